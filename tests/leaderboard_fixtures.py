"""Realistic leaderboard inputs, written by the harness's own code: result.json through
harness.record (AttemptRecord in an Attempt folder, with submission.diff and checks.json), and
agent sessions through the harness.ledger.Ledger API (new_attempt, charge, finish, submit)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.attempt import Prepared, prepare
from harness.envinfo import environment
from harness.ledger import Ledger, SessionRow, Settlement, current_owner, now_iso
from harness.record import (
    Attempt,
    AttemptRecord,
    Origin,
    StageRecord,
    Status,
    new_attempt_id,
)
from harness.runtime.fileio import atomic_write_json, atomic_write_text
from harness.runtime.fileio import sha256_file as sha_file
from harness.runtime.preflight import CheckResult, PreflightReport
from harness.session import new_session_id, test_name
from harness.task import REPO_ROOT, TaskSpec, load_task

TASK: TaskSpec = load_task()
BASELINES = REPO_ROOT / "baselines"


@dataclass(frozen=True)
class Spec:
    """One attempt to write."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    mode: str = "vanilla"
    agent: str = "-"
    model: str = "-"
    scale: str = "smoke"
    status: str = "succeeded"
    reason: str = "ok"
    code: str = "ternary_158bit"  # the baseline whose regions the attempt "submitted"
    finished_at: str = ""


def metrics_for(val_loss: float, **others: float) -> dict[str, float]:
    """A full metric set around a val_loss, as the lm-eval stage would add to it."""
    base = {"val_loss": val_loss, "wikitext2_ppl": 20 * val_loss, "lambada_ppl": 30 * val_loss,
            "arc_easy": 40.0, "hellaswag": 30.0, "piqa": 60.0, "winogrande": 50.0}
    base.update(others)
    return base


def curve_for(val_loss: float, steps: int = 4) -> list[dict[str, Any]]:
    """metrics.jsonl rows falling to val_loss, in the template's row format."""
    return [{"step": 10 * i, "train_loss": None if i == 0 else val_loss + 3 - i,
             "val_loss": val_loss + 0.5 * (steps - 1 - i), "lr": 0.001, "tokens": 5120 * i,
             "elapsed_s": 1.0 + i} for i in range(steps)]


@functools.cache
def _prepared(code: str) -> Prepared:
    return prepare(BASELINES / code, TASK)


@functools.cache
def _environment() -> dict[str, Any]:
    return environment()


def _report(ok: bool) -> PreflightReport:
    checks = [CheckResult("interface", "pass", 0.1, "shapes ok"),
              CheckResult("low-bit", "pass" if ok else "fail", 7.0,
                          "at most 3 levels" if ok else "float weights reached a matmul")]
    return PreflightReport(checks=checks, skipped=[] if ok else ["compile", "ddp"])


def write_result(runs_dir: Path, spec: Spec, *, origin: Origin | None = None,
                 attempt_id: str | None = None) -> Path:
    """An attempt folder as harness.attempt.run_attempt leaves it; its result.json path."""
    prepared = _prepared(spec.code)
    sub = prepared.submission
    attempt = Attempt.create(runs_dir, attempt_id or new_attempt_id(spec.name, sub.sha256))
    report = _report(spec.status == "succeeded")
    atomic_write_json(attempt.checks, report.to_dict())
    atomic_write_text(attempt.file(TASK.template), prepared.spliced)
    atomic_write_text(attempt.diff, prepared.diff)
    meta = {"name": spec.name, "agent": spec.agent, "mode": spec.mode, "model": spec.model}
    status = Status(spec.status)
    val = spec.metrics.get("val_loss", 7.0)
    stages = {"pretrain": StageRecord(
        outcome=status, returncode=0, wall_s=50.0, details={
            "curve": curve_for(val) if status.ranked else [],
            "final": {"device": "cpu", "world_size": 2, "val_loss": val,
                      "peak_memory_gb": None}, "traceback": ""})}
    if status.ranked:
        stages["lm-eval"] = StageRecord(outcome=status, returncode=0, wall_s=20.0)
    record = AttemptRecord(
        attempt_id=attempt.id,
        origin=origin or Origin("baseline" if spec.mode == "baseline" else "run"),
        task={"name": TASK.name, "version": TASK.version}, scale=spec.scale,
        submission={"name": spec.name, "kind": sub.kind, "sha256": sub.sha256,
                    "source": str(sub.source), "meta": meta},
        template_sha256=sha_file(TASK.template_path),
        spliced_sha256=sha_file(attempt.file(TASK.template)), status=status, runner="local",
        reason=spec.reason, metrics=dict(spec.metrics), stages=stages,
        environment=_environment(), started_at=now_iso(),
        finished_at=spec.finished_at or now_iso(), preflight=report.summary())
    record.artifacts = attempt.manifest()
    attempt.write(record)
    return attempt.record_path


def as_schema_1(result: Path) -> None:
    """Rewrite a record as the harness wrote it before schema 2: no origin."""
    data = json.loads(result.read_text())
    del data["origin"]
    data["schema_version"] = 1
    atomic_write_json(result, data)


def ledger_session(home: Path, *, agent: str, mode: str = "agent", model: str | None = None,
                   scale: str = "smoke", tests: list[Spec], submit: int | None) -> str:
    """A session whose tests ran and settled through the Ledger API; test #submit is its
    final submission (None: nothing submitted). Returns the session id."""
    with Ledger(home) as ledger:
        sid = new_session_id()
        ledger.create_session(SessionRow(
            id=sid, task=TASK.name, task_version=TASK.version, task_root=str(TASK.root),
            template_sha256=sha_file(TASK.template_path), scale=scale, agent=agent, mode=mode,
            model=model, created_at=now_iso(), budget=max(3, len(tests))))
        for number, spec in enumerate(tests, 1):
            digest = _prepared(spec.code).submission.sha256
            name = test_name(sid, number)
            attempt_id = new_attempt_id(name, digest)
            row = ledger.new_attempt(sid, current_owner(), lambda n, a=attempt_id: a)
            named = replace(spec, name=name, agent=agent, mode=mode, model=model or "",
                            scale=scale)
            result = write_result(ledger.runs_dir, named, attempt_id=row.id,
                                  origin=Origin("session", session_id=sid, number=number))
            ledger.charge(row.id)
            ledger.finish(row.id, Settlement(
                status=Status(spec.status), reason=spec.reason, metrics=spec.metrics,
                attempt_dir=str(result.parent), result_sha256=sha_file(result)))
        if submit is not None:
            ledger.submit(sid, submit)
    return sid
