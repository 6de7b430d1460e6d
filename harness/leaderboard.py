"""The leaderboard: every final result, one row per entrant, per task and scale.

Sources, read in the formats the harness already writes (there is no format of our own):
  * `runs/<id>/result.json` of plain attempts (`harness run`, `harness baselines`): the record
    of harness.attempt.Result;
  * the final submissions of agent sessions in the ledger (harness.ledger): the session names
    the entrant, the results table holds the metrics, and the attempt's result.json (re-hashed
    against the sha256 the ledger recorded) holds the curve, the hashes and the environment.

Row model (docs/leaderboard.md): a row is the key (task, task version, scale, mode, agent,
model, variant), where variant is the submission name for baselines and for submissions with no
agent, and empty otherwise, so that an agent's sessions are the seeds of one row. Rows come
from a pandas groupby on that key, after attempts are deduplicated by attempt id; a second row
for a key, or two values for one attempt, cannot come out of it.

Pipeline: collect() -> [AttemptRecord] -> aggregate() -> Board -> board JSON (build) ->
page (harness.leaderboard_page) | CSV | Markdown | JSON (export).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from harness.errors import UserError
from harness.ledger import FINISHED, LEDGER_FILE, AttemptRow, Ledger, SessionRow, now_iso
from harness.paths import sha256_bytes
from harness.task import MetricSpec, TaskSpec, load_task

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")

BOARD_SCHEMA = "harness-leaderboard/1"
EXPORT_SCHEMA = "harness-leaderboard-export/1"
# The result.json versions this reader understands; a test fails when harness.attempt's
# SCHEMA_VERSION moves past them, so a new version is read on purpose, not by luck.
RESULT_SCHEMAS = (1,)
INVALID = "invalid"  # our verdict: the record cannot be trusted (tampered, inconsistent, ...)
RULE_VIOLATION = "rule_violation"
RANKED = "succeeded"
NO_LABEL = "-"
# Ledger first: its copy of a session attempt is the one the budget rules stand behind.
SOURCE_PRIORITY = {"ledger": 0, "runs": 1}
# `<id suffix>-t<N>`: the submission name harness.session gives each test of a session.
SESSION_TEST_NAME = re.compile(r"^ses-[0-9a-f]+-t[0-9]+$")
KEY = ("task", "task_version", "scale", "mode", "agent", "model", "variant")
MAX_DIFF_CHARS = 20_000  # per row on the page; the attempt folder keeps the whole diff
SKIP_RUNNING = "in progress (status running): not final"
SKIP_SESSION_TEST = "session tests: only a session's final submission counts, from the ledger"
SKIP_NO_SUBMISSION = "sessions without a final submission"


# --- one attempt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptRecord:
    """What the board needs of one final attempt, whichever source it came from."""

    attempt_id: str
    source: str  # "ledger" | "runs"
    task: str
    task_version: str
    scale: str
    name: str  # the submission's name
    agent: str
    mode: str
    model: str
    status: str  # a ledger FINISHED status, or INVALID
    reason: str
    metrics: dict[str, float] = field(default_factory=dict, hash=False)
    finished_at: str = ""
    result_path: str = ""
    attempt_dir: str = ""
    session_id: str = ""
    audit: str = ""  # how to audit it: the command for a session attempt, else result.json
    runner: str = ""
    hardware: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict, hash=False)
    hashes: dict[str, str] = field(default_factory=dict, hash=False)
    preflight: dict[str, Any] = field(default_factory=dict, hash=False)
    region_diff: str | None = None  # the ledger's copy, for a folder without submission.diff
    curve: tuple[tuple[int, float], ...] = ()  # (step, val_loss)
    session_test: bool = False  # a test of an agent session (harness.session names it so)

    @property
    def variant(self) -> str:
        # Baselines share agent "baseline" and model "-": their name is what tells them apart.
        # A submission with no agent has nothing but its name either.
        return self.name if self.mode == "baseline" or self.agent == NO_LABEL else ""

    @property
    def key(self) -> tuple[str, ...]:
        return (self.task, self.task_version, self.scale, self.mode, self.agent, self.model,
                self.variant)

    def fingerprint(self) -> str:
        """Everything that decides the attempt's place on the board: equal when two reads of
        one attempt agree."""
        body = {"key": self.key, "status": self.status, "metrics": sorted(self.metrics.items())}
        return sha256_bytes(json.dumps(body).encode())


@dataclass(frozen=True)
class Problem:
    """A record that could not be read at all (so it has no key and no row)."""

    path: str
    reason: str


@dataclass
class Collected:
    records: list[AttemptRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)


class _Skip(Exception):
    """Not a final result: counted, not shown."""


class _Unreadable(Exception):
    """Not a result.json this harness can read: a Problem."""


# --- reading result.json -------------------------------------------------------------------


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A sub-object of a record, {} when it is missing or not an object."""
    found = data.get(key)
    return found if isinstance(found, dict) else {}


