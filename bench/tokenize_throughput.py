"""Throughput of `harness data prepare fineweb` on a synthetic FineWeb-like parquet file.

The text is English prose from the smoke corpus (the Python standard library's docstrings,
topics and comments, split into sentences, the code-like ones dropped), shuffled and regrouped
into documents whose lengths follow a log-normal around FineWeb's (~3,000 characters, ~700
tokens on average). It is written as one parquet file with row groups of 1,000 documents,
snappy-compressed, plus an ignored `id` column.

Measured: the per-core cost of each stage (parquet decoding, tokenizing, the shard writer),
then whole prepare runs with each worker count: end to end, and steady (between the first and
the last checkpoint, start-up and close left out). Projected: the time for 10B tokens here, and
on a 32-core node, assuming workers scale linearly with cores (they share nothing; each needs
one core, and one core is left to the main process) until the single writing process saturates:

    rate(cores) = min((cores - 1) * worker_rate, writer_rate)

worker_rate is the steady rate per worker of the run with the most workers below the core count.

    python bench/tokenize_throughput.py                 # ~80 MB of text, workers 1 and 2
    python bench/tokenize_throughput.py --mb 20 --workers 1,2,4 --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from harness.data.fineweb import prepare_fineweb  # noqa: E402
from harness.data.shards import ShardWriter  # noqa: E402
from harness.data.smoke import stdlib_documents  # noqa: E402
from harness.runtime.tokenizer import encode_documents, gpt2_encoding  # noqa: E402

TEN_BILLION = 10_000_000_000
ROW_GROUP = 1000
STAGE_GROUPS = 40  # row groups (~28M tokens) timed stage by stage
CHECKPOINT_TOKENS = 2_000_000  # shard size in the timed runs: a progress report each
_REPORT = re.compile(r"([0-9,]+) tokens from")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][a-z']*")


def prose_sentences() -> list[str]:
    """Sentences of the smoke corpus that read like English: 6-40 words, mostly letters,
    capitalised, ending in a full stop, no code punctuation."""
    out = []
    for doc in stdlib_documents():
        for raw in _SENTENCE_END.split(" ".join(doc.split())):
            words = raw.split()
            if not (6 <= len(words) <= 40 and raw[0].isupper() and raw.endswith((".", "?"))):
                continue
            if any(c in raw for c in "()[]{}=_<>`*#|\\/@$%"):
                continue
            if sum(bool(_WORD.fullmatch(w.strip(",.;:?'\""))) for w in words) >= 0.9 * len(words):
                out.append(raw)
    return sorted(set(out))


def synthetic_documents(sentences: list[str], total_chars: int, seed: int = 0) -> list[str]:
    """Documents of shuffled sentences in paragraphs, log-normal lengths (median ~2,000
    characters, mean ~3,000), until `total_chars` are reached."""
    rng = random.Random(seed)
    docs: list[str] = []
    size = 0
    while size < total_chars:
        target = int(rng.lognormvariate(7.6, 0.9))
        paragraphs, length = [], 0
        while length < target:
            para = " ".join(rng.choices(sentences, k=rng.randint(2, 7)))
            paragraphs.append(para)
            length += len(para) + 2
        docs.append("\n\n".join(paragraphs))
        size += len(docs[-1])
    return docs


def write_parquet(docs: list[str], path: Path) -> None:
    pa = importlib.import_module("pyarrow")  # untyped: imported by name, as in fineweb.py
    pq = importlib.import_module("pyarrow.parquet")

    table = pa.table({"id": pa.array(range(len(docs)), type=pa.int64()),
                      "text": pa.array(docs, type=pa.string())})
    pq.write_table(table, path, row_group_size=ROW_GROUP, compression="snappy")


def stage_costs(path: Path) -> dict[str, float]:
    """Seconds per token of each stage, one core each: parquet decoding, tokenizing,
    and the main process's shard writing (tokens already made)."""
    pq = importlib.import_module("pyarrow.parquet")

    pf = pq.ParquetFile(path)
    start = time.perf_counter()
    groups = [pf.read_row_group(i, columns=["text"], use_threads=False).column(0).to_pylist()
              for i in range(min(pf.num_row_groups, STAGE_GROUPS))]
    read_s = time.perf_counter() - start
    gpt2_encoding()
    start = time.perf_counter()
    encoded = [encode_documents(texts) for texts in groups]
    tok_s = time.perf_counter() - start
    n_tokens = sum(len(t) for t, _ in encoded)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp), shard_tokens=10_000_000, source={}, val_rule="-")
        start = time.perf_counter()
        for tokens, lengths in encoded:
            in_val = np.repeat(np.arange(len(lengths)) % 100 == 0, lengths)  # as prepare splits
            writer.add_documents("train", tokens[~in_val], len(lengths))
            writer.add_documents("val", tokens[in_val], 0)
        writer.close()
        write_s = time.perf_counter() - start
    chars = sum(len(t) for texts in groups for t in texts)
    return {"tokens": n_tokens, "chars": chars, "read": read_s / n_tokens,
            "tokenize": tok_s / n_tokens, "write": write_s / n_tokens}


