"""harness.runtime.procs: finding, signalling and reaping process trees."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.runtime import procs

# A parent that ignores SIGTERM, with a grandchild in a session of its own (as torchrun's
# ranks are) that ignores it too; both write their pid, then sleep.
TREE = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
out = sys.argv[1]
subprocess.Popen([sys.executable, "-c",
    "import os, signal, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    f"open({out!r} + '/grandchild', 'w').write(str(os.getpid()))\\n"
    "time.sleep(600)\\n"], start_new_session=True)
open(out + "/child", "w").write(str(os.getpid()))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    fields = procs.proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _wait_for(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_run_kills_a_tree_that_ignores_sigterm_on_timeout(tmp_path: Path) -> None:
    log = tmp_path / "log"
    t0 = time.monotonic()
    run = procs.run([sys.executable, "-c", TREE, str(tmp_path)], cwd=tmp_path, log=log,
                    deadline=time.monotonic() + 3.0, env=dict(os.environ), grace_s=1.0)
    assert run.timed_out and run.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 15
    pids = [_wait_for(tmp_path / "child"), _wait_for(tmp_path / "grandchild")]
    assert _gone(pids), f"left running: {[p for p in pids if _alive(p)]}"


def test_run_kills_the_tree_when_interrupted(tmp_path: Path) -> None:
    """An exception while waiting (Ctrl-C) never leaves the tree behind."""
    import threading

    def interrupt() -> None:
        _wait_for(tmp_path / "grandchild")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give this process Python's own for the test.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        procs.run([sys.executable, "-c", TREE, str(tmp_path)], cwd=tmp_path,
                  log=tmp_path / "log", deadline=time.monotonic() + 60, env=dict(os.environ),
                  grace_s=1.0)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt did not come through")
    finally:
        signal.signal(signal.SIGINT, before)
    pids = [_wait_for(tmp_path / "child"), _wait_for(tmp_path / "grandchild")]
    assert _gone(pids)


def test_kill_tree_signals_only_processes_it_found(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE, str(tmp_path)],
                            start_new_session=True)
    grandchild = _wait_for(tmp_path / "grandchild")
    found = procs.descendants(proc.pid)
    assert grandchild in found and found[grandchild] == procs.start_time(grandchild)
    procs.kill_tree(proc, grace_s=1.0)
    assert proc.returncode == -signal.SIGKILL
    assert _gone([proc.pid, grandchild])


def test_the_processes_of_a_folder_and_of_a_token(tmp_path: Path) -> None:
    env = {**os.environ, procs.STAGE_TOKEN_ENV: "tok-123"}
    # Working in a folder inside the attempt's (a test's pre-flight works in preflight/).
    inner = tmp_path / "attempt" / "preflight"
    inner.mkdir(parents=True)
    (tmp_path / "att").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            cwd=inner, env=env)
    tmp_path = tmp_path / "attempt"
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in procs.processes_in(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs.processes_in(tmp_path) == [proc.pid]
        assert procs.processes_in(inner) == [proc.pid]
        # A folder whose name is only the start of the attempt's is not it.
        assert procs.processes_in(tmp_path.parent / "att") == []
        assert procs.tagged_processes("tok-123") == [proc.pid]
        assert procs.tagged_processes("tok-1") == []
        assert procs.kill_processes_in(tmp_path, wait_s=5) == (proc.pid,)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert procs.processes_in(tmp_path) == [] and procs.tagged_processes("tok-123") == []
    finally:
        proc.kill()
        proc.wait()


def test_owner_state_and_process_token() -> None:
    me = os.getpid()
    token = procs.process_token(me)
    assert token and token == procs.process_token(me)
    host = socket.gethostname()
    assert procs.owner_state(me, host, token) == "alive"
    assert procs.owner_state(me, host, "another-boot:1") == "gone"  # a reused pid
    assert procs.owner_state(me, "some-other-host", token) == "elsewhere"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert procs.owner_state(dead.pid, host, "") == "gone"


def test_outside_signals_in_both_forms() -> None:
    assert procs.outside_signal(-signal.SIGKILL) == "SIGKILL"
    assert procs.outside_signal(-signal.SIGSEGV) is None  # the stage's own crash
    assert procs.outside_signal(1) is None and procs.outside_signal(None) is None
    assert procs.outside_exit_code(137) == "SIGKILL" and procs.outside_exit_code(143) == "SIGTERM"
    assert procs.outside_exit_code(139) is None and procs.outside_exit_code(None) is None
    assert set(procs.OUTSIDE_EXIT_CODES.values()) == set(procs.OUTSIDE_SIGNALS.values())
