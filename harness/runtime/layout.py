"""The region-marker parser: a template's text as frozen segments interleaved with editable
regions (`Layout`), shared by the host (splicing, the edit session) and the stage processes
(run-time integrity finds the frozen lines of a spliced file with it).

Text conventions, used everywhere here and in harness.regions:
  * CRLF and lone CR become LF before anything else;
  * text -> lines: "" is no lines; otherwise one trailing "\\n" is dropped and the rest is
    split on "\\n" only (so "\\n" is one empty line, and U+2028 etc. stay inside a line);
  * lines -> text: each line followed by "\\n" ("" for no lines). The two round-trip.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from harness.errors import UserError

BEGIN_MARKER = re.compile(r"^# >>> EDITABLE REGION (?P<id>[a-z][a-z0-9_]*) >>>$")
END_MARKER = re.compile(r"^# <<< EDITABLE REGION (?P<id>[a-z][a-z0-9_]*) <<<$")


def begin_marker(region_id: str) -> str:
    return f"# >>> EDITABLE REGION {region_id} >>>"


def end_marker(region_id: str) -> str:
    return f"# <<< EDITABLE REGION {region_id} <<<"


# Anything a reader could take for a marker: the exact markers and near misses
# (indented, other case, extra spaces). A near miss is not parsed as a boundary, so
# letting one through would show the agent a boundary that does not exist.
_MARKER_LIKE = re.compile(r"^\s*#\s*(?:>>>|<<<)\s*EDITABLE\s+REGION\b", re.IGNORECASE)


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_to_lines(text: str) -> tuple[str, ...]:
    """Text -> lines, by the module's conventions ("" -> (), "\\n" -> ("",))."""
    text = normalise_newlines(text)
    if not text:
        return ()
    if text.endswith("\n"):
        text = text[:-1]
    return tuple(text.split("\n"))


