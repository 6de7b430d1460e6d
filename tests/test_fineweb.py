"""`harness data prepare fineweb`: parquet (or a hub stream) to token shards, resumable.

Every run here is small (a few hundred documents, shards of a few thousand tokens), so several
shards exist and a kill lands mid-dataset. Byte-identity is checked file by file: a resumed run,
or one with another number of workers, must leave exactly the directory of a clean run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.data import fineweb, shards
from harness.data.fineweb import prepare_fineweb
from harness.data.shards import ShardWriter, decode_split, read_manifest, verify
from harness.errors import UserError
from harness.runtime.tokenizer import EOT, encode_document, gpt2_encoding, tokenizer_sha256
from tests.conftest import PYTHON, REPO

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I don't think they're coming back; we've waited since Tuesday, haven't we?",
    "Prices rose 3.5% in 2023, to $1,249.99 per unit (before tax).",
    "Ein naïver Café-Besucher bestellte zwei Stück Kuchen und ein Glas Wasser.",
    "Жизнь прекрасна, когда светит солнце и поют птицы.",
    "日本語のテキストも正しく処理されるべきです。",
    "한국어 문장도 포함되어 있습니다.",
    "العربية تُكتب من اليمين إلى اليسار.",
    "Emoji are text too: 😀 👍🏽 👨‍👩‍👧‍👦 🇩🇪 ✨",
    "A literal <|endoftext|> inside a page is ordinary text, not a document break.",
    "Tabs\tand   runs of spaces    survive\ttokenization.",
    "She said, \"Call me at 555-0100 after 6 p.m.\" and hung up.",
    "Ωmega, π ≈ 3.14159, and ∑ x² are all fine in UTF-8.",
    "The committee will reconvene on 2024-06-01 to review the findings.",
    "Non\u00a0breaking\u2003spaces and a zero\u200bwidth joiner are kept as they are.",
]
SHARD_TOKENS = 1500
VAL_EVERY = 5
N_DOCS = 360


def _documents() -> list[str | None]:
    """Varied pages of 1-8 sentences; row 17 is null (skipped), row 40 an empty page."""
    rng = random.Random(20261123)
    docs: list[str | None] = []
    for i in range(N_DOCS):
        parts = rng.choices(SENTENCES, k=rng.randint(1, 8))
        docs.append(rng.choice([" ", "\n", "\n\n"]).join(parts) + f" (page {i})")
    docs[17], docs[40] = None, ""
    return docs


def _write_source(root: Path, docs: list[str | None]) -> Path:
    """Two parquet files, the second in a subfolder, small row groups, an extra column."""
    cut = 150
    for rel, part in (("part-0.parquet", docs[:cut]), ("part-1/rest.parquet", docs[cut:])):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"url": [f"https://example.org/{i}" for i in range(len(part))],
                          "text": pa.array(part, type=pa.string())})
        pq.write_table(table, path, row_group_size=20)
    return root


def _is_val(text: str, every: int = VAL_EVERY, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:".encode() + text.encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % every == 0


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


def _decoded_documents(directory: Path, split: str) -> list[str]:
    tokens = decode_split(directory, split)
    assert len(tokens) == 0 or tokens[-1] == EOT
    ends = np.flatnonzero(tokens == EOT)
    pieces = np.split(tokens, ends + 1)[:-1]
    return [gpt2_encoding().decode(p[:-1].tolist()) for p in pieces]


def harness(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, **(env or {})})


def _prepare_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "fineweb", "--source", str(source), "--out", str(out),
            "--shard-tokens", str(SHARD_TOKENS), "--val-every", str(VAL_EVERY), *extra]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_source(tmp_path_factory.mktemp("parquet"), _documents())


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean, uninterrupted build in this process (workers=0)."""
    out = tmp_path_factory.mktemp("reference")
    prepare_fineweb(source, out, workers=0, shard_tokens=SHARD_TOKENS, val_every=VAL_EVERY)
    return out


class _Killed(Exception):
    """Stands in for os._exit in in-process runs."""


def _raise_killed() -> None:
    raise _Killed


# --- a clean build --------------------------------------------------------------------------


