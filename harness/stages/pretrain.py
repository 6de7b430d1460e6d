"""The pretrain stage: torchrun over the spliced template; scores come from its files."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.record import Status
from harness.runners.base import StageRun, StageSpec
from harness.runtime.fileio import read_stage_file, read_stage_json, sha256_file
from harness.runtime.launch import LAUNCH_FILE
from harness.runtime.memwatch import MEMORY_FILE
from harness.runtime.procs import outside_signal
from harness.stages.base import (
    StageContext,
    StageOutcome,
    Unresumable,
    outcome,
    planted_file,
)
from harness.task import ScaleSpec, TaskSpec

STAGE = "pretrain"
GUARD = "harness.runtime.guard"
LAUNCHER = "harness.runtime.launch"
# Parameter checksums (float64 sums) of the ranks may differ by this much, relatively.
CHECKSUM_RTOL = 1e-9
# What the frozen template writes for a resume (custom_pretrain.py, save_resume): an index
# naming the last checkpoint with its sha256, and the progress file the stall watchdog reads.
RESUME_INDEX = "resume.json"
CHECKPOINT_NAME = re.compile(r"resume-\d{7}\.pt")
PROGRESS_FILE = "progress.json"
# The template's curves: one row per evaluation, one per log interval.
METRICS_LOG = "metrics.jsonl"
TRAIN_LOG = "train_log.jsonl"
# The files one launch writes beside its outputs; a resumed launch starts without them.
SEGMENT_FILES = ("stdout.log", "stderr.log", LAUNCH_FILE, "error_rank*.json",
                 "guard_rank*.json", "violation_rank*.json", "final.json", MEMORY_FILE)
# The least time limit a resumed launch gets, however little of the stage's is left: it
# must get through start-up and the checkpoint's load to make any progress.
MIN_RESUME_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ResumePoint:
    """A verified resume checkpoint: the file, its iteration and its sha256."""

    file: Path
    iter: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file.name, "iter": self.iter, "sha256": self.sha256}


def build(scale: ScaleSpec, *, attempt_dir: Path, script: Path, data_dir: Path,
          out_dir: Path, python: str = sys.executable,
          resume: ResumePoint | None = None) -> StageSpec:
    # torchrun through harness.runtime.launch, which records how each rank ended; every rank
    # starts in the guard, which checks and audits the spliced script (harness/runtime/guard.py),
    # then runs it.
    argv = [
        python, "-m", LAUNCHER, "--standalone",
        f"--nproc_per_node={scale.nproc_per_node}", "-m", GUARD, str(script),
        *scale.cli_args(), f"--data_dir={data_dir}", f"--out_dir={out_dir}",
    ]
    if resume is not None:
        # The template re-hashes the file before it loads it: the check and the use agree.
        argv += [f"--resume_from={resume.file}", f"--resume_sha256={resume.sha256}"]
    # On CPU each process gets one thread: N processes share the machine's cores.
    env = {"OMP_NUM_THREADS": "1"} if scale.device == "cpu" else {}
    return StageSpec(name=STAGE, argv=tuple(argv), cwd=attempt_dir, log_dir=out_dir,
                     timeout_s=float(scale.timeout_s), env=env,
                     progress_file=out_dir / PROGRESS_FILE,
                     stall_s=float(scale.stall_timeout_s))


def resume_point(out_dir: Path, recorded: dict[str, Any] | None = None) -> ResumePoint:
    """The last checkpoint of the stage, verified: its index readable, the file it names
    present, whole and with the sha256 the index (and, when given, the attempt's record)
    holds for it. Unresumable says why not, naming the file; it is never half-trusted."""
    index = out_dir / RESUME_INDEX
    data = _read_json(index)
    if data is None:
        raise Unresumable(f"no resume checkpoint: {index} is missing or unreadable")
    name, it, sha, size = (data.get(k) for k in ("file", "iter", "sha256", "bytes")) \
        if isinstance(data, dict) else (None,) * 4
    if not (isinstance(name, str) and CHECKPOINT_NAME.fullmatch(name) and isinstance(it, int)
            and isinstance(sha, str) and isinstance(size, int)):
        raise Unresumable(f"{index} is not a resume index the template wrote: {data!r:.200}")
    file = out_dir / name
    if not file.is_file():
        raise Unresumable(f"{file}: the resume checkpoint {index} names is missing")
    if file.stat().st_size != size:
        raise Unresumable(f"{file}: {file.stat().st_size} bytes, {size} when written; the "
                          f"checkpoint is truncated or replaced")
    if sha256_file(file) != sha:
        raise Unresumable(f"{file}: sha256 differs from the one written with it; the "
                          f"checkpoint is corrupted or replaced")
    if recorded is not None and (recorded.get("sha256"), recorded.get("iter")) != (sha, it):
        raise Unresumable(f"{file}: not the checkpoint the attempt's record names "
                          f"(iteration {recorded.get('iter')}, sha256 "
                          f"{str(recorded.get('sha256'))[:12]}...)")
    return ResumePoint(file, it, sha)


def archive_segment(out_dir: Path, number: int) -> Path:
    """Move the files of launch `number` aside (segment-N/), so that the next launch is judged
    on its own files while the earlier ones stay in the attempt."""
    dest = out_dir / f"segment-{number}"
    dest.mkdir(exist_ok=True)
    for pattern in SEGMENT_FILES:
        for p in out_dir.glob(pattern):
            shutil.move(str(p), dest / p.name)
    return dest


def read_progress(out_dir: Path) -> dict[str, Any]:
    """The template's progress file (iteration, losses, tokens/s, elapsed), or {}."""
    data = _read_json(out_dir / PROGRESS_FILE)
    return data if isinstance(data, dict) else {}


class PretrainStage:
    """The stage the attempt loop runs (harness.stages.base.Stage)."""

    name = STAGE
    gpus: int | None = None  # the scale's nproc_per_node

    def check(self, task: TaskSpec) -> list[str]:
        return []  # the template's own checks are harness validate-task's

    def reads(self, ctx: StageContext) -> tuple[Path, ...]:
        return (ctx.data_dir,)

    def build(self, ctx: StageContext) -> StageSpec:
        return build(ctx.scale, attempt_dir=ctx.attempt.root, script=ctx.script,
                     data_dir=ctx.data_dir, out_dir=ctx.attempt.stage_dir(STAGE))

    def collect(self, ctx: StageContext, run: StageRun, out_dir: Path) -> StageOutcome:
        return collect(run, out_dir, [m.name for m in ctx.task.metrics if m.stage == STAGE])

    def resume(self, ctx: StageContext, segments: Sequence[dict[str, Any]],
               used_s: float) -> StageSpec:
        out_dir = ctx.attempt.stage_dir(STAGE)
        recorded = segments[-1].get("checkpoint") if segments else None
        point = resume_point(out_dir, recorded if isinstance(recorded, dict) else None)
        archive_segment(out_dir, len(segments))
        spec = build(ctx.scale, attempt_dir=ctx.attempt.root, script=ctx.script,
                     data_dir=ctx.data_dir, out_dir=out_dir, resume=point)
        # The stage's time limit covers all its launches: a resume gets what is left.
        return replace(spec, timeout_s=max(spec.timeout_s - used_s, MIN_RESUME_TIMEOUT_S))


def _read_json(path: Path) -> Any:
    return read_stage_json(path)  # never through a link the stage left (fileio)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a log the template appends to, up to a torn last line (a killed run, or
    one being written now); [] when there is none yet."""
    rows: list[dict[str, Any]] = []
    data = read_stage_file(path)
    try:
        text = "" if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            break
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_curve(out_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(out_dir / METRICS_LOG)


def rank_records(out_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The readable <kind>_rank<R>.json records of the ranks, in rank order."""
    found = [_read_json(p) for p in sorted(out_dir.glob(f"{kind}_rank*.json"))]
    return [r for r in found if isinstance(r, dict)]


