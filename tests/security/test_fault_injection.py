"""Fault injection (issue #10): SIGKILL from outside, at a moment hypothesis draws, of the harness
process (`harness session test`, which also holds the local runner), of the stage (one torchrun
rank worker; or the process the local runner started: torchrun, later the lm-eval stage) and,
with -m docker, of the stage's container.

After each kill, and `harness recover` when the harness itself died, three properties hold:
  1. the ledger passes its integrity check;
  2. no attempt is lost: the one test started has exactly one row, finished; every attempt folder
     under the home is that row's, its result.json says what the ledger says, and `audit`
     re-hashes every recorded file unchanged (nothing kept writing after the record closed);
  3. a kill from outside is never charged: the test ends failed_infra (refunded) or cancelled,
     or succeeded when the kill came after everything that decides the outcome. Only the
     submission's own faults are charged, as the control (a submission that raises) shows.

Every example is a real smoke-scale attempt (about 30 s on 2 cores, less when killed early), so
hypothesis draws a handful, derandomized and without shrinking: CI sees the same draws. The
windows between two writes of the harness, which a random moment rarely hits, are covered
exactly: there the harness SIGKILLs itself before or after a given call of its own code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from harness.audit import audit
from harness.ledger import AttemptRow, Ledger
from harness.record import FINISHED, REFUNDABLE
from harness.regions import EditSession
from harness.runners.docker import LABEL
from harness.runtime.fileio import sha256_file
from harness.runtime.procs import kill_processes_in, processes_in
from harness.session import Session
from harness.task import load_task
from tests.conftest import PYTHON, REPO, TEMPLATE, wait_for
from tests.test_session import CRASH_EARLY, GOOD, IMPORT_OS

pytestmark = pytest.mark.slow

# The milestones of one test, in order; a kill lands `delay` seconds after the drawn one.
# "launched": the CLI has just started; "registered": the ledger has the test's row, not yet
# charged; "finished": the process has exited. A stage process that does not exist yet at the
# moment is killed as soon as it does.
MOMENTS = ("launched", "registered", "charged", "training", "trained", "evaluating", "finished")
TARGETS = ("harness", "leader", "worker")
ATTEMPT_S = 300.0  # one smoke attempt takes ~30 s on 2 cores; this only stops a hang
SETTLE_S = 15.0  # for killed processes to be gone
POLL_S = 0.02
FEW = settings(max_examples=6, deadline=None, derandomize=True, database=None,
               phases=(Phase.explicit, Phase.generate), print_blob=False)


@pytest.fixture(scope="module")
def data_root() -> Iterator[Path]:
    """The smoke corpus and eval sets, built once: the first example must not pay for them."""
    from harness.data.smoke import prepare_smoke
    from harness.stages import lmeval

    with tempfile.TemporaryDirectory(prefix="fault-data-") as tmp:
        root = Path(tmp)
        prepare_smoke(root / "smoke")
        lmeval.evals_dir(load_task().scale("smoke"), root)
        yield root


# --- processes -------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, or None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st_ := _stat(int(entry.name))) and st_[1] == pid \
                and st_[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return sorted(out)


def _rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


# --- one test, run by the CLI ----------------------------------------------------------------


@dataclass
class Run:
    home: Path
    sid: str
    proc: subprocess.Popen[bytes]
    stderr: Path
    t0: float

    def row(self) -> AttemptRow | None:
        with Ledger(self.home) as led:
            rows = led.attempts(self.sid)
        return rows[0] if rows else None

    def root(self) -> Path | None:
        """The attempt folder: the ledger learns it when the test is charged."""
        row = self.row()
        return Path(row.attempt_dir) if row and row.attempt_dir else None

    def done(self) -> bool:
        return self.proc.poll() is not None

    def reached(self, moment: str) -> bool:
        if self.done() or moment == "launched":
            return True
        if moment == "registered":
            return self.row() is not None
        root = self.root()
        if root is None or moment == "finished":
            return False
        return {"charged": True,
                "training": bool(_read(root / "pretrain" / "metrics.jsonl").strip()),
                "trained": (root / "pretrain" / "final.json").exists(),
                "evaluating": (root / "lm-eval" / "stdout.log").exists()}[moment]

    def stderr_tail(self) -> str:
        return "\n".join(_read(self.stderr).splitlines()[-15:])


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def start_test(home: Path, data: Path, content: str | None = None,
               runner: tuple[str, ...] = ("--runner", "local"),
               harness: tuple[str, ...] = (PYTHON, "-m", "harness")) -> Run:
    """A session with one edit (or the template's defaults), and `harness session test` on it
    in a process of its own, as an agent would run it."""
    with Session.create(agent="fault-injection", home=home, data_dir=data,
                        preflight=False) as s:
        sid = s.id
        if content is not None:
            (first, last), _ = EditSession(TEMPLATE.read_text()).editable_ranges()
            s.replace(None, first, last, content)
    err = home / "session-test.stderr"
    with err.open("wb") as f:
        proc = subprocess.Popen([*harness, "session", "test", sid, "--home",
                                 str(home), "--data-dir", str(data), *runner], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=f)
    return Run(home, sid, proc, err, time.monotonic())


def until(what: Callable[[], object], timeout: float, message: str) -> object:
    return wait_for(what, timeout, step=POLL_S, message=message)


Finder = Callable[[Run], "int | str | None"]


def kill_at(run: Run, moment: str, delay: float, find: Finder,
            possible: Callable[[Run], bool], kill: Callable[[int | str], None]) -> str | None:
    """Wait for the moment plus the delay, then kill what `find` names: at once when it runs,
    else as soon as it starts, unless it can no longer start. What was killed, or None."""
    until(lambda: run.reached(moment), ATTEMPT_S, f"never reached {moment}: "
          f"{run.stderr_tail()}")
    time.sleep(delay)
    found: list[int | str | None] = []

    def look() -> bool:
        found[:] = [find(run)]
        return found[0] is not None or not possible(run)

    until(look, ATTEMPT_S, "the target never appeared")
    target = found[0]
    if target is None:
        return None
    try:
        kill(target)
    except ProcessLookupError:
        return None  # it ended between the look and the kill
    return f"{target} at {time.monotonic() - run.t0:.1f}s"


def _sigkill(pid: int | str) -> None:
    os.kill(int(pid), signal.SIGKILL)


def _leader(run: Run) -> int | None:
    """The process the local runner started (its own process group): torchrun, or lm-eval."""
    root = run.root()
    if root is None:
        return None
    ours = set(processes_in(root))
    found = [p for p in _children(run.proc.pid) if p in ours]
    return found[0] if found else None


def local_target(target: str, rank: int) -> tuple[Finder, Callable[[Run], bool]]:
    """How to find the drawn process, and whether it can still appear."""
    if target == "harness":
        return (lambda r: None if r.done() else r.proc.pid), lambda r: False
    if target == "leader":
        return _leader, lambda r: not r.done()

    def worker(r: Run) -> int | None:
        leader = _leader(r)
        found = [w for w in _children(leader) if _rank(w) == rank] if leader else []
        return found[0] if found else None

    def pretraining(r: Run) -> bool:
        root = r.root()
        return not r.done() and not (root and ((root / "pretrain" / "final.json").exists()
                                               or (root / "lm-eval").exists()))
    return worker, pretraining


def finish(run: Run, recover: bool) -> None:
    """Wait for the test to end; after a killed harness, `harness recover` settles it."""
    try:
        run.proc.wait(timeout=ATTEMPT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the test did not end: {run.stderr_tail()}") from None
    if recover:
        out = subprocess.run([PYTHON, "-m", "harness", "recover", "--home", str(run.home)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "settled: test #1" in out.stdout or "0 attempt(s) settled" in out.stdout, out.stdout
    root = run.root()
    if root is not None:
        until(lambda: not processes_in(root), SETTLE_S,
              f"stage processes left running in {root}: {processes_in(root)}")


# --- the three properties ------------------------------------------------------------------


def settled_and_whole(home: Path, sid: str, *,
                      harness_killed: bool = False) -> tuple[AttemptRow | None, int]:
    """Properties 1 and 2: the test's row (None only when the harness was killed before it
    registered the test: nothing ran, nothing was lost) and the tests the session has used."""
    with Ledger(home) as led:
        assert led.integrity_check() == []
        rows = led.attempts(sid)
        # No row only when the harness died before it registered the test.
        assert len(rows) == 1 or (not rows and harness_killed), \
            f"{len(rows)} rows for one test: {[(a.number, a.status) for a in rows]}"
        row = rows[0] if rows else None
        if row is not None:
            assert row.status in FINISHED, (row.status, row.reason)
            history = audit(led, sid)
            assert not history.tampered, history.text()
        used = led.used(sid)
    runs = home / "runs"
    folders = sorted(p.resolve() for p in runs.iterdir()) if runs.is_dir() else []
    mine = [Path(row.attempt_dir).resolve()] if row is not None and row.attempt_dir else []
    # A folder the ledger does not point at would be an attempt whose record was lost.
    assert folders == mine, (folders, row)
    if row is not None and mine:
        result = mine[0] / "result.json"
        if not result.is_file():
            # Only a harness that died between making the folder and writing its record.
            assert harness_killed and row.status == "failed_infra", f"{result} is missing"
            return row, used
        recorded = json.loads(result.read_text())
        assert recorded["status"] == row.status, (recorded["status"], recorded.get("reason"),
                                                  row.status, row.reason)
        assert sha256_file(result) == row.result_sha256
    return row, used


def never_charged_for(row: AttemptRow | None, used: int, killed: str | None) -> None:
    """Property 3: a kill from outside costs nothing; with nothing killed, a normal success."""
    if row is None:  # the harness died before it registered the test
        assert killed is not None and used == 0, (killed, used)
        return
    what = f"{row.status} ({row.reason}) after killing {killed}"
    charged = row.charged and not row.refunded
    if killed is None:
        assert (row.status, charged, used) == ("succeeded", True, 1), what
        return
    # Charged only when the kill came after everything that decided a success.
    assert not charged or row.status == "succeeded", f"a kill from outside was charged: {what}"
    # Else refunded, cancelled, or refused by the checks (free) before the kill.
    assert row.status in ("succeeded", *REFUNDABLE) or not row.charged, what
    assert used == int(charged), what


def report(target: str, moment: str, delay: float, killed: str | None, row: AttemptRow | None,
           took: float) -> None:
    end = ("no row: killed before the test was registered" if row is None else
           f"{row.status}{' (refunded)' if row.refunded else ''}: {row.reason}")
    line = (f"{target:<9} {moment:<10} +{delay:.2f}s  killed: {killed or 'nothing'}  ->  "
            f"{end}  [{took:.0f}s]")
    print(line)  # what hypothesis drew and what came of it: run with -s to see


# --- the tests -------------------------------------------------------------------------------


@FEW
@given(target=st.sampled_from(TARGETS), moment=st.sampled_from(MOMENTS),
       delay=st.floats(0.0, 2.5), rank=st.integers(0, 1))
@example(target="worker", moment="training", delay=1.0, rank=1)
@example(target="leader", moment="training", delay=0.5, rank=0)
@example(target="harness", moment="registered", delay=0.0, rank=0)
def test_a_sigkill_from_outside_is_never_charged(data_root: Path, target: str, moment: str,
                                                  delay: float, rank: int) -> None:
    find, possible = local_target(target, rank)
    with tempfile.TemporaryDirectory(prefix="fault-home-") as tmp:
        run = start_test(Path(tmp) / "home", data_root)
        killed: str | None = None
        try:
            killed = kill_at(run, moment, delay, find, possible, _sigkill)
            finish(run, recover=target == "harness" and killed is not None)
            row, used = settled_and_whole(run.home, run.sid,
                                          harness_killed=target == "harness" and bool(killed))
            report(target, moment, delay, killed, row, time.monotonic() - run.t0)
            never_charged_for(row, used, killed)
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            if (root := run.root()) is not None:
                kill_processes_in(root)


def test_control_a_crashing_submission_is_charged(data_root: Path, tmp_path: Path) -> None:
    """The submission's own fault, nothing killed: charged, and property 3 would say so."""
    run = start_test(tmp_path / "home", data_root, content=CRASH_EARLY)
    try:
        finish(run, recover=False)
        row, used = settled_and_whole(run.home, run.sid)
        report("none", "-", 0.0, None, row, time.monotonic() - run.t0)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        if (root := run.root()) is not None:
            kill_processes_in(root)
    assert run.proc.returncode == 4 and row is not None
    assert (row.status, row.charged, row.refunded, used) == ("failed_submission", True, False, 1)
    assert "submission bug: exploded at step 5" in (row.reason or "")
    with pytest.raises(AssertionError, match="a kill from outside was charged"):
        never_charged_for(row, used, "(pretend: the control killed nothing)")