def test_shards_decode_to_the_documents(source: Path, reference: Path) -> None:
    docs = [d for d in _documents() if d is not None]
    expected = {"train": [d for d in docs if not _is_val(d)],
                "val": [d for d in docs if _is_val(d)]}
    assert expected["val"] and expected["train"]
    manifest = read_manifest(reference)
    for split, split_docs in expected.items():
        assert _decoded_documents(reference, split) == split_docs
        assert manifest["documents"][split] == len(split_docs)
        assert manifest["tokens"][split] == sum(len(encode_document(d)) for d in split_docs)
        assert len(manifest["splits"][split]) >= (2 if split == "train" else 1)
    assert len(manifest["splits"]["train"]) > 4
    assert verify(reference) == []
    assert sorted(p.name for p in reference.iterdir()) == ["manifest.json", *sorted(
        e["file"] for entries in manifest["splits"].values() for e in entries)]


def test_manifest_records_source_rule_and_tokenizer(source: Path, reference: Path) -> None:
    manifest = read_manifest(reference)
    src = manifest["source"]
    assert src["kind"] == "parquet" and src["column"] == "text"
    assert src["files"] == [
        {"path": rel, "bytes": (source / rel).stat().st_size,
         "rows": pq.ParquetFile(source / rel).metadata.num_rows,
         "sha256": hashlib.sha256((source / rel).read_bytes()).hexdigest()}
        for rel in ("part-0.parquet", "part-1/rest.parquet")]
    assert src["rows"] == N_DOCS and src["null_rows"] == 1
    assert src["val"] == {"rule": "sha256-mod", "every": VAL_EVERY, "seed": 0}
    assert src["max_tokens"] is None and src["shard_tokens"] == SHARD_TOKENS
    assert f"% {VAL_EVERY} == 0" in manifest["val_rule"]
    assert manifest["tokenizer"]["sha256"] == tokenizer_sha256()
    # No timestamps or machine facts: a rebuild elsewhere gives the same manifest.
    text = (reference / "manifest.json").read_text()
    assert str(source) not in text and "time" not in text and "host" not in text


