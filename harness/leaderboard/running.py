"""Attempts still in progress, as the page shows them: how far each is, and its curves so far.

Read from the attempt's folder as it is at the time of the build: `progress.json` and the
template's logs (`train_log.jsonl`, `metrics.jsonl`). The training process writes them, and
the submission's code runs in that process, so nothing read here is a score: running attempts
are shown beside the tables, never ranked, and a finished attempt's numbers come only from its
settled record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.leaderboard.board import NO_LABEL, RunningAttempt
from harness.ledger import AttemptRow, SessionRow
from harness.progress import attempt_progress
from harness.record import AttemptRecord
from harness.stages.pretrain import STAGE, TRAIN_LOG, read_curve, read_jsonl

# A curve of more points than this is thinned evenly (its last point always kept): a 13,535-
# iteration run logs over a thousand train losses, far more than a plot of this size shows.
MAX_POINTS = 400


def thin(points: list[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def _points(rows: Iterable[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        step, value = row.get("step"), row.get(key)
        if isinstance(step, int) and not isinstance(step, bool) \
                and isinstance(value, int | float) and math.isfinite(value):
            out.append((step, float(value)))
    return out


def running_of(attempt_dir: Path, *, attempt_id: str, name: str, task: str, scale: str,
               status: str, started_at: str) -> RunningAttempt:
    """What the page shows of one attempt in progress, read from its folder now."""
    stage = attempt_dir / STAGE
    progress = attempt_progress(attempt_dir)
    return RunningAttempt(
        attempt_id=attempt_id, name=name, task=task, scale=scale, status=status,
        started_at=started_at, attempt_dir=str(attempt_dir),
        iter=progress.iter if progress else None, total=progress.total if progress else None,
        elapsed_s=progress.elapsed_s if progress else None,
        eta_s=progress.eta_s if progress else None,
        tokens_per_s=progress.tokens_per_s if progress else None,
        train_loss=progress.train_loss if progress else None,
        val_loss=progress.val_loss if progress else None,
        checkpoint_iter=progress.checkpoint_iter if progress else None,
        resumed_from=progress.resumed_from if progress else None,
        train_curve=thin(_points(read_jsonl(stage / TRAIN_LOG), "train_loss")),
        val_curve=thin(_points(read_curve(stage), "val_loss")))


def running_of_record(record: AttemptRecord, path: Path) -> RunningAttempt:
    """A plain attempt (`harness run`) in progress, from its result.json."""
    name = record.submission.get("name") or record.meta.get("name") or record.attempt_id
    return running_of(path.parent, attempt_id=record.attempt_id, name=str(name),
                      task=str(record.task.get("name", NO_LABEL)), scale=record.scale,
                      status=record.status.value, started_at=record.started_at or "")


def running_of_test(session: SessionRow, row: AttemptRow) -> RunningAttempt:
    """A session's test in progress, from the ledger's row (its folder may hold no record
    yet while the pre-flight runs)."""
    return running_of(Path(row.attempt_dir or ""), attempt_id=row.id,
                      name=f"{session.id} {row.label}", task=session.task,
                      scale=session.scale, status=row.status, started_at=row.started_at or "")