def _text(value: Any, default: str = NO_LABEL) -> str:
    return value.strip() if isinstance(value, str) and value.strip() else default


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def finite_metrics(raw: Any) -> dict[str, float]:
    """The finite numeric metrics; NaN or inf are no score (the ledger drops them too)."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        x = _finite(v)
        if isinstance(k, str) and x is not None:
            out[k] = x
    return out


def _curve(stages: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    rows = _table(stages, "pretrain").get("curve") or []
    # Inlined checks: this runs for every point of every final attempt.
    return tuple((r["step"], float(r["val_loss"])) for r in rows
                 if isinstance(r, dict) and type(r.get("step")) is int
                 and type(r.get("val_loss")) in (int, float) and math.isfinite(r["val_loss"]))


def _stage_seconds(stages: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, info in stages.items():
        wall = _finite(info.get("wall_s")) if isinstance(info, dict) else None
        if wall is not None:
            out[str(name)] = wall
    return out


def hardware_summary(env: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    """Host, platform, CPUs, then what training saw (device, processes, GPU, peak memory)."""
    host = _table(env, "host")
    final = _table(_table(stages, "pretrain"), "final")
    parts = [_text(host.get("hostname"), ""), _text(host.get("platform"), "")]
    if isinstance(host.get("cpu_count"), int):
        parts.append(f"{host['cpu_count']} CPUs")
    # Runners may record GPUs under a key of their own: show any that names one.
    for where in (env, host):
        for k, v in where.items():
            if ("gpu" in k.lower() or "cuda" in k.lower()) and v:
                parts.append(f"{k}: {v if isinstance(v, str) else json.dumps(v)}")
    if final.get("device"):
        parts.append(f"trained on {final['device']} × {final.get('world_size', '?')}")
        if _finite(final.get("peak_memory_gb")) is not None:
            parts.append(f"peak {final['peak_memory_gb']:.1f} GB")
    torch = _table(env, "packages").get("torch")
    if torch:
        parts.append(f"torch {torch}")
    return " · ".join(p for p in parts if p)


def _hashes(data: Mapping[str, Any], result_sha256: str) -> dict[str, str]:
    sub = _table(data, "submission")
    git = _table(_table(data, "environment"), "git")
    out = {"submission": _text(sub.get("sha256"), ""),
           "template": _text(data.get("template_sha256"), ""),
           "spliced": _text(data.get("spliced_sha256"), ""),
           "result.json": result_sha256}
    if git.get("commit"):
        out["harness commit"] = f"{git['commit']}{' (dirty)' if git.get('dirty') else ''}"
    return {k: v for k, v in out.items() if v}


def _require(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _Unreadable(f"no {key!r}")
    return value


def parse_result(raw: bytes, path: Path, *, source: str = "runs",
                 digest: str | None = None) -> AttemptRecord:
    """A record from result.json bytes; _Unreadable or _Skip when it is no final result."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise _Unreadable(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _Unreadable("not a JSON object")
    if data.get("schema_version") not in RESULT_SCHEMAS:
        raise _Unreadable(f"schema_version {data.get('schema_version')!r} is not one this "
                          f"harness reads ({', '.join(map(str, RESULT_SCHEMAS))})")
    status = _require(data, "status")
    if status not in FINISHED:
        raise _Skip(SKIP_RUNNING if status == "running" else f"unknown status {status!r}")
    task, sub, stages = _table(data, "task"), _table(data, "submission"), _table(data, "stages")
    meta, env = _table(sub, "meta"), _table(data, "environment")
    name = _text(sub.get("name"), _text(meta.get("name"), _require(data, "attempt_id")))
    return AttemptRecord(
        attempt_id=_require(data, "attempt_id"), source=source,
        task=_require(task, "name"), task_version=_text(task.get("version"), "?"),
        scale=_require(data, "scale"), name=name, agent=_text(meta.get("agent")),
        mode=_text(meta.get("mode")), model=_text(meta.get("model")), status=shown(status),
        reason=_text(data.get("reason"), ""), metrics=finite_metrics(data.get("metrics")),
        finished_at=_text(data.get("finished_at"), ""), result_path=str(path),
        attempt_dir=str(path.parent), audit=str(path), runner=_text(data.get("runner"), ""),
        hardware=hardware_summary(env, stages), stage_seconds=_stage_seconds(stages),
        hashes=_hashes(data, digest or sha256_bytes(raw)),
        preflight=_table(data, "preflight"),
        curve=_curve(stages),
        session_test=bool(sub.get("session")) or bool(SESSION_TEST_NAME.match(name)),
    )


