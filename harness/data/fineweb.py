"""FineWeb (or any corpus with a `text` column) to GPT-2 uint16 token shards, resumably.

The source is a directory of parquet files (read with pyarrow, one row group at a time) or a
Hugging Face hub id (read with `datasets` in streaming mode). Either way it is cut into units in
a fixed order -- (file, row group) for parquet, runs of HUB_CHUNK_ROWS rows for a hub stream --
and a pool of worker processes turns each unit into tokens (EOT after every document) and the
val/train decision of every document. The main process takes the results in unit order and
appends them to a ShardWriter, so the output depends only on the source and the options, never
on the number of workers or on timing.

Resuming: after every shard's worth of tokens, at the next unit boundary, the writer's state is
made durable and progress.json records it with the next unit to read. A restarted prepare with
the same options cuts the open shards back to that state and reads on from that unit, so it ends
with the same bytes as a run that never stopped. progress.json is removed once manifest.json is
written; the manifest carries no timestamps.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from harness.data.shards import (
    MANIFEST_NAME,
    ShardWriter,
    read_manifest,
)
from harness.errors import UserError
from harness.runtime.fileio import atomic_write_json, sha256_file
from harness.runtime.tokenizer import encode_documents, gpt2_encoding, tokenizer_sha256

PROGRESS_NAME = "progress.json"
PROGRESS_FORMAT = "harness-prepare-progress/1"
COLUMN = "text"
DEFAULT_VAL_EVERY = 100  # 1% of documents: ~100M val tokens from FineWeb 10B, as nanoGPT keeps
DEFAULT_SHARD_TOKENS = 100_000_000
HUB_CHUNK_ROWS = 1024  # rows per unit when streaming from the hub
_BATCH_ROWS = 1024  # rows decoded at a time inside a parquet row group
# Settings-independent facts the manifest's "source" also records (left out of comparisons).
_RESULT_KEYS = ("rows", "null_rows")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_DIE_AFTER_SHARDS = "HARNESS_TEST_DIE_AFTER_SHARDS"
_DIE_WHILE_CLOSING = "HARNESS_TEST_DIE_WHILE_CLOSING"
_FIX_SOURCE = ("pass a directory holding the parquet files (for FineWeb 10B: the "
               "sample/10BT/*.parquet files of HuggingFaceFW/fineweb) or a hub id")
_FIX_SETTINGS = ("rerun with the same options and source to resume, or remove the directory "
                 "(or choose another --out) to start over")

Log = Callable[[str], None]


# --- the val rule ------------------------------------------------------------------------


@dataclass(frozen=True)
class ValRule:
    """Which documents go to val: one in `every` by a seeded hash of the text, or the first
    `docs` rows of the source. Both depend only on the document (and its place), so a resumed
    run and any number of workers decide alike."""

    every: int | None = DEFAULT_VAL_EVERY
    docs: int | None = None
    seed: int = 0

    @classmethod
    def make(cls, every: int | None, docs: int | None, seed: int) -> ValRule:
        if every is not None and docs is not None:
            raise UserError("give either --val-every or --val-docs, not both")
        if docs is not None:
            if docs < 0:
                raise UserError(f"--val-docs must be 0 or more, got {docs}")
            return cls(every=None, docs=docs, seed=seed)
        every = DEFAULT_VAL_EVERY if every is None else every
        if every < 2:
            raise UserError(f"--val-every must be at least 2, got {every}")
        return cls(every=every, docs=None, seed=seed)

    def as_dict(self) -> dict[str, Any]:
        if self.docs is not None:
            return {"rule": "first-rows", "docs": self.docs, "seed": self.seed}
        return {"rule": "sha256-mod", "every": self.every, "seed": self.seed}

    def describe(self) -> str:
        if self.docs is not None:
            return (f"the first {self.docs} rows of the source (files in source.files order, "
                    f"rows in file order) are val, the rest train (seed {self.seed} unused)")
        return (f"a document is val when int(sha256(b'{self.seed}:' + utf-8 text)"
                f".hexdigest()[:16], 16) % {self.every} == 0, else train")

    def flags(self, texts: list[str], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Per document, whether it is val; `rows` are the documents' row indices in the
        whole source."""
        if self.docs is not None:
            return rows < self.docs
        assert self.every is not None
        prefix = f"{self.seed}:".encode()
        return np.fromiter(
            (int(hashlib.sha256(prefix + t.encode("utf-8")).hexdigest()[:16], 16) % self.every
             == 0 for t in texts), dtype=np.bool_, count=len(texts))


