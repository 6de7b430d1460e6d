"""Fault injection for the container and cluster runners (issue #24): what the docker cases
(tests/docker/test_docker_faults.py) and the Slurm cases (tests/slurm/test_slurm_faults.py)
share. The local runner's cases, and the properties checked afterwards, are in
tests/security/test_fault_injection.py; this module drives the same properties through the
real command line (`harness session start`, `session test`, `recover`, `audit`).

One case: a session runs one smoke test (with the pre-flight, as by default, when the moment
can reach it); at a moment drawn from a seeded random source, one target is SIGKILLed from
outside:

  harness    the `harness session test` process (it holds the runner: nothing stops the stage)
  rank       one torchrun rank worker (of the pre-flight's DDP check or of pretrain), by its
             host pid: a container's processes, a Slurm job's on this one-node cluster, are
             in this host's /proc; found by the attempt's paths in their command line
  launcher   the stage's top process: what docker-init or the job's `timeout` started
  container  docker: `docker kill` of the test's running container
  job        Slurm: `scancel --signal=KILL --full` of the test's running job

The moments, in the order a test passes them; the kill lands `fraction` of the moment's span
after it is reached (a target that does not exist yet is killed as soon as it appears):

  registered    the ledger has the test's row (the checks start)
  preflight     the pre-flight stage runs (its container / job)
  pretrain      training runs: a random fraction of its usual length
  lm-eval       the eval stage runs
  final-writes  the eval stage wrote eval.json, its last file: the harness collects it, writes
                result.json, settles the ledger

Afterwards: `harness recover` (it settles a dead harness's test and stops what its runner left),
then nothing of the test left running or left behind (containers in `docker ps -a`, jobs in
`squeue`, processes naming its folder), the properties of test_fault_injection (ledger
integrity, no lost attempt, a kill from outside never charged), a kill that hit a stage seen
in the record (failed_infra, or a resumed segment), and `harness audit` clean.

The draws depend on HARNESS_FAULT_SEED (default: DEFAULT_SEED, so CI sees the same ones) and
are in the test ids; a failure names the seed and the case to replay it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from harness.record import Status
from tests.conftest import PYTHON, REPO
from tests.security.test_fault_injection import (
    Run,
    never_charged_for,
    settled_and_whole,
    until,
)

SEED_ENV = "HARNESS_FAULT_SEED"
DEFAULT_SEED = 24
MOMENTS = ("registered", "preflight", "pretrain", "lm-eval", "final-writes")
# Seconds a drawn fraction spreads over, after the moment is reached: about how long the
# stage runs on the CI machine (2 cores); a kill drawn past its end lands in what follows.
SPAN_S = {"registered": 0.5, "preflight": 8.0, "pretrain": 12.0, "lm-eval": 5.0,
          "final-writes": 0.5}
# What each target can hit (a rank exists only in the pre-flight's DDP run and in pretrain).
TARGET_MOMENTS = {"harness": MOMENTS, "rank": ("registered", "preflight", "pretrain"),
                  "launcher": MOMENTS, "container": MOMENTS, "job": MOMENTS}
PREFLIGHT_MOMENTS = ("registered", "preflight")
ATTEMPT_S = 300.0  # one smoke test takes ~30 s here; this only stops a hang
# For what recover or the runner stopped to be gone: both wait until it is, so only a
# job's last moments in squeue (COMPLETING) need this; short, so that a unit nobody
# stopped is still seen before it ends by itself.
SETTLE_S = 3.0
POLL_S = 0.1
# A harness killed while the pre-flight ran once left it running and unrecorded: the stage
# was named `harness-preflight` and worked in `runs/.preflight-*`, so recover could not tie it
# to the test; and a pre-flight ended by us left no result.json. Both are pinned by an
# explicit case in each runner's file (EXPLICIT), whatever the seed draws.


# --- the draws -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draw:
    runner: str
    target: str
    moment: str
    fraction: float
    rank: int
    seed: int | None  # None: an explicit case, not drawn

    @property
    def delay(self) -> float:
        return self.fraction * SPAN_S[self.moment]

    @property
    def id(self) -> str:
        what = f"rank{self.rank}" if self.target == "rank" else self.target
        drawn = f"seed{self.seed}" if self.seed is not None else "explicit"
        return f"{what}-at-{self.moment}+{self.fraction:.2f}-{drawn}"

    def replay(self, test_file: str) -> str:
        seed = f"{SEED_ENV}={self.seed} " if self.seed is not None else ""
        marker = "" if self.runner == "local" else f"-m {self.runner} "
        return f"{seed}pytest {marker}{test_file} -k '{self.id}'"


def seed() -> int:
    raw = os.environ.get(SEED_ENV, "").strip()
    return int(raw) if raw else DEFAULT_SEED


def draw(runner: str, target: str, seed_: int) -> Draw:
    """One moment for one target, from a random source seeded by (runner, target, seed): the
    same seed gives the same case on any machine (a str seed does not depend on hash salt)."""
    rng = random.Random(f"{runner}:{target}:{seed_}")
    moment = rng.choice(TARGET_MOMENTS[target])
    return Draw(runner, target, moment, round(rng.random(), 2), rng.randrange(2), seed_)


def cases(runner: str, targets: Sequence[str],
          explicit: Sequence[Draw] = ()) -> list[object]:
    """pytest params: one drawn case per target, then the explicit ones (an explicit case
    whose target and moment the seed drew already is left out)."""
    s = seed()
    drawn = [draw(runner, t, s) for t in targets]
    extra = [e for e in explicit
             if not any((e.target, e.moment) == (d.target, d.moment) for d in drawn)]
    return [pytest.param(d, id=d.id) for d in [*drawn, *extra]]


# --- what a runner must tell ------------------------------------------------------------------


class Probe(Protocol):
    """The runner-specific part: its units (containers, Slurm jobs) of one test's folder."""

    name: str
    runner_args: tuple[str, ...]

    def active(self, runs: Path, stage: str) -> bool:
        """Whether a unit of that stage runs for a folder under `runs`."""

    def running_unit(self, runs: Path) -> str | None:
        """A running unit (any stage) for a folder under `runs`."""

    def kill_unit(self, unit: int | str) -> None:
        """SIGKILL it from outside, as an operator would; ProcessLookupError when it ended."""

    def leftovers(self, runs: Path) -> list[str]:
        """Every unit still there (running or stopped but not removed) for folders under runs."""

    def remove(self, runs: Path) -> None:
        """Stop and remove every unit for folders under runs (a failed case's, for the next)."""