def collect_files(paths: Iterable[Path], out: Collected, *, skip_ids: set[str]) -> None:
    """Plain attempts from result.json files; a session's tests are left to the ledger."""
    for path in paths:
        try:
            raw = path.read_bytes()
            # abspath, not resolve(): no syscall per path component, for thousands of files.
            record = parse_result(raw, Path(os.path.abspath(path)))
        except OSError as e:
            out.problems.append(Problem(str(path), f"cannot read: {e.strerror}"))
            continue
        except _Unreadable as e:
            out.problems.append(Problem(str(path), str(e)))
            continue
        except _Skip as e:
            out.skipped[str(e)] += 1
            continue
        if record.attempt_id in skip_ids or record.session_test:
            out.skipped[SKIP_SESSION_TEST] += 1
            continue
        out.records.append(record)


def result_files(runs_dir: Path) -> list[Path]:
    """Every runs/<id>/result.json, in a fixed order."""
    return sorted(runs_dir.glob("*/result.json"))


# --- reading the ledger --------------------------------------------------------------------


def _ledger_record(s: SessionRow, a: AttemptRow, metrics: dict[str, float],
                   home: Path) -> AttemptRecord:
    """The session's final submission; INVALID when its files disagree with the ledger."""
    base = AttemptRecord(
        attempt_id=a.id, source="ledger", task=s.task, task_version=s.task_version,
        scale=s.scale, name=s.id, agent=_text(s.agent), mode=_text(s.mode),
        model=_text(s.model), status=shown(a.status), reason=a.reason or "",
        metrics=finite_metrics(metrics), finished_at=a.finished_at or "",
        attempt_dir=a.attempt_dir or "", session_id=s.id,
        audit=f"harness audit {a.id} --home {home}", runner=a.runner or "",
        region_diff=a.region_diff,
    )
    path = Path(a.attempt_dir or "") / "result.json"
    try:
        if not a.attempt_dir:
            raise FileNotFoundError(path)
        raw = path.read_bytes()
    except OSError:
        return _invalid(base, f"result.json is missing ({path})")
    digest = sha256_bytes(raw)
    if a.result_sha256 and digest != a.result_sha256:
        return _invalid(base, "result.json changed since the ledger recorded it "
                              f"(recorded {a.result_sha256[:12]}, now {digest[:12]})")
    try:
        parsed = parse_result(raw, path, source="ledger", digest=digest)
    except (_Unreadable, _Skip) as e:
        return _invalid(base, f"result.json: {e}")
    if parsed.metrics != base.metrics:
        return _invalid(base, "the metrics in result.json differ from the ledger's")
    if parsed.scale != s.scale or parsed.task != s.task:
        return _invalid(base, f"result.json is for {parsed.task}/{parsed.scale}, the session "
                              f"for {s.task}/{s.scale}")
    return replace(base, result_path=str(path), runner=parsed.runner,
                   hardware=parsed.hardware, stage_seconds=parsed.stage_seconds,
                   hashes={**parsed.hashes, "ledger's result.json": a.result_sha256 or ""},
                   # The ledger's copy of the pre-flight only when result.json lacks one.
                   preflight=parsed.preflight or _ledger_preflight(a.check_report),
                   curve=parsed.curve)


def _ledger_preflight(check_report: str | None) -> dict[str, Any]:
    """The pre-flight report harness.session stored in the attempt row, if any."""
    try:
        report = json.loads(check_report or "{}")
    except ValueError:
        return {}
    found = report.get("preflight") if isinstance(report, dict) else None
    return found if isinstance(found, dict) else {}


def shown(status: str) -> str:
    """A rule broken at run time is shown as invalid (never ranked); its reason says which."""
    return INVALID if status == RULE_VIOLATION else status


def _invalid(record: AttemptRecord, reason: str) -> AttemptRecord:
    return replace(record, status=INVALID, reason=reason)


def collect_ledger(ledger: Ledger, out: Collected) -> set[str]:
    """Each session's final submission; returns the id of every session attempt, so that a
    runs-dir scan leaves them to the ledger."""
    with ledger.snapshot():  # one consistent view even while sessions are running
        ids = ledger.attempt_ids()
        finals = ledger.final_submissions()
        sessions = len(ledger.sessions())
    if sessions > len(finals):
        out.skipped[SKIP_NO_SUBMISSION] += sessions - len(finals)
    out.records += [_ledger_record(s, a, metrics, ledger.home) for s, a, metrics in finals]
    return ids


def collect(runs_dirs: Sequence[Path] = (), *, home: Path | None = None,
            files: Sequence[Path] = ()) -> Collected:
    """Every final result of the ledger in `home` (when given), the runs dirs and files."""
    out = Collected()
    skip: set[str] = set()
    if home is not None:
        with Ledger(home, create=False) as ledger:
            out.sources.append(f"ledger {ledger.path}")
            skip = collect_ledger(ledger, out)
    for d in runs_dirs:
        if not d.is_dir():
            raise UserError(f"no runs directory {d}", fix="pass --runs-dir a folder of "
                            "attempts (runs/<id>/result.json)")
        out.sources.append(f"runs {d.resolve()}")
        collect_files(result_files(d), out, skip_ids=skip)
    if files:
        out.sources.append(f"{len(files)} result file(s)")
        collect_files(files, out, skip_ids=skip)
    return out


