"""The ledger on its own: migrations, budget, refunds, submissions, recovery, integrity."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.audit import recover
from harness.errors import UserError
from harness.ledger import (
    LEDGER_FILE,
    MIGRATIONS,
    SCHEMA_VERSION,
    Ledger,
    NoTestsLeft,
    Owner,
    SessionRow,
    Settlement,
    connect,
    current_owner,
    migrate,
    now_iso,
    resolve_home,
    user_version,
)
from harness.record import Status
from harness.runtime.procs import owner_state
from tests.conftest import PYTHON


def make_session(ledger: Ledger, sid: str = "ses-1", budget: int = 3) -> SessionRow:
    row = SessionRow(id=sid, task="llm-pretrain-bitlinear", task_version="1.0.0",
                     task_root="/nowhere", template_sha256="0" * 64, scale="smoke",
                     agent="unit", mode="agent", model=None, created_at=now_iso(), budget=budget)
    ledger.create_session(row)
    return row


def start(ledger: Ledger, sid: str = "ses-1", owner: Owner | None = None) -> str:
    """A new attempt, charged as its stage starts; its id (which never changes)."""
    a = ledger.new_attempt(sid, owner or current_owner(), lambda n: f"{sid}-a{n}")
    ledger.charge(a.id)
    return a.id


def finish(ledger: Ledger, attempt_id: str, status: str, **kw: object) -> None:
    ledger.finish(attempt_id, Settlement(Status(status), reason=f"because {status}", **kw))  # type: ignore[arg-type]


def dead_pid() -> int:
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()  # reaped: the pid is free and names no process of ours
    return proc.pid


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "home") as led:
        yield led


# --- opening and migrations -------------------------------------------------------


def test_home_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "env"))
    assert resolve_home(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_home() == tmp_path / "env"
    monkeypatch.delenv("HARNESS_HOME")
    assert resolve_home() == Path("~/.local/share/bitlinear-harness").expanduser()


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == SCHEMA_VERSION


def test_an_empty_file_is_version_0_and_migrates_to_the_latest(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").touch()
    with Ledger(tmp_path) as led:
        assert user_version(led.conn) == SCHEMA_VERSION
        tables = {r[0] for r in led.conn.execute("SELECT name FROM sqlite_master WHERE "
                                                 "type = 'table'")}
        assert {"sessions", "attempts", "results", "submissions", "edits"} <= tables
        assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert led.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert led.integrity_check() == []


def test_an_older_ledger_keeps_its_rows_through_migration(tmp_path: Path) -> None:
    conn = connect(tmp_path / "ledger.sqlite3")
    assert migrate(conn, target=1) == 1  # a ledger written by a harness that knew only v1
    conn.execute("INSERT INTO sessions VALUES ('ses-old', 't', '1', '/t', 'x', 'smoke', 'a', "
                 "'agent', NULL, '2026-01-01T00:00:00Z', 3)")
    conn.close()
    with Ledger(tmp_path) as led:
        assert user_version(led.conn) == SCHEMA_VERSION
        assert led.session("ses-old").budget == 3
        assert led.session("ses-old").preflight is True  # migration 3's default
        assert led.edits("ses-old") == []


def test_a_v3_ledger_learns_rule_violation_in_place(tmp_path: Path) -> None:
    conn = connect(tmp_path / "ledger.sqlite3")
    assert migrate(conn, target=3) == 3  # before rule_violation existed
    conn.execute("INSERT INTO sessions VALUES ('ses-1', 't', '1', '/t', 'x', 'smoke', 'a', "
                 "'agent', NULL, '2026-01-01T00:00:00Z', 2, 1)")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute("INSERT INTO attempts (id, session_id, number, status, created_at, host, "
                      "pid, start_token) VALUES ('a0', 'ses-1', 9, 'rule_violation', 'now', "
                      "'h', 1, 't')")
    conn.close()
    with Ledger(tmp_path) as led:
        assert user_version(led.conn) == SCHEMA_VERSION
        finish(led, start(led), "rule_violation")
        (a,) = led.attempts("ses-1")
        # A rule broken at run time is the submission's doing: charged, never refunded.
        assert (a.status, a.charged, a.refunded) == ("rule_violation", True, False)
        assert led.used("ses-1") == 1 and led.integrity_check() == []
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            led.conn.execute("UPDATE attempts SET status = 'nonsense'")


def test_a_newer_ledger_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "ledger.sqlite3")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UserError, match="upgrade the harness"):
        Ledger(tmp_path)


def test_a_file_that_is_not_a_database_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").write_bytes(b"not a database at all, just bytes" * 10)
    with pytest.raises(UserError, match="cannot open the ledger"):
        Ledger(tmp_path)


# --- budget and refunds ---------------------------------------------------------------


def test_a_test_beyond_the_budget_is_refused_before_it_has_a_row(ledger: Ledger) -> None:
    make_session(ledger, budget=2)
    for _ in range(2):
        finish(ledger, start(ledger), "failed_submission")
    with pytest.raises(NoTestsLeft) as e:
        ledger.new_attempt("ses-1", current_owner(), lambda n: f"x{n}")
    assert e.value.what == "No tests remaining (2 of 2 used); call submit(n=N)"
    assert "nothing to submit" in str(e.value.fix)
    assert [a.number for a in ledger.attempts("ses-1")] == [1, 2]


def test_the_charge_rechecks_the_budget_when_the_stage_starts(ledger: Ledger) -> None:
    make_session(ledger, budget=1)
    a = ledger.new_attempt("ses-1", current_owner(), lambda n: "p1")
    ledger.conn.execute("UPDATE sessions SET budget = 0")  # as if spent meanwhile
    with pytest.raises(NoTestsLeft, match=r"\(0 of 0 used\)"):
        ledger.charge(a.id)
    row = ledger.attempt("p1")
    assert not row.charged and row.status == "pending"


def test_infra_failure_refunds_and_submission_failure_stays_charged(ledger: Ledger) -> None:
    make_session(ledger, budget=2)
    finish(ledger, start(ledger), "failed_infra")
    finish(ledger, start(ledger), "failed_submission")
    infra, mine = ledger.attempts("ses-1")
    assert infra.charged and infra.refunded
    assert infra.refund_reason == "failed_infra: because failed_infra"
    assert mine.charged and not mine.refunded and mine.refund_reason is None
    assert ledger.used("ses-1") == 1
    finish(ledger, start(ledger), "succeeded", metrics={"val_loss": 3.5})
    assert ledger.used("ses-1") == 2 and ledger.integrity_check() == []


def test_a_free_refusal_is_never_charged(ledger: Ledger) -> None:
    make_session(ledger, budget=1)
    a = ledger.new_attempt("ses-1", current_owner(), lambda n: "p1")
    ledger.set_status(a.id, Status.CHECKING)
    finish(ledger, a.id, "failed_submission")
    row = ledger.attempt("p1")
    assert (row.charged, row.refunded, row.status) == (False, False, "failed_submission")
    assert ledger.used("ses-1") == 0


def test_one_test_at_a_time_per_session(ledger: Ledger) -> None:
    make_session(ledger)
    start(ledger)
    with pytest.raises(UserError, match="test #1 is still in progress"):
        ledger.new_attempt("ses-1", current_owner(), lambda n: "p2")


def test_results_and_finding_by_reference(ledger: Ledger) -> None:
    make_session(ledger)
    final = start(ledger)
    finish(ledger, final, "succeeded", metrics={"val_loss": 3.25})
    assert ledger.results(final) == {"val_loss": 3.25}
    assert ledger.find_attempt(final).number == 1
    assert ledger.find_attempt("ses-1:1").id == final
    assert ledger.find_attempt(final[:-1]).id == final  # a unique prefix
    with pytest.raises(UserError, match="no test #7"):
        ledger.find_attempt("ses-1:7")


def test_results_are_stored_only_for_succeeded_attempts(ledger: Ledger) -> None:
    make_session(ledger)
    a = start(ledger)
    finish(ledger, a, "failed_submission", metrics={"val_loss": 3.0})
    assert ledger.results(a) == {}


# --- submissions ---------------------------------------------------------------------


def test_submit_rules(ledger: Ledger) -> None:
    make_session(ledger)
    with pytest.raises(UserError, match=r"no test #1 \(no test has run yet"):
        ledger.submit("ses-1", 1)
    bad = start(ledger)
    finish(ledger, bad, "failed_submission")
    running = start(ledger)
    with pytest.raises(UserError, match="test #2 has not finished"):
        ledger.submit("ses-1", 2)
    finish(ledger, running, "succeeded", metrics={"val_loss": 3.0})
    with pytest.raises(UserError, match="test #1 cannot be submitted: it ended failed_submis"):
        ledger.submit("ses-1", 1)
    with pytest.raises(UserError, match=r"no test #9 \(tests are numbered 1..2\)"):
        ledger.submit("ses-1", 9)
    assert ledger.submit("ses-1", 2).id == running
    with pytest.raises(UserError, match="the session is closed: test #2 was submitted"):
        ledger.submit("ses-1", 2)
    with pytest.raises(UserError, match="the session is closed"):
        ledger.new_attempt("ses-1", current_owner(), lambda n: "p3")
    with pytest.raises(UserError, match="the session is closed"):
        ledger.append_edit("ses-1", 0, {"op": "undo", "n": 1})
    assert ledger.integrity_check() == []


def test_submit_takes_only_an_attempt_of_its_own_session(ledger: Ledger) -> None:
    make_session(ledger, "ses-1")
    make_session(ledger, "ses-2")
    finish(ledger, start(ledger, "ses-2"), "succeeded", metrics={"val_loss": 3.0})
    with pytest.raises(UserError, match="no test #1"):
        ledger.submit("ses-1", 1)


# --- edits ---------------------------------------------------------------------------


def test_edits_are_numbered_and_a_stale_writer_is_refused(ledger: Ledger) -> None:
    make_session(ledger)
    ledger.append_edit("ses-1", 0, {"op": "replace", "start_line": 38, "end_line": 38,
                                    "content": "x = 1\n"})
    ledger.append_edit("ses-1", 1, {"op": "undo", "n": 1})
    with pytest.raises(UserError, match="another process edited this session"):
        ledger.append_edit("ses-1", 1, {"op": "undo", "n": 1})
    assert [e.as_log() for e in ledger.edits("ses-1")] == [
        {"op": "replace", "start_line": 38, "end_line": 38, "content": "x = 1\n"},
        {"op": "undo", "n": 1}]


# --- owners and recovery ----------------------------------------------------------------


def test_owner_state() -> None:
    me = current_owner()
    assert owner_state(me.pid, me.host, me.token) == "alive"
    assert owner_state(dead_pid(), me.host, "") == "gone"
    assert owner_state(me.pid, me.host, "another-boot:1") == "gone"  # a reused pid
    assert owner_state(me.pid, "some-other-host", me.token) == "elsewhere"


def test_recover_settles_dead_owners_and_leaves_live_ones(ledger: Ledger) -> None:
    make_session(ledger, "ses-1")
    make_session(ledger, "ses-2")
    me = current_owner()
    dead = Owner(dead_pid(), me.host, "boot:1")
    crashed = start(ledger, "ses-1", dead)
    alive = start(ledger, "ses-2", me)
    found = {r.attempt.id: r.action for r in recover(ledger)}
    assert found == {crashed: "settled", alive: "alive"}
    row = ledger.attempt(crashed)
    assert (row.status, row.charged, row.refunded) == ("failed_infra", True, True)
    assert "ended while the attempt was running" in str(row.reason)
    assert ledger.attempt(alive).status == "running"
    assert ledger.integrity_check() == []


# --- integrity ---------------------------------------------------------------------------


def plant(ledger: Ledger, sql: str, *params: object) -> None:
    ledger.conn.execute(sql, params)


def test_integrity_check_names_each_planted_inconsistency(ledger: Ledger) -> None:
    make_session(ledger, budget=1)
    failed = start(ledger)
    finish(ledger, failed, "failed_submission")
    assert ledger.integrity_check() == []
    plant(ledger, "INSERT INTO results VALUES (?, 'val_loss', 1.0)", failed)
    plant(ledger, "INSERT INTO submissions VALUES ('ses-1', ?, 'now')", failed)
    plant(ledger, "INSERT INTO attempts (id, session_id, number, status, charged, created_at, "
          "host, pid, start_token) VALUES ('x2', 'ses-1', 2, 'succeeded', 1, 'now', 'h', 1, '')")
    plant(ledger, "INSERT INTO attempts (id, session_id, number, status, refunded, created_at, "
          "host, pid, start_token) VALUES ('x3', 'ses-1', 3, 'pending', 1, 'now', 'h', 1, '')")
    problems = ledger.integrity_check()
    assert f"attempt {failed}: has results but is failed_submission" in problems
    assert f"session ses-1: submitted attempt {failed} is failed_submission, not succeeded" \
        in problems
    assert "session ses-1: 2 charged attempts on a budget of 1" in problems
    assert "attempt x2: succeeded but has no finished_at" in problems
    assert "attempt x3: refunded but never charged" in problems


def test_integrity_check_reports_a_dangling_reference(ledger: Ledger) -> None:
    make_session(ledger)
    ledger.conn.execute("PRAGMA foreign_keys = OFF")
    plant(ledger, "INSERT INTO results VALUES ('ghost', 'val_loss', 1.0)")
    assert any(p.startswith("foreign key: results") for p in ledger.integrity_check())


def test_each_process_has_its_own_connection_and_sees_committed_writes(tmp_path: Path) -> None:
    with Ledger(tmp_path) as a, Ledger(tmp_path) as b:
        make_session(a, "ses-a")
        assert b.session("ses-a").agent == "unit"
        with pytest.raises(sqlite3.IntegrityError):
            make_session(b, "ses-a")


def test_opening_a_fresh_file_waits_while_another_connection_writes(tmp_path: Path) -> None:
    # Sessions started together on a fresh home race to turn the file into WAL mode, and
    # SQLite refuses that conversion at once, without its busy timeout, while another
    # connection is writing (seen in CI as "cannot open the ledger: database is locked").
    path = tmp_path / LEDGER_FILE
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE early (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO early VALUES (1)")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        conn = connect(path)
    finally:
        release.join()
        holder.close()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