# --- units of work and what workers make of them ------------------------------------------


@dataclass(frozen=True)
class _Task:
    """One unit: a parquet row group (path, row_group) or rows carried along (texts)."""

    first_row: int
    rule: ValRule
    column: str
    path: str | None = None
    row_group: int = 0
    texts: list[str | None] | None = None


@dataclass
class _Encoded:
    """A unit's documents: tokens (EOT after each), lengths, val flags, and for each document
    its row within the unit (null texts are skipped and leave gaps)."""

    tokens: npt.NDArray[np.uint16]
    lengths: npt.NDArray[np.int64]
    is_val: npt.NDArray[np.bool_]
    rows: npt.NDArray[np.int64]
    n_rows: int


def _init_worker() -> None:
    # Ctrl-C goes to the whole process group; the parent alone handles it (and ends the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gpt2_encoding()  # built (and its files checked) once per worker, then cached


def _unit_texts(task: _Task) -> Iterator[list[str | None]]:
    if task.texts is not None:
        yield task.texts
        return
    assert task.path is not None
    try:
        # One worker is one core's worth: pyarrow's own threads would only contend.
        batches = _parquet_file(task.path).iter_batches(
            batch_size=_BATCH_ROWS, row_groups=[task.row_group], columns=[task.column],
            use_threads=False)
        for batch in batches:
            yield batch.column(0).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow.ArrowException derives from both
        raise UserError(f"cannot read row group {task.row_group}: {e}", where=task.path,
                        fix="the file is damaged or changed: download it again") from None


@functools.lru_cache(maxsize=2)
def _parquet_file(path: str) -> Any:
    """An open pyarrow.parquet.ParquetFile, kept per worker: consecutive units mostly come from
    the same file, and a large file's footer is worth parsing once."""
    return _pyarrow_parquet().ParquetFile(path)


def _pyarrow_parquet() -> Any:
    """pyarrow.parquet, or a UserError saying how to install it. (Imported by name: pyarrow
    and datasets ship no type information, so mypy sees them as Any either way.)"""
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise UserError("reading parquet files needs the 'pyarrow' package, which is not "
                        "installed", fix="pip install 'pyarrow>=14'") from None


def _encode_task(task: _Task) -> _Encoded:
    """Tokenize one unit (in a worker, or inline with workers=0)."""
    tokens: list[npt.NDArray[np.uint16]] = []
    lengths: list[npt.NDArray[np.int64]] = []
    flags: list[npt.NDArray[np.bool_]] = []
    rows: list[npt.NDArray[np.int64]] = []
    n_rows = 0
    for texts in _unit_texts(task):
        kept = [i for i, t in enumerate(texts) if t is not None]
        docs = [t for t in texts if t is not None]
        where = np.asarray(kept, dtype=np.int64) + n_rows
        toks, lens = encode_documents(docs)
        tokens.append(toks)
        lengths.append(lens)
        flags.append(task.rule.flags(docs, where + task.first_row))
        rows.append(where)
        n_rows += len(texts)
    return _Encoded(_cat(tokens, np.uint16), _cat(lengths, np.int64), _cat(flags, np.bool_),
                     _cat(rows, np.int64), n_rows)


def _cat(parts: list[npt.NDArray[Any]], dtype: type[Any]) -> npt.NDArray[Any]:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


# --- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParquetFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    row_groups: tuple[int, ...]  # rows in each


