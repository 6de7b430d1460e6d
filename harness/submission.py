"""Load a submission in any of its four forms into region texts.

Forms (auto-detected from the path):
  directory   one file per region, named by the region's `submission_file` in task.toml,
              plus an optional meta.toml; a missing file keeps the template's default;
  region-file a single .py without marker lines: the text of one region (the region whose
              submission_file has that name, else the first python region);
  full-file   a single .py with the template's marker lines: a full edited copy, whose
              frozen lines must be identical to the template's;
  edit-log    a .json list of replace/undo ops (or {"ops": [...]}), replayed on the template.

`Submission.regions` is canonical whatever the form: region text as lines each ending in
"\\n", and only regions that differ from the template's default. So two submissions with
the same effect have the same regions and the same sha256.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.regions import EditSession, extract_from_full_file
from harness.runtime.layout import (
    Layout,
    is_marker_like,
    lines_to_text,
    normalise_newlines,
    parse_layout,
    text_to_lines,
)
from harness.task import RegionSpec, TaskSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_FILE_BYTES = 256 * 1024
MAX_REGION_LINES = 2000
META_FILE = "meta.toml"
META_KEYS = frozenset({"agent", "mode", "model", "name", "description"})
MODES = ("vanilla", "agent", "baseline")
_FORMS_HINT = ("pass a directory of region files, a .py file (a region's text or a full "
               "edited copy of the template) or a .json edit log")


@dataclass(frozen=True)
class Submission:
    kind: str  # "directory" | "region-file" | "full-file" | "edit-log"
    source: Path
    regions: dict[str, str] = field(hash=False)  # region id -> text, only non-default ones
    meta: dict[str, str] = field(hash=False)  # meta.toml [submission]; may be empty
    sha256: str  # of json.dumps(regions, sort_keys=True): the same for every form
    name: str  # meta name, else the directory/file stem


def load_submission(path: str | Path, task: TaskSpec) -> Submission:
    source = Path(path)
    if not source.exists():
        raise UserError("no such file or directory", where=str(source), fix=_FORMS_HINT)
    template = task.template_text()
    meta: dict[str, str] = {}
    if source.is_dir():
        kind = "directory"
        raw, meta = _load_directory(source, task)
    elif source.suffix == ".json":
        kind, raw = "edit-log", _load_edit_log(source, task, template)
    elif source.suffix == ".py":
        kind, raw = _load_py(source, task, template)
    else:
        raise UserError(f"unsupported submission file type {source.suffix or '(none)'!r}",
                        where=str(source), fix=_FORMS_HINT)
    regions = _canonical(raw, parse_layout(template, where=task.template), str(source))
    digest = hashlib.sha256(json.dumps(regions, sort_keys=True).encode("utf-8")).hexdigest()
    # resolve(): a directory given as "." has no name of its own.
    name = meta.get("name") or (source.resolve().name if source.is_dir() else source.stem)
    return Submission(kind=kind, source=source, regions=regions, meta=meta, sha256=digest,
                      name=name)


# --- reading files -------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A submitted file as text: a regular file (never a link, a FIFO or a device), bounded
    size, UTF-8, no NUL bytes, newlines normalised."""
    where = str(path)
    try:
        data = _read_regular(path)
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", where=where) from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(f"contains a NUL byte at byte offset {nul}", where=where,
                        fix="submit plain UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset "
                        f"{e.start} (line {line})", where=where,
                        fix="save the file as UTF-8") from None
    # Editors on Windows may add a BOM; inside a spliced file it would be a syntax error.
    return normalise_newlines(text.removeprefix("\ufeff"))


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file, opened without following a link in its last component
    (a submitted `bitlinear.py -> /etc/passwd` must not be read) and without blocking on a
    FIFO; its size checked before anything is read, so a huge file is never loaded."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError("is a symbolic link; submitted files are read only as regular "
                            "files", where=where,
                            fix="copy the file's contents into the submission instead of "
                                "linking it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"is not a regular file ({_kind(st.st_mode)})", where=where,
                        fix="submit plain text files only")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_FILE_BYTES:
            raise UserError(f"file is {st.st_size} bytes; the limit is {MAX_FILE_BYTES} "
                            "(256 KiB)", where=where, fix="submit only the region code")
        return f.read(MAX_FILE_BYTES + 1)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _special_entries(directory: Path) -> list[str]:
    """Entries of a submission folder that are links or special files: refused, even those
    the harness would not read, so that what is checked is what is there."""
    out = []
    for p in sorted(directory.iterdir()):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out.append(f"{p.name} (a symbolic link)")
        elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            out.append(f"{p.name} ({_kind(st.st_mode)})")
    return out


# --- the four forms --------------------------------------------------------------------


