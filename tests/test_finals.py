"""Finals over several seeds: a session's submitted test re-run at the scale's other seeds,
outside the budget, recorded in the ledger and the audit, aggregated on the board.

Fast tests use FakeRunner (its val_loss moves with --init_seed); one `slow` test runs the
whole CLI flow at smoke scale for real, on a task whose smoke scale asks for two seeds.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.audit import audit
from harness.errors import UserError
from harness.leaderboard.aggregate import aggregate
from harness.leaderboard.collect import collect
from harness.leaderboard.export import export_csv
from harness.leaderboard.stats import ci_halfwidths
from harness.ledger import current_owner
from harness.record import Attempt, Status
from harness.session import Session
from harness.task import load_task
from tests.conftest import REPO
from tests.session_fakes import FakeRunner
from tests.test_session import GOOD, cli, ranges

PER_SEED = 0.01


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def submitted(home: Path, data: Path, runner: FakeRunner | None = None) -> Session:
    """A session whose one test (seed 0) succeeded and was submitted."""
    s = Session.create(agent="unit", model="m1", home=home, data_dir=data, preflight=False,
                       runner=runner or FakeRunner(per_seed=PER_SEED, stderr=0.5))
    first, last = ranges(s.view())[0]
    s.replace(None, first, last, GOOD)
    assert s.run_test().status == Status.SUCCEEDED.value
    s.submit(1)
    return s


@pytest.fixture
def session(home: Path, smoke_data: Path) -> Iterator[Session]:
    with submitted(home, smoke_data) as s:
        yield s


def test_finals_run_the_submitted_files_at_other_seeds_outside_the_budget(
        session: Session) -> None:
    report = session.run_finals(3)
    assert report.complete and report.exit_code == 0
    finals = session.ledger.finals(session.id)
    (test,) = session.ledger.attempts(session.id)
    assert [(a.number, a.seed, a.final_of, a.status, a.charged) for a in finals] == [
        (2, 1, test.id, "succeeded", False), (3, 2, test.id, "succeeded", False)]
    assert session.ledger.used(session.id) == 1  # the test alone
    scale = session.task.scale("smoke").seeds()
    for a in finals:
        record = Attempt(Path(str(a.attempt_dir))).read()
        assert (record.origin.kind, record.origin.number) == ("final", 1)
        assert record.seeds == {k: v + int(str(a.seed)) for k, v in scale.items()}
        assert a.spliced_sha256 == test.spliced_sha256
    values = [4.25 + PER_SEED * k for k in range(3)]
    assert [session.ledger.results(a.id)["val_loss"] for a in [test, *finals]] == \
        pytest.approx(values)
    (half,) = ci_halfwidths([0.01], [3])  # the std of 4.25, 4.26, 4.27
    assert report.message.splitlines()[-1] == \
        f"val_loss: {sum(values) / 3:.4f} ± {half:.4f} (95% CI, 3 seeds)"
    assert re.search(r"^  seed 2: succeeded +val_loss=4\.2700", report.message, re.MULTILINE)
    checked = audit(session.ledger, session.id)
    assert not checked.tampered, checked.text()
    assert "final s1" in checked.text() and "final s2" in checked.text()
    status = session.status_data()
    assert [(f["seed"], f["status"], f["charged"]) for f in status["finals"]] == \
        [(1, "succeeded", False), (2, "succeeded", False)]
    assert (status["used"], len(status["tests"])) == (1, 1)
    assert "  final seed 2 (run #3) succeeded" in session.status()
    # Nothing is run twice: a seed with its outcome stands.
    again = session.run_finals(3)
    assert len(session.ledger.finals(session.id)) == 2 and again.message == report.message


def test_the_board_takes_the_seeds_of_a_final_as_one_row(session: Session, home: Path) -> None:
    session.run_finals(3)
    board = aggregate(collect(home=home))
    (row,) = board.tables[0].rows
    assert (row.n, row.n_failed, row.entrant) == (3, 0, "m1")
    cell = row.cells["val_loss"]
    assert cell.mean == pytest.approx(4.26)
    (half,) = ci_halfwidths([0.01], [3])
    assert cell.ci95 == pytest.approx(float(half))
    # lm-eval's own standard error beside our interval, for the metrics lm-eval scores.
    assert row.cells["hellaswag"].lm_eval_stderr == pytest.approx(0.5)
    csv = export_csv(board).splitlines()
    assert "hellaswag_lm-eval-smoke_lm_eval_stderr" in csv[0].split(",")
    assert {a.attempt_id for a in row.attempts} == \
        {a.id for a in [*session.ledger.attempts(session.id), *session.ledger.finals(session.id)]}


def test_a_seed_failed_by_the_submission_stands_one_failed_by_us_runs_again(
        home: Path, smoke_data: Path) -> None:
    with submitted(home, smoke_data) as s:
        s.runner = FakeRunner(outcome="raise")
        failed = s.run_finals(2)
        assert failed.exit_code == Status.FAILED_SUBMISSION.exit_code and not failed.complete
        assert re.search(r"seed 1: failed_submission .*boom at step 5", failed.message)
        assert failed.message.splitlines()[-1] == \
            "val_loss: 4.2500 (1 seed); 1 of 2 seeds did not succeed"
        # Drawn, not picked: the failed seed is not run again.
        s.runner = FakeRunner()
        assert s.run_finals(2).message == failed.message
        assert len(s.ledger.finals(s.id)) == 1
        (row,) = aggregate(collect(home=home)).tables[0].rows
        assert (row.n, row.n_failed, row.reason) == (1, 1, "1 of 2 run(s) succeeded")

    with submitted(home, smoke_data) as s:
        s.runner = FakeRunner(outcome="infra")
        ours = s.run_finals(2)
        assert ours.exit_code == Status.FAILED_INFRA.exit_code
        assert s.ledger.finals(s.id)[0].status == "failed_infra"
        s.runner = FakeRunner(per_seed=PER_SEED)
        assert s.run_finals(2).complete
        assert [a.status for a in s.ledger.finals(s.id)] == ["failed_infra", "succeeded"]
        assert s.ledger.integrity_check() == []
        rows = aggregate(collect(home=home)).tables[0].rows
        # One row per agent and model: both sessions' seeds; the retried seed counts once.
        (row,) = rows
        assert (row.n, row.n_failed) == (3, 1)


def test_finals_refuse_bad_input_before_anything_runs(home: Path, smoke_data: Path) -> None:
    with Session.create(agent="unit", home=home, data_dir=smoke_data, preflight=False,
                        runner=FakeRunner()) as fresh, \
            pytest.raises(UserError, match="no final submission to re-run"):
        fresh.run_finals(3)
    with submitted(home, smoke_data) as s:
        for bad in (0, -1, 21):
            with pytest.raises(UserError, match=f"{bad} seeds: a final runs at 1 to 20"):
                s.run_finals(bad)
        snapshot = s.ledger.sessions_dir / s.id / "tests" / "1" / "bitlinear.py"
        snapshot.write_text(snapshot.read_text() + "\n# changed after the test\n")
        with pytest.raises(UserError, match="the submitted test's files changed since it ran"):
            s.run_finals(3)
        assert s.ledger.finals(s.id) == []


def test_the_ledger_keeps_finals_outside_the_budget(session: Session) -> None:
    session.run_finals(2)
    (final,) = session.ledger.finals(session.id)
    with pytest.raises(UserError, match="final seed 1 is already succeeded"):
        session.ledger.new_final(session.id, 1, current_owner(), lambda n: f"x{n}")
    with pytest.raises(UserError, match="is a final run, not a test"):
        session.ledger.reopen(final.id, current_owner())
    # Run #2 is the final, not a test: never offered for submission, not SESSION:2.
    assert session.ledger.succeeded_numbers(session.id) == [1]
    with pytest.raises(UserError, match="has no test #2"):
        session.ledger.find_attempt(f"{session.id}:2")
    conn = sqlite3.connect(session.ledger.path)
    with conn:
        conn.execute("UPDATE attempts SET charged = 1 WHERE id = ?", (final.id,))
    conn.close()
    assert session.ledger.integrity_check() == [
        f"attempt {final.id}: a final run, but charged to the budget"]


def test_a_forged_seed_that_ran_other_files_is_invalid(session: Session, home: Path) -> None:
    session.run_finals(2)
    (final,) = session.ledger.finals(session.id)
    attempt = Attempt(Path(str(final.attempt_dir)))
    # A consistent forgery: result.json says other files ran, and the ledger's hash agrees.
    raw = json.loads(attempt.record_path.read_text())
    raw["spliced_sha256"] = "0" * 64
    attempt.record_path.write_text(json.dumps(raw))
    conn = sqlite3.connect(session.ledger.path)
    with conn:
        conn.execute("UPDATE attempts SET result_sha256 = ? WHERE id = ?",
                     (attempt.record_sha256(), final.id))
    conn.close()
    (row,) = aggregate(collect(home=home)).tables[0].rows
    bad = next(a for a in row.attempts if a.attempt_id == final.id)
    assert bad.status == "invalid"
    assert bad.reason.startswith("final seed 1 (run #2) ran other files than the submitted "
                                 "test #1 (spliced 000000000000")
    assert row.n == 1


@pytest.mark.slow
def test_session_submit_runs_the_final_seeds_for_real(tmp_path: Path, smoke_data: Path) -> None:
    # The real task with its smoke scale asking for two seeds.
    task = tmp_path / "task"
    shutil.copytree(REPO / "tasks" / "llm-pretrain-bitlinear", task)
    smoke = task / "scales" / "smoke.toml"
    smoke.write_text(smoke.read_text().replace("final_seeds = 1", "final_seeds = 2"))
    assert load_task(task).finals_at(load_task(task).scale("smoke")) == 2
    home = tmp_path / "home"
    sid = cli("session", "start", "--agent", "cli", "--task", str(task), "--no-preflight",
              home=home).stdout.strip()
    with Session.open(sid, home=home) as s:
        first, last = ranges(s.view())[0]
        s.replace(None, first, last, GOOD)
    assert cli("session", "test", sid, home=home, data=smoke_data).returncode == 0
    done = cli("session", "submit", sid, "1", home=home, data=smoke_data, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "scored at 1 more seed(s), outside your budget" in done.stdout
    assert re.search(r"^  seed 1: succeeded +val_loss=\d+\.\d{4}", done.stdout, re.MULTILINE)
    assert re.search(r"^val_loss: \d+\.\d{4} ± \d+\.\d{4} \(95% CI, 2 seeds\)$", done.stdout,
                     re.MULTILINE), done.stdout
    checked = cli("audit", sid, "--json", home=home)
    assert checked.returncode == 0, checked.stdout
    rows = json.loads(checked.stdout)["attempts"]
    assert [(a["number"], a["seed"], a["charged"], a["status"]) for a in rows] == [
        (1, None, True, "succeeded"), (2, 1, False, "succeeded")]
    assert json.loads(checked.stdout)["used"] == 1
    board = aggregate(collect(home=home))
    (row,) = board.tables[0].rows
    assert row.n == 2 and row.cells["val_loss"].ci95 is not None
