"""The one place that starts, watches, signals and reaps process trees.

Used on the host (the local runner, the runners' failure classification, `harness recover`,
the ledger's owner check) and inside the sandbox (the pre-flight orchestrator), so it imports
only the standard library.

    proc_stat, start_time, process_token, owner_state    who a pid is, and whether it lives
    descendants, tagged_processes, processes_in          finding the processes of a tree
    kill_tree, kill_tagged, kill_processes_in            stopping them
    run                                                  one process tree, under a deadline
    OUTSIDE_SIGNALS, outside_signal, outside_exit_code   kills that were not the stage's doing

A pid is only ever signalled while its start time is the one recorded when it was found:
a pid freed meanwhile may already belong to someone else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# SIGTERM first; this long for a process (torchrun reaping its ranks) to end, then SIGKILL.
KILL_GRACE_S = 10.0
# Set in a stage's environment, and so inherited by all its processes: how they are found
# when their process group does not hold them (torchrun starts each rank in a session of its
# own) or their parent is gone.
STAGE_TOKEN_ENV = "HARNESS_STAGE_TOKEN"
# The top process of a stage dying of these was someone else's doing (an operator, the
# out-of-memory killer, a scheduler): the stage's own code cannot signal it (the static rules
# refuse os, signal and subprocess). Container runtimes report them as exit code 128 + N.
OUTSIDE_SIGNALS: Mapping[signal.Signals, str] = {
    signal.SIGKILL: "SIGKILL", signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT",
    signal.SIGHUP: "SIGHUP"}
OUTSIDE_EXIT_CODES: Mapping[int, str] = {128 + int(sig): name
                                         for sig, name in OUTSIDE_SIGNALS.items()}
_PROC = Path("/proc")


def outside_signal(returncode: int | None) -> str | None:
    """The name of the outside signal a process died of, from its Popen-style return code
    (negative: killed by that signal), or None."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return OUTSIDE_SIGNALS.get(signal.Signals(-returncode))
    except ValueError:
        return None


def outside_exit_code(code: int | None) -> str | None:
    """The same for a container's exit code (128 + the signal), or None."""
    return None if code is None else OUTSIDE_EXIT_CODES.get(code)


# --- who a pid is ---------------------------------------------------------------------------


def proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and
    parentheses): state, ppid, pgrp, ...; None when there is no such process."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    try:
        return raw.rsplit(")", 1)[1].split()
    except IndexError:
        return None


