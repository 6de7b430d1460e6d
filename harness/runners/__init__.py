"""Runners execute one stage command somewhere — a local process, a Docker or Apptainer
container, a Slurm job — and report how it ended, with infra failures told apart from the
submission's own (harness.runners.base has the contract)."""

from __future__ import annotations

from harness.runners.base import Runner
from harness.runners.config import RunnerConfig


def make_runner(config: RunnerConfig) -> Runner:
    """The runner a config names; imports only what that runner needs. A runner that starts
    stages on this host leases them its GPUs (harness/runners/leased.py); Slurm allocates."""
    from harness.runners.leased import LeasedRunner

    if config.kind == "docker":
        from harness.runners.docker import DockerRunner

        return LeasedRunner(DockerRunner(config.docker), config.leases)
    if config.kind == "apptainer":
        from harness.runners.apptainer import ApptainerRunner

        return LeasedRunner(ApptainerRunner(config.apptainer), config.leases)
    if config.kind == "slurm":
        from harness.runners.apptainer import ApptainerRunner
        from harness.runners.slurm import SlurmRunner

        wrap = ApptainerRunner(config.apptainer) if config.slurm.wrap == "apptainer" else None
        return SlurmRunner(config.slurm, wrap=wrap)
    from harness.runners.local import LocalRunner

    return LeasedRunner(LocalRunner(config.local), config.leases)
