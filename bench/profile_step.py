"""Where the GPU time of one training iteration goes, per variant (issue 9).

Splices a variant into the template, imports it as a module, builds its GPT at gpt-345m
shape, compiles it as the template does and profiles a few steady-state iterations
(forward, backward, clip, fused AdamW: the template's step without DDP). Prints the GPU time
per iteration by kernel family (matmuls, attention, Triton-generated elementwise and
reduction kernels, optimizer, copies) and the largest kernels.

    python bench/profile_step.py --variants reference,ternary_158bit --out profile.json

The template's own training loop is what bench/pretrain_throughput.py times; this script
only explains that time. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pretrain_throughput import variant_script  # noqa: E402

from harness.runtime.spliced import load_spliced  # noqa: E402

# Kernel-name fragments of each family, first match wins.
FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "ampere_bf16", "splitk")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("nccl", ("nccl",)),
    ("copy/fill", ("memcpy", "memset", "copy_kernel", "fill", "elementwise_kernel")),
    ("triton (fused elementwise/reductions)", ("triton",)),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def kernel_breakdown(prof: Any, iters: int) -> dict[str, Any]:
    """GPU time per iteration of a finished profile: in total, by family, largest kernels."""
    by_family: dict[str, float] = defaultdict(float)
    kernels = []
    for ev in prof.key_averages():
        ms = ev.self_device_time_total / iters / 1e3
        if ms > 0:
            by_family[family(ev.key)] += ms
            kernels.append((ms, ev.count // iters, ev.key))
    kernels.sort(reverse=True)
    return {"gpu_ms_per_iter": sum(by_family.values()),
            "by_family_ms": dict(sorted(by_family.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"ms": ms, "calls": n, "name": name[:160]}
                            for ms, n, name in kernels[:25]]}


def print_breakdown(headline: str, r: dict[str, Any], top: int = 12) -> None:
    print(headline, flush=True)
    for fam, ms in r["by_family_ms"].items():
        print(f"   {fam:<40} {ms:8.2f} ms")
    for k in r["top_kernels"][:top]:
        print(f"   {k['ms']:7.2f} ms x{k['calls']:<4} {k['name'][:100]}")


def profile_variant(script: Path, batch_size: int, iters: int, pre_eval: bool) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    mod = load_spliced(script)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = mod.GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304)
    model = mod.GPT(cfg).cuda()
    opt = model.configure_optimizer(0.1, 3e-4, (0.9, 0.95), "cuda")
    cmodel = torch.compile(model)
    x = torch.randint(0, 50257, (batch_size, 1024), device="cuda")
    y = torch.randint(0, 50257, (batch_size, 1024), device="cuda")

    def step(fresh_batch: bool = False) -> None:
        nonlocal x, y
        if fresh_batch:
            # As the template's get_batch: a new CPU batch, pinned, copied without blocking.
            cpu = torch.randint(0, 50257, (2, batch_size, 1024))
            x = cpu[0].pin_memory().to("cuda", non_blocking=True)
            y = cpu[1].pin_memory().to("cuda", non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = cmodel(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if pre_eval:
        # As the template's evaluation at iteration 0: eval(), no_grad, rows of block + 1 tokens
        # sliced into inputs and targets (views that are not contiguous).
        rows = torch.randint(0, 50257, (batch_size, 1025), device="cuda")
        cmodel.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            cmodel(rows[:, :-1], rows[:, 1:])
        cmodel.train()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    wall = {}
    for fresh in (False, True):
        t0 = time.perf_counter()
        for _ in range(iters + 2):
            step(fresh)
        torch.cuda.synchronize()
        wall[fresh] = (time.perf_counter() - t0) / (iters + 2) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return {**kernel_breakdown(prof, iters), "wall_ms_per_iter": wall[False],
            "wall_ms_per_iter_fresh_batches": wall[True]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="reference,ternary_158bit")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--pre-eval", action="store_true",
                   help="evaluate once before training, as the template does at iteration 0")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variants.split(","):
            name, script = variant_script(spec, Path(tmp))
            r = results[name] = profile_variant(script, args.batch_size, args.iters,
                                                        args.pre_eval)
            print_breakdown(f"== {name}: {r['gpu_ms_per_iter']:.1f} ms of GPU time per iteration;"
                            f" wall {r['wall_ms_per_iter']:.1f} ms, "
                            f"{r['wall_ms_per_iter_fresh_batches']:.1f} ms with a fresh pinned "
                            "batch each step", r)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
