"""One object owns an attempt's directory; every write is atomic (temp file + os.replace)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def new_attempt_id(name: str, digest: str) -> str:
    """Sortable by time, readable, and unique even for two starts in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "submission"
    return f"{stamp}-{safe}-{digest[:8]}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class AttemptPaths:
    root: Path

    @classmethod
    def create(cls, runs_dir: Path, attempt_id: str) -> AttemptPaths:
        # Absolute: stages run with the attempt as their working directory.
        root = runs_dir.resolve() / attempt_id
        root.mkdir(parents=True, exist_ok=False)
        return cls(root)

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def spliced(self) -> Path:
        return self.root / "custom_pretrain.py"

    @property
    def diff(self) -> Path:
        return self.root / "submission.diff"

    @property
    def regions(self) -> Path:
        return self.root / "submission.json"

    @property
    def checks(self) -> Path:
        return self.root / "checks.json"

    def stage_dir(self, stage: str) -> Path:
        d = self.root / stage
        d.mkdir(exist_ok=True)
        return d

    def manifest(self) -> dict[str, str]:
        """sha256 of every file under the attempt, by relative path (result.json excluded)."""
        out = {}
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and p != self.result and not p.name.endswith(".tmp"):
                out[str(p.relative_to(self.root))] = sha256_file(p)
        return out
