"""One attempt end to end: splice, static checks, pretrain stage, result.json.

Scores travel only in files the frozen template writes; nothing is read from stdout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import __version__
from harness.checks.preflight import PreflightReport
from harness.checks.static import RegionText, check_spliced
from harness.errors import CheckFailed, InfraError, UserError
from harness.paths import (
    AttemptPaths,
    atomic_write_json,
    atomic_write_text,
    new_attempt_id,
    sha256_bytes,
    sha256_file,
)
from harness.regions import parse_layout, splice, unified_diff
from harness.runners.base import Mount, Outcome, Runner, StageSpec
from harness.stages import lmeval, pretrain
from harness.submission import Submission, load_submission
from harness.task import ScaleSpec, TaskSpec

SCHEMA_VERSION = 1
# How far training's val_loss may lie from the eval stage's recomputation: bf16 autocast,
# a compiled model against an eager one and other batch sizes move it by ~1e-3.
CROSS_CHECK_ATOL = 0.01
CROSS_CHECK_RTOL = 0.005


@dataclass(frozen=True)
class Prepared:
    """A submission that passed splicing and the static checks."""

    submission: Submission
    spliced: str
    diff: str


def region_texts(spliced: str) -> list[RegionText]:
    layout = parse_layout(spliced, where="spliced file")
    return [RegionText(r.id, "\n".join(r.lines), layout.span(r.id)[0]) for r in layout.regions]


def prepare(submission_path: Path, task: TaskSpec) -> Prepared:
    """Load, splice and statically check; CheckFailed (exit 2) lists every finding."""
    sub = load_submission(submission_path, task)
    template = task.template_text()
    spliced = splice(template, sub.regions)
    findings = check_spliced(task, spliced, region_texts(spliced))
    if findings:
        raise CheckFailed(findings, where=str(submission_path))
    return Prepared(sub, spliced, unified_diff(template, spliced))


def preflight_or_refuse(prepared: Prepared, task: TaskSpec) -> PreflightReport:
    """Pre-flight on CPU (seconds, free): its report, or a refusal: UserError (exit 2) when
    the submission failed a check, InfraError when only our side did."""
    import tempfile

    from harness.checks.preflight import run_preflight

    with tempfile.TemporaryDirectory(prefix="harness-preflight-") as tmp:
        report = run_preflight(task, prepared.spliced, work_dir=Path(tmp))
    if report.ok:
        return report
    failed = ", ".join(c.id for c in report.failed) or ", ".join(report.skipped)
    if report.failed and all(c.status == "error" for c in report.failed):
        raise InfraError(f"pre-flight could not run ({failed}):\n{report.render()}")
    raise UserError(f"pre-flight failed: {failed}", where=str(prepared.submission.source),
                    fix="fix the submission; nothing was charged and no attempt was created",
                    details=report.render())


def data_root(explicit: Path | None = None) -> Path:
    return explicit or Path(os.environ.get("HARNESS_DATA", "data"))


def dataset_dir(scale: ScaleSpec, root: Path) -> Path:
    """The scale's token shards; the embedded smoke corpus is built on first use."""
    path = root / scale.dataset
    if scale.dataset == "smoke":
        from harness.data.smoke import prepare_smoke

        prepare_smoke(path)
        return path.resolve()
    if not (path / "manifest.json").is_file():
        raise UserError(f"no prepared dataset {scale.dataset!r} at {path}",
                        fix=f"run `harness data prepare fineweb --out {path}` or pass --data-dir")
    return path.resolve()