# --- the board -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    name: str
    label: str
    direction: str  # "min" | "max"
    mls_key: str


@dataclass(frozen=True)
class Cell:
    """One metric of one row: over the row's succeeded seeds."""

    mean: float | None
    std: float | None  # sample std (ddof 1); None for a single seed
    n: int
    delta: float | None  # mean - the best baseline's mean
    improved: bool | None  # better than the best baseline, in the metric's direction


@dataclass(frozen=True)
class AttemptLink:
    attempt_id: str
    status: str
    reason: str
    source: str
    result_path: str
    audit: str
    primary: float | None
    spliced_sha256: str


@dataclass(frozen=True)
class Details:
    """Of the row's representative attempt: its latest succeeded seed, else its latest."""

    attempt_id: str
    diff: str
    diff_truncated: bool
    checks: str
    hashes: dict[str, str]
    runner: str
    hardware: str
    duration: str
    verdict: str


@dataclass(frozen=True)
class Row:
    key: str
    task: str
    task_version: str
    scale: str
    entrant: str  # what the Model column shows
    name: str
    agent: str
    mode: str
    model: str
    baseline: bool
    status: str  # "succeeded" (ranked), a failure status, or "invalid"
    reason: str
    rank: int | None
    n: int  # succeeded seeds
    n_failed: int
    cells: dict[str, Cell]
    attempts: list[AttemptLink]
    details: Details
    curve: list[tuple[int, float]]  # mean val_loss over the seeds, by step

    @property
    def ranked(self) -> bool:
        return self.rank is not None


@dataclass(frozen=True)
class Table:
    id: str
    task: str
    task_version: str
    scale: str
    scale_description: str
    primary: str
    metrics: list[MetricInfo]
    best_baseline: str | None  # the entrant the deltas are against
    best_baseline_key: str | None  # its row key
    rows: list[Row]


@dataclass(frozen=True)
class Board:
    schema: str
    generated_at: str
    sources: list[str]
    attempts: int
    tables: list[Table]
    problems: list[Problem]
    skipped: dict[str, int]


def mls_key(metric: MetricSpec | MetricInfo, scale: str) -> str:
    """The MLS-Bench key of a metric at a scale: losses and perplexities carry the scale name
    (`val_loss_gpt-345m`), accuracies (direction max) `lm-eval-` and the scale's size
    (`arc_easy_lm-eval-345m`); a scale without the `gpt-` prefix gives its whole name
    (`val_loss_smoke`, `arc_easy_lm-eval-smoke`)."""
    if metric.direction == "max":
        return f"{metric.name}_lm-eval-{scale.removeprefix('gpt-')}"
    return f"{metric.name}_{scale}"


def entrant_of(mode: str, agent: str, model: str, name: str) -> str:
    if mode == "baseline":
        return name
    for label in (model, agent):
        if label != NO_LABEL:
            return label
    return name


def _rank_order(direction: str) -> bool:
    """pandas `ascending` for best first."""
    return direction == "min"


def _fmt_seconds(seconds: Mapping[str, float]) -> str:
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
    if _finite(report.get("duration_s")) is not None:
        head += f" in {report['duration_s']:.1f} s"
    lines = [head, *(f"{c.get('status')} {c.get('id')}: {c.get('reason')}" for c in checks)]
    if report.get("skipped"):
        lines.append(f"not run: {', '.join(map(str, report['skipped']))}")
    return "\n".join(lines)


def _read_checks(record: AttemptRecord) -> str:
    path = Path(record.attempt_dir) / "checks.json" if record.attempt_dir else None
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "checks.json is unreadable"
        if isinstance(data, dict):
            return summarize_checks(data)
    return summarize_checks(record.preflight)


def _read_diff(record: AttemptRecord) -> tuple[str, bool]:
    path = Path(record.attempt_dir) / "submission.diff" if record.attempt_dir else None
    text = record.region_diff
    if path is not None and path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    if text is None:
        return "(no diff recorded)", False
    if not text:
        return "(none: the submission leaves the template's regions as they are)", False
    if len(text) > MAX_DIFF_CHARS:
        return text[:MAX_DIFF_CHARS], True
    return text, False


def _verdict(status: str, reason: str, n: int, n_failed: int) -> str:
    if status == RANKED:
        extra = f"; {n_failed} other run(s) did not succeed" if n_failed else ""
        return f"ranked: {n} succeeded run(s){extra}"
    if status == INVALID:
        return f"invalid, not ranked: {reason}"
    return f"not ranked: {status} ({reason})"