def _template_regions(task: TaskSpec) -> list[RegionSpec]:
    return [r for r in task.regions if r.file == task.template]


def _load_directory(directory: Path, task: TaskSpec) -> tuple[dict[str, str], dict[str, str]]:
    by_file = {r.submission_file: r.id for r in _template_regions(task)}
    expected = ", ".join([*by_file, META_FILE])
    special = _special_entries(directory)
    if special:
        raise UserError(f"links or special files in the submission folder: "
                        f"{', '.join(special)}", where=str(directory),
                        fix="a submission folder holds regular files only: copy the contents "
                            "in instead of linking them")
    unknown = sorted(p.name for p in directory.iterdir() if p.suffix == ".py"
                     and p.name not in by_file)
    if unknown:
        raise UserError(f"unexpected file(s) {', '.join(unknown)}", where=str(directory),
                        fix=f"a submission directory holds only: {expected}")
    regions = {rid: _region_file(directory / name, rid)
               for name, rid in by_file.items() if (directory / name).exists()}
    meta_path = directory / META_FILE
    meta = _load_meta(meta_path) if meta_path.exists() else {}
    if not regions and not meta:
        raise UserError("no region file and no meta.toml", where=str(directory),
                        fix=f"add at least one of: {expected}")
    return regions, meta


def _region_file(path: Path, rid: str) -> str:
    text = read_text(path)
    if any(is_marker_like(line) for line in text_to_lines(text)):
        raise UserError("contains EDITABLE REGION marker lines", where=str(path),
                        fix=f"{path.name} holds only the text of region {rid!r}; to submit a "
                            "full edited copy of the template, pass that .py file itself")
    return text


def _load_py(path: Path, task: TaskSpec, template: str) -> tuple[str, dict[str, str]]:
    text = read_text(path)
    if any(is_marker_like(line) for line in text_to_lines(text)):
        return "full-file", extract_from_full_file(template, text, where=str(path))
    regions = _template_regions(task)
    named = [r for r in regions if r.submission_file == path.name]
    target = named or [r for r in regions if r.kind == "python"]
    if not target:
        raise UserError("the task has no python region for a single .py file",
                        where=str(path), fix=_FORMS_HINT)
    return "region-file", {target[0].id: text}


def _load_edit_log(path: Path, task: TaskSpec, template: str) -> dict[str, str]:
    where = str(path)
    try:
        data: Any = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                        where=where) from None
    if isinstance(data, dict):
        if set(data) != {"ops"}:
            raise UserError(f"an edit log object has exactly one key 'ops', not "
                            f"{', '.join(map(repr, sorted(data))) or 'none'}", where=where,
                            fix='write {"ops": [...]} or just the list [...]')
        data = data["ops"]
    if not isinstance(data, list):
        raise UserError(f"an edit log is a list of ops, not {type(data).__name__}",
                        where=where, fix='write [{"op": "replace", ...}, {"op": "undo"}, ...]')
    session = EditSession(template, filename=Path(task.template).name)
    session.apply_log(data, where=where)
    return session.regions()


def _load_meta(path: Path) -> dict[str, str]:
    where = str(path)
    try:
        data = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"invalid TOML: {e}", where=where) from None
    if set(data) - {"submission"}:
        raise UserError(f"unknown table(s) {', '.join(sorted(set(data) - {'submission'}))}",
                        where=where, fix="put every key under [submission]")
    table = data.get("submission", {})
    if not isinstance(table, dict):
        raise UserError("'submission' must be a table", where=where, fix="write [submission]")
    unknown = sorted(set(table) - META_KEYS)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} in [submission]", where=where,
                        fix=f"valid keys: {', '.join(sorted(META_KEYS))}")
    bad = sorted(k for k, v in table.items() if not isinstance(v, str))
    if bad:
        raise UserError(f"{', '.join(bad)} must be string(s)", where=where)
    if "mode" in table and table["mode"] not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, not {table['mode']!r}",
                        where=where)
    return dict(table)


# --- canonical form ----------------------------------------------------------------------


def _canonical(raw: Mapping[str, str], layout: Layout, where: str) -> dict[str, str]:
    """Normalised text of each region that differs from its default, within the limits."""
    out: dict[str, str] = {}
    for rid, text in raw.items():
        lines = text_to_lines(text)
        if len(lines) > MAX_REGION_LINES:
            raise UserError(f"region {rid!r} has {len(lines)} lines; the limit is "
                            f"{MAX_REGION_LINES}", where=where, fix="shorten the region's code")
        layout.with_region(rid, lines, where=where)  # unknown ids and forged markers fail here
        if lines != layout.region(rid).lines:
            out[rid] = lines_to_text(lines)
    return out