# --- this host's processes --------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _state(pid: int) -> tuple[str, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _env_value(pid: int, name: str) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    found = [e[len(prefix):].decode() for e in env if e.startswith(prefix)]
    return found[0] if found else None


def stage_processes(runs: Path) -> dict[int, list[str]]:
    """Every live process on this host, of any user (a container's run as another uid), whose
    command line names a path under `runs`: a stage's processes, wherever its runner put
    them. The harness itself names only its home, never runs/."""
    needle = str(runs) + "/"
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        argv = _cmdline(pid)
        st = _state(pid)
        if st is not None and st[0] not in ("Z", "X") and any(needle in a for a in argv):
            found[pid] = argv
    return found


def rank_pid(runs: Path, rank: int) -> int | None:
    found = [p for p in stage_processes(runs) if _env_value(p, "RANK") == str(rank)]
    return min(found) if found else None


def launcher_pid(runs: Path) -> int | None:
    """The stage's top process: a python naming the folder whose parent is not one (the
    parent is docker-init in a container, `timeout` in a Slurm job)."""
    procs = stage_processes(runs)
    pythons = {p for p, argv in procs.items()
               if argv and Path(argv[0]).name.startswith("python")}
    top = [p for p in pythons if (st := _state(p)) is not None and st[1] not in pythons]
    return min(top) if top else None


