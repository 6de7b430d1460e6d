"""Token shards: raw little-endian uint16 files (no header) plus manifest.json.

A data directory holds `{split}_{index:06d}.bin` files and a manifest naming every shard with
its token count and sha256. The manifest is written last and atomically, so a directory with a
manifest is complete; the training template reads the manifest and memory-maps the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from harness import __version__
from harness.errors import UserError
from harness.runtime.fileio import atomic_write_json, fsync_dir, sha256_file
from harness.runtime.tokenizer import EOT, TOKENIZER_NAME, VOCAB_SIZE, tokenizer_sha256

MANIFEST_FORMAT = "harness-token-shards/1"
MANIFEST_NAME = "manifest.json"
DTYPE = np.dtype("<u2")
BUFFER_TOKENS = 1 << 22  # tokens buffered per split between writes (8 MiB)
_HASH_CHUNK = 1 << 24  # bytes read at a time when hashing a shard
_SPLIT_NAME = re.compile(r"[a-z][a-z0-9]*\Z")
_SHARD_NAME = re.compile(r"[a-z][a-z0-9]*_[0-9]{6}\.bin\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
# Temporary files of ours that a killed process may leave: shard rewrites and JSON writes.
_OUR_TMP = re.compile(r"\.(?:[a-z][a-z0-9]*_[0-9]{6}\.bin|manifest\.json\.[0-9]+)\.tmp\Z")
_FIX_PREPARE = "prepare the data again (`harness data prepare`)"
_FIX_RESTART = "remove the output directory and prepare the data again from the start"


@dataclass
class _Split:
    """Writing state of one split."""

    name: str
    buffer: npt.NDArray[np.uint16]
    filled: int = 0
    documents: int = 0
    tokens: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)
    file: IO[bytes] | None = None
    path: Path | None = None
    in_shard: int = 0
    hasher: Any = None


class ShardWriter:
    """Writes documents' tokens into uint16 shards of at most `shard_tokens` tokens per split.

    Documents are concatenated in the order added (the caller appends EOT to each); a document
    may continue into the next shard. Opening a writer removes the directory's manifest and
    old shard files first, so a half-written directory never looks complete. close() fsyncs
    the shards, then writes manifest.json through a temporary file and os.replace.

    Resuming: checkpoint() puts every token added so far on disk (fsynced) and returns a small
    JSON-able state; a writer opened with `resume_from=state` after a crash truncates the open
    shards back to that state, deletes shards begun later, and continues, so the same documents
    added afterwards give the same bytes as a run that never stopped. close() hands the state it
    reaches once every shard is complete to `on_closing` before it touches any finished shard,
    and the tail evening-out below is idempotent, so a crash inside close() is resumable too.

    When a split ends with a short shard (under half of `shard_tokens`) after a full one, the
    two are evened out at close, so every shard of a multi-shard split holds at least
    `shard_tokens // 2` tokens (the training template draws windows of block_size + 1 tokens
    from single shards, so no shard may be shorter than that).
    """

    def __init__(self, out_dir: Path, *, shard_tokens: int = 100_000_000,
                 source: dict[str, Any], val_rule: str,
                 resume_from: dict[str, Any] | None = None) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.shard_tokens = shard_tokens
        self.source = source
        self.val_rule = val_rule
        self._splits: dict[str, _Split] = {}
        self._manifest: dict[str, Any] | None = None
        self._closing = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        keep: set[str] = set()
        if resume_from is not None:
            keep = self._restore(resume_from)
        for old in self.out_dir.iterdir():
            stale = _SHARD_NAME.match(old.name) and old.name not in keep
            if (stale or _OUR_TMP.match(old.name)) and old.is_file():
                old.unlink()

    @property
    def shards_completed(self) -> int:
        """How many shards, over all splits, are complete (full, flushed and fsynced)."""
        return sum(len(state.entries) for state in self._splits.values())

    def add(self, split: str, tokens: Sequence[int] | npt.NDArray[np.integer[Any]]) -> None:
        """Append one whole document's tokens to `split` ("train", "val", ...)."""
        self.add_documents(split, tokens, documents=1)

    def add_documents(self, split: str, tokens: Sequence[int] | npt.NDArray[np.integer[Any]],
                      documents: int) -> None:
        """Append `documents` whole documents to `split`, their tokens concatenated (each ending
        in the caller's EOT). One range check and one copy for many documents."""
        if self._manifest is not None or self._closing:
            raise RuntimeError("ShardWriter.add after close")
        arr = _as_tokens(tokens)
        state = self._split(split)
        state.documents += documents
        state.tokens += len(arr)
        cap = len(state.buffer)
        pos = 0
        while pos < len(arr):
            take = min(len(arr) - pos, cap - state.filled)
            state.buffer[state.filled:state.filled + take] = arr[pos:pos + take]
            state.filled += take
            pos += take
            if state.filled == cap:
                self._flush(state)

    def flush(self) -> None:
        """Write every buffered token to its shard file (not fsynced)."""
        for state in self._splits.values():
            self._flush(state)

    def checkpoint(self) -> dict[str, Any]:
        """Put every token added so far on disk, fsynced; return the state to resume from."""
        if self._manifest is not None or self._closing:
            raise RuntimeError("ShardWriter.checkpoint after close")
        self.flush()
        for state in self._splits.values():
            if state.file is not None:
                state.file.flush()
                os.fsync(state.file.fileno())
        return self._state()

    def close(self, on_closing: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
        """Flush and hash every shard, write manifest.json, return the manifest.

        `on_closing` gets the resumable state once all shards are complete, before any is
        rewritten by the tail evening-out (a caller persists it to survive a crash there).
        """
        if self._manifest is not None:
            return self._manifest
        if not self._closing:
            for state in self._splits.values():
                self._flush(state)
                if state.file is not None:
                    self._finish_shard(state)
            self._closing = True
            if on_closing is not None:
                on_closing(self._state())
        for state in self._splits.values():
            if (len(state.entries) >= 2
                    and state.entries[-1]["tokens"] < self.shard_tokens // 2):
                self._even_out_tail(state)
        names = ["train", "val", *sorted(n for n in self._splits if n not in ("train", "val"))]
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "tokenizer": {
                "name": TOKENIZER_NAME,
                "dtype": "uint16",
                "vocab_size": VOCAB_SIZE,
                "eot": EOT,
                "sha256": tokenizer_sha256(),
            },
            "splits": {n: self._entries(n) for n in names},
            "source": self.source,
            "documents": {n: self._splits[n].documents if n in self._splits else 0
                          for n in names},
            "tokens": {n: self._splits[n].tokens if n in self._splits else 0 for n in names},
            "val_rule": self.val_rule,
            "created_by": f"harness {__version__}",
        }
        atomic_write_json(self.out_dir / MANIFEST_NAME, manifest, sort_keys=False)
        self._manifest = manifest
        return manifest

    def _split(self, name: str) -> _Split:
        state = self._splits.get(name)
        if state is None:
            if not _SPLIT_NAME.match(name):
                raise ValueError(f"split name must match [a-z][a-z0-9]*, got {name!r}")
            size = min(BUFFER_TOKENS, max(self.shard_tokens, 1 << 16))
            state = self._splits[name] = _Split(name, np.empty(size, dtype=DTYPE))
        return state

    def _state(self) -> dict[str, Any]:
        """What checkpoint() returns; the buffers must be empty (flushed)."""
        splits: dict[str, Any] = {}
        for name, state in self._splits.items():
            assert state.filled == 0
            partial = None
            if state.file is not None and state.path is not None:
                partial = {"file": state.path.name, "tokens": state.in_shard}
            splits[name] = {"entries": [dict(e) for e in state.entries], "partial": partial,
                            "documents": state.documents, "tokens": state.tokens}
        return {"closing": self._closing, "splits": splits}

    def _restore(self, saved: dict[str, Any]) -> set[str]:
        """Take over a checkpoint()'s state; returns the shard files it owns."""
        try:
            self._closing = bool(saved["closing"])
            owned: set[str] = set()
            for name, split in saved["splits"].items():
                owned |= self._restore_split(self._split(name), split)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the saved writer state is damaged ({type(e).__name__}: {e})",
                            where=str(self.out_dir), fix=_FIX_RESTART) from e
        return owned

    def _restore_split(self, state: _Split, saved: dict[str, Any]) -> set[str]:
        state.entries = [{"file": str(e["file"]), "tokens": int(e["tokens"]),
                          "sha256": str(e["sha256"])} for e in saved["entries"]]
        state.documents, state.tokens = int(saved["documents"]), int(saved["tokens"])
        partial = saved["partial"]
        files = [e["file"] for e in state.entries] + ([partial["file"]] if partial else [])
        if files != [f"{state.name}_{i:06d}.bin" for i in range(len(files))]:
            raise ValueError(f"split {state.name}: unexpected shard files {files}")
        # A closing state's last two shards may be mid evening-out; _even_out_tail checks them.
        for e in state.entries[:-2] if self._closing else state.entries:
            self._check_size(self.out_dir / e["file"], e["tokens"])
        if partial is not None:
            self._reopen(state, files[-1], int(partial["tokens"]))
        written = sum(e["tokens"] for e in state.entries) + state.in_shard
        if written != state.tokens:
            raise ValueError(f"split {state.name}: {written} tokens in shards, "
                             f"{state.tokens} counted")
        return set(files)

    def _reopen(self, state: _Split, file: str, tokens: int) -> None:
        """Open a partial shard for appending, cut back to its checkpointed `tokens`; the
        sha256 state is rebuilt by re-reading that prefix."""
        path = self.out_dir / file
        size = path.stat().st_size if path.is_file() else -1
        if size < 2 * tokens:
            raise UserError(f"{file} holds {max(size, 0) // 2} tokens, fewer than the "
                            f"{tokens} its checkpoint says were written",
                            where=str(self.out_dir), fix=_FIX_RESTART)
        f = open(path, "r+b")  # noqa: SIM115 - closed in _finish_shard
        f.truncate(2 * tokens)
        hasher = hashlib.sha256()
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
        state.file, state.path, state.in_shard, state.hasher = f, path, tokens, hasher

    def _check_size(self, path: Path, tokens: int) -> None:
        size = path.stat().st_size if path.is_file() else -1
        if size != 2 * tokens:
            raise UserError(f"{path.name}: {size} bytes on disk, the checkpoint says {tokens} "
                            f"tokens ({2 * tokens} bytes)", where=str(self.out_dir),
                            fix=_FIX_RESTART)

    def _entries(self, name: str) -> list[dict[str, Any]]:
        return list(self._splits[name].entries) if name in self._splits else []

    def _flush(self, state: _Split) -> None:
        data = state.buffer[:state.filled]
        pos = 0
        while pos < len(data):
            if state.file is None:
                index = len(state.entries)
                state.path = self.out_dir / f"{state.name}_{index:06d}.bin"
                state.file = open(state.path, "wb")  # noqa: SIM115 - closed in _finish_shard
                state.hasher = hashlib.sha256()
                state.in_shard = 0
            take = min(len(data) - pos, self.shard_tokens - state.in_shard)
            chunk = data[pos:pos + take].data.cast("B")
            state.file.write(chunk)
            state.hasher.update(chunk)
            state.in_shard += take
            pos += take
            if state.in_shard == self.shard_tokens:
                self._finish_shard(state)
        state.filled = 0

    def _finish_shard(self, state: _Split) -> None:
        assert state.file is not None and state.path is not None
        state.file.flush()
        os.fsync(state.file.fileno())
        state.file.close()
        state.entries.append({"file": state.path.name, "tokens": state.in_shard,
                              "sha256": state.hasher.hexdigest()})
        state.file = None
        state.path = None

    def _even_out_tail(self, state: _Split) -> None:
        """Move tokens from the end of the last full shard to the front of the short tail.

        Crash-safe and idempotent: the new tail replaces the old one atomically (temporary file
        + os.replace) before the full shard is cut, and the file sizes tell which of the two
        steps a killed run had done, so running this again from the pre-evening state finishes
        the job with the same bytes.
        """
        prev, tail = state.entries[-2], state.entries[-1]
        keep = (prev["tokens"] + tail["tokens"] + 1) // 2
        new_tail = prev["tokens"] + tail["tokens"] - keep
        prev_path, tail_path = self.out_dir / prev["file"], self.out_dir / tail["file"]
        tail_size = tail_path.stat().st_size if tail_path.is_file() else -1
        if tail_size == 2 * tail["tokens"]:
            self._check_size(prev_path, prev["tokens"])
            _rewrite_tail(prev_path, tail_path, keep)
        elif tail_size != 2 * new_tail:
            self._check_size(tail_path, tail["tokens"])
        prev_size = prev_path.stat().st_size if prev_path.is_file() else -1
        if prev_size == 2 * prev["tokens"]:
            with open(prev_path, "r+b") as f:
                f.truncate(2 * keep)
                f.flush()
                os.fsync(f.fileno())
        elif prev_size != 2 * keep:
            self._check_size(prev_path, keep)
        prev["tokens"], tail["tokens"] = keep, new_tail
        prev["sha256"] = sha256_file(prev_path)
        tail["sha256"] = sha256_file(tail_path)