@dataclass
class Result:
    """result.json: one record per attempt, versioned."""

    attempt_id: str
    task: dict[str, str]
    scale: str
    submission: dict[str, Any]
    template_sha256: str
    spliced_sha256: str
    status: str
    runner: str
    schema_version: int = SCHEMA_VERSION
    harness_version: str = __version__
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, str] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    # The pre-flight that cleared the attempt, one line per check (checks.json has the
    # full report). Empty when the caller ran no pre-flight.
    preflight: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sha(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


CANCEL_FILE = "cancel_requested"


def runtime(spec: StageSpec, paths: AttemptPaths, scale: ScaleSpec, *,
            reads: tuple[Path, ...], gpus: int | None = None) -> StageSpec:
    """What every runner needs beyond the command: the stage's output folder as the one
    writable mount, the attempt and its inputs read-only (same paths inside a container),
    its GPUs, a job name carrying the attempt id, and the cancel marker."""
    mounts = (Mount(spec.log_dir, str(spec.log_dir), writable=True),
              Mount(paths.root, str(paths.root)),
              *(Mount(p, str(p)) for p in reads))
    if gpus is None:
        gpus = scale.nproc_per_node if scale.device == "cuda" else 0
    return replace(spec, mounts=mounts, gpus=gpus, cancel_file=paths.root / CANCEL_FILE,
                   job_name=f"harness-{paths.root.name}-{spec.name}")


def run_attempt(prepared: Prepared, task: TaskSpec, scale: ScaleSpec, *, runs_dir: Path,
                data: Path, runner: Runner,
                on_event: Callable[[str, dict[str, Any]], None] | None = None,
                preflight: bool = False,
                ) -> tuple[Result, AttemptPaths]:
    """on_event(kind, info): "stage_start" just before a stage launches (raising there stops
    it from launching: the ledger charges the budget at this point) and "stage_end" after.
    preflight: run the pre-flight checks first; a failure raises before the attempt exists."""
    from harness.envinfo import environment

    sub = prepared.submission
    # Resolved before the attempt exists: missing data is the user's to fix, not a crash.
    data_dir = dataset_dir(scale, data)
    # Likewise the eval sets of a scale that scores with lm-eval (smoke: built on first use).
    eval_sets = lmeval.evals_dir(scale, data) if lmeval.STAGE in scale.stages else None
    checks = preflight_or_refuse(prepared, task) if preflight else None
    paths = AttemptPaths.create(runs_dir, new_attempt_id(sub.name, sub.sha256))
    if checks is not None:
        atomic_write_json(paths.checks, checks.to_dict())
    atomic_write_text(paths.spliced, prepared.spliced)
    atomic_write_text(paths.diff, prepared.diff)
    atomic_write_json(paths.regions, {"kind": sub.kind, "source": str(sub.source),
                                      "meta": sub.meta, "regions": sub.regions})
    for name in task.frozen_files:
        if name != task.template:
            shutil.copyfile(task.root / name, paths.root / name)
    result = Result(
        attempt_id=paths.root.name, task={"name": task.name, "version": task.version},
        scale=scale.name,
        submission={"name": sub.name, "kind": sub.kind, "sha256": sub.sha256,
                    "source": str(sub.source), "meta": sub.meta},
        template_sha256=_sha(task.template_text()), spliced_sha256=_sha(prepared.spliced),
        status="running", runner=runner.name, environment=environment(), started_at=_now(),
        preflight=checks.summary() if checks is not None else {},
    )
    # The record exists before the work starts: a crash leaves a visible "running" row.
    atomic_write_json(paths.result, asdict(result))

    out_dir = paths.stage_dir(pretrain.STAGE)
    result.dataset = {"name": scale.dataset, "dir": str(data_dir),
                      "manifest_sha256": sha256_file(data_dir / "manifest.json")}
    spec = runtime(pretrain.build(scale, attempt_dir=paths.root, script=paths.spliced,
                                  data_dir=data_dir, out_dir=out_dir),
                   paths, scale, reads=(data_dir,))
    event: dict[str, Any] = {"stage": pretrain.STAGE, "attempt_id": paths.root.name,
                             "attempt_dir": str(paths.root), "log_dir": str(out_dir)}
    if on_event:
        on_event("stage_start", event)
    run = runner.run(spec)
    got = pretrain.collect(run, out_dir)
    if on_event:
        on_event("stage_end", {**event, "outcome": got.outcome.value, "wall_s": run.wall_s})
    result.status = got.outcome.value
    result.reason = got.reason
    result.metrics = got.metrics
    result.stages[pretrain.STAGE] = {
        "returncode": run.returncode, "wall_s": round(run.wall_s, 3), "timed_out": run.timed_out,
        "runner": run.info, "infra": run.infra, "cancelled": run.cancelled,
        "final": got.final, "curve": got.curve, "argv": list(spec.argv),
        "stderr_tail": run.stderr_tail() if got.outcome is not Outcome.SUCCEEDED else "",
        "traceback": got.traceback,
    }
    if eval_sets is not None and got.outcome is Outcome.SUCCEEDED:
        run_lm_eval(task, scale, paths, eval_sets, runner, result, on_event, data_dir=data_dir)
    result.finished_at = _now()
    result.artifacts = paths.manifest()
    atomic_write_json(paths.result, asdict(result))
    return result, paths


def cross_check(task: TaskSpec, trained: dict[str, float], official: dict[str, float]
                ) -> str | None:
    """Why training's own numbers disagree with the official ones recomputed by another
    stage's frozen code from the checkpoint, or None. Beyond the tolerance (bf16, compiled
    against eager, other batching) the record cannot be trusted."""
    for m in task.metrics:
        if m.scorer == m.stage or m.name not in official:
            continue
        got, ref = trained.get(m.name), official[m.name]
        if got is None or not math.isclose(got, ref, rel_tol=CROSS_CHECK_RTOL,
                                           abs_tol=CROSS_CHECK_ATOL):
            return (f"{m.name} from {m.stage} ({got}) disagrees with {m.scorer}'s recomputation "
                    f"from the checkpoint ({ref:.6g}); tolerance {CROSS_CHECK_ATOL} + "
                    f"{CROSS_CHECK_RTOL:.1%}")
    return None


def run_lm_eval(task: TaskSpec, scale: ScaleSpec, paths: AttemptPaths, evals: Path,
                runner: Runner, result: Result,
                on_event: Callable[[str, dict[str, Any]], None] | None = None, *,
                data_dir: Path | None = None) -> None:
    """The lm-eval stage on pretrain's checkpoint. It scores the lm-eval tasks and, with
    data_dir, recomputes val_loss, which must agree with training's; its metrics become the
    attempt's. A failure or a disagreement decides the attempt's status."""
    script = paths.root / lmeval.SCRIPT
    if not script.exists():  # copied with the frozen files once task.toml lists it
        shutil.copyfile(task.root / lmeval.SCRIPT, script)
    out_dir = paths.stage_dir(lmeval.STAGE)
    spec = runtime(lmeval.build(script=script, attempt_dir=paths.root,
                                checkpoint=paths.root / pretrain.STAGE / "ckpt.pt", evals=evals,
                                out_dir=out_dir, settings=lmeval.settings_for(scale),
                                timeout_s=float(scale.timeout_s), data_dir=data_dir),
                   paths, scale, reads=(evals, *((data_dir,) if data_dir else ())),
                   gpus=1 if scale.device == "cuda" else 0)
    event: dict[str, Any] = {"stage": lmeval.STAGE, "attempt_id": paths.root.name,
                             "attempt_dir": str(paths.root), "log_dir": str(out_dir)}
    if on_event:
        on_event("stage_start", event)
    run = runner.run(spec)
    expected = [m.name for m in task.metrics if m.scorer == lmeval.STAGE
                and (data_dir is not None or m.stage == lmeval.STAGE)]
    got = lmeval.collect(run, out_dir, expected)
    if on_event:
        on_event("stage_end", {**event, "outcome": got.outcome.value, "wall_s": run.wall_s})
    keep = ("lm_eval_version", "convention", "metrics", "secondary", "detail", "settings",
            "evals", "samples_sha256", "error", "val_loss", "lowbit_audit")
    result.stages[lmeval.STAGE] = {
        "returncode": run.returncode, "wall_s": round(run.wall_s, 3), "timed_out": run.timed_out,
        "runner": run.info, "infra": run.infra, "cancelled": run.cancelled,
        "argv": list(spec.argv), "outcome": got.outcome.value, "reason": got.reason,
        "stderr_tail": run.stderr_tail() if got.outcome is not Outcome.SUCCEEDED else "",
        **{k: got.report[k] for k in keep if k in got.report},
    }
    if got.outcome is not Outcome.SUCCEEDED:
        result.status, result.reason = got.outcome.value, got.reason
        return
    disagree = cross_check(task, result.metrics, got.metrics)
    if disagree:
        result.status = Outcome.RULE_VIOLATION.value
        result.reason = f"rule violation (cross-check): {disagree}"
        result.metrics = {}
        return
    # The official numbers replace training's; training's stay in its stage record.
    result.stages[pretrain.STAGE]["trained_metrics"] = dict(result.metrics)
    result.metrics.update(got.metrics)


def load_result(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