@dataclass
class ParquetSource:
    """A directory of parquet files, read in sorted relative-path order."""

    root: Path
    column: str
    files: list[_ParquetFile]
    sha256: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, column: str) -> ParquetSource:
        paths = sorted((p for p in root.rglob("*.parquet") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix())
        if not paths:
            raise UserError("no .parquet files in this directory (searched recursively)",
                            where=str(root), fix=_FIX_SOURCE)
        return cls(root, column, [_inspect(p, root, column) for p in paths])

    def hash_files(self, known: dict[str, Any], threads: int) -> None:
        """sha256 of every file; reuses `known` ({rel: [size, mtime_ns, sha256]}, from a
        checkpoint) for files whose size and mtime are unchanged, since hashing tens of GB on
        every resume would cost minutes. hashlib releases the GIL, so threads overlap."""
        todo = []
        for f in self.files:
            old = known.get(f.rel)
            if isinstance(old, list) and old[:2] == [f.size, f.mtime_ns]:
                self.sha256[f.rel] = str(old[2])
            else:
                todo.append(f)
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for f, digest in zip(todo, pool.map(lambda f: sha256_file(f.path), todo),
                                 strict=True):
                self.sha256[f.rel] = digest

    def file_stats(self) -> dict[str, Any]:
        return {f.rel: [f.size, f.mtime_ns, self.sha256[f.rel]] for f in self.files}

    def settings(self) -> dict[str, Any]:
        return {"kind": "parquet", "column": self.column,
                "files": [{"path": f.rel, "bytes": f.size, "rows": sum(f.row_groups),
                           "sha256": self.sha256.get(f.rel)} for f in self.files]}

    def tasks(self, start: int, rule: ValRule) -> Iterator[_Task]:
        unit, first_row = 0, 0
        for f in self.files:
            for group, n in enumerate(f.row_groups):
                if unit >= start:
                    yield _Task(first_row, rule, self.column, path=str(f.path), row_group=group)
                unit += 1
                first_row += n


def _inspect(path: Path, root: Path, column: str) -> _ParquetFile:
    """A parquet file's size and row groups; UserError unless it has a string `column`."""
    pq = _pyarrow_parquet()
    pa = importlib.import_module("pyarrow")
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        groups = tuple(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups))
    except (OSError, ValueError) as e:  # pyarrow.ArrowException derives from both
        raise UserError(f"not a readable parquet file: {e}", where=str(path),
                        fix="download the file again") from None
    if column not in schema.names:
        raise UserError(f"no {column!r} column (the columns are: {', '.join(schema.names)})",
                        where=str(path), fix=f"pass parquet files with a {column!r} column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"column {column!r} holds {kind}, not strings", where=str(path),
                        fix=f"pass parquet files whose {column!r} column is text")
    stat = path.stat()
    return _ParquetFile(path.relative_to(root).as_posix(), path, stat.st_size, stat.st_mtime_ns,
                        groups)


