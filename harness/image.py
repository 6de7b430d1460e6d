"""`harness image build|check`: the container image the stages run in.

build: a wheelhouse is made on this host — the harness's own wheel (this working tree) plus
every package of its runtime dependency closure at the exact version installed here (so the
image runs what the tests ran), torch from /opt/wheels when a local wheel is there, nothing
for torch when the base image already has it (a CUDA PyTorch base on clusters) — and
containers/Dockerfile installs from it with `pip install --no-index`, with the build's
network switched off. No network is needed in the image at build or run time.

check (harness.runners.docker.check_image, since the docker runner checks each image before
its first stage with it): `python -m harness.runtime.image_probe` inside the image (network
none, read-only, non-root) reports python, torch (CUDA and NCCL with --gpu), lm-eval at the
task's pin and the offline tokenizer files with their hashes; anything missing exits 2,
before any attempt is charged.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import __version__
from harness.envinfo import DIST, project_requirements
from harness.errors import InfraError, UserError
from harness.runners.config import DockerSettings

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "containers" / "Dockerfile"
# A CUDA PyTorch image; pick the tag whose CUDA your cluster's driver supports
# (containers/README.md). CI builds from a local Debian base instead (scripts/ci_docker.sh).
DEFAULT_BASE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
LOCAL_WHEELS = Path("/opt/wheels")
WHEEL_CACHE = REPO / "build" / "wheelhouse"
LABEL = "org.bitlinear-harness"
# Printed by the base image's python: its version and whether it has torch already.
BASE_PROBE = (
    "import json, sys, importlib.metadata as m\n"
    "try:\n    torch = m.version('torch')\nexcept m.PackageNotFoundError:\n    torch = None\n"
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'torch': torch}))\n")

Say = Callable[[str], None]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- what goes into the image ---------------------------------------------------------------

def pinned_closure(roots: Iterable[str], *, skip: Iterable[str] = ()) -> dict[str, str]:
    """Every distribution the requirements pull in, transitively (markers evaluated for this
    interpreter), with the version installed here: canonical name -> version. `skip` names
    are left out with their own dependencies. A requirement not installed here is a UserError:
    the wheelhouse pins what this environment has."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    skipped = {canonicalize_name(s) for s in skip}
    found: dict[str, str] = {}
    done: dict[str, frozenset[str]] = {}
    todo: list[tuple[str, frozenset[str], str]] = [(r, frozenset(), DIST) for r in roots]
    while todo:
        line, extras, parent = todo.pop()
        req = Requirement(line)
        if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        name = canonicalize_name(req.name)
        if name in skipped:
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"{req.name} (required by {parent}) is not installed here",
                            fix="install the harness first (make install, or pip install -e .): "
                                "the image pins the versions of this environment") from None
        # A package comes back with new extras (fsspec, then fsspec[http]): their deps too.
        wanted = (frozenset(req.extras) | {""}) - done.get(name, frozenset())
        found[name] = version
        if not wanted:
            continue
        done[name] = done.get(name, frozenset()) | wanted
        for sub in importlib.metadata.requires(req.name) or []:
            todo.append((sub, wanted, req.name))
    return dict(sorted(found.items()))


def _have_wheel(cache: Path, name: str, version: str) -> Path | None:
    from packaging.tags import sys_tags
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    from packaging.version import Version

    supported = set(sys_tags())
    for path in cache.glob("*.whl"):
        try:
            wname, wversion, _, tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        if wname == name and wversion == Version(version) and tags & supported:
            return path
    return None


def _pip(args: list[str], say: Say) -> None:
    import subprocess

    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"pip failed: {' '.join(args[:2])} ...", details=proc.stderr[-3000:],
                        fix="the wheelhouse is made on this host: pip needs the package index "
                            "(or --wheelhouse DIR with wheels made elsewhere)")


