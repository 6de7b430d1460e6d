"""The board's data: one Entry per final attempt (what collect reads), the Board it aggregates
to (Table, Row, Cell, ...), and the board file (`board.json`: write_board, read_board)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import UserError
from harness.runtime.fileio import atomic_write_text, sha256_bytes
from harness.task import MetricSpec

T = TypeVar("T")

BOARD_SCHEMA = "harness-leaderboard/1"
# The board's own verdict, not an attempt status: the record cannot be trusted (tampered,
# conflicting copies, a success without its primary metric, a rule broken at run time).
INVALID = "invalid"
NO_LABEL = "-"
KEY = ("task", "task_version", "scale", "mode", "agent", "model", "variant")
TABLE_KEY = KEY[:3]  # each (task, task version, scale) is its own table


# --- one attempt, as collected -------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
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
    status: str  # a finished harness.record.Status's value, or INVALID
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
    # Each stage's recorded curve (its rows, by stage name): the task's metric table says
    # which stage's rows hold the primary metric's curve (MetricSpec.stage).
    curves: dict[str, tuple[Any, ...]] = field(default_factory=dict, hash=False)
    # lm-eval's own standard error of each metric it scored (the eval set's sampling error
    # of this one run), by metric name.
    stderr: dict[str, float] = field(default_factory=dict, hash=False)

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


@dataclass(frozen=True)
class RunningAttempt:
    """An attempt still in progress, as far as its own files say at the build (running.py):
    shown beside the tables, never ranked, never a score."""

    attempt_id: str
    name: str  # the submission's, or the session's test ("<session> test #N")
    task: str
    scale: str
    status: str  # an in-progress harness.record.Status's value
    started_at: str
    attempt_dir: str
    iter: int | None = None  # None before the first progress report
    total: int | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    tokens_per_s: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    checkpoint_iter: int | None = None
    resumed_from: int | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list, hash=False)
    val_curve: list[tuple[int, float]] = field(default_factory=list, hash=False)


@dataclass
class Collected:
    records: list[Entry] = field(default_factory=list)
    live: list[RunningAttempt] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)


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
    # Half-width of the 95% Student-t interval of the mean (stats.py); None for one seed.
    ci95: float | None = None
    # lm-eval's standard error of one run's value (the eval set's sampling error), averaged
    # over the seeds; None for what lm-eval gives none (val_loss, and metrics without one).
    lm_eval_stderr: float | None = None


EMPTY_CELL = Cell(mean=None, std=None, n=0, delta=None, improved=None)


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
    status: str  # Status.SUCCEEDED's value (ranked), a failure status's, or INVALID
    reason: str
    rank: int | None
    n: int  # succeeded seeds
    n_failed: int
    cells: dict[str, Cell]
    attempts: list[AttemptLink]
    details: Details
    curve: list[tuple[int, float]]  # the primary metric's mean curve over the seeds, by step
    # The tie rule of stats.py: shares its rank with a row Welch's test cannot tell it from;
    # and the test's p-value on the primary metric against the table's best row.
    tied: bool = False
    p_best: float | None = None
    # The half-width of the 95% interval of that mean, at the steps with two seeds or more.
    curve_ci95: list[tuple[int, float]] = field(default_factory=list)

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
    live: list[RunningAttempt] = field(default_factory=list)


def mls_key(metric: MetricSpec | MetricInfo, scale: str) -> str:
    """The MLS-Bench key of a metric at a scale: losses and perplexities carry the scale name
    (`<metric>_gpt-345m`), accuracies (direction max) `lm-eval-` and the scale's size
    (`<metric>_lm-eval-345m`); a scale without the `gpt-` prefix gives its whole name
    (`<metric>_smoke`, `<metric>_lm-eval-smoke`)."""
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
    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers. No
    # indent: it would switch json to its pure-Python encoder, seconds on a large board.
    atomic_write_text(path, json.dumps(board_to_json(board), separators=(",", ":"),
                                       allow_nan=False) + "\n")


def _from(cls: type[T], data: Any, **nested: Any) -> T:
    """A dataclass from its asdict() form; `nested` gives the fields already converted. A
    field with a default may be missing (a board written before the field existed)."""
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{k: nested[k] if k in nested else data[k] for k, f in fields.items()
                  if k in nested or k in data or (f.default is MISSING
                  and f.default_factory is MISSING)})


def board_from_json(data: Any, *, where: str) -> Board:
    """The inverse of board_to_json; a UserError for anything that is not a board file."""
    if not isinstance(data, dict) or data.get("schema") != BOARD_SCHEMA:
        raise UserError(f"not a leaderboard file (schema {BOARD_SCHEMA})", where=where,
                        fix="write one with `harness leaderboard build`")
    try:
        tables = [_from(Table, t, metrics=[_from(MetricInfo, m) for m in t["metrics"]],
                        rows=[_row_from_json(r) for r in t["rows"]]) for t in data["tables"]]
        return _from(Board, data, tables=tables,
                     problems=[_from(Problem, p) for p in data["problems"]],
                     # Absent from a board written before running attempts were shown.
                     live=[_running_from_json(r) for r in data.get("live", [])])
    except (KeyError, TypeError) as e:
        raise UserError(f"the leaderboard file is incomplete ({type(e).__name__}: {e})",
                        where=where, fix="rebuild it with `harness leaderboard build`") from None


def _row_from_json(r: Any) -> Row:
    return _from(Row, r, cells={k: _from(Cell, c) for k, c in r["cells"].items()},
                 attempts=[_from(AttemptLink, a) for a in r["attempts"]],
                 details=_from(Details, r["details"]),
                 curve=[(int(s), float(v)) for s, v in r["curve"]],
                 curve_ci95=[(int(s), float(v)) for s, v in r.get("curve_ci95", [])])


def _running_from_json(r: Any) -> RunningAttempt:
    return _from(RunningAttempt, r,
                 train_curve=[(int(s), float(v)) for s, v in r["train_curve"]],
                 val_curve=[(int(s), float(v)) for s, v in r["val_curve"]])


def read_board(path: Path) -> Board:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no leaderboard file {path}",
                        fix="run `harness leaderboard build` first (or pass --board)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the leaderboard file: {e}", where=str(path)) from None
    return board_from_json(data, where=str(path))
