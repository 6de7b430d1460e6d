"""Aggregate: board entries -> Board, with pandas (docs/leaderboard.md, "Row model").

Three frames, each a groupby or merge of the one before:
  attempts  one line per attempt id (deduplicated, validated), the row it belongs to
            (`ngroup` over the key) and its place in the row: the representative first;
  rows      one line per key: its representative, status, reason, succeeded and failed runs;
  stats     one line per (row, metric) over the row's succeeded seeds: mean, std, n, then the
            rank (by the task's primary metric, in its direction, within the table) and the
            delta against the table's best baseline.
Only the dataclasses of the board are built in Python, once, from these frames.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from harness.errors import UserError
from harness.leaderboard.board import (
    BOARD_SCHEMA,
    EMPTY_CELL,
    INVALID,
    KEY,
    TABLE_KEY,
    AttemptLink,
    Board,
    Cell,
    Collected,
    Entry,
    MetricInfo,
    Row,
    Table,
    entrant_of,
    mls_key,
)
from harness.leaderboard.details import details
from harness.leaderboard.stats import Ranked, ci_halfwidths, tie_ranks
from harness.ledger import now_iso
from harness.record import Status
from harness.task import TaskSpec, load_task

if TYPE_CHECKING:
    import pandas as pd

# Ledger first: its copy of a session attempt is the one the budget rules stand behind.
SOURCE_PRIORITY = {"ledger": 0, "runs": 1}
CONFLICT = "conflicting records of this attempt id (status, key or metrics differ between copies)"
_SUCCEEDED = Status.SUCCEEDED.value


def aggregate(collected: Collected, *, tasks: Sequence[str] | None = None,
              load: Callable[[str], TaskSpec] = load_task) -> Board:
    """The board: one table per (task, version, scale), one row per key; see the module doc."""
    specs: dict[str, TaskSpec] = {}
    entries: list[Entry] = []
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
        entries.append(r)
    tables = _tables(entries, specs) if entries else []
    return Board(schema=BOARD_SCHEMA, generated_at=now_iso(), sources=list(collected.sources),
                 attempts=len(entries), tables=tables, problems=list(collected.problems),
                 skipped=dict(sorted(skipped.items())),
                 live=sorted((r for r in collected.live if tasks is None or r.task in tasks),
                             key=lambda r: (r.started_at, r.attempt_id)))


# --- the frames ----------------------------------------------------------------------------


def _attempts_frame(entries: Sequence[Entry], specs: Mapping[str, TaskSpec]) -> pd.DataFrame:
    import pandas as pd

    columns = [*KEY, "idx", "attempt_id", "priority", "fingerprint", "finished_at", "status",
               "reason", "primary"]
    return pd.DataFrame.from_records(
        [(*e.key, i, e.attempt_id, SOURCE_PRIORITY[e.source], e.fingerprint(), e.finished_at,
          e.status, e.reason, e.metrics.get(specs[e.task].primary_metric, math.nan))
         for i, e in enumerate(entries)], columns=columns)


def _dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per attempt id. Two reads that agree are one attempt; two that disagree (a
    copied folder edited, a record claimed by two entrants) leave one line, marked INVALID,
    so that no value of it is ranked or shown as a score."""
    clash = frame.groupby("attempt_id")["fingerprint"].transform("nunique") > 1
    frame = (frame.assign(clash=clash)
             .sort_values(["attempt_id", "priority", "idx"], kind="stable")
             .drop_duplicates("attempt_id", keep="first"))
    frame.loc[frame["clash"], ["status", "reason"]] = [INVALID, CONFLICT]
    return frame


def _validate(frame: pd.DataFrame, specs: Mapping[str, TaskSpec]) -> pd.DataFrame:
    """A success without a finite primary metric cannot be ranked: INVALID, with why."""
    import numpy as np

    bad = (frame["status"] == _SUCCEEDED) & ~np.isfinite(frame["primary"].astype(float))
    primary = {name: spec.primary_metric for name, spec in specs.items()}
    frame.loc[bad, "status"] = INVALID
    frame.loc[bad, "reason"] = "succeeded but recorded no finite " + \
        frame.loc[bad, "task"].map(primary)
    frame["eligible"] = frame["status"] == _SUCCEEDED
    return frame


