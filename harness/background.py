"""A session test in a process of its own, for the tool servers (`harness mcp`, `serve`).

Why a process and not a thread of the server: the test must outlive the connection that
asked for it. A client that disconnects, times out or kills its stdio server mid-test would
otherwise kill the test with it, and a test stopped by a failure of ours is refunded: an
agent could try a file for free by hanging up before it finished. So the server starts
`python -m harness.background`, in a session of its own (no signal sent to the server's
process group reaches it), which runs `Session.run_test()` exactly as `harness session test`
does, settles the ledger row itself and writes its outcome as JSON. The server only watches:
the ledger row (which test it is), the template's progress file, and the outcome file.

Files, per session: `<home>/sessions/<id>/background/<token>.json` (the outcome) and
`<token>.log` (the worker's stdout and stderr: the local runner's warning, a bug's traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.errors import EXIT_INFRA, EXIT_USER, HarnessError, InfraError, UserError
from harness.ledger import AttemptRow, Ledger
from harness.progress import Progress, attempt_progress
from harness.record import Status
from harness.runtime.fileio import atomic_write_text

# How long the worker may take to write its test's ledger row (import, open the session,
# replay its edits) before the server gives up on it as a failure of ours.
START_TIMEOUT_S = 120.0
POLL_S = 0.5
EXIT_BUG = 1
EXIT_INTERRUPTED = 130  # as the CLI: someone stopped the worker (SIGTERM, Ctrl-C)


@dataclass(frozen=True)
class Outcome:
    """How a background test ended: the report of a test that ran (or was refused by the
    checks), or the error that stopped it before or outside a test."""

    exit_code: int
    report: dict[str, Any] | None = None  # harness.session.TestReport, as a dict
    error: str | None = None  # the message, as the CLI would print it
    error_kind: str | None = None  # "user" (exit 2), "harness" (ours, exit 3), "bug", "stopped"

    @property
    def message(self) -> str:
        if self.report is not None:
            return str(self.report["message"])
        return self.error or "(no message)"


@dataclass
class Background:
    """A test started in its own process; the server's handle on it."""

    session_id: str
    home: Path
    process: subprocess.Popen[bytes]
    outcome_path: Path
    log_path: Path
    after: int  # the session's last test number before this one started
    row: AttemptRow | None = None  # its ledger row, once the worker wrote it

    def finished(self) -> bool:
        return self.process.poll() is not None

    def outcome(self) -> Outcome:
        """The worker's outcome; a failure of ours when it died without writing one."""
        if self.outcome_path.is_file():
            return Outcome(**json.loads(self.outcome_path.read_text(encoding="utf-8")))
        tail = _tail(self.log_path, 20)
        return Outcome(EXIT_INFRA, error=f"the test's worker process (pid {self.process.pid}) "
                       f"ended with exit code {self.process.returncode} before it reported "
                       f"an outcome; its log {self.log_path} ends:\n{tail}",
                       error_kind="harness")

    def find_row(self) -> AttemptRow | None:
        """The test's ledger row as it is now: the session's attempt its worker owns (None
        before the worker wrote it)."""
        with Ledger(self.home, create=False) as ledger:
            if self.row is not None:
                self.row = ledger.attempt(self.row.id)
            else:
                mine = [a for a in ledger.attempts(self.session_id)
                        if a.pid == self.process.pid and a.number > self.after]
                self.row = mine[-1] if mine else None
        return self.row

    def progress(self) -> Progress | None:
        """The training's progress, from the template's progress file (None before it)."""
        row = self.find_row()
        return attempt_progress(row.attempt_dir) if row and row.attempt_dir else None


def start(session_id: str, *, home: Path, data_dir: Path | None = None,
          runner_args: Sequence[str] = ()) -> Background:
    """Start test of the session's current file in a new process; returns at once."""
    with Ledger(home, create=False) as ledger:
        after = max((a.number for a in ledger.attempts(session_id)), default=0)
    folder = home / "sessions" / session_id / "background"
    folder.mkdir(parents=True, exist_ok=True)
    token = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
    outcome, log = folder / f"{token}.json", folder / f"{token}.log"
    argv = [sys.executable, "-m", "harness.background", session_id, "--home", str(home),
            "--outcome", str(outcome), *runner_args]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    with log.open("wb") as out:
        # A session of its own: the server's client may kill the server's whole process
        # group when it disconnects; the test must run on and settle itself.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Reap it when it ends, whoever is still watching: no zombie for `harness recover`.
    threading.Thread(target=proc.wait, daemon=True).start()
    return Background(session_id, home, proc, outcome, log, after)


def wait_started(bg: Background, timeout_s: float = START_TIMEOUT_S) -> AttemptRow | None:
    """Block until the worker wrote its ledger row (None: it ended without one, e.g. refused
    because no test is left: its outcome says why). InfraError when it does neither."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = bg.find_row()
        if row is not None:
            return row
        if bg.finished():
            return bg.find_row()
        time.sleep(POLL_S / 5)
    raise InfraError(f"the test's worker process (pid {bg.process.pid}) wrote no ledger row "
                     f"in {timeout_s:.0f}s; its log: {bg.log_path}")


def started_message(row: AttemptRow) -> str:
    return (f"Test #{row.number} started in the background (attempt {row.id}). It runs on even "
            "if this connection closes. Poll `status` for its progress and outcome, and "
            f"`logs` with n={row.number} for its output.")


# --- the worker ----------------------------------------------------------------------------


def _tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _run(args: argparse.Namespace) -> Outcome:
    from harness.runners import make_runner
    from harness.runners.config import load_config, with_overrides
    from harness.session import Session

    try:
        runner = make_runner(with_overrides(load_config(args.config), kind=args.runner,
                                            image=args.image))
        with Session.open(args.session, home=args.home, data_dir=args.data_dir,
                          runner=runner) as s:
            report = s.run_test()
    except UserError as e:
        return Outcome(EXIT_USER, error=str(e), error_kind="user")
    except HarnessError as e:
        return Outcome(e.exit_code, error=str(e), error_kind="harness")
    except KeyboardInterrupt:  # the test itself was settled cancelled on the way out
        return Outcome(EXIT_INTERRUPTED, error="the test's worker was stopped (a signal); "
                       "the test was settled cancelled and refunded", error_kind="stopped")
    except Exception as e:  # a bug of ours: keep its traceback in the log
        traceback.print_exc()
        return Outcome(EXIT_BUG, error=f"internal error (a bug of the harness): "
                       f"{type(e).__name__}: {e}", error_kind="bug")
    code = EXIT_USER if report.free else Status(report.status).exit_code
    return Outcome(code, report=asdict(report))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.background",
                                description="run one session test; write its outcome as JSON")
    p.add_argument("session")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--outcome", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--runner", default=None)
    p.add_argument("--image", default=None)
    p.add_argument("--config", type=Path, default=None)
    args = p.parse_args(argv)

    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds like Ctrl-C: the stage stopped, the test cancelled

    signal.signal(signal.SIGTERM, interrupt)
    outcome = _run(args)
    atomic_write_text(args.outcome, json.dumps(asdict(outcome)))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
