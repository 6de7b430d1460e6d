"""The board as CSV, Markdown or JSON, with the MLS-Bench metric keys; the number formats the
page shares."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from harness.errors import UserError
from harness.leaderboard.board import Board
from harness.leaderboard.stats import ALPHA

EXPORT_SCHEMA = "harness-leaderboard-export/1"
EXPORT_FORMATS = ("csv", "md", "json")


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


def _export_rows(board: Board) -> list[dict[str, Any]]:
    """Flat rows: identity, rank (with `tied` and the primary metric's `p_best`), status, and
    per metric its MLS key (mean), `_std`, `_ci95`, `_n`, `_delta` and `_lm_eval_stderr`
    (lm-eval's own standard error of one run, averaged over the seeds) columns."""
    out = []
    for t in board.tables:
        for r in t.rows:
            row: dict[str, Any] = {
                "task": r.task, "task_version": r.task_version, "scale": r.scale,
                "rank": r.rank, "tied": r.tied, "p_best": r.p_best, "model": r.entrant,
                "type": r.mode, "agent": r.agent, "llm": r.model, "submission": r.name,
                "status": r.status, "reason": r.reason,
                "n": r.n, "n_failed": r.n_failed, "baseline": r.baseline}
            for m in t.metrics:
                c = r.cells[m.name]
                row.update({m.mls_key: c.mean, f"{m.mls_key}_std": c.std,
                            f"{m.mls_key}_ci95": c.ci95, f"{m.mls_key}_n": c.n,
                            f"{m.mls_key}_delta": c.delta,
                            f"{m.mls_key}_lm_eval_stderr": c.lm_eval_stderr})
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


def export_markdown(board: Board) -> str:
    out = [f"# Leaderboard ({board.generated_at})", ""]
    for t in board.tables:
        out += [f"## {t.task} {t.task_version} · scale `{t.scale}`", "",
                f"Scale {t.scale}: {t.scale_description}. Ranked by {t.metrics[0].label} "
                f"{arrow(t.metrics[0].direction)}; mean ± the 95% confidence interval "
                f"(Student t) over n seeds; [se …]: lm-eval's standard error of one run; "
                f"ranks marked = are tied (Welch's t-test, p ≥ {ALPHA}); Δ against the best "
                f"baseline ({t.best_baseline or 'none'}).", ""]
        head = ["Rank", "Model", "Type", "n", "Status",
                *(f"{m.label} {arrow(m.direction)} (`{m.mls_key}`)" for m in t.metrics)]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in t.rows:
            cells = []
            for m in t.metrics:
                c = r.cells[m.name]
                text = fmt_value(c.mean)
                if c.ci95 is not None:
                    text += f" ± {fmt_value(c.ci95)}"
                if c.lm_eval_stderr is not None:
                    text += f" [se {fmt_value(c.lm_eval_stderr)}]"
                if c.delta is not None and not r.baseline:
                    text += f" (Δ {fmt_delta(c.delta)})"
                cells.append(text)
            rank = "-" if r.rank is None else f"{r.rank} =" if r.tied else str(r.rank)
            out.append("| " + " | ".join([rank, _md(r.entrant), r.mode,
                                          str(r.n), r.status, *cells]) + " |")
        out.append("")
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def export(board: Board, fmt: str) -> str:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}", fix=f"use {', '.join(EXPORT_FORMATS)}")
    return {"csv": export_csv, "md": export_markdown, "json": export_json}[fmt](board)
