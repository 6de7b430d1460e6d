"""GPU leases (harness/leases.py, harness/runners/leased.py): a stage takes exactly its GPUs
from the host's free ones, waits in a first-come queue when too few are free, and a dead
holder's lease is free at once. Contention is real: separate processes on real flock(2)s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.leases import LeaseError, Pool
from harness.runners.apptainer import stage_env
from harness.runners.base import StageRun, StageSpec
from harness.runners.config import DockerSettings, LeaseSettings, parse_config
from harness.runners.docker import container_args
from harness.runners.leased import LeasedRunner
from harness.runners.local import LocalRunner
from tests.conftest import REPO, wait_for

# One process: lease n slots of a pool, write when it held them, hold for a while.
HOLDER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from harness.leases import Pool
    root, slots, n, hold_s, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), \\
        float(sys.argv[4]), Path(sys.argv[5])
    pool = Pool(Path(root), "gpu", tuple(slots), poll_s=0.05)
    said = []
    with pool.hold(n, out.stem, say=said.append) as lease:
        t0 = time.time()
        out.with_suffix(".held").write_text("")
        time.sleep(hold_s)
        out.write_text(json.dumps({"slots": lease.slots, "from": t0, "to": time.time(),
                                   "said": said, "positions": lease.queue_positions}))
""")


def holder(tmp: Path, name: str, n: int, hold_s: float,
           slots: str = "0,1,2") -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"{name}.json"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp / "leases"), slots, str(n),
                             str(hold_s), str(out)], cwd=REPO)
    return proc, out


def test_stages_never_share_a_gpu_and_wait_their_turn_in_order(tmp_path: Path) -> None:
    first, a = holder(tmp_path, "a", 2, 1.5)
    wait_for(lambda: a.with_suffix(".held").exists(), 30)
    # b needs 2 of the 1 left: it queues; c (1 GPU) came later and must not jump ahead of b.
    second, b = holder(tmp_path, "b", 2, 0.5)
    time.sleep(0.5)
    third, c = holder(tmp_path, "c", 1, 0.1)
    for p in (first, second, third):
        assert p.wait(60) == 0
    held = {k: json.loads(p.read_text()) for k, p in (("a", a), ("b", b), ("c", c))}
    assert len(held["a"]["slots"]) == 2 and len(held["b"]["slots"]) == 2
    assert held["b"]["from"] >= held["a"]["to"]  # b waited for a's pair
    assert held["c"]["from"] >= held["b"]["from"]  # first come, first served
    assert held["b"]["said"] == ["[lease] waiting for 2 GPU(s) of 3: position 1 in the queue"]
    assert held["c"]["positions"][0] == 2
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        overlap = held[x]["from"] < held[y]["to"] and held[y]["from"] < held[x]["to"]
        assert not (overlap and set(held[x]["slots"]) & set(held[y]["slots"])), (x, y)


def test_a_killed_holder_frees_its_gpus_at_once(tmp_path: Path) -> None:
    proc, a = holder(tmp_path, "a", 3, 600)
    wait_for(lambda: a.with_suffix(".held").exists(), 30)
    pool = Pool(tmp_path / "leases", "gpu", ("0", "1", "2"), poll_s=0.05)
    assert set(pool.holders()) == {"0", "1", "2"}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    t0 = time.monotonic()
    with pool.hold(3, "next") as lease:
        assert lease.slots == ("0", "1", "2")
    assert time.monotonic() - t0 < 5
    assert pool.holders() == {}


