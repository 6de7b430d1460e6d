"""Fault injection through the slurm runner (issue #24; -m slurm, scripts/ci_slurm.sh).

SIGKILL from outside, at a moment drawn from a seeded random source, of the harness, of a rank
worker of the stage's job (by its pid: the one-node cluster runs jobs on this host), of the
job's top process (what its `timeout` started) and of the whole job (`scancel --signal=KILL
--full`); then `harness recover`, nothing of the test left in `squeue` or running, nothing
lost, nothing charged for our failure, `harness audit` clean.
What is drawn, what is checked and how to replay a case: tests/faults.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.faults import Draw, cases, run_case
from tests.security.test_fault_injection import data_root as smoke_data_root  # noqa: F401

pytestmark = pytest.mark.slurm

TARGETS = ("harness", "rank", "launcher", "job")
EXPLICIT = (
    # The harness killed during the pre-flight (once a leak, tests/faults.py), whatever the
    # seed draws.
    Draw("slurm", "harness", "preflight", 0.25, 0, None),
    # torchrun killed mid-training: proctrack/linuxproc loses its ranks, which trained on into
    # the closed (or resumed) attempt until SlurmRunner.cleanup killed them by SLURM_JOB_ID.
    Draw("slurm", "launcher", "pretrain", 0.5, 0, None),
)


class SlurmProbe:
    name = "Slurm"

    def __init__(self, config: Path) -> None:
        self.runner_args: tuple[str, ...] = ("--runner", "slurm", "--config", str(config))

    def _jobs(self, runs: Path) -> list[tuple[str, str, str]]:
        """(id, name, state) of the queue's jobs (pending, running, completing) whose working
        directory is under runs: the stages' jobs and the pre-flight's."""
        got = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T|%Z"], capture_output=True,
                             text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        rows = [line.split("|", 3) for line in got.stdout.splitlines() if line.count("|") == 3]
        return [(i, n, s) for i, n, s, folder in rows if folder.startswith(f"{runs}/")]

    def active(self, runs: Path, stage: str) -> bool:
        return any(n.endswith(f"-{stage}") and s == "RUNNING" for _, n, s in self._jobs(runs))

    def running_unit(self, runs: Path) -> str | None:
        found = [i for i, _, s in self._jobs(runs) if s == "RUNNING"]
        return found[0] if found else None

    def kill_unit(self, unit: int | str) -> None:
        """SIGKILL to every process of the job, as an operator's `scancel --signal=KILL`."""
        got = subprocess.run(["scancel", "--signal=KILL", "--full", str(unit)], capture_output=True,
                             text=True, timeout=60)
        if got.returncode != 0:
            raise ProcessLookupError(got.stderr)  # it ended between the look and the kill

    def leftovers(self, runs: Path) -> list[str]:
        return [f"{i} {n} {s}" for i, n, s in self._jobs(runs)]

    def remove(self, runs: Path) -> None:
        ids = [i for i, _, _ in self._jobs(runs)]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


@pytest.mark.parametrize("case", cases("slurm", TARGETS, EXPLICIT))
def test_a_sigkill_from_outside_leaves_nothing_lost_charged_or_running(
        case: Draw, tmp_path: Path, smoke_data_root: Path, config: Path  # noqa: F811
        ) -> None:
    run_case(tmp_path / "home", smoke_data_root, case, SlurmProbe(config),
             "tests/slurm/test_slurm_faults.py")
