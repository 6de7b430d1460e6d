"""Whose out-of-memory kill it was: the one memory policy every runner applies.

A stage runs under a per-attempt memory limit the harness sets (docker `memory`, Slurm `mem`),
below the machine's. The scale's `peak_memory_gb` is the template's own measured peak for one
stage at that scale (docs/security.md names the measurement); the limit must leave
`MARGIN` times that, else the stage is not started (ours: our configuration is wrong, not the
submission). Then:

- killed for outgrowing its own limit, with a measured peak to compare to: the submission
  asked for more than the template needs with room to spare, so it is charged
  (`over_limit`, failed_submission);
- killed at its limit on a scale with no measured peak: the limit may be too low for the
  template itself, so it is ours (refunded), and the reason says so;
- killed below its limit (the machine or a parent cgroup ran out), or with no evidence either
  way: ours, refunded.
"""

from __future__ import annotations

import re
from typing import Any

from harness.runners.base import RunnerError

# The limit must allow this many times the template's own measured peak.
MARGIN = 1.5
GIB = 2**30
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, *, default_unit: str = "b") -> int:
    """Bytes of a size as docker ("16g", "512m") or Slurm ("8G", "4000" = MB) write it."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 16g, 512m)")
    unit = m.group(2).lower() or default_unit
    return int(float(m.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def vet_limit(limit: int, peak_gb: float, *, setting: str, scale_hint: str = "") -> None:
    """Refuse (RunnerError: ours, never charged) a limit that leaves the template itself less
    than MARGIN times its measured peak."""
    if peak_gb <= 0:
        return
    need = MARGIN * peak_gb * GIB
    if limit < need:
        raise RunnerError(f"{setting} = {gib(limit)} is below {MARGIN} x the template's own "
                          f"measured peak of {peak_gb:g} GiB per stage{scale_hint} "
                          f"({gib(need)}): raise it, or an out-of-memory kill could be the "
                          f"template's and not the submission's")


def judge_kill(*, limit_text: str, peak_gb: float, report: dict[str, Any] | None
               ) -> tuple[str | None, str | None]:
    """An OOM kill's verdict as (over_limit, infra): exactly one is set. report: what the
    stage's memory watcher read from its cgroup (runtime/memwatch.py), None when it wrote
    nothing."""
    if report is None:
        return None, (f"killed by the out-of-memory killer (memory limit {limit_text}); the "
                      f"stage's memory report is missing, so nothing shows it reached its limit")
    peak = report.get("peak_bytes")
    seen = f", peak {gib(peak)}" if isinstance(peak, int) else ""
    if not report.get("limit_reached"):
        return None, (f"killed by the out-of-memory killer below its memory limit of "
                      f"{limit_text}{seen}: the machine ran out of memory, not the stage")
    if peak_gb <= 0:
        return None, (f"killed at its memory limit of {limit_text}{seen}, but this scale has no "
                      f"measured peak (peak_memory_gb), so the limit may be too low for the "
                      f"template itself: not charged")
    return (f"the stage outgrew its memory limit of {limit_text}{seen}; the template's own "
            f"measured peak at this scale is {peak_gb:g} GiB"), None
