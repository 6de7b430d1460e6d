"""Short-run ordering check of the three baselines at gpt-124m (issue 9, deliverable 4), and
their seed-to-seed spread (issue 21, deliverable 5).

Two steps, so that the GPU machine needs neither the corpus sources nor the working-tree
template (which may change under us):

    python bench/ordering_check.py prepare --dir .ordering
    python bench/ordering_check.py run --dir .ordering --json ordering.json   # on the GPU
    python bench/ordering_check.py run --dir .ordering --seeds 3 --iters 150 --json s.json
    python bench/ordering_check.py combine s0.json s1.json --json seeds.json

`prepare` (here, no GPU): builds a real-text corpus from what this machine has — the docstrings
and comment blocks of installed Python packages and the standard library, their .md/.rst/.txt
files, /usr/share/doc texts and the English man pages (roff markup stripped) — deduplicated by
file content and by text, at most 1% of the tokens from any one package (so gcloud's thousands
of man pages cannot dominate), tokenized with the harness's offline GPT-2 tokenizer into the
shard format the template reads (manifest "harness-token-shards/1", sha256 per shard). Validation
files are chosen by a hash of their content, so val and train never share a file. It then
splices each baseline into the template (`harness.attempt.prepare`, static checks included)
and writes `<dir>/<baseline>.py`, plus `<dir>/plan.json` with the gpt-124m scale's config as it
is now and the hashes of everything.

`run` (on the GPU): for each seed and each baseline, torchrun with one process on its spliced
script, the scale's config with only the iteration count, warm-up, accumulation and evaluation
cadence changed so that every baseline trains on the same number of tokens (by default one pass
over the train split's size; `--iters` or `--tokens` shorten it), with the same data and the
same validation windows. Seed k of `--seeds N` (k = --first-seed .. --first-seed + N - 1) moves
BOTH of the template's seeds by k, as `harness run --seeds` does (ScaleSpec.seed_run):
init_seed = scale's init_seed + k (weights, dropout) and data_seed = scale's data_seed + k (the
batches' order); seed 0 is the scale itself (42, 42). The runs go seed by seed (every baseline
at seed k, then k + 1), so a run cut short leaves the same seeds for each baseline. Reads each
run's metrics.jsonl / train_log.jsonl / final.json and writes everything to --json after each
run: per baseline n, mean, sample std (ddof 1) and the 95% Student-t interval of the mean of
the final val_loss, and per pair of baselines Welch's t-test (scipy) plus, since seed k gives
every baseline the same batches, a paired t-test over the seeds both have. Prints one table
and whether int2_uniform < ternary_158bit <= binary_sign holds for the means.

`combine` (anywhere with scipy): merges the --json records of several `run` commands (other
seeds of the same plan and config, say, when one command cannot hold them all) into one, the
statistics computed again over all runs.

Not FineWeb: the absolute losses are not comparable with the task statement's table.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASELINES = ("binary_sign", "int2_uniform", "ternary_158bit")
SCALE = "gpt-124m"
MIN_CHARS = 50
MIN_TEXT_FRACTION = 0.7  # letters and whitespace over all characters
MIN_SPACE_FRACTION = 0.05  # plain spaces: tells prose from word lists and tables
MAX_FILE_BYTES = 4 << 20
FAMILY_CAP = 0.01  # of all tokens wanted, at most, from one package (see family())
VAL_MODULUS = 20  # one file in 20 (by content hash) is a validation file
SKIP_DIRS = frozenset({"__pycache__", "test", "tests", "testing", "idle_test", "turtledemo",
                       "encodings", "node_modules", ".git"})
TEXT_SUFFIXES = (".md", ".rst", ".txt")
DOC_SUFFIXES = (".md", ".rst", ".txt", ".gz")
EXPECTED_ORDER = "int2_uniform < ternary_158bit <= binary_sign"
# The template's two seeds (harness.task.SEED_KEYS): weights and dropout, batches' order.
SEED_KEYS = ("init_seed", "data_seed")
CONFIDENCE = 0.95  # of the interval of each baseline's mean


def default_roots() -> dict[str, list[Path]]:
    """Where the corpus comes from, by kind; missing folders are skipped."""
    py = [Path(p) for p in sorted({*map(str, Path("/usr/lib").glob("python3*")),
                                   *map(str, Path(sys.prefix).glob("lib/python3*")),
                                   *map(str, Path(sys.base_prefix).glob("lib/python3*"))})]
    return {"python": py, "doc": [Path("/usr/share/doc")],
            "man": [Path(f"/usr/share/man/man{i}") for i in range(1, 9)]}


# -- text extraction ---------------------------------------------------------------------------

def is_prose(text: str) -> bool:
    if len(text) < MIN_CHARS:
        return False
    letters = sum(1 for c in text if c.isalpha() or c.isspace())
    return (letters >= MIN_TEXT_FRACTION * len(text)
            and text.count(" ") >= MIN_SPACE_FRACTION * len(text))


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def python_texts(source: bytes) -> list[str]:
    """Docstrings (in source order) and blocks of consecutive whole-line comments."""
    try:
        tree = ast.parse(source)
        lines = source.decode("utf-8").splitlines()
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    docs: list[tuple[int, str]] = []
    in_string: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append((getattr(node, "lineno", 0), doc))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            in_string.update(range(node.lineno + 1, (node.end_lineno or node.lineno) + 1))
    block: list[str] = []
    start = 0
    for number, line in enumerate([*lines, ""], start=1):
        stripped = line.strip()
        if stripped.startswith("#") and number not in in_string:
            if not block:
                start = number
            if not stripped.startswith("#!") and "-*- coding" not in stripped:
                block.append(stripped.lstrip("#").strip())
            continue
        if block:
            docs.append((start, "\n".join(block).strip()))
            block = []
    docs.sort(key=lambda d: d[0])
    return [text for _, text in docs]


_ROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")
_ROFF_SPECIAL = re.compile(r"\\\(..|\\\[[^\]]*\]|\\[*n]\(?..|\\[&|^%:c]|\\s[-+]?\d+")


def man_text(roff: str) -> str:
    """Readable text from a man page's roff source: macros dropped, their arguments kept."""
    out: list[str] = []
    for line in roff.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or len(parts) == 1 or parts[0] in ("de", "ds", "nr", "if", "ie", "el",
                                                             "tr", "so", "TH", "ig", "ta"):
                continue
            line = parts[1].replace('"', "")
        line = _ROFF_FONT.sub("", line)
        line = _ROFF_SPECIAL.sub("", line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def file_texts(kind: str, path: Path, data: bytes) -> list[str]:
    """The prose texts of one file, by kind of source."""
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return []
    if kind == "python" and path.suffix == ".py":
        return python_texts(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []
    if kind == "man":
        if text.lstrip().startswith(".so "):
            return []
        return [man_text(text)]
    return [text.strip()]


def family(kind: str, name: str) -> str:
    """The package a file belongs to, for the per-package cap: a man page's command prefix,
    a /usr/share/doc folder, a site-packages top-level name, or the standard library."""
    parts = Path(name).parts
    if kind == "man":
        return "man:" + re.split(r"[_.\-]", parts[-1])[0]
    if kind == "doc":
        return "doc:" + (parts[4] if len(parts) > 5 else parts[-1])
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ("site-packages", "dist-packages"):
            return "py:" + parts[i + 1].split("-")[0].removesuffix(".py")
    return "py:stdlib"


def candidate_files(roots: dict[str, list[Path]]) -> Iterator[tuple[str, Path]]:
    """(kind, path) of every file to read, sorted by path within each root."""
    for kind, folders in roots.items():
        for root in folders:
            if not root.is_dir():
                continue
            found: list[Path] = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
                for name in filenames:
                    p = Path(dirpath) / name
                    if kind == "python" and not (name.endswith(".py")
                                                 or name.endswith(TEXT_SUFFIXES)):
                        continue
                    if kind == "doc" and not name.endswith(DOC_SUFFIXES):
                        continue
                    if kind == "man" and not name.endswith(".gz"):
                        continue
                    found.append(p)
            found.sort()
            yield from ((kind, p) for p in found)


def _extract(job: tuple[str, str]) -> tuple[str, str, str, list[str]]:
    kind, name = job
    path = Path(name)
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return kind, name, "", []
        data = path.read_bytes()
    except OSError:
        return kind, name, "", []
    return kind, name, hashlib.sha256(data).hexdigest(), file_texts(kind, path, data)


def build_corpus(out: Path, train_tokens: int, val_tokens: int, workers: int,
                 roots: dict[str, list[Path]] | None = None) -> dict[str, Any]:
    """Token shards of ~train_tokens / ~val_tokens under `out`, with manifest.json."""
    from multiprocessing import Pool

    import numpy as np

    from harness.data.shards import ShardWriter
    from harness.runtime.tokenizer import encode_documents

    roots = roots or default_roots()
    jobs = [(k, str(p)) for k, p in candidate_files(roots)]
    seen_files: set[str] = set()
    seen_texts: set[bytes] = set()
    docs: list[tuple[str, str, str, str]] = []  # (file sha256, kind, family, document text)
    t0 = time.time()
    with Pool(workers) as pool:
        for kind, name, sha, texts in pool.imap(_extract, jobs, chunksize=16):
            if not sha or sha in seen_files:
                continue
            seen_files.add(sha)
            kept = []
            for text in texts:
                key = hashlib.sha256(text.encode("utf-8", "replace")).digest()[:16]
                if key in seen_texts or not is_prose(text):
                    continue
                seen_texts.add(key)
                kept.append(text)
            if kept:
                docs.append((sha, kind, family(kind, name), "\n\n".join(kept)))
    print(f"{len(jobs)} files read, {len(seen_files)} distinct, {len(docs)} with prose "
          f"({time.time() - t0:.0f}s)", flush=True)
    # A fixed pseudo-random order (by content hash): the cap takes a mix of every source.
    docs.sort(key=lambda d: hashlib.sha256(("order:" + d[0]).encode()).hexdigest())
    writer = ShardWriter(out, shard_tokens=10_000_000, source={
        "kind": "local-real-text", "roots": {k: [str(p) for p in v] for k, v in roots.items()},
        "note": "docstrings/comments of installed Python code, package docs, /usr/share/doc, "
                "man pages; NOT FineWeb"}, val_rule=f"file content sha256 mod {VAL_MODULUS} == 0")
    count = {"train": 0, "val": 0}
    by_kind: dict[str, dict[str, int]] = {}
    want = {"train": train_tokens, "val": val_tokens}
    # No one package may dominate (gcloud's thousands of man pages, one JDK's legal notes).
    family_cap = max(1, int(FAMILY_CAP * (train_tokens + val_tokens)))
    per_family: dict[str, int] = {}
    for k in range(0, len(docs), 256):
        batch = docs[k:k + 256]
        tokens, lengths = encode_documents([d[3] for d in batch])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for (sha, kind, fam, _), a, b in zip(batch, offsets[:-1], offsets[1:], strict=True):
            split = "val" if int(sha[:8], 16) % VAL_MODULUS == 0 else "train"
            n = int(b - a)
            # Whole documents only, none past a split's target or its package's cap (so
            # one huge file is left out rather than cut).
            if count[split] + n > want[split] or per_family.get(fam, 0) + n > family_cap:
                continue
            per_family[fam] = per_family.get(fam, 0) + n
            writer.add(split, tokens[a:b])
            count[split] += n
            kinds = by_kind.setdefault(kind, {"train": 0, "val": 0})
            kinds[split] += n
        if all(count[s] >= 0.999 * want[s] for s in want):
            break
    manifest = writer.close()
    print(f"corpus: train {count['train']:,} tokens, val {count['val']:,} tokens; "
          f"by source {by_kind} ({time.time() - t0:.0f}s)", flush=True)
    top = sorted(per_family.items(), key=lambda kv: -kv[1])[:10]
    print(f"{len(per_family)} families (cap {family_cap:,} tokens each); largest: {top}",
          flush=True)
    return {"tokens": count, "documents": manifest["documents"], "by_kind": by_kind,
            "families": len(per_family), "family_cap_tokens": family_cap,
            "largest_families": dict(top),
            "files_read": len(jobs), "distinct_files": len(seen_files),
            "files_with_prose": len(docs)}


def cmd_prepare(args: argparse.Namespace) -> int:
    from harness.attempt import prepare
    from harness.runtime.fileio import sha256_file
    from harness.task import load_task

    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    task = load_task()
    scale = task.scale(SCALE)
    plan: dict[str, Any] = {
        "scale": SCALE, "scale_config": scale.config, "task": task.name,
        "template_sha256": sha256_file(task.template_path), "baselines": {},
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for name in args.baselines.split(","):
        prepared = prepare(REPO / "baselines" / name, task)
        script = out / f"{name}.py"
        script.write_text(prepared.spliced, encoding="utf-8")
        plan["baselines"][name] = {"script": script.name, "sha256": sha256_file(script),
                                   "submission_sha256": prepared.submission.sha256}
        print(f"{name}: spliced -> {script}", flush=True)
    if not args.skip_corpus:
        plan["corpus"] = build_corpus(out / "data", args.train_tokens, args.val_tokens,
                                      args.workers)
    elif (out / "plan.json").is_file():
        plan["corpus"] = json.loads((out / "plan.json").read_text()).get("corpus")
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return 0


# -- the run (GPU side: stdlib, torch and scipy) ------------------------------------------------

def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _descendants(root: int) -> list[int]:
    """Every live descendant of `root`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_one(name: str, script: Path, argv: list[str], out_dir: Path, nproc: int,
            timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *argv, f"--out_dir={out_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "stdout.log"
    t0 = time.time()
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)

        def kill() -> None:
            # torchrun starts each worker in a session of its own: SIGTERM lets it stop them,
            # then whatever is left of the tree is killed.
            timed_out.set()
            tree = [proc.pid, *_descendants(proc.pid)]
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            for pid in [*tree, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith(("TRAIN_METRICS", "model:", "error", "Traceback")):
                    print(f"   {line.rstrip()}", flush=True)
        finally:
            rc = proc.wait()
            timer.cancel()
    wall = time.time() - t0
    status = "timeout" if timed_out.is_set() else ("ok" if rc == 0 else f"exit {rc}")
    metrics = _rows(out_dir / "metrics.jsonl")
    train_log = _rows(out_dir / "train_log.jsonl")
    final = json.loads((out_dir / "final.json").read_text()) if (
        out_dir / "final.json").is_file() else None
    # The template always writes a resume checkpoint at the end (model and optimizer, ~1.5 GB
    # at gpt-124m): nothing here reads it, and many runs would fill the disk.
    for ckpt in out_dir.glob("*.pt"):
        ckpt.unlink()
    # Steady state: seconds per iteration between log rows, the first two left out
    # (compilation); the median drops the intervals that hold an evaluation.
    per_iter = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                for a, b in itertools.pairwise(train_log[2:])]
    step_s = statistics.median(per_iter) if per_iter else None
    tail = log_path.read_text()[-3000:] if status != "ok" else ""
    return {"status": status, "wall_s": wall, "metrics": metrics, "train_log": train_log,
            "final": final, "steady_step_s": step_s, "log_tail": tail,
            "val_loss": metrics[-1]["val_loss"] if metrics else None,
            "tokens": final["tokens"] if final else None,
            "train_time_s": final["train_time_s"] if final else None}


def _parse_set(item: str) -> tuple[str, Any]:
    key, value = item.split("=", 1)
    if value in ("true", "false"):
        return key, value == "true"
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_args(cfg: dict[str, Any], data: Path, tokens: int, accum: int, evals: int,
             val_tokens: int, sets: list[str], iters: int = 0) -> dict[str, Any]:
    """The template's settings: the scale's config, shortened to `iters` iterations (0: as
    many as `tokens` needs), with the scale's own seeds (seed 0; see with_seed)."""
    cfg = dict(cfg)
    explicit = dict(_parse_set(item) for item in sets)
    cfg.update(explicit)  # shapes set here (CPU tests) decide the iteration count too
    missing = [k for k in SEED_KEYS if k not in cfg]
    if missing:
        raise SystemExit(f"the plan's scale config has no {', '.join(missing)}: it predates "
                         "the template's two seeds; run `prepare` again")
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * accum
    iters = iters or max(1, tokens // tokens_per_iter)
    # Warm-up: the scale's fraction of its own iterations (250 of 4768), at least one.
    warmup = max(1, round(iters * cfg["warmup_iters"] / cfg["max_iters"]))
    cfg.update(max_iters=iters, warmup_iters=warmup, gradient_accumulation_steps=accum,
               eval_interval=max(1, iters // evals),
               # Validation: about the whole val split once, in fixed windows.
               eval_iters=max(1, val_tokens // (cfg["batch_size"] * cfg["block_size"])),
               log_interval=max(1, min(cfg["log_interval"], iters // 20)),
               # No resume checkpoints but the template's final one (deleted by run_one).
               checkpoint_interval=0, save_checkpoint=False, data_dir=str(data))
    cfg.update(explicit)
    return cfg


def with_seed(cfg: dict[str, Any], k: int) -> dict[str, Any]:
    """Seed k of several: both seeds moved by k (ScaleSpec.seed_run; 0: the config's own)."""
    return {**cfg, **{key: int(cfg[key]) + k for key in SEED_KEYS}}


def to_argv(cfg: dict[str, Any]) -> list[str]:
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items()]


# -- statistics over seeds ------------------------------------------------------------------

def seed_stats(values: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """n, mean, sample std (ddof 1) and the Student-t interval of the mean of `values`
    (harness/leaderboard/stats.py's formula); spread and interval None under two values."""
    from scipy import stats

    n = len(values)
    out: dict[str, Any] = {"n": n, "values": values,
                           "mean": statistics.fmean(values) if n else None,
                           "std": None, "ci_confidence": confidence, "ci_half_width": None,
                           "ci_low": None, "ci_high": None}
    if n >= 2:
        std = statistics.stdev(values)
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci_half_width=half, ci_low=out["mean"] - half,
                   ci_high=out["mean"] + half)
    return out


def _p_value(result: Any) -> float | None:
    p = float(result.pvalue)
    return p if math.isfinite(p) else None


def pair_tests(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Welch's t-test (two-sided) of two baselines' final val_loss over their seeds, and the
    paired t-test over the seeds both have (seed k: the same batches for every baseline).
    A p-value is None where the test is undefined (under two values, or no spread)."""
    from scipy import stats

    out: dict[str, Any] = {"welch_p": None, "welch_t": None, "paired_p": None,
                           "paired_n": 0, "mean_diff": None}
    xs, ys = list(a.values()), list(b.values())
    if xs and ys:
        out["mean_diff"] = statistics.fmean(xs) - statistics.fmean(ys)
    with warnings.catch_warnings():
        # Without spread scipy warns of cancellation, then answers 0 or NaN.
        warnings.simplefilter("ignore", RuntimeWarning)
        if len(xs) >= 2 and len(ys) >= 2:
            welch = stats.ttest_ind(xs, ys, equal_var=False)
            out.update(welch_p=_p_value(welch), welch_t=float(welch.statistic))
        common = sorted(set(a) & set(b))
        out["paired_n"] = len(common)
        if len(common) >= 2:
            out["paired_p"] = _p_value(stats.ttest_rel([a[k] for k in common],
                                                       [b[k] for k in common]))
    return out


def summarize(record: dict[str, Any]) -> None:
    """Fill record's stats, pairwise, ordering_holds and observed_order from its runs."""
    losses: dict[str, dict[int, float]] = {name: {} for name in record["baselines_run"]}
    for r in record["runs"]:
        if r["status"] == "ok" and r["val_loss"] is not None:
            losses.setdefault(r["baseline"], {})[r["seed"]] = r["val_loss"]
    record["stats"] = {name: {"seeds": sorted(v), **seed_stats([v[k] for k in sorted(v)])}
                       for name, v in losses.items()}
    record["pairwise"] = {f"{x} vs {y}": pair_tests(losses[x], losses[y])
                          for x, y in itertools.combinations(losses, 2)}
    means = {n: st["mean"] for n, st in record["stats"].items() if st["mean"] is not None}
    record["ordering_holds"] = ordering_holds(means)
    record["observed_order"] = (" < ".join(sorted(means, key=lambda n: means[n]))
                                if len(means) == len(losses) else None)


def ordering_holds(losses: dict[str, float]) -> bool | None:
    a, b, c = (losses.get(n) for n in ("int2_uniform", "ternary_158bit", "binary_sign"))
    if a is None or b is None or c is None:
        return None
    return a < b <= c


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def render(record: dict[str, Any]) -> str:
    lines = [f"{'baseline':<15} {'seed':>4} {'status':<8} {'tokens':>12} {'val_loss':>8} "
             f"{'tokens/s':>10} {'wall s':>7}  val_loss curve (step: loss)"]
    for r in record["runs"]:
        curve = ", ".join(f"{m['step']}: {m['val_loss']:.3f}" for m in r["metrics"])
        tps = (record["tokens_per_iter"] / r["steady_step_s"]) if r["steady_step_s"] else None
        tok = f"{r['tokens']:,}" if r["tokens"] is not None else "-"
        lines.append(f"{r['baseline']:<15} {r['seed']:>4} {r['status']:<8} {tok:>12} "
                     f"{_f(r['val_loss']):>8} {(f'{tps:,.0f}' if tps else '-'):>10} "
                     f"{r['wall_s']:7.0f}  {curve}")
    lines.append(f"{'baseline':<15} {'n':>2} {'mean':>8} {'std':>8} {'95% CI +-':>9}")
    for name, st in record["stats"].items():
        lines.append(f"{name:<15} {st['n']:>2} {_f(st['mean']):>8} {_f(st['std']):>8} "
                     f"{_f(st['ci_half_width']):>9}")
    for pair, t in record["pairwise"].items():
        lines.append(f"{pair:<32} diff {_f(t['mean_diff'], '+.4f')}  Welch p "
                     f"{_f(t['welch_p'], '.3g')}  paired p {_f(t['paired_p'], '.3g')} "
                     f"(n={t['paired_n']})")
    verdict = {True: "HOLDS", False: "DOES NOT HOLD", None: "unknown"}[record["ordering_holds"]]
    lines.append(f"expected (task statement's table): {EXPECTED_ORDER}: {verdict} (means)")
    if record.get("observed_order"):
        lines.append(f"observed (mean final val_loss, lowest first): {record['observed_order']}")
    return "\n".join(lines)


def _write(record: dict[str, Any], path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(record, indent=2) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    root: Path = args.dir
    plan = json.loads((root / "plan.json").read_text())
    data = root / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    train_tokens = int(manifest["tokens"]["train"])
    val_tokens = int(manifest["tokens"]["val"])
    tokens = args.tokens or train_tokens
    cfg = run_args(plan["scale_config"], data.resolve(), tokens, args.accum, args.evals,
                   val_tokens, args.set, args.iters)
    names = args.baselines.split(",")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    record: dict[str, Any] = {
        "what": "short-run ordering check (issue 9, deliverable 4) and seed-to-seed spread "
                "(issue 21, deliverable 5) of the baselines",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "nproc_per_node": args.nproc, "scale": plan["scale"], "config": cfg,
        "seeds": seeds,
        "seed_rule": "seed k: init_seed = config's init_seed + k and data_seed = config's "
                     "data_seed + k (ScaleSpec.seed_run); the config shows seed 0",
        "tokens_per_iter": tokens_per_iter,
        "tokens_per_baseline": cfg["max_iters"] * tokens_per_iter,
        "corpus": {"train_tokens": train_tokens, "val_tokens": val_tokens,
                   "source": manifest.get("source"), "val_rule": manifest.get("val_rule"),
                   "shards": manifest["splits"], **(plan.get("corpus") or {})},
        "template_sha256": plan["template_sha256"], "baselines": plan["baselines"],
        "baselines_run": names, "expected_order": EXPECTED_ORDER, "runs": [],
    }
    summarize(record)
    print(f"{record['device']}, torch {record['torch']}; {record['tokens_per_baseline']:,} "
          f"tokens per run ({cfg['max_iters']} iterations x {tokens_per_iter:,}); "
          f"seeds {seeds}", flush=True)
    deadline = time.time() + args.budget_s
    jobs = [(k, name) for k in seeds for name in names]
    for i, (k, name) in enumerate(jobs):
        seeded = with_seed(cfg, k)
        run: dict[str, Any] = {"baseline": name, "seed": k,
                               **{key: seeded[key] for key in SEED_KEYS}}
        left = deadline - time.time()
        if left < 30:
            run.update(status="skipped", wall_s=0.0, metrics=[], steady_step_s=None,
                       val_loss=None, tokens=None, train_time_s=None)
        else:
            share = left / (len(jobs) - i)
            timeout = min(left, args.run_timeout_s) if args.run_timeout_s else share
            run.update(run_one(f"{name} seed {k}", root / plan["baselines"][name]["script"],
                               to_argv(seeded), args.work / name / f"seed{k}", args.nproc,
                               timeout))
            print(f"   {name} seed {k}: {run['status']}, val_loss {run['val_loss']}, "
                  f"{run['wall_s']:.0f}s", flush=True)
        record["runs"].append(run)
        summarize(record)
        _write(record, args.json)
    print(render(record), flush=True)
    return 0 if all(r["status"] == "ok" for r in record["runs"]) else 1


# What may differ between the records that `combine` merges: the rest must be one plan.
COMBINE_MAY_DIFFER = frozenset({"date", "torch", "device", "seeds", "runs", "stats",
                                "pairwise", "ordering_holds", "observed_order",
                                "baselines_run"})


def cmd_combine(args: argparse.Namespace) -> int:
    parts = [json.loads(Path(p).read_text()) for p in args.records]
    record = {k: v for k, v in parts[0].items() if k not in COMBINE_MAY_DIFFER}
    for path, part in zip(args.records[1:], parts[1:], strict=True):
        for key, value in record.items():
            if part.get(key) != value:
                raise SystemExit(f"{path}: {key} differs from {args.records[0]}'s")
    # A later command may run only the baselines an earlier one skipped; its order is kept.
    record["baselines_run"] = list(dict.fromkeys(n for p in parts for n in p["baselines_run"]))
    ran = [r for part in parts for r in part["runs"]]
    done = [(r["baseline"], r["seed"]) for r in ran if r["status"] != "skipped"]
    # A run skipped in one command and run in another counts once, as run.
    runs = [r for r in ran if r["status"] != "skipped" or (r["baseline"], r["seed"]) not in done]
    if len(done) != len(set(done)):
        raise SystemExit("a baseline's seed is in more than one record")
    record.update(
        date=max(p["date"] for p in parts),
        torch=sorted({p["torch"] for p in parts}),
        device=sorted({p["device"] for p in parts}),
        seeds=sorted({k for p in parts for k in p["seeds"]}),
        parts=[{"file": str(path), "date": p["date"], "torch": p["torch"],
                "device": p["device"], "seeds": p["seeds"]}
               for path, p in zip(args.records, parts, strict=True)],
        runs=sorted(runs, key=lambda r: (r["seed"], record["baselines_run"].index(
            r["baseline"]))),
        **args.note)
    if len(record["torch"]) == 1 and len(record["device"]) == 1:
        record.update(torch=record["torch"][0], device=record["device"][0])
    summarize(record)
    print(render(record), flush=True)
    _write(record, args.json)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the corpus and the spliced scripts (no GPU)")
    pp.add_argument("--dir", type=Path, default=REPO / ".ordering")
    pp.add_argument("--baselines", default=",".join(BASELINES))
    pp.add_argument("--train-tokens", type=int, default=20_000_000)
    pp.add_argument("--val-tokens", type=int, default=1_000_000)
    pp.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    pp.add_argument("--skip-corpus", action="store_true", help="only re-splice the scripts")
    pr = sub.add_parser("run", help="train every baseline on the prepared data (GPU)")
    pr.add_argument("--dir", type=Path, default=REPO / ".ordering")
    pr.add_argument("--baselines", default="int2_uniform,ternary_158bit,binary_sign")
    pr.add_argument("--seeds", type=int, default=1,
                    help="seeds per baseline: both init_seed and data_seed moved by k")
    pr.add_argument("--first-seed", type=int, default=0,
                    help="the first k (seeds k .. k + seeds - 1; to split seeds over commands)")
    pr.add_argument("--tokens", type=int, default=0,
                    help="training tokens per run (default: the train split's size)")
    pr.add_argument("--iters", type=int, default=0,
                    help="iterations per run (default: as many as --tokens needs)")
    pr.add_argument("--accum", type=int, default=1,
                    help="gradient accumulation steps (micro-batch stays the scale's)")
    pr.add_argument("--evals", type=int, default=5, help="evaluations after step 0")
    pr.add_argument("--nproc", type=int, default=1)
    pr.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock for all runs; each gets an equal share of what is left")
    pr.add_argument("--run-timeout-s", type=float, default=0.0,
                    help="each run's limit instead of the equal share (the first runs, which "
                         "compile, take longest); runs past --budget-s are skipped")
    pr.add_argument("--work", type=Path, default=Path("/tmp/ordering-runs"))
    pr.add_argument("--json", type=Path, default=None)
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a template setting (tests on CPU: --set device=\"cpu\")")
    pc = sub.add_parser("combine", help="merge the --json records of several runs")
    pc.add_argument("records", nargs="+", type=Path)
    pc.add_argument("--json", type=Path, default=None)
    pc.add_argument("--note", action="append", default=[], type=_parse_set,
                    metavar="KEY=VALUE", help="add a top-level key to the merged record")
    args = p.parse_args(argv)
    if args.cmd == "combine":
        args.note = dict(args.note)
        return cmd_combine(args)
    if args.cmd == "run" and args.seeds < 1:
        p.error("--seeds must be at least 1")
    return cmd_prepare(args) if args.cmd == "prepare" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