def start_time(pid: int | str) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of stat), or None."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _boot_id() -> str:
    try:
        return (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def process_token(pid: int) -> str:
    """Boot id + the process's start time: unique per process across pid reuse and reboots.

    "" where /proc is missing; liveness then falls back to the pid alone.
    """
    started = start_time(pid)
    return f"{_boot_id()}:{started}" if started is not None else ""


def owner_state(pid: int, host: str, token: str) -> str:
    """'alive', 'gone', or 'elsewhere' (another host: this machine cannot tell) for the
    process (pid, host, process_token) that owns something."""
    if host != socket.gethostname():
        return "elsewhere"
    stat = proc_stat(pid)
    if stat is not None:
        # A zombie has exited: its parent just has not reaped it yet.
        if stat[0] in ("Z", "X"):
            return "gone"
        return "alive" if not token or process_token(pid) == token else "gone"
    if (_PROC / "self" / "stat").exists():
        return "gone"
    try:  # no /proc: the pid alone, which may have been reused
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "alive"
    return "alive"


# --- finding a tree -------------------------------------------------------------------------


def _pids() -> list[int]:
    try:
        return [int(e.name) for e in _PROC.iterdir() if e.name.isdigit()]
    except OSError:
        return []


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of root, with its start time."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for pid in _pids():
        fields = proc_stat(pid)
        if fields is None or len(fields) < 20:
            continue
        children.setdefault(int(fields[1]), []).append(pid)
        started[pid] = fields[19]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = started[child]
                todo.append(child)
    return found


def _mine(pid: int) -> bool:
    """Ours (this uid), not this process, and not a zombie."""
    if pid == os.getpid():
        return False
    try:
        if (_PROC / str(pid)).stat().st_uid != os.getuid():
            return False
    except OSError:
        return False
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def tagged_processes(token: str, var: str = STAGE_TOKEN_ENV) -> list[int]:
    """This user's live processes that carry var=token in their environment."""
    needle = f"{var}={token}".encode()
    found = []
    for pid in _pids():
        try:
            tagged = needle in (_PROC / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if tagged and _mine(pid):
            found.append(pid)
    return found


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def processes_in(folder: Path) -> list[int]:
    """This user's processes whose working directory is `folder` or inside it (a stage
    outlives a killed harness there: the test's pre-flight works in its `preflight/`), this
    process excluded."""
    target = str(Path(folder).resolve())
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            if (_PROC / str(pid)).stat().st_uid == os.getuid() and \
                    _inside(os.readlink(_PROC / str(pid) / "cwd"), target):
                found.append(pid)
        except OSError:
            continue
    return found


# --- stopping it ----------------------------------------------------------------------------


def _signal_known(victims: Mapping[int, str], sig: signal.Signals) -> None:
    """Signal each pid whose start time is still the recorded one."""
    for pid, started in victims.items():
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def kill_tree(proc: subprocess.Popen[bytes], *, grace_s: float = KILL_GRACE_S,
              term_descendants: bool = True) -> None:
    """SIGTERM, grace_s to end, then SIGKILL: to proc's process group and to every
    descendant, wherever its session (torchrun starts its ranks in sessions of their own).

    Descendants are found through /proc before anything is signalled, and again before the
    SIGKILL (a rank started meanwhile); one orphaned meanwhile is still remembered.
    term_descendants=False sends the SIGTERM to the group only, so that a launcher's own
    handler stops its children in order (torchrun does); the SIGKILL reaches all of them."""
    victims: dict[int, str] = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        victims.update(descendants(proc.pid))
        if term_descendants or sig == signal.SIGKILL:
            _signal_known(victims, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
            if sig == signal.SIGTERM:
                time.sleep(0.2)  # let a launcher's own SIGTERM handler reap its children
        except subprocess.TimeoutExpired:
            continue


def _kill_until_gone(find: Callable[[], list[int]], wait_s: float) -> tuple[int, ...]:
    """SIGKILL what find() returns until it returns nothing (one may have been forking as
    the first round came) or wait_s has passed; the pids signalled."""
    killed: list[int] = []
    deadline = time.monotonic() + wait_s
    while (pids := find()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.05)
    return tuple(killed)


def kill_tagged(token: str, *, wait_s: float = KILL_GRACE_S,
                var: str = STAGE_TOKEN_ENV) -> tuple[int, ...]:
    """SIGKILL every process tagged var=token: what is left of a stage once its top process
    is gone (ranks torchrun left behind would otherwise train on, writing into an attempt
    whose record is closed)."""
    return _kill_until_gone(lambda: tagged_processes(token, var), wait_s)


def kill_processes_in(folder: Path, wait_s: float = KILL_GRACE_S) -> tuple[int, ...]:
    """SIGKILL this user's processes working in `folder` until none is left; the pids."""
    return _kill_until_gone(lambda: processes_in(folder), wait_s)


# --- running one tree -----------------------------------------------------------------------


@dataclass
class ProcessRun:
    returncode: int | None
    timed_out: bool
    wall_s: float
    log: Path

    def tail(self, lines: int = 20) -> str:
        return log_tail(self.log, lines)


def log_tail(path: Path, lines: int) -> str:
    """The last lines of a process's log; empty when it is missing or unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run(argv: Sequence[str], *, cwd: Path, log: Path, deadline: float,
        env: Mapping[str, str], grace_s: float = KILL_GRACE_S) -> ProcessRun:
    """argv in a session of its own, stdout and stderr into `log`, until it ends or
    time.monotonic() passes `deadline`; then, or on any exception here (Ctrl-C), its whole
    tree is killed (kill_tree) before this returns or raises."""
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_tree(proc, grace_s=grace_s)
            rc, timed_out = proc.returncode, True
        except BaseException:
            kill_tree(proc, grace_s=grace_s)
            raise
    return ProcessRun(rc, timed_out, time.monotonic() - t0, log)
