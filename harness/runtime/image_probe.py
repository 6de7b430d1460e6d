"""What an image must hold for the task's stages, checked from inside it.

    python3 -m harness.runtime.image_probe [--gpu] [--pin lm-eval==0.4.13 ...] [--source-sha256=H]

Runs inside the image (`harness image check` starts it in a container without network; the
Apptainer definition's %test runs it directly). Prints one JSON object, {"ok", "checks":
[{"id", "ok", "detail"}], ...}, and exits 2 when anything is missing. Only the standard
library is imported at module level: a broken image must still give a report.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DIST = "bitlinear-harness"
MIN_PYTHON = (3, 10)
# What the stages run inside the image (without torch's heavy import where it can wait).
RUNTIME_MODULES = ("harness", "harness.runtime.guard", "harness.runtime.launch",
                   "harness.runtime.preflight", "harness.runtime.preflight_worker")


def declared_pins() -> dict[str, str]:
    """The exact pins (name==version) among the installed harness's own requirements."""
    try:
        requires = importlib.metadata.requires(DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    pins: dict[str, str] = {}
    for req in requires:
        spec = req.split(";", 1)[0].strip()
        if "==" in spec and "extra" not in req.split(";", 1)[-1]:
            name, _, version = spec.partition("==")
            pins[name.strip()] = version.strip()
    return pins


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Probe:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def check(self, check_id: str, fn: Callable[[], str]) -> bool:
        try:
            detail, ok = fn(), True
        except Exception as e:  # every failure is a finding, never a crash of the probe
            text = str(e).strip().splitlines()
            detail, ok = f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": "), False
        self.checks.append({"id": check_id, "ok": ok, "detail": detail})
        return ok


def _python() -> str:
    if tuple(sys.version_info[:2]) < MIN_PYTHON:
        raise RuntimeError(f"Python {platform.python_version()} is older than 3.10")
    return f"Python {platform.python_version()} at {sys.executable}"


def _torch(probe: Probe, gpu: bool) -> str:
    import torch
    import torch.distributed as dist

    probe.facts["torch"] = torch.__version__
    if not dist.is_available():
        raise RuntimeError(f"torch {torch.__version__} was built without torch.distributed")
    if not dist.is_gloo_available():
        raise RuntimeError(f"torch {torch.__version__} has no gloo backend")
    return f"torch {torch.__version__} (gloo)" + (" CUDA build " + str(torch.version.cuda)
                                                  if torch.version.cuda else " CPU build")


def _cuda() -> str:
    import torch

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU build")
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (run with GPUs: --gpu passes them)")
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s): {', '.join(names)}"


def _nccl() -> str:
    import torch
    import torch.distributed as dist

    if not dist.is_nccl_available():
        raise RuntimeError("torch.distributed has no NCCL backend")
    nccl: Any = torch.cuda.nccl
    version = nccl.version()
    return "NCCL " + (".".join(map(str, version)) if isinstance(version, tuple) else str(version))


def _pin(name: str, version: str) -> Callable[[], str]:
    def check() -> str:
        found = _version(name)
        if found is None:
            raise RuntimeError(f"{name} is not installed (the task pins {name}=={version})")
        if found != version:
            raise RuntimeError(f"{name} {found} is installed, the task pins {version}")
        return f"{name}=={found}"
    return check


def _imports(modules: Sequence[str]) -> Callable[[], str]:
    def check() -> str:
        for module in modules:
            importlib.import_module(module)
        return ", ".join(modules)
    return check


def source_digest(package_dir: Path) -> str:
    """sha256 over the harness package's Python sources, each by its relative path: the same
    for the image's installed harness and the tree it was built from, and for nothing else."""
    h = hashlib.sha256()
    for p in sorted(package_dir.rglob("*.py")):
        if "__pycache__" not in p.parts:
            h.update(p.relative_to(package_dir).as_posix().encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def _source(expected: str) -> Callable[[], str]:
    def check() -> str:
        import harness

        got = source_digest(Path(harness.__file__).resolve().parent)
        if got != expected:
            raise RuntimeError(
                f"the image's harness (sources sha256 {got[:12]}) is not the one that runs it "
                f"({expected[:12]}): it was built from another harness; rebuild it with "
                "`harness image build --tag IMAGE`")
        return f"sources sha256 {got[:12]}, the same as the harness that runs it"
    return check


def _tokenizer() -> str:
    from harness.runtime.tokenizer import GPT2_FILES, gpt2_encoding

    # gpt2_encoding() reads both files and refuses any whose sha256 differs from GPT2_FILES.
    ids = gpt2_encoding().encode_ordinary("Hello world")
    if ids != [15496, 995]:
        raise RuntimeError(f"the GPT-2 encoding gives {ids} for 'Hello world', not [15496, 995]")
    return ", ".join(f"{name} sha256 {GPT2_FILES[name][:12]}…" for name in sorted(GPT2_FILES))


def run_probe(*, gpu: bool, pins: dict[str, str], source: str | None = None) -> dict[str, Any]:
    """source: the sha256 (source_digest) of the harness that will run the image's stages;
    the image's own harness must match it (None: not checked, as in Apptainer's %test)."""
    probe = Probe()
    probe.check("python", _python)
    probe.facts["python"] = platform.python_version()
    # Every stage process imports only harness.runtime: the pretrain stage runs the spliced
    # script through its launch and guard, the pre-flight through its orchestrator, inside the
    # image. An image built from an older harness lacks them and fails every attempt late.
    if probe.check("harness", _imports(RUNTIME_MODULES)):
        probe.facts["harness"] = _version(DIST)
        # The host reads what the image's stages write (their records, audits, memory
        # reports): an image built from an older tree runs an older protocol, and fails or
        # misleads late. Caught here, before a stage starts, as ours.
        if source is not None:
            probe.check("harness-source", _source(source))
    if probe.check("torch", lambda: _torch(probe, gpu)) and gpu:
        probe.check("cuda", _cuda)
        probe.check("nccl", _nccl)
    probe.check("numpy", _imports(["numpy"]))
    for name, version in sorted(pins.items()):
        probe.check(f"pin:{name}", _pin(name, version))
    probe.check("lm-eval", _imports(["lm_eval", "harness.runtime.lmeval_run",
                                     "harness.runtime.lmeval_model"]))
    probe.check("tokenizer", _tokenizer)
    missing = [c["id"] for c in probe.checks if not c["ok"]]
    return {"ok": not missing, "missing": missing, "gpu": gpu, "facts": probe.facts,
            "checks": probe.checks}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.runtime.image_probe", description=__doc__)
    p.add_argument("--gpu", action="store_true", help="also require CUDA devices and NCCL")
    p.add_argument("--pin", action="append", default=None, metavar="NAME==VERSION",
                   help="a version the image must have (default: the harness's own pins)")
    p.add_argument("--source-sha256", default=None, metavar="H",
                   help="the sources sha256 of the harness that will run this image's stages: "
                        "the image's own harness must be the same")
    args = p.parse_args(argv)
    pins = declared_pins() if args.pin is None else dict(
        (n.strip(), v.strip()) for n, _, v in (s.partition("==") for s in args.pin))
    report = run_probe(gpu=args.gpu, pins=pins, source=args.source_sha256)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