def _started(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def snapshot(runs: Path) -> dict[int, str]:
    """The test's processes now, each with its start time (a pid may be reused later)."""
    return {pid: s for pid in stage_processes(runs) if (s := _started(pid)) is not None}


def alive(victims: dict[int, str]) -> dict[int, str]:
    """Those of `victims` still running (the same process: the same start time, no zombie)."""
    return {pid: " ".join(_cmdline(pid))[:160] for pid, s in victims.items()
            if _started(pid) == s and (st := _state(pid)) is not None
            and st[0] not in ("Z", "X")}


def _sigkill(pid: int | str) -> None:
    os.kill(int(pid), signal.SIGKILL)


# --- one case ---------------------------------------------------------------------------------


def cli(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "harness", *args, "--home", str(home)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def start(home: Path, data: Path, runner_args: Sequence[str], *, preflight: bool) -> Run:
    """`harness session start` (the task's defaults in the file), then `harness session test`
    in a process of its own, as an agent runs them."""
    got = cli("session", "start", "--agent", "fault-injection", "--budget", "3",
              *([] if preflight else ["--no-preflight"]), home=home)
    sid = got.stdout.strip()
    assert got.returncode == 0 and sid.startswith("ses-"), got.stdout + got.stderr
    err = home / "session-test.stderr"
    with err.open("wb") as f:
        proc = subprocess.Popen([PYTHON, "-m", "harness", "session", "test", sid, "--home",
                                 str(home), "--data-dir", str(data), *runner_args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=f)
    return Run(home, sid, proc, err, time.monotonic())


def _runs(run: Run) -> Path:
    return (run.home / "runs").resolve()


def _eval_written(run: Run) -> bool:
    root = run.root()
    return root is not None and (root / "lm-eval" / "eval.json").exists()


def reached(run: Run, moment: str, probe: Probe) -> bool:
    """Whether the test has got to `moment` (or past it: a stage shorter than a poll is
    seen by what follows it)."""
    if run.done():
        return True
    if moment == "registered":
        return run.row() is not None
    if moment == "final-writes":
        return _eval_written(run)
    later = MOMENTS[MOMENTS.index(moment) + 1]
    return probe.active(_runs(run), moment) or reached(run, later, probe)


Finder = Callable[[Run], "int | str | None"]


def target_of(d: Draw, probe: Probe) -> tuple[Finder, Callable[[Run], bool],
                                             Callable[[int | str], None]]:
    """How to find the drawn target, whether it can still appear, and how to kill it."""
    if d.target == "harness":
        return (lambda r: None if r.done() else r.proc.pid), lambda r: False, _sigkill
    if d.target == "rank":
        def pretraining(r: Run) -> bool:
            root = r.root()
            return not r.done() and not (root is not None and (root / "lm-eval").exists())
        return (lambda r: rank_pid(_runs(r), d.rank)), pretraining, _sigkill
    if d.target == "launcher":
        return (lambda r: launcher_pid(_runs(r))), (lambda r: not r.done()), _sigkill
    return (lambda r: probe.running_unit(_runs(r))), (lambda r: not r.done()), probe.kill_unit


def _where(run: Run, probe: Probe) -> str:
    runs = _runs(run)
    stages = [s for s in ("preflight", "pretrain", "lm-eval") if probe.active(runs, s)]
    root = run.root()
    progress = {}
    if root is not None:
        try:
            progress = json.loads((root / "pretrain" / "progress.json").read_text())
        except (OSError, ValueError):
            progress = {}
    it = f", pretrain iter {progress.get('iter')}/{progress.get('max_iters')}" \
        if progress else ""
    return f"{'+'.join(stages) or 'no stage running'}{it}"


def kill_at(run: Run, d: Draw, probe: Probe) -> tuple[str | None, dict[int, str]]:
    """Wait for the moment plus the drawn delay, then kill the target: at once when it
    exists, else as soon as it appears, unless it no longer can. What was killed (or None),
    and the test's processes at that moment."""
    find, possible, kill = target_of(d, probe)
    until(lambda: reached(run, d.moment, probe), ATTEMPT_S,
          f"never reached {d.moment}: {run.stderr_tail()}")
    time.sleep(d.delay)
    found: list[int | str | None] = []

    def look() -> bool:
        found[:] = [find(run)]
        return found[0] is not None or not possible(run)

    until(look, ATTEMPT_S, f"the {d.target} never appeared")
    target = found[0]
    if target is None:
        return None, {}
    where = _where(run, probe)
    victims = snapshot(_runs(run))
    try:
        kill(target)
    except ProcessLookupError:
        return None, {}  # it ended between the look and the kill
    return f"{d.target} {target} at {time.monotonic() - run.t0:.1f}s ({where})", victims


def _relaunched(run: Run) -> bool:
    """A stage was launched again (resumed): the stopped launch's files were moved aside."""
    root = run.root()
    return root is not None and any(root.glob("*/segment-*"))


def outlived(run: Run, victims: dict[int, str]) -> dict[int, str]:
    """Wait for the test to end; the processes of the killed launch still running when the
    harness launched a stage again or ended. A launch's processes all end with it: one that
    outlives it (a rank orphaned by its dead launcher) trains on into an attempt whose record
    is closed or resumed; it may end before the audit looks, so it is looked for here."""
    deadline = time.monotonic() + ATTEMPT_S
    while time.monotonic() < deadline:
        if run.done() or _relaunched(run):
            left = alive(victims)
            run.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            return left
        time.sleep(POLL_S)
    raise AssertionError(f"the test did not end: {run.stderr_tail()}")


def kill_was_seen(root: Path) -> bool:
    """A kill that hit a stage left its mark in the record: a stage launch that ended as our
    failure (then resumed), or the pre-flight's DDP run tried twice."""
    record = json.loads((root / "result.json").read_text())
    segments = [s for st in record.get("stages", {}).values() for s in st.get("segments", [])]
    if any(s.get("outcome") == Status.FAILED_INFRA.value for s in segments):
        return True
    checks = root / "checks.json"
    return checks.is_file() and "first_try_log_tail" in checks.read_text()


def nothing_left(run: Run, probe: Probe) -> None:
    runs = _runs(run)

    def clean() -> bool:
        return not probe.leftovers(runs) and not stage_processes(runs)

    # A stage's folders are the test's own: none outside it (the pre-flight's once was).
    strays = [p.name for p in runs.iterdir() if p.name.startswith(".")] if runs.is_dir() else []
    assert not strays, f"folders outside the test's under runs/: {strays}"

    try:
        until(clean, SETTLE_S, "")
    except AssertionError:
        procs = {pid: " ".join(argv)[:160] for pid, argv in stage_processes(runs).items()}
        raise AssertionError(f"left behind: {probe.name} units {probe.leftovers(runs)}, "
                             f"processes {procs}") from None


def check(run: Run, d: Draw, probe: Probe, killed: str | None,
          victims: dict[int, str]) -> str:
    """Everything that must hold after the kill; the report line."""
    harness_killed = d.target == "harness" and killed is not None
    try:
        # A dead harness leaves its stage to `harness recover` (checked below).
        left = {} if harness_killed else outlived(run, victims)
        run.proc.wait(timeout=ATTEMPT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the test did not end: {run.stderr_tail()}") from None
    assert not left, f"processes of the killed launch outlived it: {left}"
    got = cli("recover", home=run.home)
    assert got.returncode == 0, got.stdout + got.stderr
    if harness_killed:
        # Settled by recover, unless the harness had settled it before it died.
        settled = f"({Status.FAILED_INFRA.value}|{Status.SUCCEEDED.value})"
        assert re.search(rf"^settled: test #1 .*: {settled}", got.stdout, re.MULTILINE) \
            or "recover: 0 attempt(s) settled" in got.stdout, got.stdout
    else:
        assert "recover: 0 attempt(s) settled" in got.stdout, got.stdout
    nothing_left(run, probe)
    # harness_killed=True there only lets its result.json be missing (a harness killed
    # before it wrote the test's first record); everything else holds.
    row, used = settled_and_whole(run.home, run.sid, harness_killed=harness_killed)
    line = (f"{d.id}: killed {killed or 'nothing'} -> " +
            (f"{row.status}{' (refunded)' if row.refunded else ''}: {row.reason}"
             if row is not None else "no row"))
    never_charged_for(row, used, killed)
    assert row is not None, line
    if killed is not None:
        # Ours, never the submission's: its result, refunded, or resumed to the end.
        assert row.state in (Status.SUCCEEDED, Status.FAILED_INFRA, Status.CANCELLED), line
        if not harness_killed and row.state is Status.SUCCEEDED:
            assert row.attempt_dir and kill_was_seen(Path(row.attempt_dir)), \
                f"a kill that hit a stage left no trace in the record: {line}"
    audit = cli("audit", run.sid, home=run.home)
    assert audit.returncode == 0 and "Integrity: OK" in audit.stdout, audit.stdout
    if row.attempt_dir and (not harness_killed or "(preflight" in (killed or "")):
        # Every test our side stopped has its record: one stopped in its pre-flight too, the
        # record written before the pre-flight ran, closed by the harness or by recover.
        record = json.loads((Path(row.attempt_dir) / "result.json").read_text())
        assert record["status"] == row.status, f"result.json says {record['status']}: {line}"
    return line


def run_case(home: Path, data: Path, d: Draw, probe: Probe, test_file: str) -> None:
    # The pre-flight (a stage of its own, about 10 s) only where the moment can reach it.
    run = start(home, data, probe.runner_args, preflight=d.moment in PREFLIGHT_MOMENTS)
    killed: str | None = None
    try:
        killed, victims = kill_at(run, d, probe)
        print(check(run, d, probe, killed, victims))  # what was drawn and came of it (-s)
    except AssertionError as e:
        said = f"[{d.id}, killed {killed or 'nothing'}; replay: {d.replay(test_file)}] {e}"
        raise AssertionError(said) from None
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        probe.remove(_runs(run))
        for pid in stage_processes(_runs(run)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
