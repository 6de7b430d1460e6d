"""Pre-flight, the host side: one CPU stage through the runner the operator configured.

The checks themselves (interface, low-bit, one-path, gradients, compile, ddp, numerics) and
the process that runs them live in harness.runtime.preflight, which is what the stage runs:

    python -m harness.runtime.preflight --spliced=WORK/custom_pretrain.py --work-dir=WORK ...

Here the stage is built (the spliced text written into its work folder first, that folder
its only writable mount and its working directory, no GPU, a time limit a margin above the
pre-flight's own), handed to `runner.run`, and its report read back from WORK/preflight.json.
So the submission's code runs where the operator chose: in the container, network off, with
--runner docker; on the host, as the local runner says on stderr, with --runner local.

Whatever goes wrong around the checks is ours, never the submission's: a stage that did not
start, one the runner classed `infra` (the OOM killer, a kill from outside, a daemon
failure), one our own time limit had to stop, or one that left no readable report gives a
report whose first check is `error` (exit 3, nothing charged) and the rest not run.

The report is written inside the sandbox the submission's code runs in, so that code could
forge it: that only skips a free courtesy check; it fakes no score (docs/security.md).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
from harness.runners.base import Mount, Runner, StageRun, StageSpec
from harness.runtime.preflight import (
    CHECK_IDS,
    DDP_PROCESSES,
    REPORT_FILE,
    CheckResult,
    PreflightReport,
)
from harness.runtime.procs import KILL_GRACE_S
from harness.scratch import make_scratch, remove_scratch, scratch_env
from harness.task import TaskSpec

STAGE = "preflight"
# A pre-flight that belongs to no attempt (`harness check`): nothing recovers it by name.
JOB_NAME = f"harness-{STAGE}"
ORCHESTRATOR = "harness.runtime.preflight"
# The runner's own time limit is the pre-flight's plus this: the orchestrator stops at its
# deadline and kills the worker's and then torchrun's trees (a grace each), then writes the
# report; the runner's watchdog is only the backstop for an orchestrator that hangs.
STAGE_MARGIN_S = 2 * KILL_GRACE_S + 30.0
# Its DDP check runs two ranks at once: what it leases when CPU slots are pooled.
PREFLIGHT_PROCS = DDP_PROCESSES


def full_size_shapes(task: TaskSpec) -> list[tuple[int, int]]:
    """(out, in) of each BitLinear at the task's largest scale: a size-dependent quantizer
    (float weights only where in_features is large) must fail low-bit too."""
    best: dict[str, Any] = {}
    for name in task.scale_names():
        cfg = task.scale(name).config
        if int(cfg.get("n_embd", 0)) > int(best.get("n_embd", 0)):
            best = cfg
    if not best:
        return []
    d, vocab = int(best["n_embd"]), int(best.get("vocab_size", 50304))
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (vocab, d)]


def _env(runner: Runner) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                             str(min(4, os.cpu_count() or 1)))}
    if runner.name == "local":
        # The host's Python imports harness from this checkout, wherever the stage runs
        # (the local runner passes no PYTHONPATH of its own); an image has harness installed.
        env["PYTHONPATH"] = str(Path(harness.__file__).resolve().parent.parent)
    return env


def build(task: TaskSpec, *, work_dir: Path, runner: Runner, timeout_s: float,
          memory_mb: int, checks: Sequence[str], python: str = sys.executable,
          job_name: str = JOB_NAME, cancel_file: Path | None = None) -> StageSpec:
    """The pre-flight stage for the spliced script already written into work_dir.
    job_name: `harness-<attempt id>-preflight` for a test's, so that `harness recover` finds
    its container or Slurm job when the harness that ran it died."""
    script = work_dir / task.template
    argv = [python, "-m", ORCHESTRATOR, f"--spliced={script}", f"--work-dir={work_dir}",
            f"--timeout-s={timeout_s:g}", f"--memory-mb={memory_mb}",
            *(f"--full-shape={o}x{i}" for o, i in full_size_shapes(task)),
            *(f"--check={c}" for c in checks), f"--report={work_dir / REPORT_FILE}"]
    return StageSpec(name=STAGE, argv=tuple(argv), cwd=work_dir, log_dir=work_dir,
                     timeout_s=timeout_s + STAGE_MARGIN_S,
                     env={**_env(runner), **scratch_env(work_dir)},
                     mounts=(Mount(work_dir, str(work_dir), writable=True),), gpus=0,
                     procs=PREFLIGHT_PROCS, job_name=job_name, cancel_file=cancel_file)


def _ours(checks: Sequence[str], reason: str, run: StageRun | None) -> PreflightReport:
    """A report that says only that our side failed: the first check `error`, the rest not
    run, so that the submission is neither cleared nor refused."""
    details: dict[str, Any] = {}
    if run is not None:
        details = {"stage_stderr_tail": run.stderr_tail()}
    first = checks[0]
    return PreflightReport([CheckResult(first, "error", round(run.wall_s, 3) if run else 0.0,
                                        reason, details)],
                           skipped=[c for c in checks if c != first],
                           runner=dict(run.info) if run is not None else {})


def collect(run: StageRun, work_dir: Path, checks: Sequence[str], *,
            runner_name: str = "") -> PreflightReport:
    """The report the stage wrote, or one of ours (see the module docstring)."""
    if run.cancelled:
        return _ours(checks, "the pre-flight stage was cancelled (harness cancel)", run)
    if not run.started:
        return _ours(checks, f"the pre-flight stage did not start: {run.error}", run)
    if run.infra:
        return _ours(checks, f"the pre-flight stage was stopped by {run.infra}", run)
    if run.timed_out:
        return _ours(checks, f"the pre-flight stage outlived its {run.wall_s:.0f}s limit "
                             "(its own deadline should have stopped it first)", run)
    try:
        data = json.loads((work_dir / REPORT_FILE).read_text(encoding="utf-8"))
        report = PreflightReport.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return _ours(checks, f"the pre-flight stage left no readable report (exit code "
                             f"{run.returncode}; {type(e).__name__}: {e})", run)
    report.runner = {"name": runner_name, **run.info}
    return report


def run_preflight(task: TaskSpec, spliced: str, *, runner: Runner, work_dir: Path,
                  timeout_s: float = 120, memory_mb: int = 6144,
                  checks: Sequence[str] = CHECK_IDS, job_name: str = JOB_NAME,
                  cancel_file: Path | None = None) -> PreflightReport:
    """Run the pre-flight checks (all by default) on a spliced template that passed the
    static checks, as one stage through `runner`.

    work_dir receives the script, the logs, the DDP run's files and the report; it is the
    stage's working directory and only writable mount, so the runner must be able to mount
    it: a path on the Docker host for docker, on the shared filesystem for slurm (the job
    runs on a compute node). Its compiler caches and temp files go to work_dir's scratch
    folder, removed after. job_name, cancel_file: see build."""
    unknown = sorted(set(checks) - set(CHECK_IDS))
    if unknown:
        raise ValueError(f"unknown pre-flight check(s) {unknown}; known: {CHECK_IDS}")
    wanted = [c for c in CHECK_IDS if c in checks]
    if not wanted:
        return PreflightReport()
    work_dir.mkdir(parents=True, exist_ok=True)
    work_dir = work_dir.resolve()
    (work_dir / REPORT_FILE).unlink(missing_ok=True)  # a reused work_dir must not answer
    (work_dir / task.template).write_text(spliced, encoding="utf-8")
    spec = build(task, work_dir=work_dir, runner=runner, timeout_s=timeout_s,
                 memory_mb=memory_mb, checks=wanted, job_name=job_name, cancel_file=cancel_file)
    make_scratch(work_dir)
    try:
        run = runner.run(spec)
    finally:
        remove_scratch(work_dir)
    return collect(run, work_dir, wanted, runner_name=runner.name)