def frozen_errors(out_dir: Path) -> list[dict[str, Any]]:
    """Refusals the frozen template recorded itself (bad scale config or data)."""
    return rank_records(out_dir, "error")


def violations(out_dir: Path) -> list[dict[str, Any]]:
    """Rule violations the guard recorded (harness/runtime/guard.py), one per rank that saw
    one."""
    return rank_records(out_dir, "violation")


def rank_divergence(final: dict[str, Any]) -> str | None:
    """DDP leaves every rank with bitwise the same parameters; a submission that behaves
    differently on some rank (in-place updates, rank-dependent randomness) does not."""
    sums = final.get("rank_param_checksums")
    if not isinstance(sums, list) or not sums:
        return "final.json has no per-rank parameter checksums"
    ref = sums[0]
    if not all(isinstance(c, int | float) and math.isfinite(c) for c in sums):
        return f"non-finite parameter checksums per rank: {sums}"
    if any(abs(c - ref) > CHECKSUM_RTOL * max(1.0, abs(ref)) for c in sums):
        return f"ranks ended with different parameters (checksums {sums})"
    return None


def killed_rank(out_dir: Path) -> str | None:
    """Why the run's failure was a kill from outside, from the launcher's record, or None.
    SIGKILL of any rank counts (torchrun only ever sends SIGTERM); another signal counts when
    it hit the rank that failed first."""
    record = _read_json(out_dir / LAUNCH_FILE)
    if not isinstance(record, dict) or not isinstance(record.get("failures"), dict):
        return None
    codes = {rank: f.get("exitcode") for rank, f in record["failures"].items()
             if isinstance(f, dict) and isinstance(f.get("exitcode"), int)}
    for rank, code in sorted(codes.items()):
        if code == -9:
            return f"rank {rank} was killed by SIGKILL (the out-of-memory killer or an operator)"
    first = str(record.get("first"))
    code = codes.get(first)
    # The code running in a rank cannot send these (the static rules refuse os and signal).
    name = outside_signal(code)
    if name is not None:
        return f"rank {first} was killed by {name} from outside the harness"
    return None


