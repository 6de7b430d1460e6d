"""Apptainer runner: the stage inside a SIF image, with the Docker runner's mount policy.

`command(spec)` is the whole `apptainer exec` line, pure, so Slurm can wrap it and golden
files can pin it. Apptainer does not run on the CI machine (not packaged for its Debian);
the line is tested by golden files, and the process handling is the local runner's.

The policy: `--containall` (no host home, /tmp, IPC or PID namespace sharing), `--cleanenv`
plus the stage's scrubbed variables as `--env`, `--net --network none` (no network),
`--no-privs`, the image read-only (a SIF is), the stage's output folder the only writable
bind, its inputs bound read-only at the same paths, `--nv` only when the stage wants GPUs.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

from harness.runners.base import Exit, Job, RunnerError, StagedRunner, StageSpec
from harness.runners.config import ApptainerSettings
from harness.runners.local import LocalRunner, container_env

# Host-specific variables that must not leak into the image's own environment.
HOST_ONLY = ("PATH", "HOME", "LD_LIBRARY_PATH", "TMPDIR")


def _bind(source: Path, target: str, writable: bool) -> str:
    # --bind splits on ',' and ':': such paths cannot be expressed, so say so clearly.
    for part in (str(source), target):
        if "," in part or ":" in part:
            raise RunnerError(f"apptainer cannot bind a path containing ',' or ':': {part!r}; "
                              f"move the runs or data folder to a path without them")
    return f"{source}:{target}:{'rw' if writable else 'ro'}"


def stage_env(spec: StageSpec) -> dict[str, str]:
    # --nv shows every host GPU; CUDA_VISIBLE_DEVICES (host numbering) narrows it to a lease.
    leased = {"CUDA_VISIBLE_DEVICES": ",".join(spec.devices)} if spec.devices else {}
    return container_env({**spec.env, **leased}, drop=HOST_ONLY,
                         inside={"HOME": "/tmp", "TMPDIR": "/tmp"})


def command(spec: StageSpec, settings: ApptainerSettings) -> list[str]:
    """The full argv that runs `spec` in the image."""
    argv = [settings.executable, "exec", "--containall", "--cleanenv", "--no-privs",
            "--net", "--network", "none", "--pwd", str(spec.cwd)]
    if spec.gpus > 0:
        argv.append("--nv")
    # Parents before children: a later bind over a parent would hide the nested one (the
    # writable output folder lives inside the read-only attempt folder).
    for mount in sorted(spec.mounts, key=lambda m: len(Path(m.target).parts)):
        argv += ["--bind", _bind(mount.source, mount.target, mount.writable)]
    for key, value in sorted(stage_env(spec).items()):
        argv += ["--env", f"{key}={value}"]
    inner = list(spec.argv)
    if inner and inner[0] == sys.executable:
        inner[0] = settings.python
    return [*argv, settings.image, *inner]


class ApptainerRunner(StagedRunner):
    name = "apptainer"
    host_devices = True  # starts stages on this host: they lease its GPUs (leases.py)

    def __init__(self, settings: ApptainerSettings) -> None:
        self.settings = settings
        self._local = LocalRunner()
        self._digest: tuple[float, str] | None = None  # (mtime, sha256) of the image

    def image_sha256(self) -> str:
        # Hashing a multi-GB SIF takes seconds: once per image version, not per stage.
        from harness.runtime.fileio import sha256_file

        mtime = Path(self.settings.image).stat().st_mtime
        if self._digest is None or self._digest[0] != mtime:
            self._digest = (mtime, sha256_file(Path(self.settings.image)))
        return self._digest[1]

    def command(self, spec: StageSpec) -> list[str]:
        return command(spec, self.settings)

    def prepare(self, spec: StageSpec) -> None:
        if shutil.which(self.settings.executable) is None:
            raise RunnerError(f"{self.settings.executable} is not on PATH: install Apptainer, "
                              f"or choose another runner (--runner docker|local)")
        if not Path(self.settings.image).is_file():
            raise RunnerError(f"image {self.settings.image} is missing: build it with "
                              f"`apptainer build {self.settings.image} containers/apptainer.def`")

    def launch(self, spec: StageSpec) -> Job:
        job = self._local.launch(replace(spec, argv=tuple(self.command(spec))))
        job.info.update(image=self.settings.image, image_sha256=self.image_sha256())
        return job

    def poll(self, job: Job) -> Exit | None:
        return self._local.poll(job)

    def kill(self, job: Job) -> Exit:
        return self._local.kill(job)

    def cleanup(self, job: Job) -> None:
        self._local.cleanup(job)