def _rewrite_tail(prev_path: Path, tail_path: Path, keep: int) -> None:
    """Replace the tail shard by (prev's tokens from `keep` on) + (the tail), atomically."""
    with open(prev_path, "rb") as f:
        f.seek(2 * keep)
        moved = f.read()
    tmp = tail_path.with_name(f".{tail_path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(moved)
            f.write(tail_path.read_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tail_path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(tail_path.parent)


def _as_tokens(tokens: Sequence[int] | npt.NDArray[np.integer[Any]]) -> npt.NDArray[Any]:
    """Tokens as a 1-d integer array, every id checked to lie in [0, VOCAB_SIZE)."""
    arr = np.asarray(tokens) if isinstance(tokens, np.ndarray) else np.array(tokens, np.int64)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"tokens must be a 1-d sequence of ints, got {arr.dtype} {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= VOCAB_SIZE:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the GPT-2 vocabulary [0, {VOCAB_SIZE})"
                             " and does not fit the uint16 shards' meaning")
    return arr


def reusable_manifest(out_dir: Path, source: dict[str, Any], keys: Sequence[str], *,
                      read: Callable[[Path], dict[str, Any]] | None = None,
                      check: Callable[[Path], list[str]] | None = None) -> dict[str, Any] | None:
    """The manifest already in out_dir when it is intact (`check` finds no problem) and its
    `source` matches `source` on `keys`; None means build it again. `read`/`check` default to
    this module's; the eval sets pass their own."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = (read or read_manifest)(out_dir)
        if (check or verify)(out_dir):
            return None
    except UserError:
        return None
    old = manifest.get("source")
    if not isinstance(old, dict) or any(old.get(k) != source[k] for k in keys):
        return None
    return manifest


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest of a data directory, its structure checked; UserError if missing/invalid."""
    # Same shape as runtime.evalsets.read_manifest, on purpose: another format with its own
    # messages, and that one runs inside the stage, where this module is not importable.
    path = Path(data_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("no manifest.json: this is not a prepared token-shard directory",
                        where=str(data_dir), fix=_FIX_PREPARE) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the manifest: {e}", where=str(path),
                        fix=_FIX_PREPARE) from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"the manifest is not valid JSON: {e}", where=str(path),
                        fix=_FIX_PREPARE) from e
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise UserError(f"invalid manifest: {problem}", where=str(path), fix=_FIX_PREPARE)
    result: dict[str, Any] = manifest
    return result


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _manifest_problem(m: object) -> str | None:
    """What is structurally wrong with a parsed manifest, or None."""
    if not isinstance(m, dict):
        return "the top level is not an object"
    if m.get("format") != MANIFEST_FORMAT:
        return f"format is {m.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    tok = m.get("tokenizer")
    if not isinstance(tok, dict):
        return "'tokenizer' is missing or not an object"
    if tok.get("name") != TOKENIZER_NAME or tok.get("dtype") != "uint16":
        return (f"tokenizer {tok.get('name')!r} with dtype {tok.get('dtype')!r}; "
                f"this harness reads {TOKENIZER_NAME!r} uint16 shards")
    for key in ("vocab_size", "eot"):
        if not _is_int(tok.get(key)):
            return f"tokenizer.{key} is missing or not an integer"
    if not isinstance(tok.get("sha256"), str):
        return "tokenizer.sha256 is missing or not a string"
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "'splits' is missing, empty or not an object"
    for name, entries in splits.items():
        if not isinstance(entries, list):
            return f"splits.{name} is not a list"
        for i, e in enumerate(entries):
            where = f"splits.{name}[{i}]"
            if not isinstance(e, dict):
                return f"{where} is not an object"
            file = e.get("file")
            if not isinstance(file, str) or not _SHARD_NAME.match(file):
                return f"{where}.file {file!r} is not a shard file name like train_000000.bin"
            if not _is_int(e.get("tokens")) or e["tokens"] < 0:
                return f"{where}.tokens is missing or not a non-negative integer"
            if not isinstance(e.get("sha256"), str) or not _SHA256.match(e["sha256"]):
                return f"{where}.sha256 is missing or not 64 lowercase hex digits"
    for key in ("source", "documents"):
        if key in m and not isinstance(m[key], dict):
            return f"'{key}' is not an object"
    return None