def _details(record: AttemptRecord, status: str, reason: str, n: int, n_failed: int
             ) -> Details:
    """`status` and `reason` are the row's: aggregation may have judged the record invalid."""
    diff, cut = _read_diff(record)
    return Details(attempt_id=record.attempt_id, diff=diff, diff_truncated=cut,
                   checks=_read_checks(record), hashes=dict(record.hashes),
                   runner=record.runner or "-", hardware=record.hardware or "-",
                   duration=_fmt_seconds(record.stage_seconds),
                   verdict=_verdict(status, reason, n, n_failed))


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(parts)).strip("-").lower()


# --- aggregation with pandas ---------------------------------------------------------------

METRIC = "m:"  # column prefix of a metric's value in the attempts frame


def _attempts_frame(records: Sequence[AttemptRecord], primary: Mapping[str, str]
                    ) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for i, r in enumerate(records):
        row: dict[str, Any] = dict(zip(KEY, r.key, strict=True))
        row.update(idx=i, attempt_id=r.attempt_id, priority=SOURCE_PRIORITY[r.source],
                   fingerprint=r.fingerprint(), finished_at=r.finished_at, status=r.status,
                   reason=r.reason, name=r.name,
                   primary=r.metrics.get(primary[r.task], math.nan))
        row.update({METRIC + k: v for k, v in r.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per attempt id. Two reads that agree are one attempt; two that disagree (a
    copied folder edited, a record claimed by two entrants) leave one line, marked INVALID,
    so that no value of it is ranked or shown as a score."""
    versions = frame.groupby("attempt_id")["fingerprint"].nunique()
    frame = frame.sort_values(["attempt_id", "priority", "idx"], kind="stable")
    frame = frame.drop_duplicates("attempt_id", keep="first").copy()
    clash = frame["attempt_id"].map(versions) > 1
    frame.loc[clash, "status"] = INVALID
    frame.loc[clash, "reason"] = "conflicting records of this attempt id (status, key or " \
                                 "metrics differ between copies)"
    return frame


def _validate(frame: pd.DataFrame, primary: Mapping[str, str]) -> pd.DataFrame:
    """A success without a finite primary metric cannot be ranked: INVALID, with why."""
    import numpy as np

    bad = (frame["status"] == RANKED) & ~np.isfinite(frame["primary"].astype(float))
    frame.loc[bad, "status"] = INVALID
    frame.loc[bad, "reason"] = [f"succeeded but recorded no finite {primary[t]}"
                                for t in frame.loc[bad, "task"]]
    frame["eligible"] = frame["status"] == RANKED
    return frame


def _stats(frame: pd.DataFrame, metric_cols: list[str]) -> Stats:
    """mean, std, count of every metric over each key's succeeded seeds, by key."""
    ok = frame[frame["eligible"]]
    if ok.empty or not metric_cols:
        return {}
    table = ok.groupby(list(KEY))[metric_cols].agg(["mean", "std", "count"])
    # Plain dicts: pandas' scalar lookups cost a millisecond each, thousands of them here.
    return {tuple(str(k) for k in key): {(str(c), str(a)): v for (c, a), v in row.items()}
            for key, row in table.to_dict("index").items()}


def _mean_curves(records: Sequence[AttemptRecord], frame: pd.DataFrame
                 ) -> dict[tuple[str, ...], list[tuple[int, float]]]:
    """Each key's val_loss curve, averaged over its succeeded seeds step by step."""
    import pandas as pd

    keys: dict[int, tuple[str, ...]] = {}  # by position in `records`: each key built once
    points = []
    for i in frame.loc[frame["eligible"], "idx"].tolist():
        keys[i] = records[i].key
        points += [(i, step, val) for step, val in records[i].curve]
    if not points:
        return {}
    curves = pd.DataFrame(points, columns=["idx", "step", "val_loss"])
    # One integer per key (its first record) instead of seven string columns to group on.
    first: dict[tuple[str, ...], int] = {}
    curves["key"] = curves["idx"].map({i: first.setdefault(k, i) for i, k in keys.items()})
    means = curves.groupby(["key", "step"], sort=True)["val_loss"].mean()
    out: dict[tuple[str, ...], list[tuple[int, float]]] = {}
    for (rep, step), val in means.items():
        out.setdefault(keys[int(rep)], []).append((int(step), float(val)))
    return out


def _num(value: Any) -> float | None:
    x = float(value)
    return x if math.isfinite(x) else None


Stats = dict[tuple[str, ...], dict[tuple[str, str], Any]]


def _cells(stats: Stats, key: tuple[str, ...], metrics: Sequence[MetricInfo]) -> dict[str, Cell]:
    mine = stats.get(key, {})
    cells = {}
    for m in metrics:
        col = METRIC + m.name
        count = mine.get((col, "count"))
        n = int(count) if count is not None and math.isfinite(count) else 0
        cells[m.name] = Cell(mean=_num(mine[(col, "mean")]) if n else None,
                             std=_num(mine[(col, "std")]) if n > 1 else None,
                             n=n, delta=None, improved=None)
    return cells


def _table_metrics(task: TaskSpec, scale: str) -> list[MetricInfo]:
    # The task's order, primary metric first, as in the task statement's table.
    ordered = sorted(task.metrics, key=lambda m: m.name != task.primary_metric)
    return [MetricInfo(m.name, m.label, m.direction, mls_key(m, scale)) for m in ordered]


def _rank_and_delta(rows: list[Row], metrics: Sequence[MetricInfo], primary: str
                    ) -> tuple[list[Row], Row | None]:
    """Competition ranks (1, 2, 2, 4) by the primary metric over succeeded rows; deltas of
    every metric against the best baseline (best by the primary metric)."""
    import pandas as pd

    spec = {m.name: m for m in metrics}
    frame = pd.DataFrame({"pos": range(len(rows)),
                          "value": [r.cells[primary].mean if r.status == RANKED else None
                                    for r in rows],
                          "baseline": [r.baseline for r in rows]}, dtype=object)
    frame["value"] = frame["value"].astype(float)
    asc = _rank_order(spec[primary].direction)
    ranks = frame["value"].rank(method="min", ascending=asc)
    base = frame[frame["baseline"].astype(bool) & frame["value"].notna()]
    best = rows[int(base.sort_values(["value", "pos"], ascending=[asc, True]).iloc[0]["pos"])] \
        if not base.empty else None
    out = []
    for r, rank in zip(rows, ranks, strict=True):
        cells = {}
        for name, c in r.cells.items():
            ref = best.cells[name].mean if best is not None else None
            delta = c.mean - ref if c.mean is not None and ref is not None else None
            improved = (None if delta is None else
                        (delta < 0 if spec[name].direction == "min" else delta > 0))
            cells[name] = Cell(c.mean, c.std, c.n, delta, improved)
        out.append(Row(**{**_shallow(r), "cells": cells,
                          "rank": int(rank) if math.isfinite(rank) else None}))
    return out, best


def _shallow(row: Row) -> dict[str, Any]:
    return {f: getattr(row, f) for f in Row.__dataclass_fields__}


def _sort_key(row: Row) -> tuple[int, float, str, str]:
    return (0 if row.rank is not None else 1, row.rank or 0, row.entrant, row.key)


def aggregate(collected: Collected, *, tasks: Sequence[str] | None = None,
              load: Callable[[str], TaskSpec] = load_task) -> Board:
    """The board: one table per (task, version, scale), one row per key; see the module doc."""
    specs: dict[str, TaskSpec] = {}
    records: list[AttemptRecord] = []
    skipped = Counter(collected.skipped)
    for r in collected.records:
        if tasks is not None and r.task not in tasks:
            skipped[f"results of other tasks than {', '.join(tasks)}"] += 1
            continue
        if r.task not in specs:
            try:
                specs[r.task] = load(r.task)
            except UserError:
                skipped[f"results of task {r.task!r}, unknown to this harness"] += 1
                continue
        records.append(r)
    tables = _tables(records, specs) if records else []
    return Board(schema=BOARD_SCHEMA, generated_at=now_iso(), sources=list(collected.sources),
                 attempts=len(records), tables=tables, problems=list(collected.problems),
                 skipped=dict(sorted(skipped.items())))


def _tables(records: Sequence[AttemptRecord], specs: Mapping[str, TaskSpec]) -> list[Table]:
    primary = {name: t.primary_metric for name, t in specs.items()}
    frame = _validate(_dedupe(_attempts_frame(records, primary)), primary)
    metric_cols = sorted(c for c in frame.columns if str(c).startswith(METRIC))
    stats = _stats(frame, metric_cols)
    curves = _mean_curves(records, frame)
    # The representative of each key: its latest succeeded seed, else its latest attempt.
    order = frame.sort_values(["eligible", "finished_at", "attempt_id"],
                              ascending=[False, False, False], kind="stable")
    lines = [_Line(*t) for t in zip(*(order[c].tolist() for c in _Line._fields), strict=True)]
    tables: dict[tuple[str, ...], list[Row]] = {}
    for raw_key, positions in order.groupby(list(KEY), sort=True).indices.items():
        key = tuple(str(k) for k in raw_key)
        tables.setdefault(key[:3], []).append(
            _row(key, [lines[i] for i in positions], records, stats, curves, specs[key[0]]))
    out = []
    for (task, version, scale), rows in sorted(tables.items()):
        spec = specs[task]
        metrics = _table_metrics(spec, scale)
        ranked, best = _rank_and_delta(rows, metrics, spec.primary_metric)
        out.append(Table(id=_slug(task, version, scale), task=task, task_version=version,
                         scale=scale, scale_description=_scale_description(spec, scale),
                         primary=spec.primary_metric, metrics=metrics,
                         best_baseline=best.entrant if best else None,
                         best_baseline_key=best.key if best else None,
                         rows=sorted(ranked, key=_sort_key)))
    return out


def _scale_description(task: TaskSpec, scale: str) -> str:
    try:
        return task.scale(scale).description
    except UserError:
        return "a scale this harness no longer defines"


class _Line(NamedTuple):
    """One attempt of the deduplicated frame, as plain values."""

    idx: int
    attempt_id: str
    status: str
    reason: str
    primary: float
    eligible: bool


def _row(key: tuple[str, ...], grp: list[_Line], records: Sequence[AttemptRecord],
         stats: Stats, curves: Mapping[tuple[str, ...], list[tuple[int, float]]],
         task: TaskSpec) -> Row:
    """The row of one key; grp is its attempts, the representative first."""
    first = grp[0]
    rep = records[first.idx]
    n = sum(1 for a in grp if a.eligible)
    n_failed = len(grp) - n
    status = RANKED if n else first.status
    reason = f"{n} of {len(grp)} run(s) succeeded" if n else first.reason
    task_key, version, scale, mode, agent, model, _ = key
    links = [AttemptLink(attempt_id=a.attempt_id, status=a.status, reason=a.reason,
                         source=records[a.idx].source, result_path=records[a.idx].result_path,
                         audit=records[a.idx].audit,
                         # An invalid record's value is no score, not even in the details.
                         primary=_num(a.primary) if a.status != INVALID else None,
                         spliced_sha256=records[a.idx].hashes.get("spliced", ""))
             for a in grp]
    return Row(key="/".join(key), task=task_key, task_version=version, scale=scale,
               entrant=entrant_of(mode, agent, model, rep.name), name=rep.name, agent=agent,
               mode=mode, model=model, baseline=mode == "baseline", status=status,
               reason=reason, rank=None, n=n, n_failed=n_failed,
               cells=_cells(stats, key, _table_metrics(task, scale)), attempts=links,
               details=_details(rep, status, reason, n, n_failed), curve=curves.get(key, []))


def build_board(runs_dirs: Sequence[Path] = (), *, home: Path | None = None,
                files: Sequence[Path] = (), tasks: Sequence[str] | None = None) -> Board:
    collected = collect(runs_dirs, home=home, files=files)
    if not collected.records and not collected.problems:
        where = ", ".join(collected.sources) or "no source"
        left = "; ".join(f"{n} {why}" for why, n in sorted(collected.skipped.items()))
        raise UserError(f"no final results to aggregate ({where})"
                        + (f"; left out: {left}" if left else ""),
                        fix="run `harness run`/`harness baselines`, or pass --runs-dir and "
                            "--home where attempts and the ledger are")
    return aggregate(collected, tasks=tasks)


# --- the board file ------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """asdict() without its deepcopy of every leaf (a third of a large board's write time)."""
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    raise TypeError(f"not JSON data: {type(obj).__name__}")


def board_to_json(board: Board) -> dict[str, Any]:
    data: dict[str, Any] = _plain(board)
    return data


def write_board(board: Board, path: Path) -> None:
    from harness.paths import atomic_write_text

    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers. No
    # indent: it would switch json to its pure-Python encoder, seconds on a large board.
    atomic_write_text(path, json.dumps(board_to_json(board), separators=(",", ":"),
                                       allow_nan=False) + "\n")


def _from(cls: type[T], data: Mapping[str, Any], **nested: Any) -> T:
    """A dataclass from its asdict() form; `nested` gives the fields already converted."""
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{k: nested[k] if k in nested else data[k] for k in names})


def board_from_json(data: Any, *, where: str) -> Board:
    """The inverse of board_to_json; a UserError for anything that is not a board file."""
    if not isinstance(data, dict) or data.get("schema") != BOARD_SCHEMA:
        raise UserError(f"not a leaderboard file (schema {BOARD_SCHEMA})", where=where,
                        fix="write one with `harness leaderboard build`")
    try:
        tables = [_from(Table, t, metrics=[_from(MetricInfo, m) for m in t["metrics"]],
                        rows=[_row_from_json(r) for r in t["rows"]]) for t in data["tables"]]
        return _from(Board, data, tables=tables,
                     problems=[_from(Problem, p) for p in data["problems"]])
    except (KeyError, TypeError) as e:
        raise UserError(f"the leaderboard file is incomplete ({type(e).__name__}: {e})",
                        where=where, fix="rebuild it with `harness leaderboard build`") from None


def _row_from_json(r: Mapping[str, Any]) -> Row:
    return _from(Row, r, cells={k: _from(Cell, c) for k, c in r["cells"].items()},
                 attempts=[_from(AttemptLink, a) for a in r["attempts"]],
                 details=_from(Details, r["details"]),
                 curve=[(int(s), float(v)) for s, v in r["curve"]])


def read_board(path: Path) -> Board:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no leaderboard file {path}",
                        fix="run `harness leaderboard build` first (or pass --board)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the leaderboard file: {e}", where=str(path)) from None
    return board_from_json(data, where=str(path))


