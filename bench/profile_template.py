"""Profile the template's own training loop at gpt-345m shape, one process (issue 9).

bench/profile_step.py explains a hand-written step; this one profiles the spliced template's
`run()` itself, so that nothing the loop does (batches, learning-rate updates, clipping, the
evaluation at iteration 0) is left out. The profiler is switched on and off from the
template's `get_lr`, which the loop calls once at the top of every iteration. Prints the
wall time per profiled iteration next to the GPU time its kernels took (the difference is
time the GPU waited), by kernel family.

    python bench/profile_template.py --variants reference,ternary_158bit --out prof.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from pretrain_throughput import GPT_345M, synthetic_data, variant_script  # noqa: E402
from profile_step import family  # noqa: E402


def profile_run(script: Path, data: Path, out: Path, start: int, iters: int,
                batch_size: int = 64) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    spec = importlib.util.spec_from_file_location(f"template_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prof = profile(activities=[ProfilerActivity.CUDA])
    marks: dict[str, float] = {}
    original = mod.get_lr

    def get_lr(it: int) -> float:
        if it == start:
            torch.cuda.synchronize()
            prof.start()
            marks["t0"] = time.perf_counter()
        elif it == start + iters:
            torch.cuda.synchronize()
            marks["t1"] = time.perf_counter()
            prof.stop()
        return float(original(it))

    mod.get_lr = get_lr
    mod.run([*GPT_345M, f"--batch_size={batch_size}", "--gradient_accumulation_steps=1",
             f"--max_iters={start + iters + 2}", f"--eval_interval={start + iters + 2}",
             "--eval_iters=1", "--log_interval=10", "--warmup_iters=2",
             "--save_checkpoint=false", f"--data_dir={data}", f"--out_dir={out}"])
    by_family: dict[str, float] = defaultdict(float)
    kernels = []
    for ev in prof.key_averages():
        us = ev.self_device_time_total
        if us > 0:
            by_family[family(ev.key)] += us / iters / 1e3
            kernels.append((us / iters / 1e3, ev.count // iters, ev.key))
    kernels.sort(reverse=True)
    return {"wall_ms_per_iter": (marks["t1"] - marks["t0"]) / iters * 1e3,
            "gpu_ms_per_iter": sum(by_family.values()),
            "by_family_ms": dict(sorted(by_family.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"ms": ms, "calls": n, "name": name[:160]}
                            for ms, n, name in kernels[:25]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="reference,ternary_158bit")
    p.add_argument("--start", type=int, default=8, help="first profiled iteration")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--out", type=Path)
    p.add_argument("--one", nargs=3, metavar=("SCRIPT", "DATA", "JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        # One variant per process: compiled graphs of an earlier variant keep its memory.
        script, data, out = map(Path, args.one)
        r = profile_run(script, data, out.parent / f"out-{script.stem}", args.start, args.iters)
        out.write_text(json.dumps(r))
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        data = synthetic_data(work / "data", 20_000_000)
        for spec in args.variants.split(","):
            name, script = variant_script(spec, work)
            subprocess.run([sys.executable, __file__, f"--start={args.start}",
                            f"--iters={args.iters}", "--one", str(script), str(data),
                            str(work / f"{name}.json")], check=True)
            r = results[name] = json.loads((work / f"{name}.json").read_text())
            print(f"== {name}: wall {r['wall_ms_per_iter']:.1f} ms per iteration, kernels "
                  f"{r['gpu_ms_per_iter']:.1f} ms", flush=True)
            for fam, ms in r["by_family_ms"].items():
                print(f"   {fam:<40} {ms:8.2f} ms")
            for k in r["top_kernels"][:10]:
                print(f"   {k['ms']:7.2f} ms x{k['calls']:<4} {k['name'][:100]}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
