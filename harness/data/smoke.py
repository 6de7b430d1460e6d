"""The embedded smoke corpus: English prose every machine with Python already has.

The text comes from the Python standard library's own source tree, read in a fixed order:

1. docstrings of modules, classes and functions (ast.get_docstring, cleaned);
2. the help topics of pydoc_data/topics.py (the language reference pages `help()` shows);
3. blocks of consecutive whole-line comments.

Test suites, idlelib, turtledemo, encodings and anything under site-packages are skipped. A text
is kept when it has at least MIN_CHARS characters and at least 70% of them are letters or
whitespace; exact duplicates are dropped. On CPython 3.11.7 this gives 11,087 texts and 772,527
GPT-2 tokens (docstrings 427k, topics 133k, comments 212k): the docstrings alone, even with no
length floor, come to under 0.45M, and only about 0.34M at 200 characters. So MIN_CHARS is 50
and val takes one document in 10 by default (about 68k tokens), not one in 20 (about 29k).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data.shards import ShardWriter, reusable_manifest
from harness.runtime.tokenizer import EOT, gpt2_encoding

SOURCE_KIND = "python-stdlib-docstrings"
MIN_CHARS = 50
KINDS = ("docstrings", "topics", "comments")
MIN_TEXT_FRACTION = 0.7
SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo",
    "encodings", "__pycache__",
})
TOPICS_FILE = "pydoc_data/topics.py"
_BATCH = 512  # documents per tokenizer call


@dataclass
class _Stats:
    """How many files a pass over the stdlib parsed."""

    files: int = 0


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(stdlib: Path) -> list[Path]:
    """The stdlib's .py files outside SKIP_DIRS, sorted by their path relative to `stdlib`."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        rel = os.path.relpath(dirpath, stdlib)
        found.extend(os.path.normpath(os.path.join(rel, f))
                     for f in filenames if f.endswith(".py"))
    found.sort(key=lambda p: p.replace(os.sep, "/"))
    return [stdlib / p for p in found]


def _is_prose(text: str) -> bool:
    if len(text) < MIN_CHARS:
        return False
    letters = sum(1 for c in text if c.isalpha() or c.isspace())
    return letters >= MIN_TEXT_FRACTION * len(text)


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _read_file(path: Path, rel: str) -> tuple[list[str], list[str], list[str]] | None:
    """(docstrings, topics, comment blocks) of one file, or None when it does not parse."""
    try:
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    docstrings: list[str] = []
    topics: list[str] = []
    in_string: set[int] = set()  # lines inside multi-line string literals
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docstrings.append(doc)
        elif isinstance(node, ast.JoinedStr) or (
                isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)):
            end = node.end_lineno or node.lineno
            in_string.update(range(node.lineno + 1, end + 1))
        if rel == TOPICS_FILE and isinstance(node, ast.Dict):
            topics.extend(v.value for v in node.values
                          if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return docstrings, topics, _comment_blocks(source, in_string)


def _comment_blocks(source: bytes, in_string: set[int]) -> list[str]:
    """Runs of consecutive whole-line `#` comments, each joined into one text."""
    try:
        lines = source.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return []
    blocks: list[str] = []
    block: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#") and number not in in_string:
            if not stripped.startswith("#!") and "-*- coding" not in stripped:
                block.append(stripped.lstrip("#").strip())
            continue
        if block:
            blocks.append("\n".join(block).strip())
            block = []
    if block:
        blocks.append("\n".join(block).strip())
    return blocks


def _documents(stdlib: Path, stats: _Stats) -> Iterator[tuple[str, str]]:
    """(kind, text) in corpus order: each file's docstrings as the files are read, then the
    topics, then the comment blocks; texts failing the prose rule and repeats are left out."""
    seen: set[str] = set()
    later: dict[str, list[str]] = {"topics": [], "comments": []}

    def keep(text: str) -> bool:
        if text in seen or not _is_prose(text):
            return False
        seen.add(text)
        return True

    for path in _python_files(stdlib):
        found = _read_file(path, path.relative_to(stdlib).as_posix())
        if found is None:
            continue
        stats.files += 1
        docstrings, topics, comments = found
        later["topics"].extend(topics)
        later["comments"].extend(comments)
        yield from (("docstrings", text) for text in docstrings if keep(text))
    for kind, texts in later.items():
        yield from ((kind, text) for text in texts if keep(text))


def stdlib_documents(max_chars: int | None = None) -> Iterator[str]:
    """The smoke corpus's documents in a fixed order; stops once `max_chars` have been given."""
    total = 0
    for _, text in _documents(_stdlib_dir(), _Stats()):
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def _is_val(text: str, val_every: int) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % val_every == 0


def _val_rule(val_every: int) -> str:
    return (f"a document is val when int(sha256(utf-8 text).hexdigest()[:8], 16) % {val_every}"
            " == 0, else train")


# What a rebuilt corpus would differ in: a manifest that matches on these is reused.
_SOURCE_KEYS = ("kind", "python", "max_tokens", "val_every", "min_chars")


def prepare_smoke(out_dir: Path, *, max_tokens: int = 2_000_000,
                  val_every: int = 10) -> dict[str, Any]:
    """Tokenize the smoke corpus into shards in out_dir; returns the manifest.

    Each document goes to val when int(sha256(text)[:8], 16) % val_every == 0, else to train;
    writing stops once train + val reach max_tokens. Idempotent: an intact out_dir built by the
    same Python with the same settings and tokenizer is returned as it is.
    """
    if val_every < 2:
        raise ValueError(f"val_every must be at least 2, got {val_every}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    out_dir = Path(out_dir)
    stdlib = _stdlib_dir()
    source: dict[str, Any] = {
        "kind": SOURCE_KIND,
        "python": sys.version,
        "stdlib": str(stdlib),
        "max_tokens": max_tokens,
        "val_every": val_every,
        "min_chars": MIN_CHARS,
    }
    existing = reusable_manifest(out_dir, source, _SOURCE_KEYS)
    if existing is not None:
        return existing

    stats = _Stats()
    documents = _documents(stdlib, stats)
    encoding = gpt2_encoding()
    writer = ShardWriter(out_dir, source=source, val_rule=_val_rule(val_every))
    written = dict.fromkeys(KINDS, 0)
    total = 0
    threads = max(1, min(8, os.cpu_count() or 1))
    while total < max_tokens:
        batch = list(itertools.islice(documents, _BATCH))
        if not batch:
            break
        texts = [text for _, text in batch]
        encoded = encoding.encode_ordinary_batch(texts, num_threads=threads)
        for (kind, text), tokens in zip(batch, encoded, strict=True):
            tokens.append(EOT)
            writer.add("val" if _is_val(text, val_every) else "train", tokens)
            written[kind] += 1
            total += len(tokens)
            if total >= max_tokens:
                break
    writer.source = {**source, "files": stats.files, "texts": written}
    return writer.close()
