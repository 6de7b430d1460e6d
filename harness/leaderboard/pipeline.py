"""The leaderboard's pipeline end to end: collect -> aggregate -> board.json and the page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.errors import UserError
from harness.leaderboard.aggregate import aggregate
from harness.leaderboard.board import Board, write_board
from harness.leaderboard.collect import collect
from harness.ledger import LEDGER_FILE


def build_board(runs_dirs: Sequence[Path] = (), *, home: Path | None = None,
                files: Sequence[Path] = (), tasks: Sequence[str] | None = None) -> Board:
    collected = collect(runs_dirs, home=home, files=files)
    if not collected.records and not collected.problems and not collected.live:
        where = ", ".join(collected.sources) or "no source"
        left = "; ".join(f"{n} {why}" for why, n in sorted(collected.skipped.items()))
        raise UserError(f"no final results to aggregate ({where})"
                        + (f"; left out: {left}" if left else ""),
                        fix="run `harness run`/`harness baselines`, or pass --runs-dir and "
                            "--home where attempts and the ledger are")
    return aggregate(collected, tasks=tasks)


def publish(board: Board, out_dir: Path) -> Path:
    """board.json and index.html in out_dir; the page's path."""
    from harness.leaderboard.page import write_page

    write_board(board, out_dir / "board.json")
    return write_page(board, out_dir / "index.html")


def baselines_page(results: Sequence[Path], out_dir: Path) -> Path:
    """The page of the runs `harness baselines` just made (and their board.json)."""
    return publish(aggregate(collect(files=results)), out_dir)


def default_home() -> Path | None:
    """The ledger's home when a ledger exists there, else None (nothing to read)."""
    from harness.ledger import resolve_home

    home = resolve_home(None)
    return home if (home / LEDGER_FILE).is_file() else None
