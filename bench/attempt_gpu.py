"""A real attempt at a GPU scale, shortened: the harness's own path, measured (issue 8).

Copies the task to a temporary folder, adds a scale derived from --scale with only the
iteration count (and evaluation cadence) shortened and the pretrain stage alone, writes
synthetic token shards (no corpus on the GPU machines), then runs `run_submission` with the
local runner — torchrun with the scale's processes, the spliced template, result.json —
and prints tokens/s from the template's own train_log.jsonl.

    python bench/attempt_gpu.py --scale gpt-345m --iters 40 --submission baselines/binary_sign

Needs as many CUDA GPUs as the scale's nproc_per_node (or --nproc).

`--audit-cost N` first times the in-run low-bit audit itself, in this process, on the real
model of the scale (uncompiled, as the guard audits it, bf16 autocast) and a batch of the
scale's own micro-batch (not --micro-batch's): the audit as it was before issue #24 (one row,
train() and eval(), the level count on the CPU), the same counted on the GPU, the current
audit (a train() window of random rows and length, an eval() one, eval() on the whole batch,
counted on the GPU) N times, once with the count on the CPU, and the guard's per-iteration
hook at a step it does not audit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pretrain_throughput import synthetic_data  # noqa: E402

from harness.attempt import prepare, run_submission  # noqa: E402
from harness.runners.local import LocalRunner  # noqa: E402
from harness.task import load_task  # noqa: E402


def short_scale(task_dir: Path, base: str, iters: int, log_interval: int,
                nproc: int | None = None, checkpoint_interval: int | None = None,
                micro_batch: int | None = None) -> str:
    text = (task_dir / "scales" / f"{base}.toml").read_text()
    import tomllib

    data = tomllib.loads(text)
    name = f"{base}-short"
    cfg = dict(data["config"], max_iters=iters, eval_interval=iters, eval_iters=2,
               log_interval=log_interval, warmup_iters=min(iters, 10))
    if checkpoint_interval is not None:
        cfg["checkpoint_interval"] = checkpoint_interval
    if micro_batch is not None:
        # The same tokens per iteration in smaller micro-batches: fits a card of less memory.
        tokens = cfg["batch_size"] * cfg["gradient_accumulation_steps"]
        if tokens % micro_batch:
            raise SystemExit(f"--micro-batch {micro_batch} does not divide {tokens} sequences")
        cfg["batch_size"], cfg["gradient_accumulation_steps"] = micro_batch, tokens // micro_batch
    s = data["scale"]
    lines = ["[scale]", f'name = "{name}"', f'description = "{base}, {iters} iterations"',
             f'device = "{s["device"]}"', f'nproc_per_node = {nproc or s["nproc_per_node"]}',
             'dataset = "synthetic"', 'stages = ["pretrain"]', "timeout_s = 1800", "", "[config]"]
    lines += [f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}"
              for k, v in cfg.items()]
    (task_dir / "scales" / f"{name}.toml").write_text("\n".join(lines) + "\n")
    return name


def eval_checks(paths: Any, data_dir: Path, task: Any, result: Any) -> dict[str, Any]:
    """What the eval stage checks before scoring, timed, on this attempt's checkpoint."""
    from harness.attempt import cross_check
    from harness.runtime.lmeval_run import EvalRequest, audit_checkpoint, load, score_val_loss

    t0 = time.monotonic()
    loaded = load(EvalRequest(script=paths.file(task.template),
                              checkpoint=paths.file(task.checkpoint),
                              evals=data_dir, out=paths.root / "unused.json",
                              device="cuda", data_dir=data_dir))
    t_load = time.monotonic()
    audit = audit_checkpoint(loaded)
    t_audit = time.monotonic()
    val = score_val_loss(loaded, data_dir)
    t_val = time.monotonic()
    return {"load_s": round(t_load - t0, 2), "audit_s": round(t_audit - t_load, 2),
            "val_loss_s": round(t_val - t_audit, 2), "audit": audit, "val_loss": val,
            "trained_val_loss": result.metrics.get("val_loss"),
            "cross_check": cross_check(task, result.metrics, {"val_loss": val["value"]})
            or "agrees"}


