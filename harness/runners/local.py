"""Local runner: a subprocess in its own process group, killed whole on timeout.

NOT A SANDBOX: the stage runs with this user's rights, can read what this user can read and
reach the network. It scrubs the environment of secrets, bounds the time, memory, file sizes
and open files ([runner.local] in harness.toml) and drops core dumps; what stops an untrusted
submission here is only the static policy and the run-time checks (docs/security.md).
Untrusted code belongs in the docker or apptainer runner.
"""

from __future__ import annotations

import os
import resource
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO

from harness.runners.base import Exit, Job, RunnerError, StagedRunner, StageSpec
from harness.runners.config import LocalSettings
from harness.runtime.procs import STAGE_TOKEN_ENV, kill_tagged, kill_tree, outside_signal

NOT_A_SANDBOX = ("note: the local runner is not a sandbox; run submissions you do not trust "
                 "with --runner docker (or apptainer), see docs/security.md")
_GB = 1 << 30

# Only these variables reach a stage: no tokens, keys or cloud credentials.
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")


def scrubbed_env(extra: dict[str, str]) -> dict[str, str]:
    # NCCL_/NVSHMEM_ settings and TORCH_SYMM_MEM_DISABLE_MULTICAST pass through: clusters
    # switch features such as NVLink multicast off with them, and a stage must keep that.
    env = {k: v for k, v in os.environ.items()
           if k in PASS_ENV or k.startswith(("NCCL_", "NVSHMEM_"))
           or k == "TORCH_SYMM_MEM_DISABLE_MULTICAST"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def container_env(extra: dict[str, str], *, drop: tuple[str, ...],
                  inside: dict[str, str]) -> dict[str, str]:
    """A stage's environment inside an image: the scrubbed host variables less `drop` (host
    values that mean nothing there), the stage's own, then the container's `inside` values."""
    env = {k: v for k, v in scrubbed_env({}).items() if k not in drop}
    env.update(extra)
    env.update(inside)
    return env


def outside_kill(returncode: int | None) -> str | None:
    name = outside_signal(returncode)
    return None if name is None else (
        f"the stage was killed by {name} from outside the harness (an operator or the "
        f"out-of-memory killer)")


def rlimits(settings: LocalSettings) -> dict[int, int]:
    """resource id -> soft and hard limit, for the stage's processes."""
    limits = {resource.RLIMIT_NOFILE: settings.open_files,
              resource.RLIMIT_FSIZE: int(settings.file_size_gb * _GB)}
    if not settings.core_dumps:
        limits[resource.RLIMIT_CORE] = 0
    if settings.memory_gb > 0:
        limits[resource.RLIMIT_DATA] = int(settings.memory_gb * _GB)
    return limits


def _limiter(limits: dict[int, int]) -> Callable[[], None]:
    def apply() -> None:  # in the child, between fork and exec
        for which, value in limits.items():
            hard = resource.getrlimit(which)[1]
            cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (cap, cap))
    return apply


def _visible(spec: StageSpec) -> dict[str, str]:
    """The leased GPUs, when the stage holds a lease: it sees those alone."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(spec.devices)} if spec.devices else {}


def warn_not_a_sandbox() -> None:
    """The loud note, on stderr, for commands that run a submission with the local runner."""
    print(NOT_A_SANDBOX, file=sys.stderr)


class LocalRunner(StagedRunner):
    name = "local"
    host_devices = True  # starts stages on this host: they lease its GPUs (leases.py)

    def __init__(self, settings: LocalSettings | None = None) -> None:
        self.settings = settings or LocalSettings()
        self._procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]] = {}
        self._tokens: dict[str, str] = {}

    def launch(self, spec: StageSpec) -> Job:
        out_path, err_path = self.logs(spec)
        out, err = out_path.open("wb"), err_path.open("wb")
        token = secrets.token_hex(16)
        env = scrubbed_env({**spec.env, STAGE_TOKEN_ENV: token, **_visible(spec)})
        try:
            proc = subprocess.Popen(list(spec.argv), cwd=spec.cwd, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                    pass_fds=spec.inherit_fds,
                                    preexec_fn=_limiter(rlimits(self.settings)))
        except OSError as e:
            out.close()
            err.close()
            raise RunnerError(f"could not start {spec.argv[0]}: {e.strerror}") from e
        self._procs[str(proc.pid)] = (proc, out, err)
        self._tokens[str(proc.pid)] = token
        s = self.settings
        return Job(spec, str(proc.pid), time.monotonic(),
                   {"pid": proc.pid, "sandbox": False,
                    "limits": {"memory_gb": s.memory_gb, "file_size_gb": s.file_size_gb,
                               "open_files": s.open_files}})

    def poll(self, job: Job) -> Exit | None:
        rc = self._procs[job.handle][0].poll()
        return None if rc is None else Exit(rc, infra=outside_kill(rc))

    def kill(self, job: Job) -> Exit:
        proc = self._procs[job.handle][0]
        # SIGTERM to the group (torchrun's handler stops its ranks), then SIGKILL to all.
        kill_tree(proc, term_descendants=False)
        kill_tagged(self._tokens[job.handle])
        return Exit(proc.returncode)

    def cleanup(self, job: Job) -> None:
        proc, out, err = self._procs.pop(job.handle)
        if proc.poll() is None:
            kill_tree(proc, term_descendants=False)
        # Before the stage's files are read and hashed: nothing of it may still write.
        kill_tagged(self._tokens.pop(job.handle))
        out.close()
        err.close()
