"""A session test's pre-flight belongs to the test (issue #24): it runs in the test's folder
(`preflight/`), under the test's id (`harness-<attempt id>-preflight`), after the test's record
exists, so that a harness that dies meanwhile, a pre-flight our side ended, and `harness cancel`
each leave the test recorded and nothing running. Here with the local runner, for real (the
docker and Slurm cases: tests/docker/test_docker_faults.py, tests/slurm/test_slurm_faults.py,
which pin the same kill with their EXPLICIT cases).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from harness.audit import audit
from harness.ledger import Ledger
from harness.record import Status
from tests.conftest import PYTHON, REPO
from tests.faults import Draw, run_case, stage_processes, start
from tests.security.test_fault_injection import data_root as smoke_data_root  # noqa: F401

pytestmark = pytest.mark.slow


class LocalProbe:
    """The local runner has no units of its own (no container, no job): its stages are this
    host's processes, which tests/faults.py already looks for by the test's folder."""

    name = "local"
    runner_args: tuple[str, ...] = ("--runner", "local")

    def active(self, runs: Path, stage: str) -> bool:
        return any(f"/{stage}" in a for argv in stage_processes(runs).values() for a in argv)

    def running_unit(self, runs: Path) -> str | None:
        return None

    def kill_unit(self, unit: int | str) -> None:
        raise ProcessLookupError(unit)

    def leftovers(self, runs: Path) -> list[str]:
        return []

    def remove(self, runs: Path) -> None:
        return None


@pytest.mark.parametrize("case", [
    # The harness dies while its test's pre-flight runs: recover stops the pre-flight and
    # closes the record written before it started.
    Draw("local", "harness", "preflight", 0.25, 0, None),
    # The pre-flight's own top process is killed from outside: ours, free, and recorded.
    Draw("local", "launcher", "preflight", 0.25, 0, None),
], ids=lambda d: d.id)
def test_a_kill_during_the_preflight_leaves_the_test_recorded_and_nothing_running(
        case: Draw, tmp_path: Path, smoke_data_root: Path) -> None:  # noqa: F811
    run_case(tmp_path / "home", smoke_data_root, case, LocalProbe(),
             "tests/test_preflight_faults.py")


def test_cancel_during_the_preflight_stops_it_and_settles_the_test_cancelled(
        tmp_path: Path, smoke_data_root: Path) -> None:  # noqa: F811
    home = tmp_path / "home"
    run = start(home, smoke_data_root, ("--runner", "local"), preflight=True)
    try:
        deadline = time.monotonic() + 120
        while not (run.root() and stage_processes(run.root() / "preflight")):
            assert time.monotonic() < deadline and not run.done(), run.stderr_tail()
            time.sleep(0.1)
        root = run.root()
        assert root is not None
        row = run.row()
        assert row is not None
        got = subprocess.run([PYTHON, "-m", "harness", "cancel", row.id, "--home", str(home)],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
        assert got.returncode == 0 and "cancel requested" in got.stdout, got.stdout + got.stderr
        assert run.proc.wait(timeout=120) == Status.CANCELLED.exit_code, run.stderr_tail()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert not stage_processes(root), "the pre-flight's processes outlived its cancel"
    with Ledger(home) as ledger:
        (a,) = ledger.attempts(run.sid)
        assert (a.status, a.charged, ledger.used(run.sid)) == (Status.CANCELLED, False, 0)
        assert not audit(ledger, run.sid).tampered
    record = json.loads((root / "result.json").read_text())
    assert record["status"] == Status.CANCELLED.value
    assert "pre-flight" in record["reason"]
    # Its logs stay with the test, hashed into the record; its caches do not.
    assert "preflight/stderr.log" in record["artifacts"]
    assert not (root / "preflight" / ".scratch").exists()
    assert [p.name for p in (home / "runs").iterdir()] == [root.name]