# --- the harness dies at an exact point of its own code ----------------------------------------

# The harness process SIGKILLs itself just before or after the nth call of one method: the
# windows between two of its writes, which a kill at a random moment rarely hits.
DIES = r"""
import os, signal, sys
import harness.ledger, harness.record, harness.runners.local
from harness.cli import main

where, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
cls_name, name = where.split(".")
cls = {"Ledger": harness.ledger.Ledger, "Attempt": harness.record.Attempt,
       "LocalRunner": harness.runners.local.LocalRunner}[cls_name]
real = getattr(cls, name)
calls = []

def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if len(calls) == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(cls, name, dying)
sys.exit(main(sys.argv[4:]))
"""
# point: (method, before|after, nth call, the submission, how recover settles the test)
POINTS = {
    "registered": ("Ledger.new_attempt", "after", 1, None, "failed_infra"),
    "checking": ("Ledger.set_status", "after", 1, None, "failed_infra"),
    "checked": ("Ledger.set_status", "after", 2, None, "failed_infra"),
    "folder made": ("Attempt.create", "after", 1, None, "failed_infra"),
    "record written": ("Ledger.charge", "before", 1, None, "failed_infra"),
    "charged": ("Ledger.charge", "after", 1, None, "failed_infra"),
    "stage launched": ("LocalRunner.launch", "after", 1, None, "failed_infra"),
    # The checks' refusal (free) is in its folder's result.json, not yet in the ledger.
    "refusal written": ("Ledger.finish", "before", 1, IMPORT_OS + GOOD, "failed_submission"),
    # Everything ran and the final result.json is written; only the ledger is left.
    "result written": ("Ledger.finish", "before", 1, None, "succeeded"),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_the_harness_killed_at_any_point_of_its_own_is_recovered(data_root: Path,
                                                                  tmp_path: Path,
                                                                  point: str) -> None:
    where, when, nth, content, settled = POINTS[point]
    run = start_test(tmp_path / "home", data_root, content,
                     harness=(PYTHON, "-c", DIES, where, when, str(nth)))
    try:
        assert run.proc.wait(timeout=ATTEMPT_S) == -signal.SIGKILL, run.stderr_tail()
        finish(run, recover=True)
        row, used = settled_and_whole(run.home, run.sid, harness_killed=True)
        report("harness", point, 0.0, f"itself {when} {where} #{nth}", row,
               time.monotonic() - run.t0)
        assert row is not None and row.status == settled, row
        never_charged_for(row, used, f"the harness at {point}")
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        if (root := run.root()) is not None:
            kill_processes_in(root)


# --- docker: the stage's container, killed from outside -----------------------------------------


@pytest.fixture(scope="module")
def docker_image() -> str:
    from tests.docker.conftest import IMAGE

    cli = shutil.which("docker")
    if cli is None or subprocess.run([cli, "image", "inspect", IMAGE], capture_output=True,
                                     timeout=60).returncode != 0:
        pytest.fail(f"no Docker engine with the image {IMAGE}: run scripts/ci_docker.sh, which "
                    "starts dockerd and builds it", pytrace=False)
    return IMAGE


def _containers(run: Run, *, running: bool = True) -> list[str]:
    """The attempt's containers (by the label the docker runner sets), running or any."""
    root = run.root()
    if root is None:
        return []
    status = ["--filter", "status=running"] if running else ["--all"]
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label={LABEL}.attempt_dir={root}",
                          *status], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _container(run: Run) -> str | None:
    found = _containers(run)
    return found[0] if found else None