@dataclass
class HubSource:
    """A dataset read with `datasets.load_dataset(id, name, split=..., streaming=True)`."""

    id: str
    config: str | None
    split: str
    column: str
    dataset: Any  # datasets.IterableDataset

    @classmethod
    def open(cls, hub_id: str, config: str | None, split: str, column: str) -> HubSource:
        fix = ("without a reachable hub, download the parquet files elsewhere (for FineWeb "
               "10B: sample/10BT/*.parquet of HuggingFaceFW/fineweb), copy them here and "
               "pass their directory as --source")
        try:
            datasets = importlib.import_module("datasets")
        except ImportError:
            raise UserError(f"{hub_id!r} is no local directory, and reading a hub id needs "
                            "the 'datasets' package, which is not installed",
                            fix=f"pip install datasets; or {fix}") from None
        try:
            ds = datasets.load_dataset(hub_id, name=config, split=split, streaming=True)
        except Exception as e:  # datasets raises a dozen unrelated kinds
            raise UserError(f"cannot open {hub_id!r} on the Hugging Face hub (nor is it a "
                            f"local directory): {_first_line(e)}", fix=fix) from None
        features = getattr(ds, "features", None)
        if features is not None and column not in features:
            raise UserError(f"the dataset has no {column!r} column (it has: "
                            f"{', '.join(features)})", where=hub_id)
        return cls(hub_id, config, split, column, ds)

    def settings(self) -> dict[str, Any]:
        return {"kind": "hf-datasets", "id": self.id, "config": self.config,
                "split": self.split, "column": self.column}

    def tasks(self, start: int, rule: ValRule) -> Iterator[_Task]:
        # A stream cannot seek: resuming skips the rows already read (datasets re-reads them).
        rows = iter(self.dataset.skip(start * HUB_CHUNK_ROWS) if start else self.dataset)
        first_row = start * HUB_CHUNK_ROWS
        while True:
            try:
                chunk = [row[self.column] for _, row in zip(range(HUB_CHUNK_ROWS), rows,
                                                             strict=False)]
            except Exception as e:  # network and format errors, any kind
                raise UserError(f"reading {self.id!r} failed: {_first_line(e)}",
                                fix="rerun the same command: it resumes") from None
            if not chunk:
                return
            bad = next((t for t in chunk if t is not None and not isinstance(t, str)), None)
            if bad is not None:
                raise UserError(f"column {self.column!r} holds {type(bad).__name__} values, "
                                "not text", where=self.id)
            yield _Task(first_row, rule, self.column, texts=chunk)
            first_row += len(chunk)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def open_source(source: str | Path, *, column: str = COLUMN, hf_config: str | None = None,
                hf_split: str = "train") -> ParquetSource | HubSource:
    """A local directory of parquet files when `source` names one, else a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError("not a directory", where=str(source), fix=_FIX_SOURCE)
        return ParquetSource.open(path.resolve(), column)
    text = str(source)
    if _HUB_ID.match(text) and not text.startswith("."):
        return HubSource.open(text, hf_config, hf_split, column)
    raise UserError("no such directory", where=text, fix=_FIX_SOURCE)


# --- the run ------------------------------------------------------------------------------


@dataclass
class _Position:
    """Where a run stands: the next unit to read and what has been read before it."""

    next_unit: int = 0
    rows: int = 0
    null_rows: int = 0
    tokens: int = 0


def _die() -> NoReturn:
    """Test hook: end the process as SIGKILL would, with no cleanup or flushing."""
    os._exit(137)


def _ordered(pool: Pool | None, tasks: Iterable[_Task], window: int) -> Iterator[_Encoded]:
    """Results in task order with at most `window` tasks in flight: a bounded prefetch, so
    memory stays flat whatever the source size (Pool.imap would queue every result)."""
    if pool is None:
        yield from map(_encode_task, tasks)
        return
    pending: deque[Any] = deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_task, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@dataclass
class _Run:
    out_dir: Path
    settings: dict[str, Any]
    file_stats: dict[str, Any]
    writer: ShardWriter
    pos: _Position
    max_tokens: int | None
    log: Log
    closing: bool  # resumed after every document was written, inside close()
    tokenizer: str = field(default_factory=tokenizer_sha256)
    started: float = field(default_factory=time.perf_counter)
    start_tokens: int = 0

    def consume(self, result: _Encoded) -> bool:
        """Add one unit's documents; True once max_tokens is reached (at a document end)."""
        lengths, n_docs, n_rows = result.lengths, len(result.lengths), result.n_rows
        stop = False
        if self.max_tokens is not None and n_docs:
            ends = np.cumsum(lengths)
            need = self.max_tokens - self.pos.tokens
            if ends[-1] >= need:
                n_docs = int(np.searchsorted(ends, need)) + 1  # first end reaching the cap
                n_rows, stop = int(result.rows[n_docs - 1]) + 1, True
        n_tokens = int(lengths[:n_docs].sum())
        is_val = result.is_val[:n_docs]
        in_val = np.repeat(is_val, lengths[:n_docs])
        tokens = result.tokens[:n_tokens]
        n_val = int(is_val.sum())
        # Per split, documents keep their source order, as if added one at a time.
        self.writer.add_documents("train", tokens[~in_val], n_docs - n_val)
        self.writer.add_documents("val", tokens[in_val], n_val)
        self.pos.rows += n_rows
        self.pos.null_rows += n_rows - n_docs
        self.pos.tokens += n_tokens
        return stop

    def save(self, writer_state: dict[str, Any]) -> None:
        progress = {"format": PROGRESS_FORMAT, "settings": self.settings,
                    "tokenizer_sha256": self.tokenizer, "file_stats": self.file_stats,
                    "next_unit": self.pos.next_unit, "rows": self.pos.rows,
                    "null_rows": self.pos.null_rows, "tokens": self.pos.tokens,
                    "writer": writer_state}
        atomic_write_json(self.out_dir / PROGRESS_NAME, progress, sort_keys=False)

    def report(self) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = (self.pos.tokens - self.start_tokens) / elapsed
        self.log(f"{self.pos.tokens:,} tokens from {self.pos.rows:,} rows, "
                 f"{self.writer.shards_completed} shards complete, {rate / 1e6:.2f}M tokens/s")

    def loop(self, results: Iterable[_Encoded]) -> None:
        """Consume units in order; checkpoint at the first unit end after another shard's worth
        of tokens (so a crash costs about one shard of work, and checkpoints stay rare)."""
        die_after = int(os.environ.get(_DIE_AFTER_SHARDS, "0") or 0)
        armed = False
        saved_at = self.pos.tokens
        for result in results:
            stop = self.consume(result)
            self.pos.next_unit += 1
            if stop:
                return
            if armed:  # test hook: tokens past the checkpoint reach the files, then death
                self.writer.flush()
                _die()
            if self.pos.tokens - saved_at >= self.settings["shard_tokens"]:
                saved_at = self.pos.tokens
                self.save(self.writer.checkpoint())
                self.report()
                armed = 0 < die_after <= self.writer.shards_completed

    def finish(self) -> dict[str, Any]:
        self.writer.source = {**self.settings, "rows": self.pos.rows,
                              "null_rows": self.pos.null_rows}

        def closing(state: dict[str, Any]) -> None:
            self.save(state)
            if os.environ.get(_DIE_WHILE_CLOSING):
                _die()

        manifest = self.writer.close(on_closing=closing)
        (self.out_dir / PROGRESS_NAME).unlink(missing_ok=True)
        self.report()
        return manifest


