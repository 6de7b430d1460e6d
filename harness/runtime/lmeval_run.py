"""Score one checkpoint on the six eval sets with lm-eval; what eval_lm.py runs.

Failures are sorted by whose they are: `SubmissionFailure` when the submission's code fails
(its module does not import, the model does not build or load, its forward pass raises or
returns the wrong shape); anything else is ours.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.runtime import evalsets
from harness.runtime import lmeval_report as stage
from harness.runtime.fileio import atomic_write_json, atomic_write_text, sha256_file

DTYPES = {"float32": None, "bfloat16": "bfloat16", "float16": "float16"}


class SubmissionFailure(Exception):
    """The submission's code failed while the model was built or run."""


class RuleViolation(Exception):
    """Frozen or torch code was changed, or the checkpoint's model computes with
    full-precision weights: the attempt gets no score."""


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
    # The attempt's token shards: val_loss is recomputed from their validation split. None
    # (`harness eval` on a bare checkpoint): no val_loss.
    data_dir: Path | None = None
    # The task's headline metrics: our name -> (lm-eval task, lm-eval metric), as task.toml
    # declares them (`source`); the stage passes them in, eval.json reports exactly these.
    metrics: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    """numpy scalars and other stragglers in lm-eval's samples, as JSON can hold them."""
    item = getattr(value, "item", None)
    return item() if callable(item) else repr(value)