def make_wheelhouse(dest: Path, pins: dict[str, str], *, cache: Path = WHEEL_CACHE,
                    find_links: Iterable[Path] = (), say: Say = _say) -> list[Path]:
    """One wheel per pin into dest, plus requirements.txt naming them all exactly. Wheels
    already in `cache` are reused; the rest are fetched (or built) by pip into it."""
    cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    links = [f"--find-links={p}" for p in find_links if p.is_dir()]
    missing = [f"{n}=={v}" for n, v in pins.items() if _have_wheel(cache, n, v) is None]
    if missing:
        say(f"image: fetching {len(missing)} wheels into {cache}")
        _pip(["wheel", "--no-deps", "--quiet", f"--wheel-dir={cache}", *links, *missing], say)
    wheels = []
    for name, version in pins.items():
        have = _have_wheel(cache, name, version)
        if have is None:
            raise UserError(f"no wheel of {name}=={version} after pip wheel", where=str(cache))
        target = dest / have.name
        try:
            os.link(have, target)
        except OSError:
            shutil.copyfile(have, target)
        wheels.append(target)
    lines = [f"{n}=={v}" for n, v in pins.items()]
    (dest / "requirements.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return wheels


def harness_wheel(dest: Path, say: Say = _say) -> Path:
    """The harness's own wheel, built from this working tree (uncommitted changes included;
    the image's git label says so)."""
    say("image: building the harness wheel from this working tree")
    _pip(["wheel", "--no-deps", "--quiet", f"--wheel-dir={dest}", str(REPO)], say)
    (wheel,) = dest.glob("*.whl")
    return wheel


# --- docker ---------------------------------------------------------------------------------

def docker_client(settings: DockerSettings | None = None) -> Any:
    from harness.runners.base import RunnerError
    from harness.runners.docker import DockerRunner

    try:
        return DockerRunner(settings or DockerSettings()).client()
    except RunnerError as e:
        raise InfraError(str(e)) from None


def base_facts(client: Any, base: str, python: str, say: Say = _say) -> dict[str, Any]:
    """The base image's Python version and torch (None when it has none); pulls it when it
    is not on this host and a registry answers."""
    import docker.errors

    try:
        client.images.get(base)
    except docker.errors.ImageNotFound:
        say(f"image: base {base} is not on this host, pulling it")
        try:
            client.images.pull(base)
        except docker.errors.DockerException as e:
            raise UserError(f"the base image {base!r} is not on this Docker host and could not "
                            f"be pulled: {str(e).splitlines()[0]}",
                            fix="pull it where a registry answers (docker save | docker load), "
                                "or build the local Debian base: scripts/ci_docker.sh") from None
    try:
        out = client.containers.run(base, [python, "-c", BASE_PROBE], network_mode="none",
                                    remove=True, stdout=True, stderr=True, user="0:0")
    except docker.errors.DockerException as e:
        raise UserError(f"the base image {base!r} cannot run {python}: {str(e).splitlines()[0]}",
                        fix="the base needs a Python >= 3.10 (pass --python if it is not "
                            "python3)") from None
    facts: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return facts


def _git_label() -> str:
    from harness.envinfo import git_state

    state = git_state()
    return f"{state['commit'] or 'unknown'}{'-dirty' if state['dirty'] else ''}"


@dataclass
class Built:
    tag: str
    image_id: str
    base: str
    seconds: float
    torch: str
    wheels: int
    log: list[str] = field(default_factory=list)


def build_image(*, base: str = DEFAULT_BASE, tag: str = DockerSettings.image,
                python: str = "python3", wheelhouse: Path | None = None,
                say: Say = _say) -> Built:
    """Build the image from containers/Dockerfile; see the module docstring."""
    import docker.errors

    t0 = time.monotonic()
    client = docker_client()
    facts = base_facts(client, base, python, say)
    host_py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    with tempfile.TemporaryDirectory(prefix="harness-image-") as tmp:
        ctx = Path(tmp)
        shutil.copyfile(DOCKERFILE, ctx / "Dockerfile")
        if wheelhouse is not None:
            if not (wheelhouse / "requirements.txt").is_file():
                raise UserError("a wheelhouse needs its requirements.txt", where=str(wheelhouse))
            shutil.copytree(wheelhouse, ctx / "wheelhouse")
            torch_from = "the given wheelhouse"
        else:
            if facts["python"] != host_py:
                raise UserError(
                    f"the base image has Python {facts['python']}, this host {host_py}: "
                    "the wheelhouse holds this host's binary wheels",
                    fix=f"run `harness image build` from a Python {facts['python']} "
                        "environment, or pass --wheelhouse DIR made with one")
            skip = ["torch"] if facts.get("torch") else []
            torch_from = (f"the base image (torch {facts['torch']})" if skip
                          else f"this host's torch {importlib.metadata.version('torch')}")
            pins = pinned_closure(project_requirements(), skip=skip)
            make_wheelhouse(ctx / "wheelhouse", pins, find_links=[LOCAL_WHEELS], say=say)
        # Apart from its dependencies: a change to the harness alone rebuilds one small layer.
        harness_wheel(ctx / "harness-wheel", say)
        wheels = len(list((ctx / "wheelhouse").glob("*.whl"))) + 1
        say(f"image: building {tag} from {base} ({wheels} wheels, torch from {torch_from})")
        labels = {f"{LABEL}.version": __version__, f"{LABEL}.git": _git_label(),
                  f"{LABEL}.base": base, f"{LABEL}.torch": torch_from}
        log: list[str] = []
        try:
            for chunk in client.api.build(path=str(ctx), tag=tag, rm=True, forcerm=True,
                                          pull=False, network_mode="none", decode=True,
                                          buildargs={"BASE": base, "PYTHON": python},
                                          labels=labels):
                if "error" in chunk:
                    raise UserError(f"docker build failed: {chunk['error'].strip()}",
                                    details="\n".join(log[-40:]))
                text = str(chunk.get("stream", "")).rstrip()
                if text:
                    log.extend(text.splitlines())
                    if text.startswith("Step "):
                        say(f"image: {text}")
        except docker.errors.DockerException as e:
            raise InfraError(f"docker build failed: {e}") from None
    image = client.images.get(tag)
    return Built(tag, image.id, base, time.monotonic() - t0, torch_from, wheels, log)
