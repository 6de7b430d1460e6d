"""The one atomic writer and the one file hasher: every write goes to a temporary file in the
same folder, flushed to disk, then `os.replace`d over the target, so a reader sees the old
file or the new one, never half of one; the folder is fsynced after the rename, so the new
file survives a power cut too."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, default: Callable[[Any], Any] | None = None,
                      sort_keys: bool = True) -> None:
    """Indented, one trailing newline; keys sorted unless the caller's order is the format's
    (the shard manifests keep theirs); `default` as json.dumps takes it."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default)
                      + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        # 16 MiB blocks: shards are hundreds of MB, and larger reads hash them faster.
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# The most the host reads of one file a stage wrote (logs of metrics, reports, records).
MAX_STAGE_FILE_BYTES = 64 * 2**20


def read_stage_file(path: Path, limit: int = MAX_STAGE_FILE_BYTES) -> bytes | None:
    """The bytes of a file in a stage's output folder, read as files that untrusted code may
    have placed must be read: never through a link (a `final.json -> another attempt's file`
    would otherwise be followed by the host, outside any sandbox), never blocking on a FIFO,
    regular files only, at most `limit` bytes. None for anything else, or no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return f.read(limit + 1)[:limit]


def read_stage_json(path: Path) -> Any:
    """A JSON file a stage wrote (read_stage_file), parsed; None when unreadable."""
    data = read_stage_file(path)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        return None