def _docker_kill(container: int | str) -> None:
    """`docker kill` (SIGKILL) from outside the harness, as an operator would."""
    out = subprocess.run(["docker", "kill", str(container)], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise ProcessLookupError(out.stderr)  # it stopped between the look and the kill


@pytest.mark.docker
@settings(FEW, max_examples=2)
@given(moment=st.sampled_from(MOMENTS), delay=st.floats(0.0, 2.5))
@example(moment="training", delay=1.0)
@example(moment="evaluating", delay=0.5)
def test_docker_kill_of_the_stage_container_is_never_charged(data_root: Path, docker_image: str,
                                                              moment: str, delay: float) -> None:
    with tempfile.TemporaryDirectory(prefix="fault-home-") as tmp:
        run = start_test(Path(tmp) / "home", data_root,
                         runner=("--runner", "docker", "--image", docker_image))
        killed: str | None = None
        try:
            killed = kill_at(run, moment, delay, _container, lambda r: not r.done(),
                             _docker_kill)
            finish(run, recover=False)
            # The runner's cleanup removed every container of the attempt.
            assert _containers(run, running=False) == []
            row, used = settled_and_whole(run.home, run.sid)
            report("container", moment, delay, killed, row, time.monotonic() - run.t0)
            never_charged_for(row, used, killed)
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            for container in _containers(run, running=False):
                subprocess.run(["docker", "rm", "-f", container], capture_output=True,
                               timeout=60)
