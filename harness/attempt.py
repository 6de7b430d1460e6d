"""One attempt end to end: splice and static checks, the pre-flight, then the task's stages
through a runner, each recorded in the attempt's result.json (harness.record).

The caller allocates the attempt (record.Attempt.create: its id and folder, once) and says
where it came from (record.Origin); `run_attempt` writes the record before the first stage
starts and closes it after the last. Scores travel only in files the frozen code writes;
nothing is read from stdout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import __version__
from harness.checks.static import RegionText, check_spliced
from harness.errors import CheckFailed, InfraError, UserError
from harness.record import (
    Attempt,
    AttemptRecord,
    Origin,
    RecordError,
    StageRecord,
    Status,
    new_attempt_id,
    now_iso,
)
from harness.regions import splice, unified_diff
from harness.runners.base import Mount, Runner, StageRun, StageSpec
from harness.runners.config import load_config
from harness.runtime.fileio import atomic_write_json, atomic_write_text, sha256_bytes, sha256_file
from harness.runtime.layout import parse_layout
from harness.runtime.preflight import PreflightReport
from harness.scratch import make_scratch, remove_scratch, scratch_env
from harness.stages.base import Stage, StageContext, StageOutcome, Unresumable
from harness.stages.lmeval import LmEvalStage, evals_dir
from harness.stages.pretrain import PretrainStage
from harness.submission import Submission, load_submission
from harness.task import ScaleSpec, TaskSpec

# How far training's val_loss may lie from the eval stage's recomputation: bf16 autocast,
# a compiled model against an eager one and other batch sizes move it by ~1e-3.
CROSS_CHECK_ATOL = 0.01
CROSS_CHECK_RTOL = 0.005
DATA_ENV = "HARNESS_DATA"
# The catalogue of stages a task may list (task.toml `stages`), by name.
STAGES: dict[str, Stage] = {s.name: s for s in (PretrainStage(), LmEvalStage())}

Hook = Callable[[str, dict[str, Any]], None]
PLAIN_RUN = Origin("run")


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


def preflight_or_refuse(prepared: Prepared, task: TaskSpec, runner: Runner, *,
                        work_root: Path | None = None,
                        attempt: Attempt | None = None) -> PreflightReport:
    """Pre-flight through the runner (a CPU stage, free): its report, or a refusal: UserError
    (exit 2) when the submission failed a check, InfraError when only our side did.

    attempt: a test's pre-flight runs in the test's own folder (its `preflight/`, kept and
    hashed into the record), named `harness-<attempt id>-preflight` and stopped by the test's
    cancel marker, so that recover and cancel find it as they find the test's other stages.
    work_root: otherwise, where a temporary folder for it goes (a runner must be able to
    mount it)."""
    import tempfile

    from harness.checks.preflight import STAGE, run_preflight

    if attempt is not None:
        report = run_preflight(task, prepared.spliced, runner=runner,
                               work_dir=attempt.stage_dir(STAGE),
                               job_name=f"harness-{attempt.id}-{STAGE}",
                               cancel_file=attempt.cancel_file)
    else:
        if work_root is None:
            raise ValueError("preflight_or_refuse needs an attempt or a work_root")
        work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".preflight-", dir=work_root) as tmp:
            report = run_preflight(task, prepared.spliced, runner=runner, work_dir=Path(tmp))
    if report.ok:
        return report
    failed = ", ".join(c.id for c in report.failed) or ", ".join(report.skipped)
    if report.failed and all(c.status == "error" for c in report.failed):
        raise InfraError(f"pre-flight could not run ({failed}):\n{report.render()}")
    raise UserError(f"pre-flight failed: {failed}", where=str(prepared.submission.source),
                    fix="fix the submission; nothing was charged and no attempt was created",
                    details=report.render())


def data_root(explicit: Path | None = None, *, home: Path | None = None) -> Path:
    """--data-dir, else $HARNESS_DATA, else <home>/data for a session's home (independent of
    the working directory), else ./data."""
    env = os.environ.get(DATA_ENV)
    return explicit or (Path(env) if env else home / "data" if home else Path("data"))


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


def stages_of(task: TaskSpec, scale: ScaleSpec) -> list[Stage]:
    """The task's stages that the scale runs, in the task's order."""
    unknown = [s for s in task.stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}", where=str(task.root),
                        fix=f"stages this harness runs: {', '.join(STAGES)}")
    stages = [STAGES[s] for s in task.stages if s in scale.stages]
    problems = [p for stage in stages for p in stage.check(task)]
    if problems:
        raise UserError(f"the task's declarations do not fit its stages: {'; '.join(problems)}",
                        where=str(task.root / "task.toml"),
                        fix="`harness validate-task` lists every problem of the task")
    return stages


def new_attempt(runs_dir: Path, prepared: Prepared) -> Attempt:
    """A fresh attempt folder for a prepared submission (`harness run`, `harness baselines`)."""
    sub = prepared.submission
    return Attempt.create(runs_dir, new_attempt_id(sub.name, sub.sha256))


def runtime(spec: StageSpec, attempt: Attempt, scale: ScaleSpec, *,
            reads: Sequence[Path], gpus: int | None = None) -> StageSpec:
    """What every runner needs beyond the command: the stage's output folder as the one
    writable mount, the attempt and its inputs read-only (same paths inside a container),
    its GPUs, a job name carrying the attempt id, and the cancel marker."""
    mounts = (Mount(spec.log_dir, str(spec.log_dir), writable=True),
              Mount(attempt.root, str(attempt.root)),
              *(Mount(p, str(p)) for p in dict.fromkeys(reads)))
    procs = scale.nproc_per_node if gpus is None else gpus
    make_scratch(spec.log_dir)
    spec = replace(spec, env={**spec.env, **scratch_env(spec.log_dir)})
    if scale.device != "cuda":
        gpus = 0
    elif gpus is None:
        gpus = scale.nproc_per_node
    return replace(spec, mounts=mounts, gpus=gpus, procs=procs, cancel_file=attempt.cancel_file,
                   job_name=f"harness-{attempt.id}-{spec.name}",
                   memory_peak_gb=scale.peak_memory_gb)


def _write_inputs(attempt: Attempt, prepared: Prepared, task: TaskSpec,
                  checks: PreflightReport | None) -> None:
    sub = prepared.submission
    if checks is not None:
        atomic_write_json(attempt.checks, checks.to_dict())
    atomic_write_text(attempt.file(task.template), prepared.spliced)
    atomic_write_text(attempt.diff, prepared.diff)
    atomic_write_json(attempt.regions, {"kind": sub.kind, "source": str(sub.source),
                                        "meta": sub.meta, "regions": sub.regions})
    for name in task.frozen_files:
        if name != task.template:
            shutil.copyfile(task.root / name, attempt.file(name))


def submission_info(sub: Submission) -> dict[str, Any]:
    """What a record says of its submission."""
    return {"name": sub.name, "kind": sub.kind, "sha256": sub.sha256, "source": str(sub.source),
            "meta": sub.meta}


def new_record(attempt: Attempt, origin: Origin, task: TaskSpec, scale: ScaleSpec, *,
               submission: dict[str, Any], spliced: str, runner: str,
               status: Status = Status.RUNNING, preflight: dict[str, Any] | None = None,
               started_at: str | None = None) -> AttemptRecord:
    """The record of an attempt about to run (or refused before it ran)."""
    from harness.envinfo import environment

    return AttemptRecord(
        attempt_id=attempt.id, origin=origin, task={"name": task.name, "version": task.version},
        scale=scale.name, submission=submission,
        template_sha256=sha256_bytes(task.template_text().encode("utf-8")),
        spliced_sha256=sha256_bytes(spliced.encode("utf-8")), status=status, runner=runner,
        harness_version=__version__, environment=environment(),
        started_at=started_at or now_iso(), preflight=preflight or {}, seeds=scale.seeds())


def run_attempt(prepared: Prepared, task: TaskSpec, scale: ScaleSpec, *, attempt: Attempt,
                origin: Origin, data: Path, runner: Runner, on_event: Hook | None = None,
                checks: PreflightReport | None = None,
                retries: int | None = None) -> AttemptRecord:
    """Run the task's stages on a prepared submission in `attempt`, recording each.

    on_event(kind, info): "stage_start" just before a stage launches (raising there stops
    it from launching: the ledger charges the budget at this point), "stage_resume" before
    a stage is relaunched from its checkpoint, and "stage_end" after.
    checks: the pre-flight report that cleared it, kept in checks.json and the record.
    retries: how many times a stage stopped by a failure of ours is resumed (None: the
    configured `[runner] resume_retries`)."""
    if retries is None:
        retries = load_config().resume_retries
    # Resolved before the record exists: missing data is the user's to fix, not a crash.
    data_dir = dataset_dir(scale, data)
    stages = stages_of(task, scale)
    eval_sets = evals_dir(scale, data) if any(s.name == LmEvalStage.name for s in stages) \
        else None
    _write_inputs(attempt, prepared, task, checks)
    record = new_record(attempt, origin, task, scale, spliced=prepared.spliced,
                        submission=submission_info(prepared.submission), runner=runner.name,
                        preflight=checks.summary() if checks is not None else None)
    record.dataset = {"name": scale.dataset, "dir": str(data_dir),
                      "manifest_sha256": sha256_file(data_dir / "manifest.json")}
    # The record exists before the work starts: a crash leaves a visible "running" one.
    attempt.write(record)
    ctx = StageContext(task, scale, attempt, data_dir, eval_sets)
    status, reason = _run_stages(stages, ctx, runner, record, on_event, retries)
    attempt.close(record, status, reason)
    return record


def _run_stages(stages: Sequence[Stage], ctx: StageContext, runner: Runner,
                record: AttemptRecord, on_event: Hook | None, retries: int, *,
                resume: tuple[str, StageSpec] | None = None) -> tuple[Status, str]:
    """The stages in order, each recorded, up to the first that does not succeed; the
    attempt's status and reason. resume: (stage, its continuing command) for `harness
    resume`: the stages before it stand as they succeeded, it continues, the rest run."""
    status, reason = Status.SUCCEEDED, "ok"
    record.metrics = {}
    for stage in stages:
        before = record.stages.get(stage.name)
        if resume is not None and stage.name != resume[0] and before is not None:
            got = StageOutcome(before.outcome, before.reason,
                               dict(before.details.get("stage_metrics") or {}))
        else:
            first = resume[1] if resume is not None else None
            got = _run_stage(stage, ctx, runner, record, on_event, retries, first=first)
            resume = None
        status, reason = got.status, got.reason
        if got.status is not Status.SUCCEEDED:
            break
        disagree = _merge_metrics(ctx.task, record, stage.name, got.metrics)
        if disagree:
            status, reason = Status.RULE_VIOLATION, f"rule violation (cross-check): {disagree}"
            break
    if status is not Status.SUCCEEDED:
        record.metrics = {}
    return status, reason


def run_submission(prepared: Prepared, task: TaskSpec, scale: ScaleSpec, *, runs_dir: Path,
                   data: Path, runner: Runner, origin: Origin = PLAIN_RUN,
                   preflight: bool = False, on_event: Hook | None = None
                   ) -> tuple[AttemptRecord, Attempt]:
    """A plain attempt outside sessions (`harness run`, `harness baselines`): the pre-flight
    first when asked (a refusal raises before any attempt exists), then a new attempt folder
    and its stages."""
    # A task its stages cannot run, or missing data, is refused before the pre-flight
    # spends its minute.
    stages_of(task, scale)
    dataset_dir(scale, data)
    checks = preflight_or_refuse(prepared, task, runner, work_root=runs_dir) if preflight \
        else None
    attempt = new_attempt(runs_dir, prepared)
    record = run_attempt(prepared, task, scale, attempt=attempt, origin=origin, data=data,
                         runner=runner, on_event=on_event, checks=checks)
    return record, attempt


def _run_stage(stage: Stage, ctx: StageContext, runner: Runner, record: AttemptRecord,
               on_event: Hook | None, retries: int, *,
               first: StageSpec | None = None) -> StageOutcome:
    """One stage: launch through the runner, judge its files, record it. A failure of ours
    (a killed rank, a lost node, a stall) is resumed from the stage's last checkpoint up to
    `retries` times: the same stage of the same attempt, charged once (one stage_start).
    first: the command continuing the stage's recorded segments (`harness resume`)."""
    segments = list(record.stages[stage.name].segments) if first is not None else []
    spec = runtime(first or stage.build(ctx), ctx.attempt, ctx.scale, reads=stage.reads(ctx),
                   gpus=stage.gpus)
    event: dict[str, Any] = {"stage": stage.name, "attempt_id": ctx.attempt.id,
                             "attempt_dir": str(ctx.attempt.root), "log_dir": str(spec.log_dir)}
    if on_event and first is None:
        on_event("stage_start", event)
    elif on_event:
        on_event("stage_resume", {**event, "segment": len(segments) + 1})
    retries += len(segments)
    while True:
        started = now_iso()
        try:
            run = runner.run(spec)
        finally:
            remove_scratch(spec.log_dir)
        got = stage.collect(ctx, run, spec.log_dir)
        segments.append(segment(run, got, started))
        record.stages[stage.name] = stage_record(spec, run, got, segments)
        if got.status is not Status.FAILED_INFRA or len(segments) > retries:
            break
        try:
            spec = runtime(stage.resume(ctx, segments, _used_s(segments)),
                           ctx.attempt, ctx.scale, reads=stage.reads(ctx), gpus=stage.gpus)
        except Unresumable as e:
            segments[-1]["not_resumed"] = str(e)
            break
        # The record shows the stopped launch while the next one runs.
        ctx.attempt.write(record)
        if on_event:
            on_event("stage_resume", {**event, "segment": len(segments) + 1})
    if on_event:
        on_event("stage_end", {**event, "outcome": got.status.value, "wall_s": run.wall_s})
    return got


def _used_s(segments: Sequence[dict[str, Any]]) -> float:
    return float(sum(s.get("wall_s") or 0.0 for s in segments))


def segment(run: StageRun, got: StageOutcome, started: str) -> dict[str, Any]:
    """One launch of a stage, for its record's list of segments."""
    return {"started_at": started, "ended_at": now_iso(),
            "host": str(run.info.get("node") or socket.gethostname()),
            "outcome": got.status.value, "reason": got.reason, "wall_s": round(run.wall_s, 3),
            **({"lease": run.info["lease"]} if "lease" in run.info else {}),
            **got.details.get("segment", {})}


def stage_record(spec: StageSpec, run: StageRun, got: StageOutcome,
                 segments: Sequence[dict[str, Any]] = ()) -> StageRecord:
    details = {k: v for k, v in got.details.items() if k != "segment"}
    details["stage_metrics"] = dict(got.metrics)  # its own scores, kept for a resume
    return StageRecord(
        outcome=got.status, reason=got.reason, returncode=run.returncode,
        wall_s=round(_used_s(segments) if segments else run.wall_s, 3),
        timed_out=run.timed_out, infra=run.infra,
        cancelled=run.cancelled, runner=dict(run.info), argv=list(spec.argv),
        stderr_tail=run.stderr_tail() if got.status is not Status.SUCCEEDED else "",
        details=details, segments=list(segments))


def _merge_metrics(task: TaskSpec, record: AttemptRecord, stage: str,
                   metrics: dict[str, float]) -> str | None:
    """A stage's metrics become the attempt's. Where the task says another stage's frozen code
    computes a metric's official value (`scored_by`), training's own number must agree with
    it first; training's numbers then stay in its stage record. Why they disagree, or None."""
    official = [m for m in task.metrics
                if m.scorer == stage and m.stage != stage and m.name in metrics]
    disagree = cross_check(task, record.metrics, {m.name: metrics[m.name] for m in official})
    if disagree:
        return disagree
    for owner in dict.fromkeys(m.stage for m in official):
        record.stages[owner].details["trained_metrics"] = dict(record.metrics)
    record.metrics.update(metrics)
    return None


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


# --- `harness resume`: an attempt stopped by a failure of ours, continued ------------------


def verify_unchanged(attempt: Attempt, task: TaskSpec) -> AttemptRecord:
    """The attempt's record, after showing that what it ran is what it would run now: the
    task's template, the spliced script, the submission's regions and the frozen copies.
    UserError (exit 2) naming what differs; nothing is changed."""
    try:
        record = attempt.read()
    except OSError:
        raise UserError("no attempt record here", where=str(attempt.record_path),
                        fix="pass an attempt id (its folder under the runs directory) or its "
                            "folder") from None
    except RecordError as e:
        raise UserError(f"the attempt's record cannot be read: {e}",
                        where=str(attempt.record_path)) from None
    if record.status is not Status.FAILED_INFRA:
        state = ("is still running" if not record.status.finished
                 else f"ended {record.status.value}: {record.reason}")
        raise UserError(f"attempt {attempt.id} {state}", where=str(attempt.record_path),
                        fix="if its process is gone, run `harness recover` first"
                        if not record.status.finished else
                        "only an attempt stopped by a failure of ours (failed_infra) resumes; "
                        "run the submission again as a new attempt")
    where = str(attempt.root)
    template = task.template_text()
    if record.task.get("name") != task.name:
        raise UserError(f"attempt {attempt.id} belongs to task {record.task.get('name')!r}",
                        where=where, fix=f"pass --task {record.task.get('name')}")
    if sha256_bytes(template.encode("utf-8")) != record.template_sha256:
        raise UserError("the task's template changed since the attempt ran", where=where,
                        fix="a resumed test must run the same frozen code: run it again as a "
                            "new attempt")
    try:
        spliced = attempt.file(task.template).read_text(encoding="utf-8")
        regions = json.loads(attempt.regions.read_text(encoding="utf-8"))["regions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the attempt's inputs cannot be read: {e}", where=where) from None
    digest = sha256_bytes(json.dumps(regions, sort_keys=True).encode("utf-8"))
    problems = [
        what for what, bad in (
            ("the spliced script differs from the one recorded",
             sha256_bytes(spliced.encode("utf-8")) != record.spliced_sha256),
            ("the submission's regions differ from the recorded submission",
             digest != record.submission.get("sha256")),
            ("the spliced script is not the template with the submission's regions",
             _splice_or_none(template, regions) != spliced),
        ) if bad]
    problems += [f"{name} differs from the task's frozen copy" for name in task.frozen_files
                 if name != task.template and _read_or_none(attempt.file(name))
                 != _read_or_none(task.root / name)]
    if problems:
        raise UserError(f"attempt {attempt.id} cannot be resumed: {'; '.join(problems)}",
                        where=where, fix="its files were changed after it ran; nothing was "
                                         "resumed (run the submission again as a new attempt)")
    return record


def _splice_or_none(template: str, regions: Any) -> str | None:
    try:
        return splice(template, dict(regions))
    except (UserError, TypeError, ValueError):
        return None


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def resume_plan(attempt: Attempt, task: TaskSpec, *, data: Path
                ) -> tuple[AttemptRecord, StageContext, list[Stage], Stage]:
    """Everything a resume needs, checked before anything changes: the verified record, the
    stage context, the stages and the one that stopped. UserError when it cannot resume."""
    record = verify_unchanged(attempt, task)
    # The seeds it ran with, which need not be the scale's own (seed k of several).
    scale = task.scale(record.scale).with_seeds(record.seeds)
    data_dir = dataset_dir(scale, data)
    if sha256_file(data_dir / "manifest.json") != record.dataset.get("manifest_sha256"):
        raise UserError("the dataset's manifest differs from the one the attempt trained on",
                        where=str(data_dir), fix="pass the --data-dir the attempt ran with")
    stages = stages_of(task, scale)
    stopped = next((s for s in stages if s.name in record.stages
                    and record.stages[s.name].outcome is not Status.SUCCEEDED), None)
    if stopped is None:
        raise UserError(f"attempt {attempt.id} has no stage stopped by a failure of ours",
                        where=str(attempt.record_path), fix="run the submission again")
    eval_sets = evals_dir(scale, data) if any(s.name == LmEvalStage.name for s in stages) \
        else None
    return record, StageContext(task, scale, attempt, data_dir, eval_sets), stages, stopped


def resume_attempt(attempt: Attempt, task: TaskSpec, *, data: Path, runner: Runner,
                   on_event: Hook | None = None, retries: int | None = None,
                   before_start: Callable[[AttemptRecord], None] | None = None
                   ) -> AttemptRecord:
    """Continue an attempt stopped by a failure of ours from its last verified checkpoint,
    as the same attempt: its record reopened, the stopped stage's segments continued, the
    later stages run, the record closed. UserError, with nothing changed, when the
    attempt's inputs or checkpoint do not verify. before_start(record): called once all is
    verified, before the record is reopened (the ledger re-charges a session's test there)."""
    if retries is None:
        retries = load_config().resume_retries
    record, ctx, stages, stopped = resume_plan(attempt, task, data=data)
    before = record.stages[stopped.name]
    try:
        first = stopped.resume(ctx, before.segments, _used_s(before.segments))
    except Unresumable as e:
        raise UserError(f"attempt {attempt.id} cannot be resumed: {e}",
                        where=str(attempt.record_path),
                        fix="run the submission again as a new attempt") from None
    if before_start is not None:
        before_start(record)
    record.status, record.reason, record.finished_at, record.runner = \
        Status.RUNNING, "", None, runner.name
    attempt.write(record)
    status, reason = _run_stages(stages, ctx, runner, record, on_event, retries,
                                 resume=(stopped.name, first))
    attempt.close(record, status, reason)
    return record
