"""Score one checkpoint on the six eval sets with lm-eval; what eval_lm.py runs.

Failures are sorted by whose they are: `SubmissionFailure` when the submission's code fails
(its module does not import, the model does not build or load, its forward pass raises or
returns the wrong shape); anything else is ours.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data import evals as evalsets
from harness.paths import sha256_file
from harness.stages import lmeval as stage

DTYPES = {"float32": None, "bfloat16": "bfloat16", "float16": "float16"}


class SubmissionFailure(Exception):
    """The submission's code failed while the model was built or run."""


@contextlib.contextmanager
def submission_code(what: str) -> Iterator[None]:
    """Exceptions inside are the submission's: re-raised as SubmissionFailure."""
    try:
        yield
    except Exception as e:
        raise SubmissionFailure(f"{what}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class EvalRequest:
    script: Path  # the attempt's spliced custom_pretrain.py
    checkpoint: Path
    evals: Path
    out: Path  # eval.json; samples.jsonl and tasks/ go beside it
    limit: int | None = None
    bootstrap_iters: int = stage.FULL_BOOTSTRAP_ITERS
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    batch_tokens: int = 0  # 0: chosen from the device's memory


def _jsonable(value: Any) -> Any:
    """numpy scalars and other stragglers in lm-eval's samples, as JSON can hold them."""
    item = getattr(value, "item", None)
    return item() if callable(item) else repr(value)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_samples(path: Path, samples: Mapping[str, Any], names: Mapping[str, str]) -> int:
    """One JSON line per scored document (its log-likelihoods, target, metrics); the document
    itself stays in the eval set, named by doc_id and doc_hash. Returns the line count."""
    lines = []
    for ours, name in names.items():
        for sample in samples.get(ours, []):
            record = {k: v for k, v in sample.items() if k != "doc"}
            lines.append(json.dumps({"task": name, **record}, default=_jsonable,
                                    ensure_ascii=False))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines)


def _autocast_dtype(dtype: str, device_type: str) -> Any:
    import torch

    name = ("bfloat16" if device_type == "cuda" else "float32") if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    chosen = DTYPES[name]
    return None if chosen is None else getattr(torch, chosen)


def make_lm(request: EvalRequest) -> tuple[Any, dict[str, Any]]:
    """The adapter over the spliced template's GPT with the checkpoint's weights."""
    from harness.lmeval_model import (
        GPTLM,
        build_model,
        default_batch_tokens,
        load_checkpoint,
        load_spliced,
        pick_device,
    )

    ckpt = load_checkpoint(request.checkpoint)
    args = ckpt["model_args"]
    device = pick_device(request.device)
    with submission_code("building the model from the spliced template"):
        model = build_model(load_spliced(request.script), ckpt)
    autocast = _autocast_dtype(request.dtype, device.type)
    budget = request.batch_tokens or default_batch_tokens(
        device, int(args["vocab_size"]), int(args["n_embd"]), int(args["n_layer"]))
    with submission_code("moving the model to the device"):
        model = model.to(device)
    lm = GPTLM(model, max_length=int(args["block_size"]), device=device,
               autocast_dtype=autocast, batch_tokens=budget)
    info = {"model_args": args, "device": str(device), "autocast": str(autocast),
            "batch_tokens": lm.batch_tokens, "iter_num": ckpt.get("iter_num"),
            "checkpoint_val_loss": ckpt.get("val_loss"),
            "num_params": sum(p.numel() for p in model.parameters())}
    return lm, info


def run_tasks(lm: Any, yaml_dir: Path, *, limit: int | None,
              bootstrap_iters: int) -> dict[str, Any]:
    """simple_evaluate over our six tasks, offline, with per-sample logs."""
    from lm_eval import simple_evaluate  # type: ignore[import-untyped,unused-ignore]
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped,unused-ignore]

    from harness.lmeval_model import ModelError

    # Only our YAMLs: they include lm-eval's own definitions by absolute path.
    manager = TaskManager(include_path=str(yaml_dir), include_defaults=False)
    try:
        results: dict[str, Any] | None = simple_evaluate(
            model=lm, tasks=[t.harness_task for t in evalsets.TASKS], task_manager=manager,
            limit=limit, bootstrap_iters=bootstrap_iters, log_samples=True)
    except ModelError as e:
        raise SubmissionFailure(str(e)) from e
    if results is None:
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return results


def evaluate(request: EvalRequest) -> dict[str, Any]:
    """Run everything and write eval.json + samples.jsonl; returns the eval.json record."""
    t0 = time.monotonic()
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    problems = evalsets.verify(request.evals)
    if problems:
        raise RuntimeError(f"eval sets at {request.evals} fail verification: {problems[:3]}")
    manifest = evalsets.read_manifest(request.evals)
    # Written afresh here: the YAMLs hold this machine's absolute paths.
    yaml_dir = out.parent / evalsets.YAML_DIR
    evalsets.write_task_yamls(request.evals, yaml_dir, manifest)
    lm, model_info = make_lm(request)
    t_eval = time.monotonic()
    results = run_tasks(lm, yaml_dir, limit=request.limit,
                        bootstrap_iters=request.bootstrap_iters)
    model_info.update(lm.stats, eval_s=round(time.monotonic() - t_eval, 3),
                      **_device_info(lm.device))
    names = {t.harness_task: t.name for t in evalsets.TASKS}
    samples_path = out.parent / stage.SAMPLES_FILE
    n_samples = write_samples(samples_path, results.get("samples", {}), names)
    report = {
        "format": stage.FORMAT,
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        **stage.summarize(results, {name: ours for ours, name in names.items()}),
        "settings": {"limit": request.limit, "num_fewshot": 0,
                     "bootstrap_iters": request.bootstrap_iters, "dtype": request.dtype},
        "model": model_info,
        "checkpoint": {"path": str(request.checkpoint), "sha256": sha256_file(request.checkpoint)},
        "spliced_sha256": sha256_file(request.script),
        "evals": {"dir": str(Path(request.evals).resolve()), "kind": manifest.get("kind"),
                  "manifest_sha256": evalsets.manifest_sha256(request.evals)},
        "samples_file": stage.SAMPLES_FILE, "samples_lines": n_samples,
        "samples_sha256": sha256_file(samples_path),
        "wall_s": round(time.monotonic() - t0, 3),
    }
    write_json_atomic(out, report)
    return report


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch_version": torch.__version__}
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device),
                    cuda_peak_bytes=int(torch.cuda.max_memory_allocated(device)))
    return info
