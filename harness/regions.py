"""Editable regions of a template: parse, splice, extract, and the agent's edit session.

A template is held as frozen segments interleaved with region contents (`Layout`, parsed by
harness.runtime.layout, which also states the text conventions). Line numbers are always
derived from that structure and never stored, so no sequence of edits can lose, merge or
move a region: the bug of the harness this replaces, whose stored ranges drifted until the
second region vanished.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError
from harness.runtime.layout import (
    Layout,
    check_region_lines,
    is_marker_like,
    lines_to_text,
    parse_layout,
    text_to_lines,
)

# Caps on how much of a long offending edit an error message repeats.
_MAX_HUNKS_SHOWN = 10
_MAX_LINES_SHOWN = 8


def format_range(first: int, last: int) -> str:
    """A 1-based inclusive range as the transcript writes it; an empty one says so."""
    return f"{first}–{last}" if last >= first else f"{first}–{last} (empty)"


# --- splicing ----------------------------------------------------------------------


def splice(template: str, contents: Mapping[str, str]) -> str:
    """The template with the given regions' texts; other regions keep their default."""
    layout = parse_layout(template)
    for rid, text in contents.items():
        layout = layout.with_region(rid, text_to_lines(text))
    return layout.render()


def unified_diff(template: str, spliced: str, *, fromfile: str = "template",
                 tofile: str = "submission") -> str:
    """A standard unified diff (for the record); "" when the texts are equal."""
    diff = difflib.unified_diff(list(text_to_lines(template)), list(text_to_lines(spliced)),
                                fromfile=fromfile, tofile=tofile, lineterm="")
    return lines_to_text(list(diff))


# --- full edited copies ------------------------------------------------------------


@dataclass(frozen=True)
class _Hunk:
    """One difflib opcode that changes the frozen part; ranges are 0-based, half-open."""

    i1: int
    i2: int
    j1: int
    j2: int
    frozen_changed: int


def _editable_mask(layout: Layout) -> tuple[list[bool], set[int]]:
    """Per template line: inside a region's content? And where inserts may go (0-based)."""
    mask = [False] * len(layout.lines())
    insert_ok: set[int] = set()
    for first, last in layout.spans():
        for i in range(first - 1, last):
            mask[i] = True
        # An insert before line index i is inside the region for i in [first-1, last]:
        # from just after the BEGIN marker to just before the END marker.
        insert_ok.update(range(first - 1, last + 1))
    return mask, insert_ok


def _scan_opcodes(layout: Layout, submitted: Sequence[str]) -> tuple[list[_Hunk], list[int]]:
    """Hunks touching frozen lines, and submitted line numbers of markers forged in regions."""
    template = layout.lines()
    mask, insert_ok = _editable_mask(layout)
    matcher = difflib.SequenceMatcher(None, template, list(submitted), autojunk=False)
    hunks: list[_Hunk] = []
    forged: list[int] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        frozen = sum(1 for i in range(i1, i2) if not mask[i])
        if frozen or (tag == "insert" and i1 not in insert_ok):
            hunks.append(_Hunk(i1, i2, j1, j2, frozen if tag != "insert" else j2 - j1))
        else:
            forged += [j + 1 for j in range(j1, j2) if is_marker_like(submitted[j])]
    return hunks, forged


def _clip(prefix: str, lines: Sequence[str]) -> list[str]:
    shown = [f"{prefix} {line}" for line in lines[:_MAX_LINES_SHOWN]]
    if len(lines) > _MAX_LINES_SHOWN:
        shown.append(f"  ... ({len(lines) - _MAX_LINES_SHOWN} more line(s))")
    return shown


def _hunk_heading(h: _Hunk) -> str:
    if h.i2 == h.i1:  # pure insert: name the template line it follows
        return f"after line {h.i1}:" if h.i1 else "before line 1:"
    if h.i2 - h.i1 == 1:
        return f"line {h.i1 + 1}:"
    return f"lines {h.i1 + 1}–{h.i2}:"


def _render_hunks(hunks: Sequence[_Hunk], template: Sequence[str],
                  submitted: Sequence[str]) -> str:
    """Only the offending hunks, numbered by template line, in a unified-diff style."""
    blocks = []
    for h in hunks[:_MAX_HUNKS_SHOWN]:
        body = _clip("-", template[h.i1:h.i2]) + _clip("+", submitted[h.j1:h.j2])
        blocks.append("\n".join([_hunk_heading(h), *body]))
    if len(hunks) > _MAX_HUNKS_SHOWN:
        blocks.append(f"... and {len(hunks) - _MAX_HUNKS_SHOWN} more changed place(s)")
    return "\n".join(blocks)