def verify(data_dir: Path) -> list[str]:
    """Re-hash every shard against the manifest. Returns the problems found (empty: all good).

    Raises UserError only when the manifest itself is missing or invalid.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    problems: list[str] = []
    try:
        installed = tokenizer_sha256()
    except UserError as err:
        problems.append(f"cannot hash the installed tokenizer: {err.what}")
    else:
        if manifest["tokenizer"]["sha256"] != installed:
            problems.append(
                f"tokenizer sha256 {manifest['tokenizer']['sha256']} in the manifest differs "
                f"from the installed GPT-2 tokenizer's {installed}")
    for entries in manifest["splits"].values():
        for e in entries:
            path = data_dir / e["file"]
            if not path.is_file():
                problems.append(f"{e['file']}: missing")
                continue
            size = path.stat().st_size
            if size != 2 * e["tokens"]:
                problems.append(f"{e['file']}: {size} bytes on disk, the manifest says "
                                f"{e['tokens']} tokens ({2 * e['tokens']} bytes)")
                continue
            actual = sha256_file(path)
            if actual != e["sha256"]:
                problems.append(f"{e['file']}: sha256 {actual}, the manifest says {e['sha256']}")
    problems.extend(_count_problems(manifest))
    return problems


def _count_problems(manifest: dict[str, Any]) -> list[str]:
    """The per-split token totals (optional in the format) against the shards' sum."""
    totals = manifest.get("tokens")
    if not isinstance(totals, dict):
        return []
    problems = []
    for name, entries in manifest["splits"].items():
        listed = sum(e["tokens"] for e in entries)
        if name in totals and totals[name] != listed:
            problems.append(f"tokens.{name} is {totals[name]}, its shards hold {listed}")
    return problems


def decode_split(data_dir: Path, split: str) -> npt.NDArray[np.uint16]:
    """All tokens of one split, its shards concatenated in manifest order."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise UserError(f"no split {split!r} in the manifest (it has "
                        f"{', '.join(sorted(manifest['splits']))})",
                        where=str(data_dir / MANIFEST_NAME))
    parts = [np.fromfile(data_dir / e["file"], dtype=DTYPE)
             for e in manifest["splits"][split]]
    if not parts:
        return np.empty(0, dtype=np.uint16)
    out: npt.NDArray[np.uint16] = np.concatenate(parts).astype(np.uint16, copy=False)
    return out