# --- exports -------------------------------------------------------------------------------

EXPORT_FORMATS = ("csv", "md", "json")


def _export_rows(board: Board) -> list[dict[str, Any]]:
    """Flat rows: identity, rank, status, and per metric its MLS key (mean), `_std`, `_n` and
    `_delta` columns."""
    out = []
    for t in board.tables:
        for r in t.rows:
            row: dict[str, Any] = {
                "task": r.task, "task_version": r.task_version, "scale": r.scale,
                "rank": r.rank, "model": r.entrant, "type": r.mode, "agent": r.agent,
                "llm": r.model, "submission": r.name, "status": r.status, "reason": r.reason,
                "n": r.n, "n_failed": r.n_failed, "baseline": r.baseline}
            for m in t.metrics:
                c = r.cells[m.name]
                row.update({m.mls_key: c.mean, f"{m.mls_key}_std": c.std,
                            f"{m.mls_key}_n": c.n, f"{m.mls_key}_delta": c.delta})
            row["attempts"] = [a.attempt_id for a in r.attempts]
            row["results"] = [a.result_path for a in r.attempts]
            out.append(row)
    return out


def export_json(board: Board) -> str:
    mapping = {m.name: {"direction": m.direction, "label": m.label}
               for t in board.tables for m in t.metrics}
    keys = {t.scale: {m.name: m.mls_key for m in t.metrics} for t in board.tables}
    body = {"schema": EXPORT_SCHEMA, "generated_at": board.generated_at,
            "metrics": mapping, "keys_by_scale": keys, "rows": _export_rows(board)}
    return json.dumps(body, indent=1, allow_nan=False) + "\n"


