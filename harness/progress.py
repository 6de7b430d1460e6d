"""How far a running attempt is: read from the progress file its training writes.

The frozen template rewrites `pretrain/progress.json` at every log interval and evaluation
(iterations done, the run's total, the last train and val loss, recent tokens/s, training
time so far); the runners' stall watchdog reads its age, `harness logs --follow` and
`harness session status` read its content. Nothing here touches the attempt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from harness.stages.pretrain import STAGE, read_progress


@dataclass(frozen=True)
class Progress:
    iter: int
    total: int
    elapsed_s: float | None = None
    tokens_per_s: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    checkpoint_iter: int | None = None
    resumed_from: int | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.iter / self.total) if self.total > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Time left at the pace of this launch so far (training time over its iterations)."""
        done = self.iter - (self.resumed_from or 0)
        if self.elapsed_s is None or done <= 0 or self.iter <= 0:
            return None
        # elapsed_s counts every launch's training; per iteration it is the run's own pace.
        return self.elapsed_s / self.iter * max(0, self.total - self.iter)

    def fields(self) -> dict[str, str]:
        """What a progress bar shows beside the count."""
        out = {}
        if self.tokens_per_s:
            out["tok/s"] = f"{self.tokens_per_s:,.0f}"
        if self.train_loss is not None:
            out["train"] = f"{self.train_loss:.4f}"
        if self.val_loss is not None:
            out["val"] = f"{self.val_loss:.4f}"
        if self.checkpoint_iter:
            out["ckpt"] = str(self.checkpoint_iter)
        return out

    def line(self) -> str:
        """One plain line: where a terminal shows a bar, a log file shows this."""
        parts = [f"{STAGE} {self.iter}/{self.total} ({self.fraction:.1%})"]
        if self.elapsed_s is not None:
            parts.append(f"elapsed {clock(self.elapsed_s)}")
        eta = self.eta_s
        if eta is not None:
            parts.append(f"ETA {clock(eta)}")
        parts += [f"{k} {v}" for k, v in self.fields().items()]
        return ", ".join(parts)


def clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def attempt_progress(attempt_dir: Path | str) -> Progress | None:
    """The attempt's training progress, or None before the first report (or without one)."""
    data = read_progress(Path(attempt_dir) / STAGE)
    it, total = _count(data, "iter"), _count(data, "max_iters")
    if it is None or total is None:
        return None
    return Progress(iter=it, total=total, elapsed_s=_number(data, "elapsed_s"),
                    tokens_per_s=_number(data, "tokens_per_s"),
                    train_loss=_number(data, "train_loss"), val_loss=_number(data, "val_loss"),
                    checkpoint_iter=_count(data, "checkpoint_iter"),
                    resumed_from=_count(data, "resumed_from"))
