"""Fault injection through the docker runner (issue #24; -m docker, scripts/ci_docker.sh).

SIGKILL from outside, at a moment drawn from a seeded random source, of the harness, of a rank
worker inside the stage's container (by its host pid), of the container's top process and of
the container itself (`docker kill`); then `harness recover`, nothing of the test left running
or in `docker ps -a`, nothing lost, nothing charged for our failure, `harness audit` clean.
What is drawn, what is checked and how to replay a case: tests/faults.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.runners.docker import LABEL
from tests.faults import Draw, cases, run_case
from tests.security.test_fault_injection import data_root as smoke_data_root  # noqa: F401

pytestmark = pytest.mark.docker

TARGETS = ("harness", "rank", "launcher", "container")
# The harness killed during the pre-flight (once a leak, tests/faults.py), whatever the
# seed draws.
EXPLICIT = (Draw("docker", "harness", "preflight", 0.25, 0, None),)


class DockerProbe:
    name = "docker"

    def __init__(self, client: Any, image: str) -> None:
        self.client = client
        self.runner_args: tuple[str, ...] = ("--runner", "docker", "--image", image)

    def _mine(self, runs: Path, *, every: bool = False, stage: str | None = None) -> list[Any]:
        filters: dict[str, Any] = {"label": f"{LABEL}.job"}
        if stage is not None:
            filters["label"] = [f"{LABEL}.job", f"{LABEL}.stage={stage}"]
        if not every:
            filters["status"] = "running"
        found = self.client.containers.list(all=every, filters=filters)
        return [c for c in found
                if str(c.labels.get(f"{LABEL}.attempt_dir", "")).startswith(f"{runs}/")]

    def active(self, runs: Path, stage: str) -> bool:
        return bool(self._mine(runs, stage=stage))

    def running_unit(self, runs: Path) -> str | None:
        found = self._mine(runs)
        return str(found[0].name) if found else None

    def kill_unit(self, unit: int | str) -> None:
        got = subprocess.run(["docker", "kill", str(unit)], capture_output=True, text=True,
                             timeout=60)
        if got.returncode != 0:
            raise ProcessLookupError(got.stderr)  # it stopped between the look and the kill

    def leftovers(self, runs: Path) -> list[str]:
        """`docker ps -a`, as an operator would look: every container, stopped ones too."""
        got = subprocess.run(["docker", "ps", "-a", "--filter", f"label={LABEL}.job",
                              "--format", f'{{{{.Names}}}}\t{{{{.Label "{LABEL}.attempt_dir"}}}}'],
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        rows = [line.split("\t", 1) for line in got.stdout.splitlines() if "\t" in line]
        return [name for name, folder in rows if folder.startswith(f"{runs}/")]

    def remove(self, runs: Path) -> None:
        for c in self._mine(runs, every=True):
            c.remove(force=True)


@pytest.mark.parametrize("case", cases("docker", TARGETS, EXPLICIT))
def test_a_sigkill_from_outside_leaves_nothing_lost_charged_or_running(
        case: Draw, tmp_path: Path, smoke_data_root: Path, image: str,  # noqa: F811
        docker_client: Any) -> None:
    run_case(tmp_path / "home", smoke_data_root, case, DockerProbe(docker_client, image),
             "tests/docker/test_docker_faults.py")