def export_csv(board: Board) -> str:
    rows = _export_rows(board)
    columns: list[str] = []
    for r in rows:  # the union, in first-seen order: tables may differ in metrics
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ";".join(v) if isinstance(v, list) else
                         ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def fmt_value(x: float | None) -> str:
    """4 decimals below 10 (losses), else 2 with thousands separators (perplexities, %)."""
    if x is None:
        return "-"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:,.2f}"


def fmt_delta(x: float) -> str:
    """Signed, with fmt_value's precision."""
    return f"{x:+.4f}" if abs(x) < 10 else f"{x:+,.2f}"


def arrow(direction: str) -> str:
    return "↓" if direction == "min" else "↑"


def export_markdown(board: Board) -> str:
    out = [f"# Leaderboard ({board.generated_at})", ""]
    for t in board.tables:
        out += [f"## {t.task} {t.task_version} · scale `{t.scale}`", "",
                f"Scale {t.scale}: {t.scale_description}. Ranked by {t.metrics[0].label} "
                f"{arrow(t.metrics[0].direction)}; mean ± std over n seeds; Δ against the best "
                f"baseline ({t.best_baseline or 'none'}).", ""]
        head = ["Rank", "Model", "Type", "n", "Status",
                *(f"{m.label} {arrow(m.direction)} (`{m.mls_key}`)" for m in t.metrics)]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in t.rows:
            cells = []
            for m in t.metrics:
                c = r.cells[m.name]
                text = fmt_value(c.mean)
                if c.std is not None:
                    text += f" ± {fmt_value(c.std)}"
                if c.delta is not None and not r.baseline:
                    text += f" (Δ {fmt_delta(c.delta)})"
                cells.append(text)
            out.append("| " + " | ".join([str(r.rank or "-"), _md(r.entrant), r.mode,
                                          str(r.n), r.status, *cells]) + " |")
        out.append("")
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def export(board: Board, fmt: str) -> str:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}", fix=f"use {', '.join(EXPORT_FORMATS)}")
    return {"csv": export_csv, "md": export_markdown, "json": export_json}[fmt](board)