def _first_failed(out_dir: Path) -> str | None:
    record = _read_json(out_dir / LAUNCH_FILE)
    first = record.get("first") if isinstance(record, dict) else None
    return str(first) if isinstance(first, (str, int)) and str(first).isdigit() else None


def teardown_crash(out_dir: Path) -> str | None:
    """Why the launch counts as having crashed after the run was complete, or None: the
    template wrote final.json with every rank's checksum, then a rank died of a signal on its
    way out (seen: SIGABRT from gloo's teardown under load). Ours, and resumed from the last
    checkpoint, so that every rank's end-of-run checks run again."""
    record = _read_json(out_dir / LAUNCH_FILE)
    final = _read_json(out_dir / "final.json")
    if not isinstance(record, dict) or not isinstance(record.get("failures"), dict) \
            or not isinstance(final, dict):
        return None
    sums = final.get("rank_param_checksums")
    if not isinstance(sums, list) or len(sums) != final.get("world_size"):
        return None
    failures = record["failures"].items()
    codes: dict[str, int] = {rank: f["exitcode"] for rank, f in failures
                             if isinstance(f, dict) and isinstance(f.get("exitcode"), int)}
    if not codes or len(codes) != len(failures) or any(c >= 0 for c in codes.values()):
        return None  # a rank that exited with a code of its own: not a teardown crash
    ranks = ", ".join(f"rank {r} by {_signal_name(-c)}" for r, c in sorted(codes.items()))
    return (f"the run was complete (final.json written) when a process died at teardown "
            f"({ranks}): a crash of ours, resumed from the last checkpoint")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def collect(run: StageRun, out_dir: Path, metrics: Sequence[str] = ()) -> StageOutcome:
    """The stage's outcome and its metrics (the task's metrics of this stage, from the
    final.json frozen code wrote); its record keeps the loss curve (and final.json, the
    submission's traceback) beside the runner's fields."""
    got = _judge(run, out_dir, metrics)
    progress = read_progress(out_dir)
    index = _read_json(out_dir / RESUME_INDEX)
    checkpoint = {k: index.get(k) for k in ("file", "iter", "sha256")} \
        if isinstance(index, dict) else None
    details = {"curve": read_curve(out_dir), "final": got.details.get("final", {}),
               "traceback": got.details.get("traceback", ""),
               # This launch's part, for the attempt's list of segments.
               "segment": {"from_iter": progress.get("resumed_from") or 0,
                           "last_iter": progress.get("iter"), "checkpoint": checkpoint}}
    return StageOutcome(got.status, got.reason, got.metrics, details)


