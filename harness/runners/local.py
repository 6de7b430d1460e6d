"""Local runner: a subprocess in its own process group, killed whole on timeout.

Not a sandbox: the stage runs with this user's rights. It scrubs the environment
and bounds the time; untrusted code belongs in the container runners.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from harness.runners.base import StageRun, StageSpec

# Only these variables reach a stage: no tokens, keys or cloud credentials.
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
KILL_GRACE_S = 10.0


def scrubbed_env(extra: dict[str, str]) -> dict[str, str]:
    # NCCL_/NVSHMEM_ settings and TORCH_SYMM_MEM_DISABLE_MULTICAST pass through: clusters
    # switch features such as NVLink multicast off with them, and a stage must keep that.
    env = {k: v for k, v in os.environ.items()
           if k in PASS_ENV or k.startswith(("NCCL_", "NVSHMEM_"))
           or k == "TORCH_SYMM_MEM_DISABLE_MULTICAST"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
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


class LocalRunner:
    name = "local"

    def run(self, spec: StageSpec) -> StageRun:
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        out_path, err_path = spec.log_dir / "stdout.log", spec.log_dir / "stderr.log"
        t0 = time.monotonic()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                proc = subprocess.Popen(list(spec.argv), cwd=spec.cwd, stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, env=scrubbed_env(spec.env),
                                        start_new_session=True)
            except OSError as e:
                return StageRun(None, False, False, 0.0, out_path, err_path,
                                error=f"could not start {spec.argv[0]}: {e.strerror}")
            try:
                rc: int | None = proc.wait(timeout=spec.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, timed_out = proc.returncode, True
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM to us): never leave the stage running.
                _kill_group(proc)
                raise
        return StageRun(rc, True, timed_out, time.monotonic() - t0, out_path, err_path)