def lines_to_text(lines: Sequence[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


def is_marker_like(line: str) -> bool:
    # The substring test is implied by the regex and skips it for nearly every line.
    return (">>>" in line or "<<<" in line) and _MARKER_LIKE.match(line) is not None


def _marker_id(pattern: re.Pattern[str], line: str) -> str | None:
    m = pattern.match(line)
    return m["id"] if m else None


@dataclass(frozen=True)
class Region:
    id: str
    lines: tuple[str, ...]  # content lines without trailing "\n"

    def text(self) -> str:
        return lines_to_text(self.lines)


@dataclass(frozen=True)
class Layout:
    """A parsed template: frozen segments interleaved with regions.

    segments[k] ends with region k's BEGIN marker and segments[k + 1] starts with its END
    marker; __post_init__ enforces this, so every Layout renders to text that parses back
    to itself.
    """

    segments: tuple[tuple[str, ...], ...]
    regions: tuple[Region, ...]

    def __post_init__(self) -> None:
        if len(self.segments) != len(self.regions) + 1:
            raise ValueError("a Layout needs exactly one more segment than regions")
        for k, region in enumerate(self.regions):
            before, after = self.segments[k], self.segments[k + 1]
            if not before or _marker_id(BEGIN_MARKER, before[-1]) != region.id:
                raise ValueError(f"segment {k} does not end with the BEGIN marker of {region.id}")
            if not after or _marker_id(END_MARKER, after[0]) != region.id:
                raise ValueError(f"segment {k + 1} does not start with the END marker of "
                                 f"{region.id}")

    def lines(self) -> list[str]:
        out = list(self.segments[0])
        for region, segment in zip(self.regions, self.segments[1:], strict=True):
            out += region.lines
            out += segment
        return out

    def render(self) -> str:
        """The full text, each line ending with "\\n"."""
        return lines_to_text(self.lines())

    def region_ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.regions)

    def index(self, region_id: str) -> int:
        for k, region in enumerate(self.regions):
            if region.id == region_id:
                return k
        raise UserError(f"no editable region {region_id!r}",
                        fix=f"valid region ids: {', '.join(self.region_ids()) or '(none)'}")

    def region(self, region_id: str) -> Region:
        return self.regions[self.index(region_id)]

    def span(self, region_id: str) -> tuple[int, int]:
        """1-based inclusive (first, last) content lines; (first, first - 1) when empty."""
        k = self.index(region_id)
        before = sum(len(s) for s in self.segments[:k + 1])
        before += sum(len(r.lines) for r in self.regions[:k])
        return before + 1, before + len(self.regions[k].lines)

    def spans(self) -> list[tuple[int, int]]:
        return [self.span(r.id) for r in self.regions]

    def with_region(self, region_id: str, lines: Sequence[str], *,
                    where: str | None = None) -> Layout:
        """A copy with one region's content replaced; marker-like lines are refused."""
        k = self.index(region_id)
        new = tuple(lines)
        check_region_lines(new, where=where or f"region {region_id!r}")
        regions = (*self.regions[:k], Region(region_id, new), *self.regions[k + 1:])
        return Layout(self.segments, regions)


def check_region_lines(lines: Sequence[str], *, where: str) -> None:
    """Region content may not contain line breaks or anything that looks like a marker."""
    for n, line in enumerate(lines, start=1):
        if "\n" in line or "\r" in line:
            raise ValueError(f"{where}: line {n} contains a line break")
        if is_marker_like(line):
            raise UserError(
                f"line {n} of the new content is an EDITABLE REGION marker: {line.strip()!r}",
                where=where,
                fix="remove it; region boundaries are frozen and cannot be added, moved or "
                    "removed by a submission")


# --- parsing -------------------------------------------------------------------


def _marker(line: str, where: str) -> tuple[str, str] | None:
    """("begin" | "end", id) for a marker line, None for other lines."""
    if not is_marker_like(line):  # exact markers are marker-like too
        return None
    if (m := BEGIN_MARKER.match(line)) is not None:
        return "begin", m["id"]
    if (m := END_MARKER.match(line)) is not None:
        return "end", m["id"]
    raise UserError(f"line looks like an EDITABLE REGION marker but is not one: {line!r}",
                    where=where,
                    fix="write markers exactly as '# >>> EDITABLE REGION <id> >>>' and "
                        "'# <<< EDITABLE REGION <id> <<<' (no indentation or trailing "
                        "spaces, id in [a-z0-9_])")


class _Parser:
    """One pass over the lines; each marker closes a segment or a region."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.segments: list[tuple[str, ...]] = []
        self.regions: list[Region] = []
        self.frozen: list[str] = []
        self.content: list[str] = []
        self.open: tuple[str, int] | None = None  # (id, line of its BEGIN marker)
        self.seen: dict[str, int] = {}

    def error(self, n: int, what: str) -> UserError:
        return UserError(what, where=f"{self.where}:{n}",
                         fix="each region needs one BEGIN and one END marker with the same id, "
                             "in that order, not nested")

    def feed(self, n: int, line: str) -> None:
        marker = _marker(line, f"{self.where}:{n}")
        if marker is None:
            (self.content if self.open else self.frozen).append(line)
        elif marker[0] == "begin":
            self.begin(n, line, marker[1])
        else:
            self.end(n, line, marker[1])

    def begin(self, n: int, line: str, rid: str) -> None:
        if self.open is not None:
            raise self.error(n, f"BEGIN marker of {rid!r} inside region {self.open[0]!r} "
                                f"(opened at line {self.open[1]})")
        if rid in self.seen:
            raise self.error(n, f"region {rid!r} appears twice (first at line {self.seen[rid]})")
        self.seen[rid] = n
        self.segments.append((*self.frozen, line))
        self.frozen = []
        self.open = (rid, n)

    def end(self, n: int, line: str, rid: str) -> None:
        if self.open is None:
            raise self.error(n, f"END marker of {rid!r} without a BEGIN marker before it")
        if rid != self.open[0]:
            raise self.error(n, f"END marker of {rid!r} closes region {self.open[0]!r} "
                                f"(opened at line {self.open[1]})")
        self.regions.append(Region(rid, tuple(self.content)))
        self.content = []
        self.frozen = [line]
        self.open = None

    def finish(self) -> Layout:
        if self.open is not None:
            raise self.error(self.open[1], f"region {self.open[0]!r} is never closed")
        return Layout((*self.segments, tuple(self.frozen)), tuple(self.regions))


def parse_layout(text: str, *, where: str = "template") -> Layout:
    """Split a template at its marker lines; bad markers are a UserError naming the line."""
    parser = _Parser(where)
    for n, line in enumerate(text_to_lines(text), start=1):
        parser.feed(n, line)
    return parser.finish()