def _judge(run: StageRun, out_dir: Path, metrics: Sequence[str]) -> StageOutcome:
    if not run.started:
        return outcome(Status.FAILED_INFRA, run.error or "stage did not start")
    if run.cancelled:
        return outcome(Status.CANCELLED, "cancelled through the harness")
    planted = planted_file(out_dir)
    if planted:
        return outcome(Status.RULE_VIOLATION, planted)
    found = violations(out_dir)
    if found:
        # Before infra and the ranks' error files: the violation is why the run stopped.
        v = found[0]
        return outcome(Status.RULE_VIOLATION, f"rule violation ({v.get('rule')}, rank "
                                              f"{v.get('rank')}): {v.get('message')}")
    errors = frozen_errors(out_dir)
    blew_up = [e for e in errors if e.get("kind") == "diverged"]
    if blew_up:
        # The frozen watchdog saw the loss leave its bounds; the other ranks' ends follow.
        return outcome(Status.FAILED_SUBMISSION, str(blew_up[0].get("message")))
    if run.over_limit:
        # Before the ranks' error files: the survivors of a killed rank record collective
        # errors; the kill itself is what ended the run.
        return outcome(Status.FAILED_SUBMISSION, f"out of memory: {run.over_limit}")
    if run.infra:
        # Before the template's own error files: when the OOM killer or a node failure takes
        # one rank, the others record collective errors that are not the submission's fault.
        return outcome(Status.FAILED_INFRA, run.infra)
    killed = killed_rank(out_dir) or teardown_crash(out_dir)
    if killed:
        return outcome(Status.FAILED_INFRA, killed)
    ours = [e for e in errors if e.get("kind") in ("config", "data", "resume")]
    if ours:
        # The template refused our own inputs: the submission never ran, so never charge it.
        return outcome(Status.FAILED_INFRA, f"{ours[0]['kind']} error: {ours[0].get('message')}")
    if not run.timed_out and run.returncode not in (0, None) \
            and not rank_records(out_dir, "guard"):
        # No rank reached the point where the submission is imported: the launcher, torchrun
        # or the guard itself failed (harness not installed in the image, say).
        return outcome(Status.FAILED_INFRA, f"the stage failed before the submission ran (exit "
                                            f"code {run.returncode}; see the stage's stderr)")
    if errors:
        # The rank that failed first (torchrun's record) raised the error; the others then
        # record the collective it left ("Connection closed by peer"), whatever their rank.
        first = _read_json(out_dir / f"error_rank{_first_failed(out_dir)}.json")
        error = first if isinstance(first, dict) else errors[0]
        message = str(error.get("message", "")).rstrip()
        return outcome(Status.FAILED_SUBMISSION, "training raised: "
                       f"{message.splitlines()[-1] if message else '?'}", traceback=message)
    if run.timed_out:
        return outcome(Status.FAILED_SUBMISSION, f"time limit reached after {run.wall_s:.0f}s")
    if run.returncode != 0:
        return outcome(Status.FAILED_SUBMISSION, f"training exited with code {run.returncode}")
    final = _read_json(out_dir / "final.json")
    if not isinstance(final, dict):
        return outcome(Status.FAILED_INFRA, "training exited 0 without final.json")
    for name in metrics:
        val = final.get(name)
        if not isinstance(val, (int, float)) or not math.isfinite(val):
            return outcome(Status.FAILED_SUBMISSION, f"{name} is not finite ({val})",
                           final=final)
    diverged = rank_divergence(final)
    if diverged:
        return outcome(Status.RULE_VIOLATION, f"rule violation (ranks): {diverged}", final=final)
    return StageOutcome(Status.SUCCEEDED, "ok", {m: float(final[m]) for m in metrics},
                        {"final": final})