def _rows_frame(attempts: pd.DataFrame) -> pd.DataFrame:
    """One line per row (by its `row` number), from its attempts, the representative first."""
    rows = attempts.groupby("row", sort=True).agg(
        **{c: (c, "first") for c in KEY}, rep=("idx", "first"), status=("status", "first"),
        reason=("reason", "first"), n=("eligible", "sum"), runs=("idx", "size"))
    ok = rows["n"] > 0
    rows["status"] = rows["status"].where(~ok, _SUCCEEDED)
    rows["reason"] = rows["reason"].where(
        ~ok, rows["n"].astype(str) + " of " + rows["runs"].astype(str) + " run(s) succeeded")
    rows["baseline"] = rows["mode"] == "baseline"
    return rows


def _declared(specs: Mapping[str, TaskSpec]) -> pd.DataFrame:
    """Each task's metric table: direction, and which metric ranks."""
    import pandas as pd

    return pd.DataFrame.from_records(
        [(task, m.name, m.direction, m.name == spec.primary_metric)
         for task, spec in specs.items() for m in spec.metrics],
        columns=["task", "metric", "direction", "primary"])


def _stats_frame(entries: Sequence[Entry], attempts: pd.DataFrame, rows: pd.DataFrame,
                 specs: Mapping[str, TaskSpec]
                 ) -> tuple[pd.DataFrame, dict[tuple[str, ...], int], dict[int, Ranked]]:
    """Per (row, declared metric) over the row's succeeded seeds: mean, std (ddof 1), n and
    the 95% interval's half-width; the rank of the row on the primary metric's line (the
    tie rule of stats.py); delta and improved against the best baseline of the row's table.
    And that baseline's row number, by table, and each ranked row's Ranked."""
    import pandas as pd

    # In attempt id order: a std sums in the order of its values, and a board is the same
    # whatever order its sources were read in.
    ok = attempts.loc[attempts["eligible"]].sort_values("attempt_id")[["idx", "row"]]
    values = pd.DataFrame.from_records(
        [(row, k, v) for i, row in ok.itertuples(index=False)
         for k, v in entries[i].metrics.items()],
        columns=["row", "metric", "value"])
    stats = (values.groupby(["row", "metric"])["value"].agg(mean="mean", std="std", n="count")
             .reset_index()
             .merge(rows[[*TABLE_KEY, "baseline"]], left_on="row", right_index=True)
             .merge(_declared(specs), on=["task", "metric"]))
    stats["ci95"] = ci_halfwidths(stats["std"], stats["n"])
    stderr = pd.DataFrame.from_records(
        [(row, k, v) for i, row in ok.itertuples(index=False)
         for k, v in entries[i].stderr.items() if k in entries[i].metrics],
        columns=["row", "metric", "lm_eval_stderr"])
    stats = stats.merge(stderr.groupby(["row", "metric"])["lm_eval_stderr"].mean().reset_index(),
                        on=["row", "metric"], how="left")
    # Best first whatever the direction: rank the score, the mean turned into a loss.
    stats["score"] = stats["mean"].where(stats["direction"] == "min", -stats["mean"])
    primary = stats["primary"]
    ranked = _ranks(values, stats[primary])
    stats.loc[primary, "rank"] = stats.loc[primary, "row"].map(lambda r: ranked[int(r)].rank)
    # The best baseline of each table (ties: the first by key), and every metric against it.
    best = (stats[primary & stats["baseline"]].sort_values([*TABLE_KEY, "score", "row"])
            .drop_duplicates(list(TABLE_KEY))[[*TABLE_KEY, "row"]])
    ref = (stats.merge(best, on=[*TABLE_KEY, "row"])[[*TABLE_KEY, "metric", "mean"]]
           .rename(columns={"mean": "ref"}))
    stats = stats.merge(ref, on=[*TABLE_KEY, "metric"], how="left")
    stats["delta"] = stats["mean"] - stats["ref"]
    stats["improved"] = (stats["delta"] < 0).where(stats["direction"] == "min",
                                                    stats["delta"] > 0)
    return stats, {tuple(k): int(r) for *k, r in best.itertuples(index=False)}, ranked


