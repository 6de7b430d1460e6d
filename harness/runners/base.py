"""The runner contract: a stage command in, an outcome with a classified failure out."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol


class Outcome(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED_SUBMISSION = "failed_submission"  # the submission's fault: charged
    FAILED_INFRA = "failed_infra"  # ours: never charged


@dataclass(frozen=True)
class StageSpec:
    name: str
    argv: tuple[str, ...]
    cwd: Path
    log_dir: Path
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageRun:
    returncode: int | None  # None: never started or killed before it returned
    started: bool
    timed_out: bool
    wall_s: float
    stdout: Path
    stderr: Path
    error: str | None = None  # why it could not start

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Runner(Protocol):
    name: str

    def run(self, spec: StageSpec) -> StageRun: ...
