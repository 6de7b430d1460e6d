"""Pretrain throughput of the frozen template, measured in one run (issue 9).

For each variant — an nn.Linear-equivalent reference and the three baselines — splice it
into the template, train a bounded number of iterations on synthetic tokens under
torchrun, and read the template's own files: steady-state step time (from train_log.jsonl,
compile and evaluation excluded), tokens/s, MFU against a bf16 matmul peak measured on the
same GPU in the same run, peak memory, time to the first step (compile included), and the
ratio of each variant's tokens/s to the reference's.

    python bench/pretrain_throughput.py --gpus 1 --out bench-results.json
    python bench/pretrain_throughput.py --gpus 1,2 --accum-per-gpu 4 --variants ternary_158bit
    python bench/pretrain_throughput.py --with-env TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
    python bench/pretrain_throughput.py --variants reference,s=bench/variants/ternary_dequant_ste.py

A variant is `reference`, a baseline's name, or `LABEL=FILE` for a bitlinear region kept in a
file (bench/variants/ holds the ones measured in docs/performance.md).

Needs CUDA GPUs. Prints a table; writes the numbers as JSON with --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.regions import splice  # noqa: E402
from harness.runtime.fileio import sha256_file  # noqa: E402
from harness.submission import load_submission  # noqa: E402
from harness.task import load_task  # noqa: E402

# A BitLinear that is exactly nn.Linear: the full-precision reference of the same model.
REFERENCE = '''
def weight_quant(weight):
    return weight, weight.new_ones(())


def activation_quant(x):
    return x, x.new_ones(())


class BitLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)
'''

GPT_345M = ["--n_layer=24", "--n_head=16", "--n_embd=1024", "--block_size=1024",
            "--vocab_size=50304", "--dtype=bfloat16", "--compile=true"]


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def synthetic_data(root: Path, tokens: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", tokens), ("val", tokens // 10)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(root / f"{split}_000000.bin")
        splits[split] = [{"file": f"{split}_000000.bin", "tokens": n,
                          "sha256": sha256_file(root / f"{split}_000000.bin")}]
    (root / "manifest.json").write_text(json.dumps({
        "format": "harness-token-shards/1", "splits": splits,
        "tokenizer": {"name": "gpt2", "dtype": "uint16", "vocab_size": 50257, "eot": 50256}}))
    return root


def variant_script(spec: str, work: Path, template: Path | None = None) -> tuple[str, Path]:
    """(label, spliced script) for `reference`, a baseline's name or LABEL=REGION_FILE.

    `template` replaces the task's template (to measure a change to its frozen lines)."""
    task = load_task()
    if "=" in spec:
        name, file = spec.split("=", 1)
        regions = {"bitlinear": Path(file).read_text()}
    elif spec == "reference":
        name, regions = spec, {"bitlinear": REFERENCE}
    else:
        name, regions = spec, load_submission(REPO / "baselines" / spec, task).regions
    script = work / f"{name}.py"
    text = template.read_text() if template else task.template_text()
    script.write_text(splice(text, regions))
    return name, script