def extract_from_full_file(template: str, submitted: str, *, where: str) -> dict[str, str]:
    """Region texts of a full edited copy of the template, whose frozen lines must be intact."""
    layout = parse_layout(template)
    lines = text_to_lines(submitted)
    try:
        parsed: Layout | None = parse_layout(submitted, where=where)
    except UserError:
        parsed = None  # broken markers are frozen lines changed: diagnosed below
    # Exact structural match first: difflib can misalign when a region repeats frozen
    # text, but equal segments are proof that only region contents differ.
    if parsed is not None and parsed.segments == layout.segments:
        return {r.id: r.text() for r in parsed.regions}
    hunks, forged = _scan_opcodes(layout, lines)
    if hunks:
        n = sum(h.frozen_changed for h in hunks)
        raise UserError(
            f"{n} frozen line(s) changed", where=where,
            fix="edit only inside the EDITABLE REGION markers; every other line, the markers "
                "included, must stay exactly as in the template",
            details=_render_hunks(hunks, layout.lines(), lines))
    raise UserError(
        f"line {forged[0] if forged else '?'} adds an EDITABLE REGION marker inside a region",
        where=where,
        fix="remove it; region boundaries are frozen and cannot be added, moved or removed")


# --- the agent-facing edit session --------------------------------------------------


