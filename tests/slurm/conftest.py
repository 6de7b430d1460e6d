"""Shared by the tests that need a one-node Slurm cluster (pytest -m slurm; scripts/ci_slurm.sh
sets it up). Without a cluster these tests fail loudly: they are never skipped."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    states = sh("sinfo", "-h", "-o", "%t")
    assert re.search(r"idle|mix|alloc", states), (
        f"no usable Slurm node (sinfo: {states!r}): run scripts/ci_slurm.sh")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The slurm runner with a fast poller: the tests' jobs are seconds long."""
    path = tmp_path_factory.mktemp("config") / "harness.toml"
    path.write_text('[runner]\nkind = "slurm"\n\n[runner.slurm]\npoll_s = 0.25\n'
                    'max_poll_s = 1.0\ntime_margin_s = 120\n')
    return path