def test_cli_with_two_workers_gives_the_same_bytes(source: Path, reference: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = harness(*_prepare_args(source, out, "--workers", "2"))
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(reference)
    assert proc.stdout.startswith(f"OK: {out}: train {manifest['tokens']['train']:,} tokens")
    assert _digests(out) == _digests(reference)
    check = harness("data", "verify", str(out))
    assert check.returncode == 0 and "every shard matches" in check.stdout


def test_rerun_is_a_no_op_and_other_settings_are_refused(source: Path, reference: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    again = prepare_fineweb(source, reference, workers=0, shard_tokens=SHARD_TOKENS,
                            val_every=VAL_EVERY)
    assert again == read_manifest(reference)
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before
    with pytest.raises(UserError, match=r"other settings \(val\)"):
        prepare_fineweb(source, reference, workers=0, shard_tokens=SHARD_TOKENS,
                        val_every=VAL_EVERY, seed=1)
    assert verify(reference) == []


def test_verify_checks_the_totals(reference: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in reference.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokens"]["val"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    [problem] = verify(copy)
    assert problem.startswith("tokens.val is ")


# --- resuming -----------------------------------------------------------------------------


def test_killed_prepare_resumes_to_the_same_bytes(source: Path, reference: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = _prepare_args(source, out, "--workers", "2")
    first = harness(*args, env={"HARNESS_TEST_DIE_AFTER_SHARDS": "3"})
    assert first.returncode == 137, first.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert progress["next_unit"] > 0 and not (out / "manifest.json").exists()
    assert len(list(out.glob("train_*.bin"))) > 3  # the shard begun after the checkpoint
    second = harness(*args)
    assert second.returncode == 0, second.stderr
    assert f"resuming at unit {progress['next_unit']}" in second.stderr
    assert _digests(out) == _digests(reference)


def test_killed_while_closing_resumes_to_the_same_bytes(source: Path, reference: Path,
                                                        tmp_path: Path) -> None:
    sizes = [e["tokens"] for e in read_manifest(reference)["splits"]["train"]]
    assert sizes[-1] < SHARD_TOKENS and sizes[-2] < SHARD_TOKENS  # the tail was evened out
    out = tmp_path / "closing"
    args = _prepare_args(source, out, "--workers", "0")
    first = harness(*args, env={"HARNESS_TEST_DIE_WHILE_CLOSING": "1"})
    assert first.returncode == 137, first.stderr
    assert json.loads((out / "progress.json").read_text())["writer"]["closing"] is True
    second = harness(*args)
    assert second.returncode == 0, second.stderr
    assert _digests(out) == _digests(reference)


def test_unfinished_prepare_with_other_settings_is_refused(
        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fineweb, "_die", _raise_killed)
    monkeypatch.setenv("HARNESS_TEST_DIE_AFTER_SHARDS", "1")
    with pytest.raises(_Killed):
        prepare_fineweb(source, tmp_path, workers=0, shard_tokens=SHARD_TOKENS)
    with pytest.raises(UserError, match=r"unfinished prepare .*\(shard_tokens\)"):
        prepare_fineweb(source, tmp_path, workers=0, shard_tokens=SHARD_TOKENS + 1)


def _writer_docs(seed: int) -> list[tuple[str, list[int]]]:
    rng = np.random.default_rng(seed)
    return [("val" if i % 4 == 0 else "train",
             [*rng.integers(0, EOT, size=int(rng.integers(1, 300))).tolist(), EOT])
            for i in range(80)]


def _writer(out: Path, state: dict[str, Any] | None = None) -> ShardWriter:
    return ShardWriter(out, shard_tokens=1000, source={"kind": "test"}, val_rule="-",
                       resume_from=state)


@pytest.mark.parametrize("at", [0, 1, 23, 57, 79])
def test_writer_resumes_from_a_checkpoint(tmp_path: Path, at: int) -> None:
    docs = _writer_docs(7)
    clean = _writer(tmp_path / "clean")
    for split, doc in docs:
        clean.add(split, doc)
    clean.close()
    out = tmp_path / "resumed"
    first = _writer(out)
    for split, doc in docs[:at]:
        first.add(split, doc)
    state = first.checkpoint()
    for split, doc in docs[at:at + 15]:  # written after the checkpoint, then "killed"
        first.add(split, doc)
    first.flush()
    second = _writer(out, json.loads(json.dumps(state)))
    for split, doc in docs[at:]:
        second.add(split, doc)
    second.close()
    assert _digests(out) == _digests(tmp_path / "clean")


@pytest.mark.parametrize("done", ["nothing", "tail", "tail+cut"])
def test_writer_close_resumes_mid_evening_out(tmp_path: Path, done: str) -> None:
    tokens = np.arange(2100, dtype=np.int64) % EOT
    clean = _writer(tmp_path / "clean")
    clean.add("train", tokens)
    clean.close()
    out = tmp_path / "resumed"
    first = _writer(out)
    first.add("train", tokens)
    saved: list[dict[str, Any]] = []

    def crash(state: dict[str, Any]) -> None:
        saved.append(state)
        raise _Killed

    with pytest.raises(_Killed):
        first.close(on_closing=crash)
    # Redo the evening-out's steps by hand, as far as a killed close got.
    prev, tail = out / "train_000001.bin", out / "train_000002.bin"
    if done != "nothing":
        shards._rewrite_tail(prev, tail, keep=550)
    if done == "tail+cut":
        os.truncate(prev, 2 * 550)
    manifest = _writer(out, saved[0]).close()
    assert [e["tokens"] for e in manifest["splits"]["train"]] == [1000, 550, 550]
    assert _digests(out) == _digests(tmp_path / "clean")


def test_writer_refuses_a_checkpoint_its_files_do_not_match(tmp_path: Path) -> None:
    first = _writer(tmp_path)
    for split, doc in _writer_docs(3):
        first.add(split, doc)
    state = first.checkpoint()
    (tmp_path / "train_000000.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match=r"train_000000\.bin: 2 bytes on disk"):
        _writer(tmp_path, state)


# --- partial builds and the val rules ---------------------------------------------------------


def test_max_tokens_stops_at_a_document_end(source: Path, tmp_path: Path) -> None:
    cap = 5000
    manifest = prepare_fineweb(source, tmp_path, workers=0, shard_tokens=SHARD_TOKENS,
                               val_every=VAL_EVERY, max_tokens=cap)
    assert verify(tmp_path) == []
    docs = [d for d in _documents() if d is not None]
    lengths = np.cumsum([len(encode_document(d)) for d in docs])
    k = int(np.searchsorted(lengths, cap)) + 1  # documents up to the first end >= cap
    assert manifest["tokens"]["train"] + manifest["tokens"]["val"] == lengths[k - 1] >= cap
    assert lengths[k - 2] < cap
    assert k % 20 not in (0, 1)  # the cap falls inside a row group, not at its edge
    kept = docs[:k]
    assert _decoded_documents(tmp_path, "train") == [d for d in kept if not _is_val(d)]
    assert _decoded_documents(tmp_path, "val") == [d for d in kept if _is_val(d)]
    assert manifest["source"]["max_tokens"] == cap
    assert manifest["source"]["rows"] == k + 1  # the null row 17 lies before the cut


def test_val_docs_takes_the_first_rows(source: Path, tmp_path: Path) -> None:
    manifest = prepare_fineweb(source, tmp_path, workers=0, shard_tokens=SHARD_TOKENS,
                               val_docs=30, seed=9)
    docs = _documents()
    assert _decoded_documents(tmp_path, "val") == [d for d in docs[:30] if d is not None]
    assert _decoded_documents(tmp_path, "train") == [d for d in docs[30:] if d is not None]
    assert manifest["source"]["val"] == {"rule": "first-rows", "docs": 30, "seed": 9}
    assert "first 30 rows" in manifest["val_rule"]


# --- a hub stream (datasets faked: nothing is downloaded) --------------------------------------


class _FakeStream:
    """What `datasets.load_dataset(..., streaming=True)` returns, reduced to what is used."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.features = {"text": "string", "url": "string"}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def skip(self, n: int) -> _FakeStream:
        return _FakeStream(self.rows[n:])


def test_hub_stream_gives_the_same_shards_and_resumes(reference: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    rows = [{"url": "u", "text": d} for d in _documents()]

    def load_dataset(hub_id: str, name: str | None, split: str, streaming: bool) -> _FakeStream:
        calls.append((hub_id, name, split, streaming))
        return _FakeStream(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(fineweb, "HUB_CHUNK_ROWS", 16)
    monkeypatch.setattr(fineweb, "_die", _raise_killed)
    monkeypatch.setenv("HARNESS_TEST_DIE_AFTER_SHARDS", "2")
    options: dict[str, Any] = {"workers": 0, "shard_tokens": SHARD_TOKENS,
                               "val_every": VAL_EVERY, "hf_config": "sample-10BT"}
    with pytest.raises(_Killed):
        prepare_fineweb("HuggingFaceFW/fineweb", tmp_path, **options)
    monkeypatch.delenv("HARNESS_TEST_DIE_AFTER_SHARDS")
    manifest = prepare_fineweb("HuggingFaceFW/fineweb", tmp_path, **options)
    assert calls[0] == ("HuggingFaceFW/fineweb", "sample-10BT", "train", True)
    assert manifest["source"]["kind"] == "hf-datasets" and manifest["source"]["rows"] == N_DOCS
    shards_only = {k: v for k, v in _digests(tmp_path).items() if k.endswith(".bin")}
    assert shards_only == {k: v for k, v in _digests(reference).items() if k.endswith(".bin")}


# --- refusals -----------------------------------------------------------------------------


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ")
    return first


def test_cli_refuses_a_missing_directory(tmp_path: Path) -> None:
    line = _error_line(harness(*_prepare_args(tmp_path / "nowhere", tmp_path / "out")))
    assert "no such directory" in line


def test_cli_refuses_a_directory_without_parquet(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not parquet")
    line = _error_line(harness(*_prepare_args(tmp_path / "src", tmp_path / "out")))
    assert "no .parquet files" in line


def test_cli_refuses_parquet_without_a_text_column(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"body": ["hello"], "id": [1]}), tmp_path / "src" / "a.parquet")
    line = _error_line(harness(*_prepare_args(tmp_path / "src", tmp_path / "out")))
    assert "no 'text' column" in line and "body, id" in line and "a.parquet" in line


def test_cli_refuses_an_unreachable_hub_id(tmp_path: Path) -> None:
    proc = harness(*_prepare_args(Path("HuggingFaceFW/fineweb"), tmp_path / "out"),
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    line = _error_line(proc)
    assert "'HuggingFaceFW/fineweb'" in line
    assert "hub" in line or "datasets" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: pq.write_table(pa.table({"text": [1, 2]}), d / "a.parquet"), "not strings"),
    (lambda d: (d / "a.parquet").write_bytes(b"PAR1 not really"), "not a readable parquet"),
])
def test_bad_parquet_is_a_user_error(tmp_path: Path, make: Any, message: str) -> None:
    make(tmp_path)
    with pytest.raises(UserError, match=message):
        prepare_fineweb(tmp_path, tmp_path / "out", workers=0)


@pytest.mark.parametrize("options", [{"max_tokens": 0}, {"workers": -1}, {"val_every": 1},
                                     {"val_docs": -1}, {"val_every": 3, "val_docs": 3},
                                     {"shard_tokens": 1}])
def test_bad_options_are_user_errors(source: Path, tmp_path: Path,
                                     options: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        prepare_fineweb(source, tmp_path, **options)
