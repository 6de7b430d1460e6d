"""The ledger: one SQLite file recording sessions, their attempts, results and submissions.

Several processes share it (an agent's separate CLI calls, a stdio server, `harness recover`),
and the budget needs atomic read-check-write steps. One rule keeps that simple: every write is
one short `BEGIN IMMEDIATE` transaction, so writers queue on SQLite's lock (a busy timeout)
and no transaction ever spans a training run. Each process opens its own connection.

An attempt row is written before its work starts and settled after; a crash leaves it in
progress with the owner's pid, host and start token, which `harness recover` uses to tell a
dead owner from a live one. The schema version is `PRAGMA user_version`; MIGRATIONS is the
ordered list that brings any older file (an empty one is version 0) up to date.
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.record import FINISHED, IN_PROGRESS, REFUNDABLE, Status
from harness.runtime.procs import process_token

HOME_ENV = "HARNESS_HOME"
DEFAULT_HOME = "~/.local/share/bitlinear-harness"
LEDGER_FILE = "ledger.sqlite3"
BUSY_TIMEOUT_S = 60.0

MODES = ("vanilla", "agent", "baseline")


# The statuses as migration 1 wrote them, and the one migration 4 added: a migration's text
# never changes once shipped, so these stay literal here (harness.record has the vocabulary).
_V1_STATUSES = ("pending", "checking", "running", "succeeded", "failed_submission",
                "failed_infra", "cancelled")


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


@dataclass(frozen=True)
class Migration:
    version: int
    summary: str
    statements: tuple[str, ...]
    # Run after the statements, inside the same transaction, for steps SQL alone cannot say.
    apply: Callable[[sqlite3.Connection], None] | None = None


def _widen_status_check(conn: sqlite3.Connection) -> None:
    """Add 'rule_violation' to the attempts table's CHECK on status, in place.

    SQLite cannot ALTER a CHECK constraint. Widening one is the case its documentation allows
    by rewriting the stored CREATE statement (every existing row still satisfies the new
    check), with the schema version bumped so other connections reload it."""
    old = "'failed_infra', 'cancelled'))"  # migration 1's text, see _V1_STATUSES
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND "
                       "name = 'attempts'").fetchone()
    if row is None or old not in row[0]:
        raise UserError("the ledger's attempts table is not the one this migration expects",
                        fix="restore the ledger from its backup or use another --home")
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    try:
        conn.execute("UPDATE sqlite_master SET sql = replace(sql, ?, ?) WHERE type = 'table' "
                     "AND name = 'attempts'", (old, "'failed_infra', 'cancelled', "
                                                    "'rule_violation'))"))
        conn.execute(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        conn.execute("PRAGMA writable_schema = OFF")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sessions, attempts, results, submissions", (
        f"""CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            task_version TEXT NOT NULL,
            task_root TEXT NOT NULL,
            template_sha256 TEXT NOT NULL,
            scale TEXT NOT NULL,
            agent TEXT NOT NULL,
            mode TEXT NOT NULL CHECK (mode IN ({_sql_list(MODES)})),
            model TEXT,
            created_at TEXT NOT NULL,
            budget INTEGER NOT NULL CHECK (budget >= 0))""",
        f"""CREATE TABLE attempts (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id),
            number INTEGER NOT NULL CHECK (number >= 1),
            status TEXT NOT NULL CHECK (status IN ({_sql_list(_V1_STATUSES)})),
            charged INTEGER NOT NULL DEFAULT 0 CHECK (charged IN (0, 1)),
            refunded INTEGER NOT NULL DEFAULT 0 CHECK (refunded IN (0, 1)),
            refund_reason TEXT,
            reason TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            spliced_sha256 TEXT,
            region_diff TEXT,
            check_report TEXT,
            runner TEXT,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            start_token TEXT NOT NULL,
            gpu_seconds REAL,
            attempt_dir TEXT,
            result_sha256 TEXT,
            UNIQUE (session_id, number))""",
        # ON UPDATE CASCADE: schema 1's attempts took their final id when their stage
        # started. Ids no longer change (harness.record.Attempt), but shipped text stays.
        """CREATE TABLE results (
            attempt_id TEXT NOT NULL REFERENCES attempts(id) ON UPDATE CASCADE,
            metric TEXT NOT NULL,
            value REAL NOT NULL,
            PRIMARY KEY (attempt_id, metric))""",
        """CREATE TABLE submissions (
            session_id TEXT PRIMARY KEY REFERENCES sessions(id),
            attempt_id TEXT NOT NULL UNIQUE REFERENCES attempts(id) ON UPDATE CASCADE,
            submitted_at TEXT NOT NULL)""",
        "CREATE INDEX attempts_by_status ON attempts(status)",
    )),
    Migration(2, "each session's edit history, replayed on open", (
        """CREATE TABLE edits (
            session_id TEXT NOT NULL REFERENCES sessions(id),
            seq INTEGER NOT NULL CHECK (seq >= 0),
            op TEXT NOT NULL CHECK (op IN ('replace', 'undo')),
            start_line INTEGER,
            end_line INTEGER,
            content TEXT,
            n INTEGER,
            created_at TEXT NOT NULL,
            PRIMARY KEY (session_id, seq))""",
    )),
    # Older sessions ran no pre-flight, but 1 is the safe default for a resumed one.
    Migration(3, "per-session switch for the pre-flight checks", (
        "ALTER TABLE sessions ADD COLUMN preflight INTEGER NOT NULL DEFAULT 1 "
        "CHECK (preflight IN (0, 1))",
    )),
    Migration(4, "status rule_violation: a rule broken at run time, charged, never ranked",
              (), apply=_widen_status_check),
    # A final run is an attempt row of the session, numbered after its tests, never charged:
    # the submitted test's files re-run at seed k (the test itself being seed 0).
    Migration(5, "final runs: re-runs of the submitted test at other seeds, outside the budget", (
        "ALTER TABLE attempts ADD COLUMN final_of TEXT REFERENCES attempts(id)",
        "ALTER TABLE attempts ADD COLUMN seed INTEGER CHECK (seed IS NULL OR seed >= 1)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def resolve_home(explicit: Path | str | None = None) -> Path:
    """--home, else $HARNESS_HOME, else ~/.local/share/bitlinear-harness."""
    raw = explicit or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(raw).expanduser().resolve()


# --- rows --------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRow:
    id: str
    task: str
    task_version: str
    task_root: str
    template_sha256: str
    scale: str
    agent: str
    mode: str
    model: str | None
    created_at: str
    budget: int
    preflight: bool = True  # run the pre-flight checks (free) before each training


@dataclass(frozen=True)
class AttemptRow:
    id: str
    session_id: str
    number: int
    status: str
    charged: bool
    refunded: bool
    refund_reason: str | None
    reason: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    spliced_sha256: str | None
    region_diff: str | None
    check_report: str | None
    runner: str | None
    host: str
    pid: int
    start_token: str
    gpu_seconds: float | None
    attempt_dir: str | None
    result_sha256: str | None
    final_of: str | None = None  # a final run: the id of the submitted test it re-runs
    seed: int | None = None  # a final run's seed k (the submitted test is seed 0)

    @property
    def is_final(self) -> bool:
        return self.final_of is not None

    @property
    def label(self) -> str:
        """How the agent and the audit name it: "test #2", "final seed 1 (run #4)"."""
        return f"final seed {self.seed} (run #{self.number})" if self.is_final \
            else f"test #{self.number}"

    @property
    def in_progress(self) -> bool:
        return self.status in IN_PROGRESS

    @property
    def state(self) -> Status:
        return Status(self.status)

    def duration_s(self) -> float | None:
        start = self.started_at or self.created_at
        if self.finished_at is None:
            return None
        return (parse_iso(self.finished_at) - parse_iso(start)).total_seconds()


@dataclass(frozen=True)
class EditOp:
    seq: int
    op: str  # "replace" | "undo"
    start_line: int | None
    end_line: int | None
    content: str | None
    n: int | None
    created_at: str

    def as_log(self) -> dict[str, Any]:
        """The op in the edit-log form EditSession.apply_log replays."""
        if self.op == "undo":
            return {"op": "undo", "n": self.n}
        return {"op": "replace", "start_line": self.start_line, "end_line": self.end_line,
                "content": self.content}


@dataclass(frozen=True)
class Settlement:
    """How an attempt ended; None leaves a column as it was."""

    status: Status
    reason: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    attempt_dir: str | None = None
    result_sha256: str | None = None
    gpu_seconds: float | None = None
    spliced_sha256: str | None = None
    region_diff: str | None = None
    check_report: str | None = None


def _columns(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
    # Iterating a Row yields its values, not its keys.
    return dict(zip(row.keys(), tuple(row), strict=True))


def _session(row: sqlite3.Row) -> SessionRow:
    data = _as_dict(row)
    data["preflight"] = bool(data["preflight"])
    return SessionRow(**data)


def _attempt(row: sqlite3.Row) -> AttemptRow:
    data = _as_dict(row)
    data["charged"], data["refunded"] = bool(data["charged"]), bool(data["refunded"])
    return AttemptRow(**data)


# --- the owner of an attempt -------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The process running an attempt. The token tells a live owner from a reused pid."""

    pid: int
    host: str
    token: str


