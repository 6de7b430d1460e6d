"""Eval sets for the lm-eval stage: local JSONL files in the schemas lm-eval's tasks expect.

Six tasks, each scored on one split exactly as lm-eval 0.4.x defines it (prompt, choices,
metrics): wikitext (wikitext-2-raw-v1 documents, test), lambada_openai (test), arc_easy
(test), hellaswag (validation), piqa (validation) and winogrande (winogrande_xl, validation).

A prepared directory holds `<task>/<split>.jsonl`, `tasks/harness_<task>.yaml` and
`manifest.json` (files, sha256, document counts, where they came from). The YAMLs `include:`
lm-eval's own installed task definition and override only where the documents come from
(`dataset_path: json` + absolute `data_files`) and which splits exist, so `doc_to_text`,
`process_docs`, `process_results` and the metrics are lm-eval's own functions. They hold
absolute paths, so the eval stage writes them afresh (`write_task_yamls`) on the machine it
runs on; the copies written here are for people and for `TaskManager(include_path=...)`.

Sources: `prepare_from_source` reads files in the Hugging Face datasets' own formats (jsonl,
json, parquet, or the .arrow files of a `datasets` cache) found under a local directory such
as an HF cache or a download; `prepare_smoke_evals` builds small sets in the same schemas
from the smoke corpus's held-out documents, so the whole eval path runs with no external data.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import __version__
from harness.errors import UserError
from harness.runtime.evalsets import (
    FORMAT,
    MANIFEST_NAME,
    TASK_NAMES,
    TASKS,
    YAML_DIR,
    EvalTask,
    lm_eval_tasks_dir,
    read_manifest,
    verify,
    write_task_yamls,
)
from harness.runtime.fileio import atomic_write_bytes, sha256_file

SOURCE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")

Row = dict[str, Any]


def get_task(name: str) -> EvalTask:
    for t in TASKS:
        if t.name == name:
            return t
    raise UserError(f"no eval task {name!r}", fix=f"use one of: {', '.join(TASK_NAMES)}")


# --- schemas ---------------------------------------------------------------------------------

def _kind_problem(value: Any, kind: str) -> str | None:
    if kind == "str":
        return None if isinstance(value, str) else "is not a string"
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "is not an integer"
    if kind == "label":  # hellaswag's label: a string of digits in the HF release
        ok = isinstance(value, str | int) and not isinstance(value, bool) and \
            str(value).isdigit()
        return None if ok else "is not a label (digits)"
    if kind == "str_list":
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
        return None if ok else "is not a non-empty list of strings"
    if kind == "choices":
        if not isinstance(value, dict):
            return "is not an object {text, label}"
        text, label = value.get("text"), value.get("label")
        if _kind_problem(text, "str_list") or _kind_problem(label, "str_list"):
            return "needs lists of strings 'text' and 'label'"
        assert isinstance(text, list) and isinstance(label, list)
        return None if len(text) == len(label) else "has 'text' and 'label' of different lengths"
    raise ValueError(f"unknown field kind {kind!r}")


def _arc_rule(row: Row) -> str | None:
    ok = row["answerKey"] in row["choices"]["label"]
    return None if ok else f"answerKey {row['answerKey']!r} is not among choices.label"


def _hellaswag_rule(row: Row) -> str | None:
    ok = 0 <= int(row["label"]) < len(row["endings"])
    return None if ok else f"label {row['label']!r} does not index endings"


def _piqa_rule(row: Row) -> str | None:
    return None if row["label"] in (0, 1) else f"label {row['label']!r} is not 0 or 1"


def _winogrande_rule(row: Row) -> str | None:
    if row["answer"] not in ("1", "2"):
        return f"answer {row['answer']!r} is not '1' or '2'"
    return None if "_" in row["sentence"] else "sentence has no '_' blank"


def _lambada_rule(row: Row) -> str | None:
    return None if " " in row["text"].strip() else "text has no last word to predict"


def _wikitext_rule(row: Row) -> str | None:
    return None if row["page"].strip() else "page is empty"


# What lm-eval's own doc_to_* functions assume beyond field types.
_RULES: dict[str, Callable[[Row], str | None]] = {
    "wikitext": _wikitext_rule, "lambada_openai": _lambada_rule, "arc_easy": _arc_rule,
    "hellaswag": _hellaswag_rule, "piqa": _piqa_rule, "winogrande": _winogrande_rule,
}


def row_problem(task: EvalTask, row: object) -> str | None:
    """What makes `row` unusable as a document of `task`, or None."""
    if not isinstance(row, dict):
        return "is not an object"
    for name, kind in task.fields:
        if name not in row:
            return f"misses field {name!r}"
        problem = _kind_problem(row[name], kind)
        if problem:
            return f"field {name!r} {problem}"
    return _RULES[task.name](row)


def validate_rows(task: EvalTask, rows: Sequence[object], where: str) -> None:
    """UserError naming the first bad rows; an empty set is bad too."""
    if not rows:
        raise UserError(f"no documents for {task.name}", where=where)
    bad = [(i, p) for i, r in enumerate(rows) if (p := row_problem(task, r)) is not None]
    if bad:
        shown = "; ".join(f"row {i} {p}" for i, p in bad[:3])
        fields = ", ".join(f"{n} ({k})" for n, k in task.fields)
        raise UserError(f"{len(bad)} of {len(rows)} rows do not fit {task.name}'s schema: "
                        f"{shown}", where=where, fix=f"{task.name} needs: {fields}")


# --- reading source files --------------------------------------------------------------------

def read_rows(path: Path) -> list[Row]:
    """Rows of a jsonl, json (list or lines), parquet or arrow (datasets cache) file."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return _read_json_rows(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]

            rows: list[Row] = pq.read_table(path).to_pylist()
            return rows
        if suffix == ".arrow":
            return _read_arrow(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read rows: {e}", where=str(path)) from e
    raise UserError(f"unsupported file type {suffix!r}", where=str(path),
                    fix=f"use one of {', '.join(SOURCE_SUFFIXES)}")


def _read_json_rows(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        data = json.loads(text)
        return list(data) if isinstance(data, list) else []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_arrow(path: Path) -> list[Row]:
    import pyarrow as pa

    # A `datasets` cache writes the IPC stream format; other tools write the file format.
    with pa.memory_map(str(path)) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
    rows: list[Row] = table.to_pylist()
    return rows


def candidate_files(source: Path, task: EvalTask) -> list[Path]:
    """Files under `source` whose path names `task`'s dataset and scored split, sorted."""
    found = []
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() not in SOURCE_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(source).as_posix().lower()
        if (re.search(task.path_pattern, rel) and re.search(task.split_pattern, rel)
                and not re.search(task.exclude_pattern, rel)):
            found.append(path)
    return found


def _usable(task: EvalTask, path: Path) -> list[Row] | None:
    try:
        rows = read_rows(path)
    except UserError:
        return None
    if rows and all(row_problem(task, r) is None for r in rows):
        return rows
    return None


def select_source(task: EvalTask, source: Path) -> tuple[Path, list[Row]]:
    """The one file under `source` that holds `task`'s scored split in its schema.

    Several files with the same rows (a parquet and its arrow cache, say) are one choice;
    different ones are refused, since guessing could score the wrong set.
    """
    candidates = candidate_files(source, task)
    usable = [(p, rows) for p in candidates if (rows := _usable(task, p)) is not None]
    distinct = {_rows_sha256(rows) for _, rows in usable}
    if len(distinct) == 1:
        return usable[0]
    hint = f"pass --file {task.name}=PATH"
    if not usable:
        looked = ", ".join(str(p) for p in candidates[:5]) or "no file with a matching path"
        raise UserError(
            f"no {task.hf_dataset} ({task.hf_config or 'default'}) {task.split} split found "
            f"for {task.name} (looked at: {looked})", where=str(source),
            fix=f"{hint}; it must be jsonl/json/parquet/arrow with fields "
                f"{', '.join(n for n, _ in task.fields)}")
    names = ", ".join(str(p) for p, _ in usable[:5])
    raise UserError(f"{len(distinct)} different candidate files for {task.name}: {names}",
                    where=str(source), fix=hint)


def _rows_sha256(rows: Iterable[Row]) -> str:
    return hashlib.sha256(_jsonl_bytes(rows)).hexdigest()


def _jsonl_bytes(rows: Iterable[Row]) -> bytes:
    lines = (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    return "".join(lines).encode("utf-8")


# --- writing a prepared directory -------------------------------------------------------------

def write_sets(out_dir: Path, sets: Mapping[str, Sequence[Row]], *, kind: str,
               source: dict[str, Any], origins: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Write every task's JSONL, the YAMLs (when lm-eval is installed), then the manifest."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # A directory without a manifest is never mistaken for a complete one.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    entries: dict[str, Any] = {}
    for task in TASKS:
        rows = sets[task.name]
        validate_rows(task, rows, where=f"{kind} set {task.name}")
        data = _jsonl_bytes(rows)
        atomic_write_bytes(out_dir / task.rel_file, data)
        entries[task.name] = {
            "task": task.harness_task, "lm_eval_task": task.name, "split": task.split,
            "file": task.rel_file, "sha256": hashlib.sha256(data).hexdigest(),
            "docs": len(rows), "full_docs": task.full_docs, "hf_dataset": task.hf_dataset,
            "hf_config": task.hf_config, **origins.get(task.name, {}),
        }
    manifest: dict[str, Any] = {"format": FORMAT, "kind": kind, "source": source,
                                "tasks": entries, "created_by": f"harness {__version__}"}
    if lm_eval_tasks_dir() is not None:
        write_task_yamls(out_dir, out_dir / YAML_DIR, manifest)
    atomic_write_bytes(out_dir / MANIFEST_NAME,
                  (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return manifest


def prepare_from_source(out_dir: Path, source: Path | None,
                        files: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """Lay out the six real eval sets from local files; `files` names some tasks' files."""
    files = dict(files or {})
    unknown = sorted(set(files) - set(TASK_NAMES))
    if unknown:
        raise UserError(f"unknown eval task(s) {', '.join(unknown)}",
                        fix=f"use: {', '.join(TASK_NAMES)}")
    if source is not None and not Path(source).is_dir():
        raise UserError("not a directory", where=str(source))
    sets: dict[str, list[Row]] = {}
    origins: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        path, rows = _source_rows(task, source, files.get(task.name))
        sets[task.name] = rows
        origins[task.name] = {"source_file": str(path.resolve()),
                              "source_sha256": sha256_file(path)}
        if len(rows) != task.full_docs:
            print(f"note: {task.name}: {len(rows)} documents, the full split has "
                  f"{task.full_docs}")
    info = {"kind": "local-files", "dir": str(Path(source).resolve()) if source else None}
    return write_sets(out_dir, sets, kind="source", source=info, origins=origins)


def _source_rows(task: EvalTask, source: Path | None,
                 explicit: Path | None) -> tuple[Path, list[Row]]:
    if explicit is not None:
        rows = read_rows(Path(explicit))
        validate_rows(task, rows, where=str(explicit))
        return Path(explicit), rows
    if source is None:
        raise UserError(f"no file for {task.name}", fix="pass --source DIR or --file TASK=PATH")
    return select_source(task, Path(source))


# --- smoke sets ------------------------------------------------------------------------------

SMOKE_VERSION = 1
SMOKE_DOCS = 64  # documents per task
_SEED = "harness-smoke-evals"


def prose(text: str) -> str:
    """A document as one line of single-spaced words."""
    return " ".join(text.split())


def _span(words: Sequence[str], rng: random.Random, n: int) -> str:
    start = rng.randrange(0, max(1, len(words) - n + 1))
    return " ".join(words[start:start + n])


class _Pool:
    """Held-out documents for one task: each item's own text plus other documents' words."""

    def __init__(self, documents: Sequence[str], task: str, min_words: int) -> None:
        self.rng = random.Random(f"{_SEED}/{SMOKE_VERSION}/{task}")
        self.docs = [d for d in (prose(x) for x in documents) if len(d.split()) >= min_words]
        if len(self.docs) < 8:
            raise UserError(f"too few held-out documents for the smoke {task} set "
                            f"({len(self.docs)} with at least {min_words} words)")
        self.rng.shuffle(self.docs)

    def build(self, n: int, make: Callable[[int, list[str]], Row | None]) -> list[Row]:
        """Up to n rows, `make(index, words)` tried on the documents in turn (cycling)."""
        rows: list[Row] = []
        for k in range(3 * len(self.docs)):
            row = make(len(rows), self.docs[k % len(self.docs)].split())
            if row is not None:
                rows.append(row)
                if len(rows) == n:
                    break
        return rows

    def distractors(self, k: int, n_words: int, avoid: set[str]) -> list[str]:
        """k spans of n_words from other documents, none equal to anything in `avoid`."""
        out: list[str] = []
        while len(out) < k:
            span = _span(self.rng.choice(self.docs).split(), self.rng, n_words)
            if span not in avoid and span not in out:
                out.append(span)
        return out

    def other_word(self, avoid: str) -> str:
        while True:
            words = [w for w in self.rng.choice(self.docs).split() if _is_word(w, 4)]
            if words and (w := self.rng.choice(words)).lower() != avoid.lower():
                return w


def _is_word(w: str, min_len: int = 3) -> bool:
    return w.isascii() and w.isalpha() and len(w) >= min_len


def _cut(rng: random.Random, words: Sequence[str], lo: int, hi: int) -> int:
    """A random split point in [lo, hi], leaving at least 4 words after it."""
    return rng.randint(lo, max(lo, min(hi, len(words) - 4)))


def smoke_wikitext(documents: Sequence[str], n: int) -> list[Row]:
    # Pages keep their line breaks, as wikitext's do.
    rng = random.Random(f"{_SEED}/{SMOKE_VERSION}/wikitext")
    pages = [d.strip() for d in documents if len(d.split()) >= 20]
    rng.shuffle(pages)
    return [{"page": page} for page in pages[:n]]


def smoke_lambada(documents: Sequence[str], n: int) -> list[Row]:
    # The target is the passage's last word: cut after a plain word, at most 60 words in.
    def make(_: int, words: list[str]) -> Row | None:
        last = max((k for k in range(8, min(len(words), 60)) if _is_word(words[k])), default=-1)
        return {"text": " ".join(words[:last + 1])} if last > 0 else None

    return _Pool(documents, "lambada_openai", 12).build(n, make)


def _choices(pool: _Pool, true: str, n_words: int, k: int) -> tuple[list[str], int]:
    options = pool.distractors(k - 1, n_words, {true})
    gold = pool.rng.randrange(k)
    options.insert(gold, true)
    return options, gold


def smoke_arc_easy(documents: Sequence[str], n: int) -> list[Row]:
    pool = _Pool(documents, "arc_easy", 14)
    labels = ["A", "B", "C", "D"]

    def make(i: int, words: list[str]) -> Row:
        q = _cut(pool.rng, words, 8, 20)
        options, gold = _choices(pool, " ".join(words[q:q + 4]), 4, 4)
        return {"id": f"smoke-arc-easy-{i:04d}", "question": " ".join(words[:q]),
                "choices": {"text": options, "label": labels}, "answerKey": labels[gold]}

    return pool.build(n, make)


def smoke_hellaswag(documents: Sequence[str], n: int) -> list[Row]:
    pool = _Pool(documents, "hellaswag", 16)

    def make(i: int, words: list[str]) -> Row:
        a = _cut(pool.rng, words, 4, 10)
        b = _cut(pool.rng, words, a + 2, a + 6)
        ctx_a, ctx_b = " ".join(words[:a]), " ".join(words[a:b])
        endings, gold = _choices(pool, " ".join(words[b:b + 6]), 6, 4)
        return {"ind": i, "activity_label": words[0].strip(".,:;").capitalize(),
                "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
                "endings": endings, "source_id": f"smoke~{i}", "split": "val",
                "split_type": "indomain", "label": str(gold)}

    return pool.build(n, make)


def smoke_piqa(documents: Sequence[str], n: int) -> list[Row]:
    pool = _Pool(documents, "piqa", 12)

    def make(_: int, words: list[str]) -> Row:
        q = _cut(pool.rng, words, 6, 14)
        sols, gold = _choices(pool, " ".join(words[q:q + 6]), 6, 2)
        return {"goal": " ".join(words[:q]), "sol1": sols[0], "sol2": sols[1], "label": gold}

    return pool.build(n, make)


def smoke_winogrande(documents: Sequence[str], n: int) -> list[Row]:
    # winogrande finds the blank with sentence.index("_"): no other underscore may come first.
    pool = _Pool([d for d in documents if "_" not in d], "winogrande", 8)

    def make(_: int, words: list[str]) -> Row | None:
        words = words[:40]
        spots = [j for j in range(3, len(words) - 1) if _is_word(words[j], 4)]
        if not spots:
            return None
        j = pool.rng.choice(spots)
        options = [words[j], pool.other_word(words[j])]
        gold = pool.rng.randrange(2)
        if gold:
            options.reverse()
        return {"sentence": " ".join([*words[:j], "_", *words[j + 1:]]),
                "option1": options[0], "option2": options[1], "answer": str(gold + 1)}

    return pool.build(n, make)


SMOKE_BUILDERS: dict[str, Callable[[Sequence[str], int], list[Row]]] = {
    "wikitext": smoke_wikitext, "lambada_openai": smoke_lambada, "arc_easy": smoke_arc_easy,
    "hellaswag": smoke_hellaswag, "piqa": smoke_piqa, "winogrande": smoke_winogrande,
}


def smoke_sets(documents: Sequence[str], n: int = SMOKE_DOCS) -> dict[str, list[Row]]:
    """Small sets in the real schemas: a true continuation against other documents' words."""
    return {name: build(documents, n) for name, build in SMOKE_BUILDERS.items()}


def val_documents(corpus_dir: Path) -> list[str]:
    """The texts of a token-shard corpus's val split (documents end with EOT)."""
    import numpy as np

    from harness.data.shards import decode_split
    from harness.runtime.tokenizer import EOT, gpt2_encoding

    tokens = decode_split(Path(corpus_dir), "val")
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    encoding = gpt2_encoding()
    return [encoding.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


# What a rebuilt set would differ in: a manifest that matches on these is reused.
_SOURCE_KEYS = ("kind", "version", "docs_per_task", "corpus_manifest_sha256")


def prepare_smoke_evals(out_dir: Path, corpus_dir: Path, *,
                        docs: int = SMOKE_DOCS) -> dict[str, Any]:
    """Smoke eval sets from the held-out documents of the prepared smoke corpus. Idempotent:
    an intact directory built from the same corpus with the same settings is kept."""
    from harness.data.shards import read_manifest as read_shards_manifest
    from harness.data.shards import reusable_manifest

    read_shards_manifest(corpus_dir)  # a clear error when the corpus is not prepared
    source = {"kind": "smoke", "version": SMOKE_VERSION, "docs_per_task": docs,
              "corpus_dir": str(Path(corpus_dir).resolve()),
              "corpus_manifest_sha256": sha256_file(Path(corpus_dir) / "manifest.json"),
              "rule": "held-out (val) documents of the smoke corpus; multiple-choice items "
                      "pit a document's true continuation against spans of other documents"}
    existing = reusable_manifest(Path(out_dir), source, _SOURCE_KEYS,
                                 read=read_manifest, check=verify)
    if existing is not None:
        return existing
    sets = smoke_sets(val_documents(corpus_dir), docs)
    return write_sets(out_dir, sets, kind="smoke", source=source, origins={})