def _ranks(values: pd.DataFrame, primary: pd.DataFrame) -> dict[int, Ranked]:
    """Each row's rank in its table on its seeds' primary-metric scores (lower is better)."""
    seeds = values.merge(primary[["row", "metric", "direction", *TABLE_KEY]],
                         on=["row", "metric"])
    seeds["score"] = seeds["value"].where(seeds["direction"] == "min", -seeds["value"])
    out: dict[int, Ranked] = {}
    for _, table in seeds.groupby(list(TABLE_KEY), sort=False):
        by_row = {int(r): g["score"].tolist() for r, g in table.groupby("row", sort=True)}
        out.update(tie_ranks(by_row))
    return out


Curve = list[tuple[int, float]]


def _mean_curves(entries: Sequence[Entry], attempts: pd.DataFrame,
                 specs: Mapping[str, TaskSpec]) -> tuple[dict[int, Curve], dict[int, Curve]]:
    """Each row's curve of its task's primary metric (recorded by the metric's stage), averaged
    over its succeeded seeds step by step; and, at the steps with two seeds or more, the
    half-width of the mean's 95% interval there (the plot's error band)."""
    import pandas as pd

    where = {t: (s.metric(s.primary_metric).stage, s.primary_metric) for t, s in specs.items()}
    points = []
    for i, row, task in attempts.loc[attempts["eligible"], ["idx", "row", "task"]].itertuples(
            index=False):
        stage, name = where[task]
        # Inlined checks: this runs for every point of every final attempt.
        points += [(row, p["step"], float(v)) for p in entries[i].curves.get(stage, ())
                   if isinstance(p, dict) and type(p.get("step")) is int
                   and type(v := p.get(name, math.nan)) in (int, float) and math.isfinite(v)]
    if not points:
        return {}, {}
    by_step = pd.DataFrame.from_records(points, columns=["row", "step", "value"]) \
        .groupby(["row", "step"], sort=True)["value"].agg(["mean", "std", "count"])
    by_step["ci"] = ci_halfwidths(by_step["std"], by_step["count"])
    means: dict[int, Curve] = {}
    bands: dict[int, Curve] = {}
    for (row, step), mean, ci in by_step[["mean", "ci"]].itertuples(name=None):
        means.setdefault(int(row), []).append((int(step), float(mean)))
        if math.isfinite(ci):
            bands.setdefault(int(row), []).append((int(step), float(ci)))
    return means, bands


# --- the board's dataclasses ---------------------------------------------------------------


def _num(value: Any) -> float | None:
    x = float(value)
    return x if math.isfinite(x) else None


def _cells(stats: pd.DataFrame) -> dict[int, dict[str, Cell]]:
    out: dict[int, dict[str, Cell]] = {}
    for row, metric, mean, std, n, delta, improved, ci, stderr in stats[
            ["row", "metric", "mean", "std", "n", "delta", "improved", "ci95",
             "lm_eval_stderr"]].itertuples(index=False):
        d = _num(delta)
        out.setdefault(int(row), {})[metric] = Cell(
            mean=_num(mean), std=_num(std) if n > 1 else None, n=int(n), delta=d,
            improved=None if d is None else bool(improved),
            ci95=_num(ci) if n > 1 else None, lm_eval_stderr=_num(stderr))
    return out


def _table_metrics(task: TaskSpec, scale: str) -> list[MetricInfo]:
    # The task's order, primary metric first, as in the task statement's table.
    ordered = sorted(task.metrics, key=lambda m: m.name != task.primary_metric)
    return [MetricInfo(m.name, m.label, m.direction, mls_key(m, scale)) for m in ordered]


def _scale_description(task: TaskSpec, scale: str) -> str:
    try:
        return task.scale(scale).description
    except UserError:
        return "a scale this harness no longer defines"


