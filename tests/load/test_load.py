"""Many agents at once (-m load; .ci/run selects it): sessions started together from separate
processes, each editing and testing against one home, with harness processes SIGKILLed in
the middle of their tests, on the local runner with its CPU slots leased.

Afterwards: every session's audit is clean, every test is counted exactly once (a killed one
refunded, never charged), `harness recover` leaves nothing running, and at no moment did more
training processes run than there are slots (a sampler watches the process table all along).
The figures are printed for docs/runners.md ("Many tests at once").
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.ledger import Ledger
from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.load

SESSIONS = int(os.environ.get("LOAD_SESSIONS", "8"))
CPU_SLOTS = 4  # two 2-process smoke trainings at a time
KILLED = 3  # sessions whose first test's harness process is SIGKILLed mid-run
# BitLinear regions the agents try (the ternary baseline is the template's own text).
REGIONS = (REPO / "baselines" / "binary_sign" / "bitlinear.py",
           REPO / "baselines" / "int2_uniform" / "bitlinear.py",
           REPO / "tests" / "data" / "seed001_per_tensor.py")
GUARD = "harness.runtime.guard"  # every training rank runs under it

# One agent: start, edit, test; a killed test is recovered and tested again; submit.
DRIVER = textwrap.dedent("""
    import json, os, random, re, signal, subprocess, sys, time
    from pathlib import Path

    py, home, data, task, first, second, kill, seed, out = sys.argv[1:10]
    rng = random.Random(int(seed))
    env = {**os.environ, "HARNESS_HOME": home, "HARNESS_DATA": data}
    log = []

    def harness(*args, stdin=None):
        p = subprocess.run([py, "-m", "harness", *args], capture_output=True, text=True,
                           input=stdin, env=env, timeout=900)
        log.append({"args": args, "rc": p.returncode, "err": p.stderr[-2000:]})
        return p

    sid = harness("session", "start", "--agent", f"load-{seed}", "--task", task,
                  "--budget", "3", "--no-preflight").stdout.strip()
    view = harness("session", "view", sid).stdout.splitlines()[0]
    start, end = map(int, re.search(r"(\\d+)–(\\d+)", view).groups())

    def edit(path):
        global end
        text = Path(path).read_text()
        p = harness("session", "edit", sid, "--start", str(start), "--end", str(end),
                    "--content-file", "-", stdin=text)
        assert p.returncode == 0, p.stderr
        end = start + len(text.splitlines()) - 1

    def test():
        return harness("session", "test", sid).returncode

    edit(first)
    killed = 0
    if kill == "1":
        p = subprocess.Popen([py, "-m", "harness", "session", "test", sid], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Once its row exists (the snapshot follows it), at a random point of its life:
        # checking, queued for a lease, or training.
        snapshot = Path(home) / "sessions" / sid / "tests" / "1"
        while not snapshot.exists():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.5, 10.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed = 1
        assert harness("recover").returncode == 0
    codes = [test()]
    edit(second)
    codes.append(test())
    ok = [n for n in (1, 2, 3, 4) if harness("session", "submit", sid, str(n)).returncode == 0]
    Path(out).write_text(json.dumps({"session": sid, "codes": codes, "killed": killed,
                                     "submitted": ok, "log": log}))
""")


class Sampler(threading.Thread):
    """Counts live training ranks every 0.1 s: the most ever seen at once."""

    def __init__(self, under: Path) -> None:
        super().__init__(daemon=True)
        self.under = under
        self.most = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.most = max(self.most, len(ranks(self.under)))
            self.samples += 1
            time.sleep(0.1)


def ranks(under: Path) -> list[int]:
    """Training ranks working in an attempt folder under `under`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # A rank: `python -u -m harness.runtime.guard ...` (the launcher's command names the
        # guard too, after its own -m harness.runtime.launch: the first -m decides).
        first = cmd.index(b"-m") if b"-m" in cmd else -1
        if 0 < first < len(cmd) - 1 and cmd[first + 1] == GUARD.encode():
            try:
                cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            except OSError:
                continue
            if cwd.is_relative_to(under):
                found.append(int(pid))
    return found


def tiny_task(root: Path) -> Path:
    """The real task, its smoke scale cut to 4 iterations and the pretrain stage alone."""
    task = root / "task"
    shutil.copytree(REPO / "tasks" / "llm-pretrain-bitlinear", task)
    smoke = task / "scales" / "smoke.toml"
    text = smoke.read_text()
    for old, new in (('stages = ["pretrain", "lm-eval"]', 'stages = ["pretrain"]'),
                     ("max_iters = 30", "max_iters = 4"),
                     ("eval_interval = 10", "eval_interval = 2"),
                     ("log_interval = 10", "log_interval = 2"),
                     ("checkpoint_interval = 10", "checkpoint_interval = 2")):
        assert old in text, old
        text = text.replace(old, new)
    smoke.write_text(text)
    return task


def test_many_sessions_at_once_lose_nothing_and_charge_each_test_once(tmp_path: Path) -> None:
    from harness.data.smoke import prepare_smoke

    home, data = tmp_path / "home", tmp_path / "data"
    prepare_smoke(data / "smoke")
    task = tiny_task(tmp_path)
    config = tmp_path / "harness.toml"
    config.write_text(f'[runner.leases]\ncpu_slots = {CPU_SLOTS}\ndir = "{tmp_path / "leases"}"\n')
    env = {**os.environ, "HARNESS_CONFIG": str(config)}
    rng = random.Random(20261207)
    sampler = Sampler(home)
    sampler.start()
    t0 = time.monotonic()
    drivers = []
    for i in range(SESSIONS):
        first, second = rng.sample(REGIONS, 2)
        out = tmp_path / f"driver{i}.json"
        argv = [PYTHON, "-c", DRIVER, PYTHON, str(home), str(data), str(task),
                str(first), str(second),
                "1" if i < KILLED else "0", str(i), str(out)]
        drivers.append((subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE,
                                         text=True), out))
    for proc, _ in drivers:
        _, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, err[-3000:]
    wall = time.monotonic() - t0
    recover = subprocess.run([PYTHON, "-m", "harness", "recover", "--home", str(home)],
                             capture_output=True, text=True, cwd=REPO, env=env)
    sampler.stop.set()
    sampler.join()
    assert recover.returncode == 0, recover.stderr

    results = [json.loads(out.read_text()) for _, out in drivers]
    with Ledger(home, create=False) as ledger:
        assert ledger.in_progress() == []
        assert ledger.integrity_check() == []
        tests = charged = refunded = 0
        for r in results:
            rows = ledger.attempts(r["session"])
            # Each test the driver ran is one row; a killed one is refunded, never charged.
            assert len(rows) == 2 + r["killed"], rows
            assert [a.status for a in rows[r["killed"]:]] == ["succeeded", "succeeded"], \
                [(a.status, a.reason) for a in rows]
            assert r["codes"] == [0, 0]
            if r["killed"]:
                dead = rows[0]  # settled by recover as ours: refunded if it was charged
                assert dead.status == "failed_infra", dead
                assert dead.refunded or not dead.charged, dead
            assert ledger.used(r["session"]) == 2
            assert r["submitted"] == [1 + r["killed"]]  # the first that succeeded, once
            tests += len(rows)
            charged += sum(a.charged and not a.refunded for a in rows)
            refunded += sum(a.refunded for a in rows)
    for r in results:
        audit = subprocess.run([PYTHON, "-m", "harness", "audit", r["session"], "--home",
                                str(home)], capture_output=True, text=True, cwd=REPO)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    assert ranks(home) == []  # nothing left running
    # The slots bound the ranks at every moment: never more than CPU_SLOTS at once.
    assert 0 < sampler.most <= CPU_SLOTS, sampler.most
    leases = [seg.get("lease") for p in (home / "runs").glob("*/result.json")
              for seg in json.loads(p.read_text())["stages"].get("pretrain", {})
              .get("segments", [])]
    waited = [lease["waited_s"] for lease in leases if lease]
    assert len(waited) == 2 * SESSIONS
    assert any(lease["queue_positions"] for lease in leases if lease)  # some tests queued
    print(f"\n[load] {SESSIONS} sessions at once, {tests} tests ({charged} charged, "
          f"{refunded} refunded, {KILLED} harness processes SIGKILLed mid-test) in {wall:.0f}s "
          f"= {3600 * tests / wall:.0f} tests/hour; at most {sampler.most} ranks at once "
          f"({CPU_SLOTS} slots, {sampler.samples} samples); longest queue wait "
          f"{max(waited):.1f}s; records lost 0, wrongly charged 0", file=sys.stderr)