def _read_progress(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / PROGRESS_NAME
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {PROGRESS_NAME}: {e}", where=str(out_dir),
                        fix=_FIX_SETTINGS) from None
    if not isinstance(progress, dict) or progress.get("format") != PROGRESS_FORMAT:
        raise UserError(f"{PROGRESS_NAME} is not one this harness writes", where=str(out_dir),
                        fix=_FIX_SETTINGS)
    return progress


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The settings that differ, by name (source file hashes only when both have them)."""
    if any(f.get("sha256") is None for f in new.get("files", [])):
        old, new = _without_hashes(old), _without_hashes(new)
    keys = sorted(k for k in set(old) | set(new)
                  if k not in _RESULT_KEYS and old.get(k) != new.get(k))
    return ", ".join(keys) or "nothing"


def _without_hashes(settings: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in settings.items() if k not in _RESULT_KEYS}
    if isinstance(out.get("files"), list):
        out["files"] = [{k: v for k, v in f.items() if k != "sha256"} for f in out["files"]]
    return out


def _finished(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished prepare into out_dir with these settings, or None when there
    is none. Source files are compared by name, size and row count, not re-hashed (that is
    `harness data verify`'s job for the shards, and the source may be gone)."""
    if not (out_dir / MANIFEST_NAME).exists():
        return None
    manifest = read_manifest(out_dir)
    old = manifest.get("source")
    if not isinstance(old, dict) or _without_hashes(old) != _without_hashes(settings):
        diff = _differences(old if isinstance(old, dict) else {}, settings)
        raise UserError(f"already holds a dataset prepared with other settings ({diff})",
                        where=str(out_dir), fix=_FIX_SETTINGS)
    (out_dir / PROGRESS_NAME).unlink(missing_ok=True)  # a crash can leave it after the manifest
    return manifest


