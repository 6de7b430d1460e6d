"""The runner contract: a stage command in, a finished run with a classified failure out.

Every runner goes through the same five steps, driven by `StagedRunner.run`:

    prepare(spec)  -> checks the runner can run it at all (image present, sbatch found...)
    launch(spec)   -> a Job (a process, a container, a Slurm job)
    poll(job)      -> None while it runs, else how it ended (Exit)
    collect(job, exit) -> the StageRun the stages read
    cleanup(job)   -> removes what launch made (containers, scripts); always runs

`run` owns the rules all runners share: the stage's time limit (our watchdog: the
submission's fault, `timed_out`), the stall watchdog (no progress for `stall_s`: ours),
cancellation through a marker file (`cancelled`, never charged), and classification of
failures that are ours (`infra`: the image is missing, the container or job could not start,
the node failed, the job was preempted, the OOM killer or someone outside the harness killed
it). The stages decide the outcome from those fields and
the files the frozen code wrote; nothing is read from stdout.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.runtime.procs import log_tail


@dataclass(frozen=True)
class Mount:
    """A host path visible inside a container at `target`; read-only unless `writable`."""

    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class StageSpec:
    name: str
    argv: tuple[str, ...]
    cwd: Path
    log_dir: Path
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    # Container runners: what the stage may see. The first writable mount is the only place
    # it may write; everything else is read-only.
    mounts: tuple[Mount, ...] = ()
    gpus: int = 0
    # Touching this file asks the run to stop: it ends `cancelled` (harness cancel).
    cancel_file: Path | None = None
    job_name: str = ""
    # The stall watchdog: a file the stage's frozen code rewrites as it makes progress. When
    # neither it nor the launch is younger than stall_s, the job is stopped as ours (a hung
    # collective, a lost rank or node): `infra`, and resumable. 0: no watchdog.
    progress_file: Path | None = None
    stall_s: float = 0.0
    # The host GPU ids leased to the stage (harness/leases.py): the runner shows it these
    # alone. (): no lease (Slurm allocates itself; no GPU pool on this host).
    devices: tuple[str, ...] = ()
    # Processes the stage runs at once: what a CPU stage leases when CPU slots are pooled.
    procs: int = 0
    # Open descriptors a stage process on this host inherits: its lease's locks, so that
    # the slots stay taken while it lives, even if the harness dies first.
    inherit_fds: tuple[int, ...] = ()
    # The template's own measured peak memory for one stage at this scale (the scale's
    # `peak_memory_gb`), 0: not measured. Only against a measured peak is a stage that outgrew
    # its memory limit judged the submission's (harness/runners/memory.py).
    memory_peak_gb: float = 0.0


@dataclass(frozen=True)
class StageRun:
    returncode: int | None  # None: never started or killed before it returned
    started: bool
    timed_out: bool
    wall_s: float
    stdout: Path
    stderr: Path
    error: str | None = None  # why it could not start
    infra: str | None = None  # a failure of ours the runner saw (OOM-kill, node failure...)
    # The stage outgrew the memory limit it was given (the submission's, charged).
    over_limit: str | None = None
    cancelled: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # job id, image digest, node...

    def stderr_tail(self, lines: int = 30) -> str:
        return log_tail(self.stderr, lines)


class Runner(Protocol):
    name: str

    def run(self, spec: StageSpec) -> StageRun: ...


class RunnerError(Exception):
    """The runner could not prepare or launch the stage: always ours (failed_infra)."""


@dataclass
class Job:
    spec: StageSpec
    handle: str  # pid, container id or Slurm job id
    started: float  # time.monotonic() at launch
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exit:
    """How a job ended, as its runner saw it."""

    returncode: int | None
    infra: str | None = None  # set when the end was not the stage's doing
    info: dict[str, Any] = field(default_factory=dict)
    over_limit: str | None = None  # killed for outgrowing its own memory limit


class StagedRunner(ABC):
    name = "staged"
    poll_s = 0.2  # first poll interval; grows by backoff up to max_poll_s
    max_poll_s = 2.0
    backoff = 1.5

    def prepare(self, spec: StageSpec) -> None:
        """Raise RunnerError when the stage cannot run here at all."""
        return None

    @abstractmethod
    def launch(self, spec: StageSpec) -> Job: ...

    @abstractmethod
    def poll(self, job: Job) -> Exit | None: ...

    @abstractmethod
    def kill(self, job: Job) -> Exit:
        """Stop the job (time limit, cancellation, Ctrl-C) and wait for its end."""

    def cleanup(self, job: Job) -> None:
        """Remove what launch made; must not raise."""
        return None

    def logs(self, spec: StageSpec) -> tuple[Path, Path]:
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        return spec.log_dir / "stdout.log", spec.log_dir / "stderr.log"

    def run(self, spec: StageSpec) -> StageRun:
        out, err = self.logs(spec)
        t0 = time.monotonic()
        try:
            self.prepare(spec)
            job = self.launch(spec)
        except RunnerError as e:
            return StageRun(None, False, False, time.monotonic() - t0, out, err, error=str(e))
        timed_out = cancelled = False
        stalled: str | None = None
        try:
            end, wait = self.poll(job), self.poll_s
            while end is None:
                if spec.cancel_file is not None and spec.cancel_file.exists():
                    cancelled, end = True, self.kill(job)
                    break
                if time.monotonic() - job.started > spec.timeout_s:
                    timed_out, end = True, self.kill(job)
                    break
                stalled = stall(spec, job)
                if stalled:
                    end = self.kill(job)
                    break
                time.sleep(wait)
                wait = min(wait * self.backoff, self.max_poll_s)
                end = self.poll(job)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM to us) or a bug: never leave the stage running.
            self.kill(job)
            self.cleanup(job)
            raise
        self.cleanup(job)
        # Our own kill is not "killed from outside": the watchdog and the cancel decide.
        infra = None if (timed_out or cancelled) else stalled or end.infra
        over = None if (timed_out or cancelled or stalled) else end.over_limit
        return StageRun(end.returncode, True, timed_out, time.monotonic() - t0, out, err,
                        infra=infra, over_limit=over, cancelled=cancelled,
                        info={**job.info, **end.info})


def stall(spec: StageSpec, job: Job) -> str | None:
    """Why the job counts as stalled (no progress for spec.stall_s), or None."""
    if not spec.stall_s or spec.progress_file is None:
        return None
    idle = time.monotonic() - job.started
    # Wall-clock age of the last write, never longer than the job has run; nothing written
    # yet: the launch is the last sign of life.
    with contextlib.suppress(OSError):
        idle = min(idle, time.time() - spec.progress_file.stat().st_mtime)
    if idle <= spec.stall_s:
        return None
    return (f"no progress for {idle:.0f}s (stall limit {spec.stall_s:.0f}s): a hung collective, "
            f"a lost rank or a lost node; stopped by the harness")
