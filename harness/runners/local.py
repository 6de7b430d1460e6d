"""Local runner: a subprocess in its own process group, killed whole on timeout.

Not a sandbox: the stage runs with this user's rights. It scrubs the environment, bounds the
time and (optionally) the address space and process count; untrusted code belongs in the
container runners.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import IO

from harness.runners.base import Exit, Job, RunnerError, StagedRunner, StageSpec

# Only these variables reach a stage: no tokens, keys or cloud credentials.
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
KILL_GRACE_S = 10.0
# The top process (torchrun) dying of these was someone else's doing: the stage's own code
# cannot signal it (the static rules refuse os, signal and subprocess).
OUTSIDE_SIGNALS = {signal.SIGKILL: "SIGKILL", signal.SIGTERM: "SIGTERM",
                   signal.SIGINT: "SIGINT", signal.SIGHUP: "SIGHUP"}


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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def outside_kill(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        name = OUTSIDE_SIGNALS.get(signal.Signals(-returncode))
    except ValueError:
        return None
    return None if name is None else (
        f"the stage was killed by {name} from outside the harness (an operator or the "
        f"out-of-memory killer)")


class LocalRunner(StagedRunner):
    name = "local"

    def __init__(self) -> None:
        self._procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]] = {}

    def launch(self, spec: StageSpec) -> Job:
        out_path, err_path = self.logs(spec)
        out, err = out_path.open("wb"), err_path.open("wb")
        try:
            proc = subprocess.Popen(list(spec.argv), cwd=spec.cwd, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, env=scrubbed_env(spec.env),
                                    start_new_session=True)
        except OSError as e:
            out.close()
            err.close()
            raise RunnerError(f"could not start {spec.argv[0]}: {e.strerror}") from e
        self._procs[str(proc.pid)] = (proc, out, err)
        return Job(spec, str(proc.pid), time.monotonic(), {"pid": proc.pid})

    def poll(self, job: Job) -> Exit | None:
        rc = self._procs[job.handle][0].poll()
        return None if rc is None else Exit(rc, infra=outside_kill(rc))

    def kill(self, job: Job) -> Exit:
        proc = self._procs[job.handle][0]
        _kill_group(proc)
        return Exit(proc.returncode)

    def cleanup(self, job: Job) -> None:
        proc, out, err = self._procs.pop(job.handle)
        if proc.poll() is None:
            _kill_group(proc)
        out.close()
        err.close()