def _check_options(max_tokens: int | None, workers: int, shard_tokens: int) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    if workers < 0:
        raise UserError(f"--workers must be 0 (tokenize in this process) or more, got {workers}")
    if shard_tokens < 2:
        raise UserError(f"--shard-tokens must be at least 2, got {shard_tokens}")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare_fineweb(source: str | Path, out_dir: Path, *, max_tokens: int | None = None,
                    workers: int | None = None, val_every: int | None = None,
                    val_docs: int | None = None, seed: int = 0,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, column: str = COLUMN,
                    hf_config: str | None = None, hf_split: str = "train",
                    log: Log | None = None) -> dict[str, Any]:
    """Tokenize `source` (a directory of parquet files or a hub id) into shards in out_dir;
    returns the manifest.

    Resumes an unfinished prepare into out_dir made with the same options; returns a finished
    one as it is; refuses (UserError) a directory prepared with other options. `workers`
    processes tokenize (default: one per CPU; 0: in this process). Writing stops at the end of
    the first document that brings train + val to `max_tokens`.
    """
    rule = ValRule.make(val_every, val_docs, seed)
    n_workers = default_workers() if workers is None else workers
    _check_options(max_tokens, n_workers, shard_tokens)
    out_dir = Path(out_dir)
    src = open_source(source, column=column, hf_config=hf_config, hf_split=hf_split)
    options = {"max_tokens": max_tokens, "val": rule.as_dict(), "shard_tokens": shard_tokens,
               "eot": "appended to every document"}
    finished = _finished(out_dir, {**src.settings(), **options})
    if finished is not None:
        return finished
    progress = _read_progress(out_dir)
    file_stats: dict[str, Any] = {}
    if isinstance(src, ParquetSource):
        src.hash_files(progress.get("file_stats", {}) if progress else {}, n_workers)
        file_stats = src.file_stats()
    settings = {**src.settings(), **options}
    run = _start(out_dir, settings, progress, rule)
    run.file_stats, run.max_tokens, run.log = file_stats, max_tokens, log or (lambda _: None)
    if not run.closing:
        _tokenize(run, src, rule, n_workers)
    return run.finish()


def _start(out_dir: Path, settings: dict[str, Any], progress: dict[str, Any] | None,
           rule: ValRule) -> _Run:
    """A run from scratch, or from progress.json when it was made with these settings."""
    pos = _Position()
    resume_from = None
    tokenizer = tokenizer_sha256()
    if progress is not None:
        old = progress.get("settings")
        if old != settings or progress.get("tokenizer_sha256") != tokenizer:
            diff = _differences(old if isinstance(old, dict) else {}, settings)
            raise UserError("holds an unfinished prepare made with other settings "
                            f"({'the tokenizer' if diff == 'nothing' else diff})",
                            where=str(out_dir), fix=_FIX_SETTINGS)
        try:
            pos = _Position(int(progress["next_unit"]), int(progress["rows"]),
                            int(progress["null_rows"]), int(progress["tokens"]))
            resume_from = dict(progress["writer"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{PROGRESS_NAME} is damaged ({e!r})", where=str(out_dir),
                            fix=_FIX_SETTINGS) from None
    for leftover in out_dir.glob(f".{PROGRESS_NAME}.*.tmp") if out_dir.is_dir() else []:
        leftover.unlink()  # a checkpoint write cut short by a kill
    writer = ShardWriter(out_dir, shard_tokens=settings["shard_tokens"], source=dict(settings),
                         val_rule=rule.describe(), resume_from=resume_from)
    closing = bool(resume_from and resume_from.get("closing"))
    return _Run(out_dir, settings, {}, writer, pos, None, lambda _: None, closing,
                tokenizer=tokenizer, start_tokens=pos.tokens)


def _tokenize(run: _Run, src: ParquetSource | HubSource, rule: ValRule, n_workers: int) -> None:
    if run.pos.next_unit:
        run.log(f"resuming at unit {run.pos.next_unit} ({run.pos.tokens:,} tokens written)")
    tasks = src.tasks(run.pos.next_unit, rule)
    if n_workers == 0:
        _parquet_file.cache_clear()  # files may have changed since an earlier call
        run.loop(_ordered(None, tasks, 1))
        return
    import multiprocessing

    # spawn, not fork: the parent may already run pyarrow's and tiktoken's threads.
    context = multiprocessing.get_context("spawn")
    with context.Pool(n_workers, initializer=_init_worker) as pool:
        run.loop(_ordered(pool, tasks, 2 * n_workers))
        # Let the few units still in flight (after --max-tokens) finish rather than terminate
        # busy workers: a clean exit, without the semaphore-leak warnings terminate can cause.
        pool.close()
        pool.join()


def print_log(message: str) -> None:
    print(f"[fineweb] {message}", file=sys.stderr, flush=True)