def run_variant(script: Path, args: argparse.Namespace, data: Path, out: Path, gpus: int,
                env: dict[str, str]) -> dict[str, Any]:
    accum = args.accum_per_gpu * gpus
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={gpus}", str(script), *GPT_345M,
            f"--batch_size={args.batch_size}", f"--gradient_accumulation_steps={accum}",
            f"--max_iters={args.iters}", f"--eval_interval={args.iters}", "--eval_iters=1",
            f"--log_interval={args.log_interval}", "--warmup_iters=2",
            "--save_checkpoint=false", f"--data_dir={data}", f"--out_dir={out}"]
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        (args.log_dir / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} failed:\n{proc.stderr[-3000:]}")
    final = json.loads((out / "final.json").read_text())
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    # Skip the first two log rows: compilation and allocator warm-up.
    steady = rows[2:]
    per_iter = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                for a, b in itertools.pairwise(steady)]
    step_s = statistics.median(per_iter)
    tokens_per_iter = args.batch_size * 1024 * accum
    cfg = final["config"]
    flops_per_token = 6 * final["num_params"] + 12 * cfg["n_layer"] * cfg["n_embd"] * 1024
    return {"step_s": step_s, "tokens_per_s": tokens_per_iter / step_s,
            "tflops_per_gpu": tokens_per_iter / step_s * flops_per_token / gpus / 1e12,
            "first_step_s": rows[0]["elapsed_s"], "peak_memory_gb": final["peak_memory_gb"],
            "num_params": final["num_params"], "wall_s": time.time() - t0,
            "tokens_per_iter": tokens_per_iter, "step_samples": len(per_iter),
            "rank_param_checksums_equal": len(set(final["rank_param_checksums"])) == 1}


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--with-env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1", help="GPU counts, e.g. 1,2 (scaling efficiency)")
    p.add_argument("--variants", default="reference,ternary_158bit,binary_sign,int2_uniform")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch per GPU")
    p.add_argument("--accum-per-gpu", type=int, default=1)
    p.add_argument("--with-env", action="append", default=[], metavar="KEY=VALUE",
                   help="run every variant a second time with these variables (repeatable)")
    p.add_argument("--out", type=Path)
    p.add_argument("--template", type=Path, help="a changed template to measure instead")
    p.add_argument("--log-dir", type=Path, help="keep each run's stdout and stderr here")
    args = p.parse_args()
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    settings = [("", {})] + ([("+env", parse_env(args.with_env))] if args.with_env else [])

    import torch

    peak = matmul_peak_tflops()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "matmul_peak_tflops": peak,
        "accum_per_gpu": args.accum_per_gpu, "env": settings[-1][1], "runs": []}
    print(f"{results['device']}, torch {torch.__version__}, bf16 matmul peak {peak:.0f} TFLOP/s; "
          f"{args.accum_per_gpu} micro-step(s) per GPU per iteration", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    runs: list[dict[str, Any]] = results["runs"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        data = synthetic_data(work / "data", 50_000_000)
        for gpus, (suffix, env) in itertools.product(gpu_counts, settings):
            for spec in args.variants.split(","):
                name, script = variant_script(spec, work, args.template)
                label = f"{name}{suffix} x{gpus}"
                out = work / f"out-{name}{suffix.replace('+', '_')}-{gpus}"
                r = run_variant(script, args, data, out, gpus, env)
                r.update(variant=name, gpus=gpus, env=env, label=label,
                         mfu=r["tflops_per_gpu"] / peak)
                runs.append(r)
                print(f"{label:>24}: {r['step_s'] * 1e3:7.1f} ms/iter  "
                      f"{r['tokens_per_s']:>9,.0f} tok/s  MFU {r['mfu']:.1%}  "
                      f"peak mem {r['peak_memory_gb']:.1f} GB  first step "
                      f"{r['first_step_s']:.0f}s", flush=True)
    for r in runs:
        same = [x for x in runs if x["gpus"] == r["gpus"] and x["env"] == r["env"]]
        ref = next((x for x in same if x["variant"] == "reference"), None)
        if ref:
            r["vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
            print(f"{r['label']:>24}: {r['vs_reference']:.3f} x reference tokens/s")
        one = next((x for x in runs if x["gpus"] == 1 and x["variant"] == r["variant"]
                    and x["env"] == r["env"]), None)
        if one and r["gpus"] > 1:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * one["tokens_per_s"])
            print(f"{r['label']:>24}: DDP scaling efficiency {r['scaling_efficiency']:.1%} "
                  f"against 1 GPU")
        if not r["rank_param_checksums_equal"]:
            print(f"{r['label']:>24}: RANKS ENDED WITH DIFFERENT WEIGHTS", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