def prepare_run(source: Path, workers: int) -> dict[str, float]:
    """A whole prepare. Its checkpoint reports (one per CHECKPOINT_TOKENS) also give the
    steady rate, between the first and the last report, start-up and close left out."""
    marks: list[tuple[float, int]] = []

    def log(message: str) -> None:
        found = _REPORT.match(message)
        if found:
            marks.append((time.perf_counter(), int(found.group(1).replace(",", ""))))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = prepare_fineweb(source, Path(tmp) / "out", workers=workers,
                                   shard_tokens=CHECKPOINT_TOKENS, log=log)
        wall = time.perf_counter() - start
    tokens = manifest["tokens"]["train"] + manifest["tokens"]["val"]
    steady = float("nan")
    if len(marks) >= 3:
        (t0, n0), (t1, n1) = marks[0], marks[-2]  # the last report is the one after close
        steady = (n1 - n0) / (t1 - t0)
    return {"workers": workers, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "startup_s": marks[0][0] - start if marks else float("nan"),
            "steady_tokens_per_s": steady}


def per_worker_rate(runs: list[dict[str, float]], costs: dict[str, float]) -> tuple[float, str]:
    """Tokens/s one worker adds: the steady rate of the run with the most workers that still
    leave a core to the main process, divided by their number (IPC and contention included);
    else the single-core stage timings."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    fitting = [r for r in runs if r["workers"] <= max(1, (cores or 1) - 1)
               and r["steady_tokens_per_s"] == r["steady_tokens_per_s"]]  # not NaN
    if fitting:
        best = max(fitting, key=lambda r: r["workers"])
        return (best["steady_tokens_per_s"] / best["workers"],
                f"measured with {best['workers']:.0f} workers")
    return 1 / (costs["read"] + costs["tokenize"]), "one core's read + tokenize"


def hours(rate: float) -> float:
    return TEN_BILLION / rate / 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=80, help="MB of text (default 80)")
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    began = time.perf_counter()
    try:
        sentences = prose_sentences()
        docs = synthetic_documents(sentences, int(args.mb * 1e6))
        source = tmp / "source"
        source.mkdir()
        write_parquet(docs, source / "synthetic.parquet")
        del docs
        print(f"[{time.perf_counter() - began:.0f} s] source written", flush=True)
        size = (source / "synthetic.parquet").stat().st_size
        print(f"source: {size / 1e6:.1f} MB parquet, {args.mb:.0f} MB of text from "
              f"{len(sentences):,} distinct sentences; load average {os.getloadavg()[0]:.1f}")
        costs = stage_costs(source / "synthetic.parquet")
        print(f"stage timings over {costs['tokens']:,} tokens "
              f"({costs['chars'] / costs['tokens']:.2f} characters per token)")
        for stage in ("read", "tokenize", "write"):
            print(f"  one core, {stage:<8}: {1 / costs[stage] / 1e6:7.2f}M tokens/s")
        runs = []
        for workers in args.workers.split(","):
            runs.append(r := prepare_run(source, int(workers)))
            print(f"prepare --workers {r['workers']}: {r['seconds']:.1f} s, "
                  f"{r['tokens_per_s'] / 1e6:.2f}M tokens/s; steady (first shard "
                  f"after {r['startup_s']:.1f} s) {r['steady_tokens_per_s'] / 1e6:.2f}M tokens/s, "
                  f"10B tokens in {hours(r['steady_tokens_per_s']):.2f} h", flush=True)
        worker_rate, basis = per_worker_rate(runs, costs)
        writer_rate = 1 / costs["write"]
        node = min(31 * worker_rate, writer_rate)
        print(f"32-core node: 31 workers x {worker_rate / 1e6:.2f}M ({basis}), writer ceiling "
              f"{writer_rate / 1e6:.0f}M: {node / 1e6:.1f}M tokens/s, "
              f"10B tokens in {hours(node) * 60:.0f} min")
        if args.json:
            report: dict[str, Any] = {"source_bytes": size, "text_mb": args.mb, **costs,
                                      "runs": runs, "node32_tokens_per_s": node,
                                      "per_worker_tokens_per_s": worker_rate,
                                      "load_average": os.getloadavg()[0]}
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":  # the prepare's worker processes are spawned: they import this file
    raise SystemExit(main())