def audit_cost(prepared: Any, scale: Any, repeats: int, device: str = "cuda") -> dict[str, Any]:
    """Seconds and extra GPU memory of each way of auditing, on the scale's real model."""
    import torch

    try:
        return _audit_cost(prepared, scale, repeats, device)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()  # the attempt that follows gets the whole card


def _audit_cost(prepared: Any, scale: Any, repeats: int, device: str) -> dict[str, Any]:
    import contextlib
    import random

    import torch

    from harness.runtime import preflight_lowbit
    from harness.runtime.guard import Auditor
    from harness.runtime.lowbit_audit import Plan, audit, draw_plan, whole
    from harness.runtime.spliced import load_spliced

    cfg = scale.config
    with tempfile.TemporaryDirectory(prefix="audit-cost-") as tmp:
        script = Path(tmp) / "custom_pretrain.py"
        script.write_text(prepared.spliced)
        module = load_spliced(script, "custom_pretrain_audit_cost")
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(**{k: cfg.get(k, getattr(module, k)) for k in (
        "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias")})).to(device)
    rows, tokens = int(cfg["batch_size"]), int(cfg["block_size"])
    idx = torch.randint(0, 50257, (rows, tokens), device=device)
    cuda = device == "cuda"
    # As the template runs: bf16 autocast on a GPU, float32 on the CPU.
    ctx: Any = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda \
        else contextlib.nullcontext()
    on_gpu = preflight_lowbit._sample_rows

    def on_cpu(w: Any, seed: int = 0) -> Any:  # the count as it ran before issue #24
        return on_gpu(w, seed).cpu()

    def timed(plan: Plan, count_on_cpu: bool) -> dict[str, Any]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        with contextlib.ExitStack() as stack:
            if count_on_cpu:
                preflight_lowbit._sample_rows = on_cpu  # type: ignore[assignment]
                stack.callback(setattr, preflight_lowbit, "_sample_rows", on_gpu)
            t0 = time.monotonic()
            record = audit(model, module.BitLinear, idx, None, where="bench", autocast=ctx,
                           plan=plan)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.monotonic() - t0
        peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
        return {"seconds": round(seconds, 3), "count_on": "cpu" if count_on_cpu else "device",
                "extra_peak_gb": round(peak / 2**30, 2),
                "passes": record.passes, "problems": len(record.problems),
                "summary": record.summary}

    with torch.no_grad(), ctx:  # CUDA and cuBLAS start-up, outside every timing
        model(idx[:1, :16])
    old = Plan((("train", whole(1, tokens)), ("eval", whole(1, tokens))), 0)
    rng = random.SystemRandom()
    out: dict[str, Any] = {"rows": rows, "tokens": tokens, "layers": None,
                           "old_cpu": timed(old, True), "old_device": timed(old, False),
                           "new_device": [timed(draw_plan(rng, rows, tokens), False)
                                          for _ in range(repeats)]}
    if cuda:
        out["new_cpu"] = timed(draw_plan(rng, rows, tokens), True)
    out["layers"] = sum(isinstance(m, module.BitLinear) for m in model.modules())
    # The hook at a step that is neither an evaluation nor a spot audit: what every iteration pays.
    module.max_iters, module.eval_interval = 13535, 1000
    auditor = Auditor(module, "", None, Path(tempfile.gettempdir()))
    auditor(model, idx, None, ctx, 0, False)  # draws the schedule (step 0 is never a spot)
    quiet = next(s for s in range(1, 1000) if s not in (auditor.spots or []))
    t0 = time.perf_counter()
    for _ in range(10_000):
        auditor(model, idx, None, ctx, quiet, False)
    out["hook_noop_us"] = round((time.perf_counter() - t0) / 10_000 * 1e6, 3)
    out["spots_drawn_full_run"] = len(auditor.spots or [])
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="gpt-345m")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--submission", type=Path, default=REPO / "baselines" / "binary_sign")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (GPUs) instead of the scale's nproc_per_node, e.g. 1 on a "
                        "one-GPU machine: the same per-GPU step, not the scale's token count")
    p.add_argument("--eval-checks", action="store_true",
                   help="also run the eval stage's checks on the checkpoint in this process: "
                        "low-bit audit, val_loss recomputation and the cross-check (needs lm_eval)")
    p.add_argument("--checkpoint-interval", type=int, default=None,
                   help="resume checkpoints this often instead of the scale's, to time several "
                        "(final.json's checkpoint_s: seconds per write, rank 0's wait)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per micro-batch instead of the scale's, with as many more "
                        "accumulation steps: the same iteration on a card of less memory")
    p.add_argument("--audit-cost", type=int, default=0, metavar="N",
                   help="first time the in-run low-bit audit on the scale's real model, old "
                        "and current, N draws of the current one (see the module's doc)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="attempt-gpu-") as tmp:
        work = Path(tmp)
        task_dir = work / "task"
        shutil.copytree(load_task().root, task_dir)
        scale_name = short_scale(task_dir, args.scale, args.iters, args.log_interval,
                                 args.nproc, args.checkpoint_interval, args.micro_batch)
        task = load_task(str(task_dir))
        scale = task.scale(scale_name)
        data = work / "data"
        (data / "synthetic").mkdir(parents=True)
        synthetic_data(data / "synthetic", 50_000_000)
        prepared = prepare(args.submission, task)
        cost = None
        if args.audit_cost:
            cost = audit_cost(prepared, task.scale(args.scale), args.audit_cost)
            print(json.dumps({"audit_cost": cost}, indent=2), flush=True)
        t0 = time.monotonic()
        result, paths = run_submission(prepared, task, scale, runs_dir=work / "runs", data=data,
                                       runner=LocalRunner())
        wall = time.monotonic() - t0
        if not (paths.stage_dir("pretrain") / "train_log.jsonl").is_file():
            print(f"{result.status}: {result.reason}", file=sys.stderr)
            for log_file in sorted(paths.root.rglob("*.log")):
                print(f"--- {log_file}\n{log_file.read_text()[-3000:]}", file=sys.stderr)
            return 1
        log = [json.loads(line) for line in
               (paths.stage_dir("pretrain") / "train_log.jsonl").read_text().splitlines()]
        record = paths.read().to_json()
        index = paths.stage_dir("pretrain") / "resume.json"
        checkpoint = json.loads(index.read_text()) if index.is_file() else None
        audits = [json.loads(line) for f in sorted(paths.stage_dir("pretrain").glob(
            "audit_rank*.jsonl")) for line in f.read_text().splitlines()]
        checks = eval_checks(paths, data / "synthetic", task, result) if args.eval_checks \
            and result.status == "succeeded" else None
    tokens_per_iter = (scale.config["batch_size"] * scale.config["block_size"]
                       * scale.config["gradient_accumulation_steps"])
    # Seconds per iteration between log lines; the first two intervals hold compilation.
    per_iter = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                for a, b in itertools.pairwise(log)][2:]
    dt = statistics.median(per_iter) if per_iter else float("nan")
    summary = {
        "status": result.status, "reason": result.reason, "scale": args.scale,
        "iters": args.iters, "nproc_per_node": scale.nproc_per_node,
        "tokens_per_iter": tokens_per_iter, "median_s_per_iter": round(dt, 4),
        "tokens_per_s": round(tokens_per_iter / dt, 1), "attempt_wall_s": round(wall, 1),
        "pretrain_wall_s": record["stages"]["pretrain"]["wall_s"],
        "val_loss": result.metrics.get("val_loss"), "final": record["stages"]["pretrain"]["final"],
        "audits": audits, "audit_cost": cost, "eval_checks": checks, "checkpoint": checkpoint,
        "checkpoint_s": record["stages"]["pretrain"]["final"].get("checkpoint_s"),
    }
    print(json.dumps(summary, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps({**summary, "train_log": log}, indent=2, default=str))
    return 0 if result.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
