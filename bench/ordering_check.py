"""Short-run ordering check of the three baselines at gpt-124m (issue 9, deliverable 4).

Two steps, so that the GPU machine needs neither the corpus sources nor the working-tree
template (which may change under us):

    python bench/ordering_check.py prepare --dir .ordering
    python bench/ordering_check.py run --dir .ordering --json ordering.json   # on the GPU

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

`run` (on the GPU): for each baseline, torchrun with one process on its spliced script, the
scale's config with only the iteration count, warm-up, accumulation and evaluation cadence
changed so that every baseline trains on the same number of tokens (by default one pass over
the train split's size), with the same seed, the same data and the same validation windows.
Reads each run's metrics.jsonl / train_log.jsonl / final.json, prints one table and whether
int2_uniform < ternary_158bit <= binary_sign holds, and writes everything to --json (also after
each baseline, so a run cut short still leaves what it finished).

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
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
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


# -- the run (GPU side: stdlib + torch only) ---------------------------------------------------

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
    # Steady state: seconds per iteration between log rows, the first two left out
    # (compilation); the median drops the intervals that hold an evaluation.
    per_iter = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                for a, b in itertools.pairwise(train_log[2:])]
    step_s = statistics.median(per_iter) if per_iter else None
    tail = log_path.read_text()[-3000:] if status != "ok" else ""
    return {"status": status, "wall_s": wall, "metrics": metrics, "train_log": train_log,
            "final": final, "steady_step_s": step_s, "log_tail": tail,
            "val_loss": metrics[-1]["val_loss"] if metrics else None,
            "tokens": final["tokens"] if final else None}


def _parse_set(item: str) -> tuple[str, Any]:
    key, value = item.split("=", 1)
    if value in ("true", "false"):
        return key, value == "true"
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_args(cfg: dict[str, Any], data: Path, tokens: int, accum: int, evals: int,
             val_tokens: int, sets: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The template's --name=value arguments: the scale's config, shortened."""
    cfg = dict(cfg)
    explicit = dict(_parse_set(item) for item in sets)
    cfg.update(explicit)  # shapes set here (CPU tests) decide the iteration count too
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * accum
    iters = max(1, tokens // tokens_per_iter)
    # Warm-up: the scale's fraction of its own iterations (250 of 4768), at least one.
    warmup = max(1, round(iters * cfg["warmup_iters"] / cfg["max_iters"]))
    cfg.update(max_iters=iters, warmup_iters=warmup, gradient_accumulation_steps=accum,
               eval_interval=max(1, iters // evals),
               # Validation: about the whole val split once, in fixed windows.
               eval_iters=max(1, val_tokens // (cfg["batch_size"] * cfg["block_size"])),
               log_interval=max(1, min(cfg["log_interval"], iters // 20)),
               save_checkpoint=False, seed=42, data_dir=str(data))
    cfg.update(explicit)
    argv = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items()]
    return argv, cfg


def ordering_holds(losses: dict[str, float | None]) -> bool | None:
    a, b, c = (losses.get(n) for n in ("int2_uniform", "ternary_158bit", "binary_sign"))
    if a is None or b is None or c is None:
        return None
    return a < b <= c


def render(record: dict[str, Any]) -> str:
    lines = [f"{'baseline':<15} {'status':<8} {'tokens':>12} {'val_loss':>8} "
             f"{'tokens/s':>10} {'wall s':>7}  val_loss curve (step: loss)"]
    for name, r in record["runs"].items():
        curve = ", ".join(f"{m['step']}: {m['val_loss']:.3f}" for m in r["metrics"])
        tps = (record["tokens_per_iter"] / r["steady_step_s"]) if r["steady_step_s"] else None
        vl = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        tok = f"{r['tokens']:,}" if r["tokens"] is not None else "-"
        lines.append(f"{name:<15} {r['status']:<8} {tok:>12} {vl:>8} "
                     f"{(f'{tps:,.0f}' if tps else '-'):>10} {r['wall_s']:7.0f}  {curve}")
    verdict = {True: "HOLDS", False: "DOES NOT HOLD", None: "unknown"}[record["ordering_holds"]]
    lines.append(f"expected (task statement's table): {EXPECTED_ORDER}: {verdict}")
    if record.get("observed_order"):
        lines.append(f"observed (final val_loss, lowest first): {record['observed_order']}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    root: Path = args.dir
    plan = json.loads((root / "plan.json").read_text())
    data = root / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    train_tokens = int(manifest["tokens"]["train"])
    val_tokens = int(manifest["tokens"]["val"])
    tokens = args.tokens or train_tokens
    argv, cfg = run_args(plan["scale_config"], data.resolve(), tokens, args.accum, args.evals,
                         val_tokens, args.set)
    record: dict[str, Any] = {
        "what": "short-run ordering check, issue 9 deliverable 4",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "nproc_per_node": args.nproc, "scale": plan["scale"], "config": cfg,
        "tokens_per_iter": cfg["batch_size"] * cfg["block_size"] * cfg[
            "gradient_accumulation_steps"],
        "tokens_per_baseline": cfg["max_iters"] * cfg["batch_size"] * cfg["block_size"]
        * cfg["gradient_accumulation_steps"],
        "corpus": {"train_tokens": train_tokens, "val_tokens": val_tokens,
                   "source": manifest.get("source"), "val_rule": manifest.get("val_rule"),
                   "shards": manifest["splits"], **(plan.get("corpus") or {})},
        "template_sha256": plan["template_sha256"], "baselines": plan["baselines"],
        "expected_order": EXPECTED_ORDER, "runs": {}, "ordering_holds": None,
    }
    print(f"{record['device']}, torch {record['torch']}; {record['tokens_per_baseline']:,} "
          f"tokens per baseline ({cfg['max_iters']} iterations x {record['tokens_per_iter']:,})",
          flush=True)
    deadline = time.time() + args.budget_s
    names = args.baselines.split(",")
    for i, name in enumerate(names):
        left = deadline - time.time()
        if left < 30:
            record["runs"][name] = {"status": "skipped", "wall_s": 0.0, "metrics": [],
                                    "steady_step_s": None, "val_loss": None, "tokens": None}
            continue
        timeout = left / (len(names) - i)
        r = run_one(name, root / plan["baselines"][name]["script"], argv,
                    args.work / name, args.nproc, timeout)
        record["runs"][name] = r
        record["ordering_holds"] = ordering_holds(
            {n: x["val_loss"] for n, x in record["runs"].items() if x["status"] == "ok"})
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"   {name}: {r['status']}, val_loss {r['val_loss']}, {r['wall_s']:.0f}s",
              flush=True)
    losses = {n: r["val_loss"] for n, r in record["runs"].items()}
    if all(v is not None for v in losses.values()):
        ranked = sorted(losses, key=lambda n: losses[n])
        record["observed_order"] = " < ".join(ranked)
    print(render(record), flush=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["status"] == "ok" for r in record["runs"].values()) else 1


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
    pr.add_argument("--tokens", type=int, default=0,
                    help="training tokens per baseline (default: the train split's size)")
    pr.add_argument("--accum", type=int, default=1,
                    help="gradient accumulation steps (micro-batch stays the scale's)")
    pr.add_argument("--evals", type=int, default=5, help="evaluations after step 0")
    pr.add_argument("--nproc", type=int, default=1)
    pr.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock for all runs; each gets an equal share of what is left")
    pr.add_argument("--work", type=Path, default=Path("/tmp/ordering-runs"))
    pr.add_argument("--json", type=Path, default=None)
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a template setting (tests on CPU: --set device=\"cpu\")")
    args = p.parse_args(argv)
    return cmd_prepare(args) if args.cmd == "prepare" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
