"""The leaderboard: every final result, one row per entrant, per task and scale.

    collect.py    result.json files (through harness.record) and the ledger's final
                  submissions -> Entry, one per final attempt (Collected)
    aggregate.py  pandas: dedupe, validate, group by key, stats, ranks and deltas -> Board
    details.py    a row's details from its representative attempt's folder
    running.py    attempts in progress: how far each is and its curves so far, from its
                  folder (shown beside the tables, never ranked)
    board.py      the dataclasses (Entry, Board, Table, Row, Cell, ...) and board.json
    export.py     CSV, Markdown, JSON with the MLS-Bench keys
    page.py       the self-contained HTML page (jinja2, inline SVG plots)
    pipeline.py   build_board, publish, baselines_page, default_home

Pipeline: collect() -> Collected -> aggregate() -> Board -> write_board (board.json) ->
page | export. docs/leaderboard.md describes the row model.
"""

from harness.leaderboard.aggregate import aggregate
from harness.leaderboard.board import (
    BOARD_SCHEMA,
    INVALID,
    KEY,
    AttemptLink,
    Board,
    Cell,
    Collected,
    Details,
    Entry,
    MetricInfo,
    Problem,
    Row,
    RunningAttempt,
    Table,
    board_from_json,
    board_to_json,
    entrant_of,
    mls_key,
    read_board,
    write_board,
)
from harness.leaderboard.collect import (
    SKIP_NO_SUBMISSION,
    SKIP_SESSION_TEST,
    collect,
    collect_files,
    collect_ledger,
    result_files,
)
from harness.leaderboard.export import EXPORT_FORMATS, EXPORT_SCHEMA, export
from harness.leaderboard.pipeline import baselines_page, build_board, default_home, publish

__all__ = [
    "BOARD_SCHEMA", "EXPORT_FORMATS", "EXPORT_SCHEMA", "INVALID", "KEY", "SKIP_NO_SUBMISSION",
    "SKIP_SESSION_TEST", "AttemptLink", "Board", "Cell", "Collected", "Details", "Entry",
    "MetricInfo", "Problem", "Row", "RunningAttempt", "Table", "aggregate", "baselines_page",
    "board_from_json", "board_to_json", "build_board", "collect", "collect_files",
    "collect_ledger", "default_home", "entrant_of", "export", "mls_key", "publish",
    "read_board", "result_files", "write_board",
]
