"""lm-eval stage throughput per task on a gpt-345m-shaped checkpoint (issue 5).

Builds, in a temporary directory: the smoke corpus, eval sets of --docs documents per task in
lm-eval's real schemas (generated from the corpus's held-out documents), and a checkpoint of
the gpt-345m model shape with the template's default (ternary) BitLinear and random weights.
Then scores each task on its own through the stage's own code path (the GPTLM adapter,
lm-eval's simple_evaluate, the stage's bootstrap setting) and prints, per task: documents,
requests, scored tokens, wall seconds, examples/s and tokens/s, plus a projection of the six
full task sets from their real document counts.

    python bench/eval_throughput.py --docs 1000 --out eval-throughput.json

The sets' documents are stdlib docstrings, not the real datasets (none reachable here), so
per-document lengths differ from the real ones: the projection is an estimate, stated as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})

from harness.data import evals as evalsets  # noqa: E402
from harness.task import load_task  # noqa: E402


def write_checkpoint(work: Path, scale_name: str) -> tuple[Path, Path]:
    """The template (default regions) and a random-weight checkpoint of the scale's shape."""
    import torch

    from harness.runtime.spliced import load_spliced

    task = load_task()
    script = work / "custom_pretrain.py"
    script.write_text(task.template_text(), encoding="utf-8")
    cfg = task.scale(scale_name).config
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                "dropout")}
    args["bias"] = bool(cfg.get("bias", False))
    module = load_spliced(script)
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(**args))
    ckpt = work / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 0}, ckpt)
    return script, ckpt


def score_task(lm: Any, manager: Any, task: evalsets.EvalTask, limit: int,
               bootstrap_iters: int) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    before = dict(lm.stats)
    t0 = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[task.harness_task], task_manager=manager,
                              limit=limit, bootstrap_iters=bootstrap_iters, log_samples=True)
    wall = time.perf_counter() - t0
    docs = len(results["samples"][task.harness_task])
    delta = {k: lm.stats[k] - before.get(k, 0) for k in lm.stats}
    return {"task": task.name, "docs": docs, "wall_s": round(wall, 3),
            "examples_per_s": round(docs / wall, 2),
            "scored_tokens": int(delta["tokens"]), "forward_passes": int(delta["forward_passes"]),
            "padded_tokens": int(delta["padded_tokens"]), "score_s": round(delta["score_s"], 3),
            "tokens_per_s": round(delta["tokens"] / wall, 1),
            "full_docs": task.full_docs,
            "projected_full_s": round(task.full_docs * wall / docs, 1)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1000, help="documents per task")
    p.add_argument("--scale", default="gpt-345m", help="the model shape to build")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--bootstrap-iters", type=int, default=None,
                   help="default: the stage's own setting")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = p.parse_args(argv)

    import torch
    from lm_eval.tasks import TaskManager

    from harness.data.smoke import prepare_smoke
    from harness.runtime.lmeval_run import EvalRequest, make_lm
    from harness.stages import lmeval as stage

    boot = stage.FULL_BOOTSTRAP_ITERS if args.bootstrap_iters is None else args.bootstrap_iters
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf")
        t0 = time.perf_counter()
        corpus = work / "corpus"
        prepare_smoke(corpus)
        manifest = evalsets.prepare_smoke_evals(work / "evals", corpus, docs=args.docs)
        evalsets.write_task_yamls(work / "evals", work / "yamls", manifest)
        setup_s = time.perf_counter() - t0
        script, ckpt = write_checkpoint(work, args.scale)
        lm, info = make_lm(EvalRequest(script=script, checkpoint=ckpt, evals=work / "evals",
                                       out=work / "out" / "eval.json", device=args.device,
                                       dtype=args.dtype))
        manager = TaskManager(include_path=str(work / "yamls"), include_defaults=False)
        # Warm-up (CUDA context, kernels, lm-eval's imports), not counted.
        score_task(lm, manager, evalsets.TASKS[-1], 8, 100)
        rows = [score_task(lm, manager, t, args.docs, boot) for t in evalsets.TASKS]

    total_full = sum(r["projected_full_s"] for r in rows)
    device = info["device"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    print(f"device {device} ({name}), torch {torch.__version__}, {info['num_params']:,} params, "
          f"autocast {info['autocast']}, batch_tokens {info['batch_tokens']}, "
          f"bootstrap {boot}, set-up {setup_s:.0f} s")
    print(f"{'task':15} {'docs':>5} {'wall s':>7} {'ex/s':>7} {'tokens':>8} {'tok/s':>8} "
          f"{'full docs':>9} {'proj. s':>7}")
    for r in rows:
        print(f"{r['task']:15} {r['docs']:5d} {r['wall_s']:7.1f} {r['examples_per_s']:7.1f} "
              f"{r['scored_tokens']:8d} {r['tokens_per_s']:8.0f} {r['full_docs']:9d} "
              f"{r['projected_full_s']:7.1f}")
    print(f"projected six full sets (by document count): {total_full / 60:.1f} min")
    if args.out:
        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "device": device, "device_name": name,
            "torch": torch.__version__, "docs_per_task": args.docs, "scale": args.scale,
            "bootstrap_iters": boot, "model": info, "tasks": rows,
            "projected_full_min": round(total_full / 60, 2)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