def current_owner() -> Owner:
    return Owner(os.getpid(), socket.gethostname(), process_token(os.getpid()))


# --- connection and migrations -----------------------------------------------------


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are always explicit here."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        _use_wal(conn)
    except sqlite3.DatabaseError as e:
        raise UserError(f"cannot open the ledger: {e}", where=str(path),
                        fix="point --home (or $HARNESS_HOME) at a harness home directory") from None
    return conn


def _use_wal(conn: sqlite3.Connection, deadline_s: float = BUSY_TIMEOUT_S) -> None:
    """Put the file in WAL mode, so readers (audit, status) and the one writer never block.

    WAL is a property of the file: after the first open this only reads it. The conversion
    itself needs the file alone and SQLite answers "database is locked" at once, without its
    busy handler, when another process has it open — as when several sessions start together
    on a fresh home — so it is retried here until the same deadline the busy timeout uses.
    """
    give_up = time.monotonic() + deadline_s
    pause = 0.005
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > give_up:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(conn: sqlite3.Connection, *, where: str = "ledger",
            target: int = SCHEMA_VERSION) -> int:
    """Apply the migrations after the file's version, one transaction each; the new version."""
    while True:
        version = user_version(conn)
        if version > SCHEMA_VERSION:
            raise UserError(f"the ledger has schema version {version}; this harness knows up "
                            f"to {SCHEMA_VERSION}", where=where,
                            fix="upgrade the harness, or use another --home")
        if version >= target:
            return version
        with immediate(conn):
            # Re-read under the lock: another process may have migrated meanwhile.
            version = user_version(conn)
            if version < target:
                step = MIGRATIONS[version]
                for statement in step.statements:
                    conn.execute(statement)
                if step.apply is not None:
                    step.apply(conn)
                conn.execute(f"PRAGMA user_version = {step.version}")


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; taking the write lock up front makes check-then-write atomic."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# --- the ledger --------------------------------------------------------------------