# --- publishing ----------------------------------------------------------------------------


def publish(board: Board, out_dir: Path) -> Path:
    """board.json and index.html in out_dir; the page's path."""
    from harness.leaderboard_page import write_page

    write_board(board, out_dir / "board.json")
    return write_page(board, out_dir / "index.html")


def default_home() -> Path | None:
    """The ledger's home when a ledger exists there, else None (nothing to read)."""
    from harness.ledger import resolve_home

    home = resolve_home(None)
    return home if (home / LEDGER_FILE).is_file() else None


def relpath(target: str, start: Path) -> str:
    """A link from a page in `start` to a file: relative, so the folder can move as a whole."""
    folder, name = os.path.split(target)
    return f"{_relative_dir(folder, str(start))}/{name}"


@functools.lru_cache(maxsize=4096)
def _relative_dir(folder: str, start: str) -> str:
    # Cached by folder: thousands of links share a few runs dirs, and relpath is slow.
    try:
        return Path(os.path.relpath(folder, start)).as_posix()
    except ValueError:  # another drive
        return Path(folder).as_posix()


def baselines_page(results: Sequence[Path], out_dir: Path) -> Path:
    """The page of the runs `harness baselines` just made (and their board.json)."""
    return publish(aggregate(collect(files=results)), out_dir)