class EditSession:
    """The agent-facing editable file, with the operations of the agent transcript.

    Line numbers are 1-based and inclusive and always refer to the CURRENT text. The
    state is a Layout plus a stack of earlier Layouts, so regions cannot drift and undo is
    exact.

    view() convention: one header line
        [Current file: custom_pretrain.py | editable: 38–115, 168–168 | total: 810 lines]
    then one line per file line: the number right-aligned (width 4 or more), then
    " ▸ " for an editable line (inside a region's content) or " | " for a frozen line
    (marker lines included), then the line itself:
          37 | # >>> EDITABLE REGION bitlinear >>>
          38 ▸ # -- Native Low-Bit Linear (BitLinear) Module ---
    An empty region is written "147–146 (empty)": insert into it with
    replace(147, 146, text).
    """

    def __init__(self, template: str, *, filename: str = "custom_pretrain.py") -> None:
        self.filename = filename
        self._layout = parse_layout(template, where=filename)
        self._history: list[Layout] = []

    # -- reading --

    @property
    def layout(self) -> Layout:
        return self._layout

    def text(self) -> str:
        return self._layout.render()

    def regions(self) -> dict[str, str]:
        """Current region texts (lines each ending with "\\n"; "" for an empty region)."""
        return {r.id: r.text() for r in self._layout.regions}

    def editable_ranges(self) -> list[tuple[int, int]]:
        return self._layout.spans()

    def ranges_text(self) -> str:
        return ", ".join(format_range(a, b) for a, b in self.editable_ranges())

    def undo_depth(self) -> int:
        return len(self._history)

    def view(self, start: int | None = None, end: int | None = None) -> str:
        """Numbered lines start..end (default: the whole file); see the class docstring."""
        lines = self._layout.lines()
        total = len(lines)
        first = 1 if start is None else start
        last = total if end is None else end
        if not 1 <= first <= last <= total:
            raise UserError(f"cannot view lines {first}..{last}", where=self.filename,
                            fix=f"use 1 <= start <= end <= {total}")
        editable = {n for a, b in self.editable_ranges() for n in range(a, b + 1)}
        width = max(4, len(str(total)))
        body = [f"{n:>{width}} {'▸' if n in editable else '|'} {lines[n - 1]}"
                for n in range(first, last + 1)]
        header = (f"[Current file: {self.filename} | editable: {self.ranges_text()} "
                  f"| total: {total} lines]")
        return "\n".join([header, *body])

    # -- editing --

    def replace(self, start_line: int, end_line: int, content: str) -> str:
        """Replace lines start..end of one region (end = start - 1: insert before start)."""
        k = self._target_region(start_line, end_line)
        rid = self._layout.regions[k].id
        first, _ = self._layout.span(rid)
        new = text_to_lines(content)
        check_region_lines(new, where=self.filename)  # numbered within `content`
        old = self._layout.regions[k].lines
        lines = old[:start_line - first] + new + old[end_line - first + 1:]
        layout = self._layout.with_region(rid, lines, where=self.filename)
        self._history.append(self._layout)
        self._layout = layout
        if end_line < start_line:
            done = f"Inserted {len(new)} line(s) at line {start_line}"
        else:
            done = f"Replaced lines {start_line}..{end_line} with {len(new)} line(s)"
        return f"OK: {done} in {self.filename}. Editable range: {self.ranges_text()}."

    def undo(self, n: int = 1) -> str:
        """Revert the last n successful replaces."""
        if n < 1 or n > len(self._history):
            raise UserError(f"cannot undo {n} edit(s): {len(self._history)} edit(s) can be "
                            "undone", where=self.filename,
                            fix=f"use 1 <= n <= {len(self._history)}" if self._history
                            else "there is nothing to undo")
        self._layout = self._history[-n]
        del self._history[-n:]
        return (f"Undo complete: restored {n} edit(s) in {self.filename}. "
                f"Editable range: {self.ranges_text()}.")

    def _target_region(self, start: int, end: int) -> int:
        """The index of the one region whose content holds start..end, else a UserError."""
        total = len(self._layout.lines())
        if end < start - 1:
            raise UserError(f"end_line {end} is before start_line {start}", where=self.filename,
                            fix="use end_line >= start_line to replace, or end_line = "
                                "start_line - 1 to insert before start_line")
        if start < 1 or end > total:
            raise UserError(f"lines {start}..{end} are outside the file (1..{total})",
                            where=self.filename,
                            fix=f"edit only inside the editable range(s): {self.ranges_text()}")
        for k, (first, last) in enumerate(self.editable_ranges()):
            # end <= last also bounds an insert (end = start - 1) to start <= last + 1.
            if first <= start and end <= last:
                return k
        raise self._outside_error(start, end)

    def _outside_error(self, start: int, end: int) -> UserError:
        lines = self._layout.lines()
        editable = {n for a, b in self.editable_ranges() for n in range(a, b + 1)}
        if end < start:
            what = f"cannot insert at line {start}: it is not inside an editable region"
            shown = [n for n in (start - 1, start) if 1 <= n <= len(lines)]
            label = "around the insert point:"
        else:
            what = f"lines {start}..{end} are not inside one editable region"
            shown = [n for n in range(start, end + 1) if n not in editable]
            # Never empty: markers are frozen, so even a span across two regions has some.
            label = f"{len(shown)} frozen line(s) in the request:"
        body = [f"{n:>4} | {lines[n - 1]}" for n in shown[:_MAX_LINES_SHOWN]]
        if len(shown) > _MAX_LINES_SHOWN:
            body.append(f"  ... ({len(shown) - _MAX_LINES_SHOWN} more line(s))")
        return UserError(what, where=self.filename,
                         fix=f"edit within one editable range: {self.ranges_text()} "
                             "(nothing was changed)",
                         details="\n".join([label, *body]))

    # -- edit logs --

    def apply_log(self, ops: Sequence[Any], *, where: str = "edit log") -> None:
        """Apply replace/undo ops in order; all or nothing (a failing op restores the start)."""
        saved = (self._layout, list(self._history))
        for i, op in enumerate(ops):
            try:
                self._apply_op(op)
            except UserError as e:
                self._layout, self._history = saved
                raise UserError(f"ops[{i}]: {e.what}", where=where, fix=e.fix,
                                details=e.details) from None

    def _apply_op(self, op: Any) -> None:
        if not isinstance(op, dict):
            raise UserError(f"an op must be an object, not {type(op).__name__}")
        kind = op.get("op")
        if kind == "replace":
            _check_keys(op, {"op", "start_line", "end_line", "content"}, {"filename"})
            if op.get("filename", self.filename) != self.filename:
                raise UserError(f"filename {op['filename']!r} is not {self.filename!r}",
                                fix=f"edit only {self.filename}")
            content = op["content"]
            if not isinstance(content, str):
                raise UserError("'content' must be a string")
            self.replace(_int(op, "start_line"), _int(op, "end_line"), content)
        elif kind == "undo":
            _check_keys(op, {"op"}, {"n"})
            self.undo(_int(op, "n") if "n" in op else 1)
        else:
            raise UserError(f"unknown op {kind!r}",
                            fix="use {\"op\": \"replace\", ...} or {\"op\": \"undo\", ...}")


def _check_keys(op: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(op))
    unknown = sorted(set(op) - required - optional)
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
            ([f"unknown {', '.join(unknown)}"] if unknown else [])
        raise UserError(f"{op['op']} op: {'; '.join(problems)}",
                        fix=f"keys: {', '.join(sorted(required | optional))}")


def _int(op: dict[str, Any], key: str) -> int:
    value = op[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{key!r} must be an integer, not {value!r}")
    return value
