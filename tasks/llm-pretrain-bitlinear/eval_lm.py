"""Frozen lm-eval entry: score an attempt's checkpoint on the six eval sets, write eval.json.

    python eval_lm.py --attempt-dir RUN --evals DIR --out RUN/lm-eval/eval.json
                      --metric NAME=TASK/METRIC ... [--limit N] [--data-dir SHARDS]

The spliced custom_pretrain.py of the attempt is imported only to build its GPT (the
submission's BitLinear included) from the checkpoint; lm-eval scores it offline from the
local eval sets. Beside eval.json: samples.jsonl (per-document log-likelihoods, for audit)
and tasks/ (the task YAMLs used). With --data-dir, the official val_loss is computed here too,
from the checkpoint on training's fixed validation windows. Before scoring, the frozen and
torch code is verified unmodified and the model passes the low-bit audit. On failure,
error.json says whose it was: {"kind": "submission" | "rule_violation" | "infra",
"message": ...}; the exit code is then 1.
"""

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

# Offline whatever the environment says, before any Hugging Face library is imported.
os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "TOKENIZERS_PARALLELISM": "false"})


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attempt-dir", type=Path, required=True,
                   help="the attempt: its spliced custom_pretrain.py and pretrain/ckpt.pt")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: ATTEMPT_DIR/pretrain/ckpt.pt")
    p.add_argument("--script", type=Path, default=None,
                   help="the spliced template; default: ATTEMPT_DIR/custom_pretrain.py")
    p.add_argument("--evals", type=Path, required=True, help="prepared eval-set directory")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the attempt's token shards: also score val_loss on their val split")
    p.add_argument("--out", type=Path, required=True, help="eval.json to write")
    p.add_argument("--metric", type=metric_arg, action="append", required=True,
                   dest="metrics", metavar="NAME=TASK/METRIC",
                   help="a headline metric: our name, the lm-eval task and its metric "
                        "(task.toml's `source`; repeat for each)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (quick runs)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000,
                   help="resamples for perplexity stderr (lm-eval's default 100000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="padded tokens per forward pass; 0 picks from the device's memory")
    return p.parse_args(argv)


def metric_arg(text):
    name, _, source = text.partition("=")
    task, _, metric = source.partition("/")
    if not (name and task and metric):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=TASK/METRIC")
    return name, (task, metric)


def write_error(out, kind, message):
    from harness.runtime.fileio import atomic_write_json as write_json_atomic

    write_json_atomic(out.parent / "error.json", {"kind": kind, "message": message[-4000:]})


def main(argv):
    args = parse_args(argv)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, out.parent / "error.json"):
        stale.unlink(missing_ok=True)
    try:
        # A private datasets cache: nothing from this run lands in the user's home.
        with tempfile.TemporaryDirectory(prefix="harness-hf-") as cache:
            os.environ["HF_DATASETS_CACHE"] = cache
            from harness.runtime.lmeval_run import EvalRequest, evaluate

            attempt = args.attempt_dir.resolve()
            report = evaluate(EvalRequest(
                script=args.script or attempt / "custom_pretrain.py",
                checkpoint=args.checkpoint or attempt / "pretrain" / "ckpt.pt",
                evals=args.evals.resolve(), out=out, limit=args.limit,
                bootstrap_iters=args.bootstrap_iters, device=args.device, dtype=args.dtype,
                batch_tokens=args.batch_tokens, metrics=dict(args.metrics),
                data_dir=args.data_dir.resolve() if args.data_dir else None))
    except Exception as e:
        from harness.runtime.lmeval_run import RuleViolation, SubmissionFailure

        kind = ("submission" if isinstance(e, SubmissionFailure) else
                "rule_violation" if isinstance(e, RuleViolation) else "infra")
        detail = "".join(traceback.format_exception(e))
        write_error(out, kind, f"{detail}\n{e}")
        print(detail, file=sys.stderr)
        return 1
    shown = ", ".join(f"{k}={v:.4g}" for k, v in report["metrics"].items())
    print(f"LM_EVAL_METRICS: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