def test_a_dead_waiter_leaves_the_queue(tmp_path: Path) -> None:
    proc, a = holder(tmp_path, "a", 3, 600)
    wait_for(lambda: a.with_suffix(".held").exists(), 30)
    waiter, _ = holder(tmp_path, "b", 1, 0.1)
    queue = tmp_path / "leases" / "gpu" / "queue"
    wait_for(lambda: list(queue.glob("*.wait")), 30)
    os.kill(waiter.pid, signal.SIGKILL)
    waiter.wait(30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    # The dead waiter was first in line; a live one behind it is not blocked by it.
    with Pool(tmp_path / "leases", "gpu", ("0", "1", "2"), poll_s=0.05).hold(1, "me") as lease:
        assert lease.waited_s < 5
    assert not list(queue.glob("*.wait"))


def test_a_stage_that_needs_more_than_the_pool_fails_as_ours(tmp_path: Path) -> None:
    with pytest.raises(LeaseError, match=r"needs 4 GPU slot\(s\) but this host's pool has 2"), \
            Pool(tmp_path, "gpu", ("0", "1")).hold(4, "x"):
        pass


class Inner:
    name = "inner"

    def __init__(self) -> None:
        self.seen: list[StageSpec] = []

    def run(self, spec: StageSpec) -> StageRun:
        self.seen.append(spec)
        return StageRun(0, True, False, 0.0, spec.log_dir / "o", spec.log_dir / "e")


def _spec(tmp: Path, gpus: int = 0, procs: int = 0) -> StageSpec:
    return StageSpec(name="pretrain", argv=(sys.executable, "-c", "pass"), cwd=tmp,
                     log_dir=tmp / "out", timeout_s=30, gpus=gpus, procs=procs,
                     job_name="harness-a1-pretrain")


def test_the_leased_runner_hands_the_stage_its_gpus_and_records_the_lease(
        tmp_path: Path) -> None:
    inner = Inner()
    runner = LeasedRunner(inner, LeaseSettings(gpus=("3", "5", "7"), dir=str(tmp_path)))
    run = runner.run(_spec(tmp_path, gpus=2))
    assert inner.seen[0].devices == ("3", "5")
    lease = run.info["lease"]
    assert (lease["pool"], lease["slots"]) == ("gpu", ["3", "5"])
    assert lease["released_at"] >= lease["acquired_at"]
    # A CPU stage takes nothing unless CPU slots are pooled; then its processes' worth.
    assert "lease" not in runner.run(_spec(tmp_path, procs=2)).info
    cpu = LeasedRunner(inner, LeaseSettings(cpu_slots=4, dir=str(tmp_path)))
    got = cpu.run(_spec(tmp_path, procs=2)).info["lease"]
    assert (got["pool"], got["slots"], inner.seen[-1].devices) == ("cpu", ["0", "1"], ())
    # More GPUs than the pool has: never started, ours.
    failed = LeasedRunner(inner, LeaseSettings(gpus=("0",), dir=str(tmp_path))).run(
        _spec(tmp_path, gpus=2))
    assert not failed.started and "needs 2 GPU slot(s)" in str(failed.error)


def test_every_runner_on_this_host_shows_the_stage_its_leased_gpus_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    spec = StageSpec(name="t", argv=(sys.executable, "-c", "import os; print(os.environ["
                                     "'CUDA_VISIBLE_DEVICES'])"), cwd=tmp_path,
                     log_dir=tmp_path / "logs", timeout_s=30, gpus=2, devices=("2", "3"))
    run = LocalRunner().run(spec)
    assert run.returncode == 0 and run.stdout.read_text().strip() == "2,3"
    args = container_args(spec, DockerSettings(), uid_gid="1000:1000")
    assert args["device_requests"][0]["DeviceIDs"] == ["2", "3"]
    assert "CUDA_VISIBLE_DEVICES" not in args["environment"]  # renumbered 0, 1 inside
    assert stage_env(spec)["CUDA_VISIBLE_DEVICES"] == "2,3"  # apptainer --nv: host ids


def test_lease_settings_are_checked(tmp_path: Path) -> None:
    ok = parse_config({"runner": {"leases": {"gpus": ["0", "1"], "cpu_slots": 4}}}, "h.toml")
    assert ok.leases == LeaseSettings(gpus=("0", "1"), cpu_slots=4)
    for bad, what in (({"cpu_slots": -1}, "cpu_slots = -1"),
                      ({"gpus": ["0", "0"]}, "ids must be distinct"),
                      ({"gpu": ["0"]}, "unknown setting 'gpu'")):
        with pytest.raises(UserError, match=what):
            parse_config({"runner": {"leases": bad}}, "h.toml")



# A harness process: one stage of `sleep` on the local runner, holding 2 of 2 CPU slots.
STAGE_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from harness.runners.base import StageSpec
    from harness.runners.config import LeaseSettings
    from harness.runners.leased import LeasedRunner
    from harness.runners.local import LocalRunner
    root = Path(sys.argv[1])
    spec = StageSpec(name="t", argv=(sys.executable, "-c", "import time; time.sleep(600)"),
                     cwd=root, log_dir=root / "logs", timeout_s=600, procs=2)
    LeasedRunner(LocalRunner(), LeaseSettings(cpu_slots=2, dir=str(root / "leases"))).run(spec)
""")


def test_a_stage_keeps_its_slots_when_the_harness_dies_before_it(tmp_path: Path) -> None:
    from harness.runtime.procs import kill_processes_in, processes_in

    harness = subprocess.Popen([sys.executable, "-c", STAGE_HOLDER, str(tmp_path)], cwd=REPO)
    pool = Pool(tmp_path / "leases", "cpu", ("0", "1"), poll_s=0.05)
    wait_for(lambda: len(pool.holders()) == 2 and processes_in(tmp_path), 30)
    os.kill(harness.pid, signal.SIGKILL)
    harness.wait(30)
    # The orphaned stage still runs, so its slots stay taken (what `harness recover` ends).
    time.sleep(0.5)
    assert processes_in(tmp_path) and set(pool.holders()) == {"0", "1"}
    kill_processes_in(tmp_path, 5.0)
    wait_for(lambda: pool.holders() == {}, 30)
    with pool.hold(2, "next") as lease:
        assert lease.slots == ("0", "1")
