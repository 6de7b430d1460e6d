"""The stage contract: what the attempt loop asks of each stage of a task.

A stage builds one command (`build`, a runner StageSpec) from what the attempt knows so far,
and after the runner ran it, reads the files its frozen code wrote (`collect`) into a
StageOutcome. The loop in harness.attempt runs the task's stages in order, records each as a
record.StageRecord and stops at the first that does not succeed; nothing here reads stdout.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.record import Attempt, Status
from harness.runners.base import StageRun, StageSpec
from harness.task import ScaleSpec, TaskSpec


@dataclass(frozen=True)
class StageContext:
    """What every stage may build its command from."""

    task: TaskSpec
    scale: ScaleSpec
    attempt: Attempt
    data_dir: Path  # the scale's token shards
    eval_sets: Path | None = None  # the prepared eval sets, when the scale scores with lm-eval

    @property
    def script(self) -> Path:
        """The attempt's spliced template."""
        return self.attempt.file(self.task.template)


@dataclass(frozen=True)
class StageOutcome:
    """How a stage ended, judged from its files and the runner's view of its end."""

    status: Status
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    # The stage's own fields of its record (the loss curve, lm-eval's versions...).
    details: dict[str, Any] = field(default_factory=dict)


class Unresumable(Exception):
    """Why a stage cannot be continued from where it stopped (no checkpoint, a bad one)."""


class Stage(Protocol):
    name: str
    # GPUs the stage takes on a CUDA scale: None for the scale's nproc_per_node.
    gpus: int | None

    # What in the task's declarations this stage cannot run with (empty: nothing); checked
    # before an attempt is created, and by `harness validate-task`.
    def check(self, task: TaskSpec) -> list[str]: ...

    # Other folders the stage reads (mounted read-only by container runners).
    def reads(self, ctx: StageContext) -> tuple[Path, ...]: ...

    def build(self, ctx: StageContext) -> StageSpec: ...

    def collect(self, ctx: StageContext, run: StageRun, out_dir: Path) -> StageOutcome: ...

    # The command that continues the stage after a failure of ours, from its last verified
    # checkpoint; `segments` are its launches so far (their records), `used_s` their wall
    # time. Raises Unresumable (saying why, naming the file) when it cannot be continued.
    def resume(self, ctx: StageContext, segments: Sequence[dict[str, Any]],
               used_s: float) -> StageSpec: ...


def outcome(status: Status, reason: str, **details: Any) -> StageOutcome:
    """A failed stage's outcome, with its own record fields."""
    return StageOutcome(status, reason, {}, details)


def planted_file(out_dir: Path) -> str | None:
    """A rule violation's text when the stage's folder holds anything but folders and regular
    files: the frozen code writes nothing else, so a link (to another attempt's files, to the
    ledger) or a FIFO there was planted by the submission, to be followed by the host."""
    if not out_dir.is_dir() or out_dir.is_symlink():
        return None
    for root, dirs, files in os.walk(out_dir):  # links to folders are listed, never entered
        for name in sorted(dirs + files):
            path = Path(root) / name
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                continue
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            return (f"rule violation (stage-files): {path.relative_to(out_dir.parent)} is "
                    f"{kind}; the stage's frozen code writes regular files only")
    return None
