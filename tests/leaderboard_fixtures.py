"""Realistic leaderboard inputs, written by the harness's own code: result.json from
harness.attempt.Result in an AttemptPaths folder (with submission.diff and checks.json), and
agent sessions through the harness.ledger.Ledger API (charge, finish, submit)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.attempt import Prepared, Result, prepare
from harness.checks.preflight import CheckResult, PreflightReport
from harness.envinfo import environment
from harness.ledger import Ledger, SessionRow, Settlement, current_owner, now_iso
from harness.paths import AttemptPaths, atomic_write_json, atomic_write_text, new_attempt_id
from harness.paths import sha256_file as sha_file
from harness.session import new_session_id
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


def write_result(runs_dir: Path, spec: Spec) -> Path:
    """An attempt folder as harness.attempt.run_attempt leaves it; its result.json path."""
    prepared = _prepared(spec.code)
    sub = prepared.submission
    paths = AttemptPaths.create(runs_dir, new_attempt_id(spec.name, sub.sha256))
    report = _report(spec.status == "succeeded")
    atomic_write_json(paths.checks, report.to_dict())
    atomic_write_text(paths.spliced, prepared.spliced)
    atomic_write_text(paths.diff, prepared.diff)
    meta = {"name": spec.name, "agent": spec.agent, "mode": spec.mode, "model": spec.model}
    val = spec.metrics.get("val_loss", 7.0)
    stages: dict[str, Any] = {
        "pretrain": {"returncode": 0, "wall_s": 50.0, "timed_out": False,
                     "curve": curve_for(val) if spec.status == "succeeded" else [],
                     "final": {"device": "cpu", "world_size": 2, "val_loss": val,
                               "peak_memory_gb": None},
                     "stderr_tail": "", "traceback": ""}}
    if spec.status == "succeeded":
        stages["lm-eval"] = {"returncode": 0, "wall_s": 20.0, "outcome": "succeeded"}
    result = Result(
        attempt_id=paths.root.name, task={"name": TASK.name, "version": TASK.version},
        scale=spec.scale,
        submission={"name": spec.name, "kind": sub.kind, "sha256": sub.sha256,
                    "source": str(sub.source), "meta": meta},
        template_sha256=sha_file(TASK.template_path),
        spliced_sha256=sha_file(paths.spliced), status=spec.status, runner="local",
        reason=spec.reason, metrics=dict(spec.metrics), stages=stages,
        environment=_environment(), started_at=now_iso(),
        finished_at=spec.finished_at or now_iso(), preflight=report.summary())
    result.artifacts = paths.manifest()
    atomic_write_json(paths.result, asdict(result))
    return paths.result


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
            row = ledger.new_attempt(sid, current_owner(), lambda n: f"{sid}-pending-{n}")
            # harness.session names each test's submission so (Session._submission_name).
            named = replace(spec, name=f"ses-{sid.rsplit('-', 1)[-1]}-t{number}", agent=agent,
                            mode=mode, model=model or "", scale=scale)
            result = write_result(ledger.runs_dir, named)
            final_id = result.parent.name
            ledger.charge(row.id, new_id=final_id, attempt_dir=str(result.parent))
            ledger.finish(final_id, Settlement(
                status=spec.status, reason=spec.reason, metrics=spec.metrics,
                attempt_dir=str(result.parent), result_sha256=sha_file(result)))
        if submit is not None:
            ledger.submit(sid, submit)
    return sid
