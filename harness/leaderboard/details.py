"""A row's details, from its representative attempt's folder: the region diff, the check
report, the duration per stage and the verdict."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.leaderboard.board import INVALID, Details, Entry
from harness.record import Attempt, Status

MAX_DIFF_CHARS = 20_000  # per row on the page; the attempt folder keeps the whole diff


def fmt_seconds(seconds: Mapping[str, float]) -> str:
    if not seconds:
        return "-"
    parts = [f"{k} {v:,.1f} s" for k, v in seconds.items()]
    total = sum(seconds.values())
    return f"{total:,.1f} s ({', '.join(parts)})" if len(parts) > 1 else parts[0]


def summarize_checks(report: Mapping[str, Any]) -> str:
    """One paragraph from a checks.json (pre-flight report or a refusal)."""
    if not report:
        return "no check report recorded"
    if "error" in report:  # a refusal by the static checks (harness.session)
        found = [f"{f.get('rule')} {f.get('line')}:{f.get('col')} {f.get('message')}"
                 for f in report.get("findings") or [] if isinstance(f, dict)]
        return "; ".join([f"refused: {report['error']}", *found])
    checks = [c for c in report.get("checks") or [] if isinstance(c, dict)]
    counts = Counter(str(c.get("status")) for c in checks)
    head = (f"pre-flight {'passed' if report.get('ok') else 'failed'}: {len(checks)} checks ("
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
    duration = report.get("duration_s")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) \
            and math.isfinite(duration):
        head += f" in {duration:.1f} s"
    lines = [head, *(f"{c.get('status')} {c.get('id')}: {c.get('reason')}" for c in checks)]
    if report.get("skipped"):
        lines.append(f"not run: {', '.join(map(str, report['skipped']))}")
    return "\n".join(lines)


def _folder(entry: Entry) -> Attempt | None:
    return Attempt(Path(entry.attempt_dir)) if entry.attempt_dir else None


def _read_checks(entry: Entry) -> str:
    folder = _folder(entry)
    if folder is not None and folder.checks.is_file():
        try:
            data = json.loads(folder.checks.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "checks.json is unreadable"
        if isinstance(data, dict):
            return summarize_checks(data)
    return summarize_checks(entry.preflight)


def _read_diff(entry: Entry) -> tuple[str, bool]:
    folder = _folder(entry)
    text = entry.region_diff
    if folder is not None and folder.diff.is_file():
        text = folder.diff.read_text(encoding="utf-8", errors="replace")
    if text is None:
        return "(no diff recorded)", False
    if not text:
        return "(none: the submission leaves the template's regions as they are)", False
    if len(text) > MAX_DIFF_CHARS:
        return text[:MAX_DIFF_CHARS], True
    return text, False


def verdict(status: str, reason: str, n: int, n_failed: int) -> str:
    if status == Status.SUCCEEDED.value:
        extra = f"; {n_failed} other run(s) did not succeed" if n_failed else ""
        return f"ranked: {n} succeeded run(s){extra}"
    if status == INVALID:
        return f"invalid, not ranked: {reason}"
    return f"not ranked: {status} ({reason})"


def details(entry: Entry, status: str, reason: str, n: int, n_failed: int) -> Details:
    """`status` and `reason` are the row's: aggregation may have judged the record invalid."""
    diff, cut = _read_diff(entry)
    return Details(attempt_id=entry.attempt_id, diff=diff, diff_truncated=cut,
                   checks=_read_checks(entry), hashes=dict(entry.hashes),
                   runner=entry.runner or "-", hardware=entry.hardware or "-",
                   duration=fmt_seconds(entry.stage_seconds),
                   verdict=verdict(status, reason, n, n_failed))
