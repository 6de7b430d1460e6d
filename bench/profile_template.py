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
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pretrain_throughput import GPT_345M, synthetic_data, variant_script  # noqa: E402
from profile_step import kernel_breakdown, print_breakdown  # noqa: E402

from harness.runtime.spliced import load_spliced  # noqa: E402


def profile_run(script: Path, data: Path, out: Path, start: int, iters: int,
                batch_size: int = 64) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    mod = load_spliced(script)
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
    return {"wall_ms_per_iter": (marks["t1"] - marks["t0"]) / iters * 1e3,
            **kernel_breakdown(prof, iters)}


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
            print_breakdown(f"== {name}: wall {r['wall_ms_per_iter']:.1f} ms per iteration, "
                            f"kernels {r['gpu_ms_per_iter']:.1f} ms", r, top=10)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