def write_samples(path: Path, samples: Mapping[str, Any], names: Mapping[str, str]) -> int:
    """One JSON line per scored document (its log-likelihoods, target, metrics); the document
    itself stays in the eval set, named by doc_id and doc_hash. Returns the line count."""
    lines = []
    for ours, name in names.items():
        for sample in samples.get(ours, []):
            record = {k: v for k, v in sample.items() if k != "doc"}
            lines.append(json.dumps({"task": name, **record}, default=_jsonable,
                                    ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _autocast_dtype(dtype: str, device_type: str) -> Any:
    import torch

    name = ("bfloat16" if device_type == "cuda" else "float32") if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    chosen = DTYPES[name]
    return None if chosen is None else getattr(torch, chosen)


@dataclass
class Loaded:
    """The spliced template's module and its GPT with the checkpoint's weights, on the device."""

    module: Any
    model: Any
    ckpt: dict[str, Any]
    device: Any
    autocast: Any  # a torch dtype, or None for float32


def load(request: EvalRequest) -> Loaded:
    from harness.runtime.lmeval_model import build_model, load_checkpoint, pick_device
    from harness.runtime.spliced import load_spliced

    ckpt = load_checkpoint(request.checkpoint)
    device = pick_device(request.device)
    with submission_code("building the model from the spliced template"):
        module = load_spliced(request.script)
        model = build_model(module, ckpt)
    with submission_code("moving the model to the device"):
        model = model.to(device)
    return Loaded(module, model, ckpt, device, _autocast_dtype(request.dtype, device.type))


def make_lm(request: EvalRequest, loaded: Loaded | None = None) -> tuple[Any, dict[str, Any]]:
    """The adapter over the spliced template's GPT with the checkpoint's weights."""
    from harness.runtime.lmeval_model import GPTLM, default_batch_tokens

    loaded = loaded or load(request)
    args = loaded.ckpt["model_args"]
    budget = request.batch_tokens or default_batch_tokens(
        loaded.device, int(args["vocab_size"]), int(args["n_embd"]), int(args["n_layer"]))
    lm = GPTLM(loaded.model, max_length=int(args["block_size"]), device=loaded.device,
               autocast_dtype=loaded.autocast, batch_tokens=budget)
    info = {"model_args": args, "device": str(loaded.device), "autocast": str(loaded.autocast),
            "batch_tokens": lm.batch_tokens, "iter_num": loaded.ckpt.get("iter_num"),
            "checkpoint_val_loss": loaded.ckpt.get("val_loss"),
            "num_params": sum(p.numel() for p in loaded.model.parameters())}
    return lm, info


def _autocast(loaded: Loaded) -> Any:
    import torch

    if loaded.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=loaded.device.type, dtype=loaded.autocast)


def audit_checkpoint(loaded: Loaded) -> dict[str, Any]:
    """The low-bit audit on the model rebuilt from the final checkpoint; RuleViolation when a
    matmul sees a full-precision weight."""
    import torch

    from harness.runtime.lowbit_audit import audit

    block = int(loaded.ckpt["model_args"]["block_size"])
    vocab = min(int(loaded.ckpt["model_args"]["vocab_size"]), 50257)
    # Any tokens reach every matmul; a fixed ramp keeps the audit independent of the data.
    idx = (torch.arange(block + 1, device=loaded.device) * 7919 % vocab).unsqueeze(0)
    with submission_code("running the low-bit audit's forward pass"):
        record = audit(loaded.model, loaded.module.BitLinear, idx[:, :-1], idx[:, 1:],
                       where="final checkpoint", autocast=_autocast(loaded))
    if record.problems:
        raise RuleViolation(f"low-bit audit at the final checkpoint: {record.problems[0]}")
    return record.as_dict()


def score_val_loss(loaded: Loaded, data_dir: Path) -> dict[str, Any]:
    """val_loss of the checkpoint on the same fixed validation windows as training, computed by
    the template's own frozen load_split, val_windows and evaluate, in this process."""
    module, ckpt = loaded.module, loaded.ckpt
    config = ckpt.get("config") or {}
    world = int(ckpt.get("world_size", 1))
    # The template's evaluation reads its globals; set them as training had them.
    for key in ("batch_size", "block_size", "eval_iters"):
        setattr(module, key, int(config[key]))
    shards = module.load_split(str(data_dir), "val", int(ckpt["model_args"]["vocab_size"]))
    windows = module.val_windows(shards, module.eval_iters * module.batch_size * world)
    t0 = time.monotonic()
    with submission_code("computing val_loss on the checkpoint"):
        value = float(module.evaluate(loaded.model, shards, windows, str(loaded.device),
                                      _autocast(loaded)))
    loaded.model.eval()  # evaluate() leaves the model in train()
    return {"value": value, "windows": len(windows), "tokens": len(windows) * module.block_size,
            "seconds": round(time.monotonic() - t0, 3)}


def run_tasks(lm: Any, yaml_dir: Path, *, limit: int | None,
              bootstrap_iters: int) -> dict[str, Any]:
    """simple_evaluate over our six tasks, offline, with per-sample logs."""
    from lm_eval import simple_evaluate  # type: ignore[import-untyped,unused-ignore]
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped,unused-ignore]

    from harness.runtime.lmeval_model import ModelError

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
    from harness.runtime.integrity import IntegrityError, TorchTable, source_of, verify

    t0 = time.monotonic()
    unknown = sorted({t for t, _ in request.metrics.values()} - set(evalsets.TASK_NAMES))
    if unknown:
        raise RuntimeError(f"metrics asked of lm-eval tasks we do not run: {unknown}")
    # Before the submission's module is imported: what its torch must still be when scoring.
    table = TorchTable()
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    problems = evalsets.verify(request.evals)
    if problems:
        raise RuntimeError(f"eval sets at {request.evals} fail verification: {problems[:3]}")
    manifest = evalsets.read_manifest(request.evals)
    # Written afresh here: the YAMLs hold this machine's absolute paths.
    yaml_dir = out.parent / evalsets.YAML_DIR
    evalsets.write_task_yamls(request.evals, yaml_dir, manifest)
    loaded = load(request)
    source = source_of(request.script)

    def check(when: str) -> None:
        try:
            verify(loaded.module, source, table, when=when)
        except IntegrityError as e:
            raise RuleViolation(str(e)) from e

    check("after importing the submission")
    audit_record = audit_checkpoint(loaded)
    check("before scoring val_loss")
    val = score_val_loss(loaded, request.data_dir) if request.data_dir is not None else None
    lm, model_info = make_lm(request, loaded)
    check("before scoring the lm-eval tasks")
    t_eval = time.monotonic()
    results = run_tasks(lm, yaml_dir, limit=request.limit,
                        bootstrap_iters=request.bootstrap_iters)
    check("after scoring")
    model_info.update(lm.stats, eval_s=round(time.monotonic() - t_eval, 3),
                      **_device_info(lm.device))
    names = {t.harness_task: t.name for t in evalsets.TASKS}
    samples_path = out.parent / stage.SAMPLES_FILE
    n_samples = write_samples(samples_path, results.get("samples", {}), names)
    summary = stage.summarize(results, {name: ours for ours, name in names.items()},
                              request.metrics)
    if val is not None:
        summary["metrics"]["val_loss"] = val["value"]
    report = {
        "format": stage.FORMAT,
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        **summary,
        "val_loss": val, "lowbit_audit": audit_record,
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
    atomic_write_json(out, report, default=_jsonable)
    return report


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch_version": torch.__version__}
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device),
                    cuda_peak_bytes=int(torch.cuda.max_memory_allocated(device)))
    return info
