"""The leaderboard as one self-contained HTML page: jinja2 (harness/templates/leaderboard.html.j2),
inline CSS and JS, inline SVG.

Nothing on the page is fetched: no CDN, no font, no image file. The plot is a static SVG that
matplotlib draws from the board's curves on its SVG canvas directly (no pyplot, no display,
no GUI backend: safe on a headless server and in threads).
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup, escape

from harness.leaderboard.board import Board, Cell, Row, RunningAttempt, Table
from harness.leaderboard.export import arrow, fmt_delta, fmt_value
from harness.leaderboard.stats import ALPHA
from harness.progress import clock
from harness.record import Status
from harness.runtime.fileio import atomic_write_text

TEMPLATE = "leaderboard.html.j2"
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
MAX_CURVES = 12  # more lines than this are unreadable in one plot


@dataclass(frozen=True)
class Plot:
    svg: Markup  # "" when no row has a curve
    caption: str


def plotted_rows(table: Table, limit: int = MAX_CURVES) -> list[Row]:
    """Every baseline with a curve, then the best-ranked others, up to `limit` lines."""
    with_curve = [r for r in table.rows if r.curve and r.rank is not None]
    baselines = [r for r in with_curve if r.baseline][:limit]
    others = [r for r in with_curve if not r.baseline][:max(0, limit - len(baselines))]
    return sorted(baselines + others, key=lambda r: (r.rank or 0, r.key))


def _strip_svg(text: str) -> str:
    """The <svg> element alone: no XML prolog, doctype or RDF metadata (whose namespace
    URLs would look like outside references)."""
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def loss_plot(table: Table) -> Plot:
    rows = plotted_rows(table)
    shown = sum(1 for r in table.rows if r.curve and r.rank is not None)
    if not rows:
        return Plot(Markup(""), "No validation-loss curve was recorded for the ranked rows.")
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    # hashsalt: matplotlib derives the SVG's element ids from it; one salt per table keeps
    # the ids of two plots on one page apart. fonttype none: text stays text (small, crisp).
    with matplotlib.rc_context({"svg.hashsalt": table.id, "svg.fonttype": "none"}):
        # Fixed margins, not constrained layout: that measures every text, a second per plot.
        fig = Figure(figsize=(9.5, 4.2))
        fig.subplots_adjust(left=0.07, right=0.66, top=0.92, bottom=0.12)
        FigureCanvasSVG(fig)
        ax = fig.add_subplot()
        # tab10's ten distinct hues while they suffice; tab20 adds lighter twins beyond.
        colors = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
        for i, r in enumerate(rows):
            steps = [s for s, _ in r.curve]
            vals = [v for _, v in r.curve]
            color = colors(i % colors.N)
            ax.plot(steps, vals, color=color, linestyle="--" if r.baseline else "-",
                    marker="o" if len(steps) <= 20 else None, markersize=3, linewidth=1.4,
                    label=f"#{r.rank} {r.entrant} ({r.mode}, n={r.n})")
            if r.curve_ci95:
                # The error band: the mean's 95% interval over the seeds, at each step.
                mean = dict(r.curve)
                at = [s for s, _ in r.curve_ci95]
                band = ax.fill_between(at, [mean[s] - h for s, h in r.curve_ci95],
                                       [mean[s] + h for s, h in r.curve_ci95],
                                       color=color, alpha=0.18, linewidth=0)
                band.set_gid(f"ci-{table.id}-{i}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation loss")
        ax.set_title(f"Validation loss, scale {table.scale} (mean over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    caption = (f"Validation loss against iteration for {len(rows)} of the {shown} ranked "
               f"row(s) with a curve at scale {table.scale}"
               + (": every baseline (dashed) and the best-ranked others" if len(rows) < shown
                  else "; baselines dashed")
               + ("; shaded: the 95% confidence interval of the mean over the seeds."
                  if any(r.curve_ci95 for r in rows) else "."))
    return Plot(Markup(_strip_svg(buf.getvalue())), caption)


def running_plot(r: RunningAttempt) -> Markup:
    """One running attempt's curves so far: train loss per log interval, val loss per
    evaluation; "" before its first logged step."""
    if not r.train_curve and not r.val_curve:
        return Markup("")
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.hashsalt": r.attempt_id, "svg.fonttype": "none"}):
        fig = Figure(figsize=(6.0, 2.6))
        fig.subplots_adjust(left=0.11, right=0.97, top=0.88, bottom=0.18)
        FigureCanvasSVG(fig)
        ax = fig.add_subplot()
        if r.train_curve:
            ax.plot([s for s, _ in r.train_curve], [v for _, v in r.train_curve],
                    color="#8fa3bf", linewidth=1.0, label="train loss")
        if r.val_curve:
            ax.plot([s for s, _ in r.val_curve], [v for _, v in r.val_curve], color="#2f6feb",
                    marker="o", markersize=3, linewidth=1.4, label="val loss")
        if r.total:
            ax.set_xlim(0, r.total)  # the whole run's length: how far it is, at a glance
        ax.set_xlabel("iteration")
        ax.set_title(f"{r.name} · {r.scale}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return Markup(_strip_svg(buf.getvalue()))


def colour_diff(diff: str) -> Markup:
    """The diff, escaped, one span per line classed by its kind (done here, not in jinja:
    pages with thousands of rows render in seconds)."""
    kinds = {"+": "add", "-": "del", "@": "hunk"}
    lines = []
    for line in diff.splitlines():
        kind = "meta" if line.startswith(("+++", "---")) else kinds.get(line[:1], "ctx")
        lines.append(f'<span class="{kind}">{escape(line)}</span>')
    return Markup("\n".join(lines))


def delta_class(cell: Cell) -> str:
    if cell.delta is None or cell.delta == 0:
        return "same"
    return "better" if cell.improved else "worse"


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


def render_page(board: Board, page_dir: Path) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(fmt=fmt_value, arrow=arrow, diff=colour_diff, delta_class=delta_class,
                       href=lambda p: relpath(p, page_dir) if p else "",
                       signed=fmt_delta, clock=clock)
    plots = {t.id: loss_plot(t) for t in board.tables}
    running_plots = {r.attempt_id: running_plot(r) for r in board.live}
    return env.get_template(TEMPLATE).render(board=board, plots=plots,
                                             running_plots=running_plots, alpha=ALPHA,
                                             succeeded=Status.SUCCEEDED.value,
                                             tasks=_task_names(board.tables))


def _task_names(tables: Sequence[Table]) -> str:
    return ", ".join(dict.fromkeys(f"{t.task} {t.task_version}" for t in tables)) or "no task"


def write_page(board: Board, path: Path) -> Path:
    atomic_write_text(path, render_page(board, path.resolve().parent))
    return path