class NoTestsLeft(UserError):
    """The budget is used up: the test is refused before anything runs."""

    def __init__(self, session_id: str, used: int, budget: int, succeeded: list[int]) -> None:
        numbers = ", ".join(str(n) for n in succeeded)
        super().__init__(
            f"No tests remaining ({used} of {budget} used); call submit(n=N)",
            where=f"session {session_id}",
            fix=f"N is the number of a succeeded test: {numbers}" if succeeded
            else "no test of this session succeeded, so there is nothing to submit")


class Ledger:
    """The ledger of one home directory; see the module docstring."""

    def __init__(self, home: Path | str | None = None, *, create: bool = True) -> None:
        self.home = resolve_home(home)
        self.path = self.home / LEDGER_FILE
        if not create and not self.path.is_file():
            # Reading commands must not leave an empty ledger behind a mistyped --home.
            raise UserError(f"no ledger in {self.home}", where=str(self.path),
                            fix="pass the --home (or $HARNESS_HOME) the session was started "
                                "with; `harness session start` creates a ledger")
        self.home.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.path)
        migrate(self.conn, where=str(self.path))

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def sessions_dir(self) -> Path:
        return self.home / "sessions"

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self.conn)

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same state (WAL snapshot)."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    # -- sessions --

    def create_session(self, row: SessionRow) -> None:
        names = _columns(SessionRow)
        marks = ", ".join("?" for _ in fields(SessionRow))
        with self._write() as c:
            c.execute(f"INSERT INTO sessions ({names}) VALUES ({marks})",
                      [getattr(row, f.name) for f in fields(SessionRow)])

    def session(self, session_id: str) -> SessionRow:
        row = self.conn.execute(f"SELECT {_columns(SessionRow)} FROM sessions WHERE id = ?",
                                (session_id,)).fetchone()
        if row is None:
            raise UserError(f"no session {session_id!r}", where=str(self.path),
                            fix="use an id printed by `harness session start` "
                                "(`harness session list` shows them all)")
        return _session(row)

    def has_session(self, session_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sessions WHERE id = ?",
                                 (session_id,)).fetchone() is not None

    def sessions(self) -> list[SessionRow]:
        rows = self.conn.execute(f"SELECT {_columns(SessionRow)} FROM sessions ORDER BY "
                                 "created_at, id").fetchall()
        return [_session(r) for r in rows]

    # -- edits --

    def edits(self, session_id: str) -> list[EditOp]:
        rows = self.conn.execute(f"SELECT {_columns(EditOp)} FROM edits WHERE session_id = ? "
                                 "ORDER BY seq", (session_id,)).fetchall()
        return [EditOp(**_as_dict(r)) for r in rows]

    def append_edit(self, session_id: str, seq: int, op: Mapping[str, Any]) -> None:
        """Record one applied op as number `seq`; refused if the history moved meanwhile."""
        with self._write() as c:
            self._require_open(c, session_id)
            count = c.execute("SELECT COUNT(*) FROM edits WHERE session_id = ?",
                              (session_id,)).fetchone()[0]
            if count != seq:
                raise UserError("another process edited this session at the same time; "
                                "nothing was changed", where=f"session {session_id}",
                                fix="view the file again, then retry the edit")
            c.execute("INSERT INTO edits (session_id, seq, op, start_line, end_line, content, n,"
                      " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (session_id, seq, op["op"], op.get("start_line"), op.get("end_line"),
                       op.get("content"), op.get("n"), now_iso()))

    # -- attempts --

    def attempts(self, session_id: str) -> list[AttemptRow]:
        """The session's tests, in order (its final runs: finals())."""
        rows = self.conn.execute(f"SELECT {_columns(AttemptRow)} FROM attempts WHERE "
                                 "session_id = ? AND final_of IS NULL ORDER BY number",
                                 (session_id,)).fetchall()
        return [_attempt(r) for r in rows]

    def finals(self, session_id: str) -> list[AttemptRow]:
        """The session's final runs, every try of every seed, in order."""
        rows = self.conn.execute(f"SELECT {_columns(AttemptRow)} FROM attempts WHERE "
                                 "session_id = ? AND final_of IS NOT NULL ORDER BY number",
                                 (session_id,)).fetchall()
        return [_attempt(r) for r in rows]

    def attempt(self, attempt_id: str) -> AttemptRow:
        row = self.conn.execute(f"SELECT {_columns(AttemptRow)} FROM attempts WHERE id = ?",
                                (attempt_id,)).fetchone()
        if row is None:
            raise UserError(f"no attempt {attempt_id!r}", where=str(self.path))
        return _attempt(row)

    def find_attempt(self, ref: str) -> AttemptRow:
        """An attempt by id, by a unique id prefix, or as SESSION:N (test #N of a session)."""
        sid, sep, num = ref.rpartition(":")
        if sep and num.isdigit() and self.has_session(sid):
            for a in self.attempts(sid):
                if a.number == int(num):
                    return a
            raise UserError(f"session {sid} has no test #{num}", where=str(self.path))
        rows = self.conn.execute(f"SELECT {_columns(AttemptRow)} FROM attempts WHERE id = ? "
                                 "OR substr(id, 1, ?) = ? ORDER BY id",
                                 (ref, len(ref), ref)).fetchall()
        exact = [r for r in rows if r["id"] == ref]
        if exact or len(rows) == 1:
            return _attempt((exact or rows)[0])
        raise UserError(f"{'no' if not rows else 'more than one'} attempt matches {ref!r}",
                        where=str(self.path),
                        fix="give a session id, an attempt id (a runs/ folder name) or "
                            "SESSION:N for test #N of a session")

    def in_progress(self) -> list[AttemptRow]:
        rows = self.conn.execute(f"SELECT {_columns(AttemptRow)} FROM attempts WHERE status IN "
                                 f"({_sql_list(IN_PROGRESS)}) ORDER BY created_at").fetchall()
        return [_attempt(r) for r in rows]

    def results(self, attempt_id: str) -> dict[str, float]:
        rows = self.conn.execute("SELECT metric, value FROM results WHERE attempt_id = ? "
                                 "ORDER BY metric", (attempt_id,)).fetchall()
        return {r["metric"]: r["value"] for r in rows}

    def used(self, session_id: str) -> int:
        return self._used(self.conn, session_id)

    @staticmethod
    def _used(c: sqlite3.Connection, session_id: str) -> int:
        used: int = c.execute("SELECT COUNT(*) FROM attempts WHERE session_id = ? AND charged = 1"
                              " AND refunded = 0", (session_id,)).fetchone()[0]
        return used

    @staticmethod
    def _succeeded(c: sqlite3.Connection, session_id: str) -> list[int]:
        rows = c.execute("SELECT number FROM attempts WHERE session_id = ? AND status = ? "
                         "AND final_of IS NULL ORDER BY number",
                         (session_id, Status.SUCCEEDED.value)).fetchall()
        return [r[0] for r in rows]

    def succeeded_numbers(self, session_id: str) -> list[int]:
        return self._succeeded(self.conn, session_id)

    def _require_open(self, c: sqlite3.Connection, session_id: str) -> None:
        sub = c.execute("SELECT a.number FROM submissions s JOIN attempts a ON a.id = "
                        "s.attempt_id WHERE s.session_id = ?", (session_id,)).fetchone()
        if sub is not None:
            raise UserError(f"the session is closed: test #{sub[0]} was submitted as final",
                            where=f"session {session_id}",
                            fix="start a new session to keep working")

    def new_attempt(self, session_id: str, owner: Owner,
                    make_id: Callable[[int], str]) -> AttemptRow:
        """The row of the session's next test, in one transaction with its refusals."""
        with self._write() as c:
            self._require_open(c, session_id)
            busy = c.execute(f"SELECT number, pid, host FROM attempts WHERE session_id = ? AND "
                             f"status IN ({_sql_list(IN_PROGRESS)})", (session_id,)).fetchone()
            if busy is not None:
                raise UserError(f"test #{busy[0]} is still in progress (pid {busy[1]} on "
                                f"{busy[2]})", where=f"session {session_id}",
                                fix="wait for it to finish; if that process is gone, run "
                                    "`harness recover`")
            budget = c.execute("SELECT budget FROM sessions WHERE id = ?",
                               (session_id,)).fetchone()[0]
            used = self._used(c, session_id)
            if used >= budget:
                raise NoTestsLeft(session_id, used, budget, self._succeeded(c, session_id))
            attempt_id = self._insert_next(c, session_id, owner, make_id)
        return self.attempt(attempt_id)

    def new_final(self, session_id: str, seed: int, owner: Owner,
                  make_id: Callable[[int], str]) -> AttemptRow:
        """The row of a final run at seed `seed` of the session's submitted test: numbered
        after every test and run, never charged. Refused when the session has no submission,
        or when that seed is in progress or has its outcome: succeeded, or failed by the
        submission (run again until it succeeds, a seed would be picked, not drawn). Only a
        seed stopped by a failure of ours (or cancelled) runs again."""
        assert seed >= 1, seed
        where = f"session {session_id}"
        with self._write() as c:
            sub = c.execute("SELECT attempt_id FROM submissions WHERE session_id = ?",
                            (session_id,)).fetchone()
            if sub is None:
                raise UserError("the session has no final submission to re-run", where=where,
                                fix="submit a succeeded test first: `harness session submit "
                                    f"{session_id} N`")
            taken = c.execute(
                f"SELECT number, status FROM attempts WHERE session_id = ? AND seed = ? AND "
                f"status NOT IN ({_sql_list(REFUNDABLE)})",
                (session_id, seed)).fetchone()
            if taken is not None:
                raise UserError(f"final seed {seed} is already {taken[1]} (run #{taken[0]})",
                                where=where, fix="nothing to do for this seed")
            attempt_id = self._insert_next(c, session_id, owner, make_id,
                                           final_of=sub[0], seed=seed)
        return self.attempt(attempt_id)

    @staticmethod
    def _insert_next(c: sqlite3.Connection, session_id: str, owner: Owner,
                     make_id: Callable[[int], str], *, final_of: str | None = None,
                     seed: int | None = None) -> str:
        """Insert the session's next row (pending, numbered after every test and final run)
        inside the caller's transaction; its id."""
        number = c.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM attempts WHERE "
                           "session_id = ?", (session_id,)).fetchone()[0]
        attempt_id = make_id(number)
        c.execute("INSERT INTO attempts (id, session_id, number, status, created_at, host, "
                  "pid, start_token, final_of, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (attempt_id, session_id, number, Status.PENDING.value, now_iso(),
                   owner.host, owner.pid, owner.token, final_of, seed))
        return attempt_id

    def set_status(self, attempt_id: str, status: Status, **columns: Any) -> None:
        """Move an attempt along pending -> checking -> running, with optional columns."""
        assert not status.finished, status
        sets = ", ".join([f"{k} = ?" for k in ("status", *columns)])
        with self._write() as c:
            cur = c.execute(f"UPDATE attempts SET {sets} WHERE id = ? AND status IN "
                            f"({_sql_list(IN_PROGRESS)})",
                            (status.value, *columns.values(), attempt_id))
            if cur.rowcount != 1:
                raise self._settled_elsewhere(c, attempt_id)

    def charge(self, attempt_id: str) -> None:
        """Charge one test as its stage starts, if the budget allows."""
        with self._write() as c:
            row = c.execute("SELECT session_id, number, status, final_of FROM attempts WHERE "
                            "id = ?", (attempt_id,)).fetchone()
            if row is None or row["status"] not in IN_PROGRESS:
                raise self._settled_elsewhere(c, attempt_id)
            assert row["final_of"] is None, "a final run is outside the budget"
            sid = row["session_id"]
            budget = c.execute("SELECT budget FROM sessions WHERE id = ?", (sid,)).fetchone()[0]
            used = self._used(c, sid)
            if used >= budget:
                raise NoTestsLeft(sid, used, budget, self._succeeded(c, sid))
            c.execute("UPDATE attempts SET charged = 1, status = ?, started_at = "
                      "COALESCE(started_at, ?) WHERE id = ?",
                      (Status.RUNNING.value, now_iso(), attempt_id))

    def reopen(self, attempt_id: str, owner: Owner) -> None:
        """Take up again a test stopped by a failure of ours (`harness resume`): in progress
        under a new owner and charged again, as a new test would be — its earlier refund
        returned what it was charged, so over its life it is charged once."""
        with self._write() as c:
            row = c.execute("SELECT session_id, number, status, final_of FROM attempts WHERE "
                            "id = ?", (attempt_id,)).fetchone()
            if row is None:
                raise UserError(f"no attempt {attempt_id} in this ledger", where=str(self.path))
            if row["final_of"] is not None:
                raise UserError(f"run #{row['number']} is a final run, not a test",
                                where=attempt_id, fix="`harness session finals SESSION` runs "
                                "the seeds a final still lacks")
            if row["status"] != Status.FAILED_INFRA.value:
                raise UserError(f"test #{row['number']} is {row['status']}; only a test stopped "
                                f"by a failure of ours resumes", where=attempt_id)
            sid = row["session_id"]
            self._require_open(c, sid)
            busy = c.execute(f"SELECT number FROM attempts WHERE session_id = ? AND status IN "
                             f"({_sql_list(IN_PROGRESS)})", (sid,)).fetchone()
            if busy is not None:
                raise UserError(f"test #{busy[0]} is still in progress", where=f"session {sid}",
                                fix="wait for it to finish, then resume")
            budget = c.execute("SELECT budget FROM sessions WHERE id = ?", (sid,)).fetchone()[0]
            used = self._used(c, sid)
            if used >= budget:
                raise NoTestsLeft(sid, used, budget, self._succeeded(c, sid))
            c.execute("UPDATE attempts SET status = ?, charged = 1, refunded = 0, "
                      "refund_reason = NULL, reason = NULL, finished_at = NULL, host = ?, "
                      "pid = ?, start_token = ? WHERE id = ?",
                      (Status.RUNNING.value, owner.host, owner.pid, owner.token, attempt_id))

    def finish(self, attempt_id: str, s: Settlement) -> AttemptRow:
        """Settle an in-progress attempt; a refundable status returns its charge."""
        assert s.status.finished, s.status
        refund = s.status.refundable
        with self._write() as c:
            cur = c.execute(
                "UPDATE attempts SET status = ?, reason = ?, finished_at = ?, "
                "refunded = CASE WHEN charged = 1 AND ? THEN 1 ELSE 0 END, "
                "refund_reason = CASE WHEN charged = 1 AND ? THEN ? ELSE NULL END, "
                "attempt_dir = COALESCE(?, attempt_dir), "
                "result_sha256 = COALESCE(?, result_sha256), "
                "gpu_seconds = COALESCE(?, gpu_seconds), "
                "spliced_sha256 = COALESCE(?, spliced_sha256), "
                "region_diff = COALESCE(?, region_diff), "
                "check_report = COALESCE(?, check_report) "
                f"WHERE id = ? AND status IN ({_sql_list(IN_PROGRESS)})",
                (s.status.value, s.reason, now_iso(), refund, refund,
                 f"{s.status.value}: {s.reason}",
                 s.attempt_dir, s.result_sha256, s.gpu_seconds, s.spliced_sha256,
                 s.region_diff, s.check_report, attempt_id))
            if cur.rowcount != 1:
                raise self._settled_elsewhere(c, attempt_id)
            if s.status.ranked:
                c.executemany("INSERT INTO results (attempt_id, metric, value) VALUES (?, ?, ?)",
                              [(attempt_id, k, float(v)) for k, v in s.metrics.items()
                               if math.isfinite(v)])
        return self.attempt(attempt_id)

    @staticmethod
    def _settled_elsewhere(c: sqlite3.Connection, attempt_id: str) -> UserError:
        row = c.execute("SELECT status FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        state = f"it is {row[0]}" if row else "it no longer exists"
        return UserError(f"attempt {attempt_id} was settled by another process ({state})",
                         fix="see `harness audit` for what happened; was `harness recover` run "
                             "while this attempt was alive on another host?")

    # -- submissions --

    def submission(self, session_id: str) -> AttemptRow | None:
        row = self.conn.execute("SELECT attempt_id FROM submissions WHERE session_id = ?",
                                (session_id,)).fetchone()
        return self.attempt(row[0]) if row else None

    def submit(self, session_id: str, number: int) -> AttemptRow:
        """Record test #number as the session's final answer: once, and only a succeeded one."""
        where = f"session {session_id}"
        with self._write() as c:
            self._require_open(c, session_id)
            row = c.execute(f"SELECT {_columns(AttemptRow)} FROM attempts WHERE session_id = ? "
                            "AND number = ? AND final_of IS NULL",
                            (session_id, number)).fetchone()
            ok = self._succeeded(c, session_id)
            fix = (f"submit a succeeded test: {', '.join(f'n={n}' for n in ok)}" if ok
                   else "no test of this session has succeeded; there is nothing to submit")
            if row is None:
                count = c.execute("SELECT COUNT(*) FROM attempts WHERE session_id = ? AND "
                                  "final_of IS NULL", (session_id,)).fetchone()[0]
                have = f"tests are numbered 1..{count}" if count else "no test has run yet"
                raise UserError(f"there is no test #{number} ({have})", where=where, fix=fix)
            a = _attempt(row)
            if a.in_progress:
                raise UserError(f"test #{number} has not finished (it is {a.status})",
                                where=where, fix="wait until it finishes")
            if a.status != Status.SUCCEEDED.value:
                raise UserError(f"test #{number} cannot be submitted: it ended {a.status} "
                                f"({a.reason})", where=where, fix=fix)
            c.execute("INSERT INTO submissions (session_id, attempt_id, submitted_at) "
                      "VALUES (?, ?, ?)", (session_id, a.id, now_iso()))
        return a

    def final_submissions(self) -> list[tuple[SessionRow, AttemptRow, dict[str, float]]]:
        """Every session's submitted attempt with its metrics, in three queries: what the
        leaderboard reads (call it inside snapshot() for one consistent view)."""
        cols = ", ".join([*(f"s.{f.name} AS s_{f.name}" for f in fields(SessionRow)),
                          *(f"a.{f.name} AS a_{f.name}" for f in fields(AttemptRow))])
        rows = self.conn.execute(f"SELECT {cols} FROM submissions sub JOIN sessions s ON "
                                 "s.id = sub.session_id JOIN attempts a ON a.id = "
                                 "sub.attempt_id ORDER BY s.created_at, s.id").fetchall()
        metrics: dict[str, dict[str, float]] = {}
        for r in self.conn.execute("SELECT r.attempt_id, r.metric, r.value FROM results r JOIN "
                                   "submissions sub ON sub.attempt_id = r.attempt_id"):
            metrics.setdefault(r[0], {})[r[1]] = r[2]
        out = []
        for r in rows:
            data = _as_dict(r)
            s = {k[2:]: v for k, v in data.items() if k.startswith("s_")}
            a = {k[2:]: v for k, v in data.items() if k.startswith("a_")}
            s["preflight"] = bool(s["preflight"])
            a["charged"], a["refunded"] = bool(a["charged"]), bool(a["refunded"])
            out.append((SessionRow(**s), AttemptRow(**a), metrics.get(a["id"], {})))
        return out

    def final_runs(self) -> list[tuple[SessionRow, AttemptRow, dict[str, float]]]:
        """Every finished final run of every session, with its metrics (inside snapshot())."""
        out = []
        for sid in [r[0] for r in self.conn.execute(
                "SELECT DISTINCT session_id FROM attempts WHERE final_of IS NOT NULL")]:
            session = self.session(sid)
            out += [(session, a, self.results(a.id)) for a in self.finals(sid)
                    if not a.in_progress]
        return out

    def attempt_ids(self) -> set[str]:
        """The id of every attempt of every session."""
        return {r[0] for r in self.conn.execute("SELECT id FROM attempts")}

    # -- integrity --

    def integrity_check(self) -> list[str]:
        """Every broken invariant, one sentence each; [] when the ledger is consistent."""
        with self.snapshot() as c:
            return [*_sqlite_problems(c), *_budget_problems(c), *_submission_problems(c),
                    *_attempt_problems(c)]


def _sqlite_problems(c: sqlite3.Connection) -> list[str]:
    out = [f"sqlite integrity_check: {r[0]}" for r in c.execute("PRAGMA integrity_check")
           if r[0] != "ok"]
    out += [f"foreign key: {r[0]} row {r[1]} points at a missing {r[2]} row"
            for r in c.execute("PRAGMA foreign_key_check")]
    return out


def _budget_problems(c: sqlite3.Connection) -> list[str]:
    rows = c.execute("SELECT s.id, s.budget, COUNT(a.id) FROM sessions s JOIN attempts a ON "
                     "a.session_id = s.id AND a.charged = 1 AND a.refunded = 0 GROUP BY s.id "
                     "HAVING COUNT(a.id) > s.budget").fetchall()
    out = [f"session {r[0]}: {r[2]} charged attempts on a budget of {r[1]}" for r in rows]
    out += [f"attempt {r[0]}: refunded but never charged" for r in
            c.execute("SELECT id FROM attempts WHERE refunded = 1 AND charged = 0")]
    out += [f"attempt {r[0]}: a final run, but charged to the budget" for r in
            c.execute("SELECT id FROM attempts WHERE final_of IS NOT NULL AND charged = 1")]
    return out


def _submission_problems(c: sqlite3.Connection) -> list[str]:
    out = [f"session {r[0]}: {r[1]} submissions" for r in c.execute(
        "SELECT session_id, COUNT(*) FROM submissions GROUP BY session_id HAVING COUNT(*) > 1")]
    rows = c.execute("SELECT s.session_id, s.attempt_id, a.session_id, a.status FROM "
                     "submissions s LEFT JOIN attempts a ON a.id = s.attempt_id").fetchall()
    for sid, aid, owner, status in rows:
        if owner is not None and owner != sid:
            out.append(f"session {sid}: submission points at attempt {aid} of session {owner}")
        elif owner is not None and status != Status.SUCCEEDED.value:
            out.append(f"session {sid}: submitted attempt {aid} is {status}, not succeeded")
    out += [f"attempt {r[0]}: a final run of {r[1]}, which is not its session's submission"
            for r in c.execute("SELECT a.id, a.final_of FROM attempts a LEFT JOIN submissions s "
                               "ON s.session_id = a.session_id WHERE a.final_of IS NOT NULL "
                               "AND (s.attempt_id IS NULL OR s.attempt_id != a.final_of)")]
    out += [f"session {r[0]}: final seed {r[1]} has {r[2]} outcomes (only a failure of ours "
            "is run again)" for r in c.execute(
                "SELECT session_id, seed, COUNT(*) FROM attempts WHERE final_of IS NOT NULL AND "
                f"status NOT IN ({_sql_list(REFUNDABLE)}) GROUP BY session_id, seed "
                "HAVING COUNT(*) > 1")]
    return out


def _attempt_problems(c: sqlite3.Connection) -> list[str]:
    finished, progress = _sql_list(FINISHED), _sql_list(IN_PROGRESS)
    out = [f"attempt {r[0]}: {r[1]} but has no finished_at" for r in c.execute(
        f"SELECT id, status FROM attempts WHERE status IN ({finished}) AND finished_at IS NULL")]
    out += [f"attempt {r[0]}: {r[1]} but has a finished_at" for r in c.execute(
        f"SELECT id, status FROM attempts WHERE status IN ({progress}) AND "
        "finished_at IS NOT NULL")]
    out += [f"attempt {r[0]}: has results but is {r[1]}" for r in c.execute(
        "SELECT DISTINCT a.id, a.status FROM results r JOIN attempts a ON a.id = r.attempt_id "
        "WHERE a.status != ?", (Status.SUCCEEDED.value,))]
    return out