def _sort_key(primary: MetricInfo) -> Callable[[Row], tuple[int, float, float, str, str]]:
    """Ranked rows first, by rank, then (within a tie) by the primary metric's mean."""
    def key(row: Row) -> tuple[int, float, float, str, str]:
        mean = row.cells[primary.name].mean
        score = math.inf if mean is None else mean if primary.direction == "min" else -mean
        return (0 if row.rank is not None else 1, row.rank or 0, score, row.entrant, row.key)
    return key


def _tables(entries: Sequence[Entry], specs: Mapping[str, TaskSpec]) -> list[Table]:
    attempts = _validate(_dedupe(_attempts_frame(entries, specs)), specs)
    # Each row's attempts in the order they are listed: its latest succeeded seed first (the
    # representative), else its latest attempt.
    attempts = attempts.sort_values(["eligible", "finished_at", "attempt_id"], ascending=False,
                                    kind="stable")
    attempts["row"] = attempts.groupby(list(KEY), sort=True).ngroup()
    attempts["link"] = [
        AttemptLink(attempt_id=a, status=status, reason=reason, source=entries[i].source,
                    result_path=entries[i].result_path, audit=entries[i].audit,
                    # An invalid record's value is no score, not even in the details.
                    primary=_num(primary) if status != INVALID else None,
                    spliced_sha256=entries[i].hashes.get("spliced", ""))
        for i, a, status, reason, primary in attempts[
            ["idx", "attempt_id", "status", "reason", "primary"]].itertuples(index=False)]
    links = attempts.groupby("row", sort=True)["link"].agg(list)
    rows = _rows_frame(attempts)
    stats, best_rows, ranked = _stats_frame(entries, attempts, rows, specs)
    cells = _cells(stats)
    curves, bands = _mean_curves(entries, attempts, specs)

    metrics: dict[tuple[str, ...], list[MetricInfo]] = {
        (task, version, scale): _table_metrics(specs[task], scale)
        for task, version, scale in rows[list(TABLE_KEY)].drop_duplicates().itertuples(
            index=False)}
    by_table: dict[tuple[str, ...], dict[int, Row]] = {}
    for r in rows.itertuples():
        key = tuple(str(getattr(r, c)) for c in KEY)
        rep, n, n_failed = entries[r.rep], int(r.n), int(r.runs - r.n)
        mine = cells.get(r.Index, {})
        by_table.setdefault(key[:3], {})[r.Index] = Row(
            key="/".join(key), task=r.task, task_version=r.task_version, scale=r.scale,
            entrant=entrant_of(r.mode, r.agent, r.model, rep.name), name=rep.name,
            agent=r.agent, mode=r.mode, model=r.model, baseline=bool(r.baseline),
            status=r.status, reason=r.reason,
            rank=ranked[r.Index].rank if r.Index in ranked else None, n=n, n_failed=n_failed,
            cells={m.name: mine.get(m.name, EMPTY_CELL) for m in metrics[key[:3]]},
            attempts=links[r.Index], details=details(rep, r.status, r.reason, n, n_failed),
            curve=curves.get(r.Index, []), curve_ci95=bands.get(r.Index, []),
            tied=r.Index in ranked and ranked[r.Index].tied,
            p_best=ranked[r.Index].p_best if r.Index in ranked else None)
    out = []
    for (task, version, scale), table_rows in sorted(by_table.items()):
        spec = specs[task]
        best_id = best_rows.get((task, version, scale))
        best = table_rows[best_id] if best_id is not None else None
        out.append(Table(id=_slug(task, version, scale), task=task, task_version=version,
                         scale=scale, scale_description=_scale_description(spec, scale),
                         primary=spec.primary_metric, metrics=metrics[(task, version, scale)],
                         best_baseline=best.entrant if best else None,
                         best_baseline_key=best.key if best else None,
                         rows=sorted(table_rows.values(),
                                     key=_sort_key(metrics[(task, version, scale)][0]))))
    return out


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(parts)).strip("-").lower()
