"""A runner on this host, with its stages' devices leased (harness/leases.py).

Wraps the local, docker or apptainer runner: before a stage launches it takes `spec.gpus`
GPUs of the host's pool (and, when [runner.leases] cpu_slots is set, `spec.procs` CPU slots
for a CPU stage), waiting in the queue while there are too few, and hands the stage exactly
those; the lease is released when the stage ends and recorded in its runner info
(`result.json`: stages.<name>.runner.lease and each segment's lease).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from harness.leases import (
    LeaseCancelled,
    LeaseError,
    Pool,
    default_dir,
    host_gpus,
    say_on_stderr,
)
from harness.runners.base import Runner, StageRun, StageSpec
from harness.runners.config import LeaseSettings


class LeasedRunner:
    def __init__(self, inner: Runner, settings: LeaseSettings) -> None:
        self.inner = inner
        self.name = inner.name
        self.lease_settings = settings
        root = Path(settings.dir) if settings.dir else default_dir()
        self._root = root
        self._gpus: Pool | None = None

    def __getattr__(self, attr: str) -> object:
        # What else callers use of the runner (docker's image, slurm's cancel...) is its own.
        return getattr(self.inner, attr)

    def pool(self, spec: StageSpec) -> tuple[Pool, int] | None:
        """The pool the stage leases from and how many slots, or None for no lease."""
        if not self.lease_settings.enabled:
            return None
        if spec.gpus > 0:
            if self._gpus is None:  # nvidia-smi once per process, and only when asked
                gpus = host_gpus(self.lease_settings.gpus or None)
                self._gpus = Pool(self._root, "gpu", gpus) if gpus else None
            return None if self._gpus is None else (self._gpus, spec.gpus)
        if self.lease_settings.cpu_slots > 0 and spec.procs > 0:
            slots = tuple(str(i) for i in range(self.lease_settings.cpu_slots))
            return Pool(self._root, "cpu", slots), spec.procs
        return None

    def run(self, spec: StageSpec) -> StageRun:
        chosen = self.pool(spec)
        if chosen is None:
            return self.inner.run(spec)
        pool, n = chosen
        out, err = spec.log_dir / "stdout.log", spec.log_dir / "stderr.log"
        cancel = spec.cancel_file
        try:
            with pool.hold(n, spec.job_name or spec.name, say=say_on_stderr,
                           cancelled=lambda: cancel is not None and cancel.exists()) as lease:
                devices = lease.slots if pool.name == "gpu" else ()
                run = self.inner.run(replace(spec, devices=devices, inherit_fds=lease.fds))
        except LeaseError as e:
            return StageRun(None, False, False, 0.0, out, err, error=str(e))
        except LeaseCancelled as e:
            return StageRun(None, False, False, 0.0, out, err, error=str(e), cancelled=True)
        done = replace(lease, released_at=time.time())
        return replace(run, info={**run.info, "lease": done.to_json()})

