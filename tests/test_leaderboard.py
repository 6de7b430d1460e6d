"""The leaderboard: aggregation semantics, sources, exports and the page, on inputs written by
the harness's own code (tests/leaderboard_fixtures.py)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from harness.cli import main
from harness.errors import UserError
from harness.leaderboard import (
    INVALID,
    SKIP_NO_SUBMISSION,
    SKIP_SESSION_TEST,
    Board,
    Collected,
    Entry,
    Row,
    Table,
    aggregate,
    baselines_page,
    build_board,
    collect,
    export,
    mls_key,
    read_board,
    write_board,
)
from harness.leaderboard.page import render_page
from harness.record import Origin, parse_record
from harness.runtime.fileio import atomic_write_json
from tests.leaderboard_fixtures import (
    TASK,
    Spec,
    as_schema_1,
    ledger_session,
    metrics_for,
    write_result,
)

MLS_345M = {"val_loss_gpt-345m", "wikitext2_ppl_gpt-345m", "lambada_ppl_gpt-345m",
            "arc_easy_lm-eval-345m", "hellaswag_lm-eval-345m", "piqa_lm-eval-345m",
            "winogrande_lm-eval-345m"}


def only_table(board: Board, scale: str = "smoke") -> Table:
    found = [t for t in board.tables if t.scale == scale]
    assert len(found) == 1, [t.id for t in board.tables]
    return found[0]


def row_of(table: Table, entrant: str, mode: str | None = None) -> Row:
    found = [r for r in table.rows if r.entrant == entrant and mode in (None, r.mode)]
    assert len(found) == 1, [(r.entrant, r.mode) for r in table.rows]
    return found[0]


def baseline(name: str, val: float, **others: float) -> Spec:
    return Spec(name=name, mode="baseline", agent="baseline", model="-", code=name,
                metrics=metrics_for(val, **others))


def vanilla(model: str, val: float, seed: int = 0, **metrics: float) -> Spec:
    return Spec(name=f"{model}-run{seed}", mode="vanilla", agent="llm", model=model,
                metrics=metrics_for(val, **metrics))


# --- aggregation semantics -----------------------------------------------------------------


def test_seeds_aggregate_to_mean_sample_std_and_n(tmp_path: Path) -> None:
    losses = [3.0, 3.25, 3.7]
    for i, v in enumerate(losses):
        write_result(tmp_path, vanilla("model-a", v, seed=i))
    table = only_table(build_board([tmp_path]))
    row = row_of(table, "model-a")
    cell = row.cells["val_loss"]
    assert (row.n, cell.n) == (3, 3)
    assert cell.mean == pytest.approx(statistics.mean(losses))
    assert cell.std == pytest.approx(statistics.stdev(losses))
    assert len(row.attempts) == 3 and len(table.rows) == 1
    low, high = scipy_stats.t.interval(0.95, 2, loc=cell.mean, scale=scipy_stats.sem(losses))
    assert cell.ci95 == pytest.approx((high - low) / 2)
    # Seeds average the curve step by step too, with the interval of each step's mean.
    first_points = [statistics.mean([v + 1.5 for v in losses])]
    assert row.curve[0] == (0, pytest.approx(first_points[0]))
    assert [s for s, _ in row.curve_ci95] == [s for s, _ in row.curve]
    assert row.curve_ci95[0][1] == pytest.approx((high - low) / 2)  # the same spread per step
    page = render_page(build_board([tmp_path]), tmp_path)
    assert page.count(f'<g id="ci-{table.id}-') == 1 and "shaded: the 95% confidence" in page


def test_entries_that_seeds_cannot_tell_apart_share_a_rank(tmp_path: Path) -> None:
    seeds = {"a": [3.00, 3.02, 2.98], "b": [3.01, 2.99, 3.03], "far": [3.50, 3.52, 3.48]}
    for model, losses in seeds.items():
        for i, v in enumerate(losses):
            write_result(tmp_path, vanilla(model, v, seed=i))
    board = build_board([tmp_path])
    table = only_table(board)
    a, b, far = (row_of(table, m) for m in seeds)
    assert (a.rank, a.tied, b.rank, b.tied) == (1, True, 1, True)
    assert (far.rank, far.tied) == (3, False)
    welch = scipy_stats.ttest_ind(seeds["far"], seeds["a"], equal_var=False).pvalue
    assert far.p_best == pytest.approx(welch) and welch < 0.05
    assert a.p_best is None  # the best row is not tested against itself
    # The rule's outcome is in every export, and on the page.
    rows = {r["model"]: r for r in json.loads(export(board, "json"))["rows"]}
    assert (rows["b"]["tied"], rows["far"]["tied"]) == (True, False)
    assert rows["far"]["p_best"] == pytest.approx(welch)
    assert rows["a"]["val_loss_smoke_ci95"] == pytest.approx(a.cells["val_loss"].ci95)
    assert "1 =" in export(board, "md")
    page = render_page(board, tmp_path)
    assert page.count('<span class="tie" title="tied') == 2


def test_single_seed_has_no_std(tmp_path: Path) -> None:
    write_result(tmp_path, vanilla("model-a", 3.0))
    cell = only_table(build_board([tmp_path])).rows[0].cells["val_loss"]
    assert cell.n == 1 and cell.std is None


def test_delta_against_the_best_baseline_respects_each_direction(tmp_path: Path) -> None:
    # The best baseline by val_loss (lower) is int2, though binary has the better ARC score.
    write_result(tmp_path, baseline("binary_sign", 3.0, arc_easy=45.0))
    write_result(tmp_path, baseline("int2_uniform", 2.5, arc_easy=41.0))
    write_result(tmp_path, vanilla("better", 2.4, arc_easy=43.0))
    write_result(tmp_path, vanilla("worse", 2.6, arc_easy=40.0))
    table = only_table(build_board([tmp_path]))
    assert table.best_baseline == "int2_uniform"
    ref = row_of(table, "int2_uniform").cells
    better, worse = row_of(table, "better").cells, row_of(table, "worse").cells
    for cells in (better, worse):
        for name, cell in cells.items():
            assert cell.delta == pytest.approx(cell.mean - ref[name].mean)
    assert better["val_loss"].delta < 0 and better["val_loss"].improved is True
    assert better["arc_easy"].delta > 0 and better["arc_easy"].improved is True
    assert worse["val_loss"].improved is False and worse["arc_easy"].improved is False
    # ↑ metrics: a higher value is the improvement, whatever the sign convention of delta.
    assert row_of(table, "binary_sign").cells["arc_easy"].improved is True


def test_no_baseline_no_delta(tmp_path: Path) -> None:
    write_result(tmp_path, vanilla("a", 3.0))
    table = only_table(build_board([tmp_path]))
    assert table.best_baseline is None
    assert all(c.delta is None and c.improved is None for c in table.rows[0].cells.values())


def test_rank_by_primary_metric_with_competition_ties(tmp_path: Path) -> None:
    for model, v in [("c", 3.1), ("a", 2.9), ("b", 2.9), ("d", 2.5)]:
        write_result(tmp_path, vanilla(model, v, arc_easy=99.0 if model == "c" else 10.0))
    table = only_table(build_board([tmp_path]))
    ranks = {r.entrant: r.rank for r in table.rows}
    assert ranks == {"d": 1, "a": 2, "b": 2, "c": 4}  # the ARC outlier does not decide
    assert [r.entrant for r in table.rows] == ["d", "a", "b", "c"]


def test_failed_and_invalid_rows_are_shown_but_never_ranked(tmp_path: Path) -> None:
    write_result(tmp_path, vanilla("ok", 3.0))
    write_result(tmp_path, Spec(name="crash", mode="vanilla", agent="llm", model="crashes",
                                status="failed_submission", reason="training raised: boom"))
    # A "success" without its primary metric cannot be ranked: invalid, with the reason.
    write_result(tmp_path, Spec(name="nometric", mode="vanilla", agent="llm", model="hollow",
                                metrics={"arc_easy": 90.0}))
    # One failure among succeeded seeds: the row is ranked on the successes and says so.
    write_result(tmp_path, vanilla("mixed", 2.0, seed=1))
    write_result(tmp_path, Spec(name="mixed-run2", mode="vanilla", agent="llm", model="mixed",
                                status="failed_infra", reason="node lost"))
    table = only_table(build_board([tmp_path]))
    crash, hollow = row_of(table, "crashes"), row_of(table, "hollow")
    assert crash.status == "failed_submission" and crash.rank is None
    assert "boom" in crash.reason and crash.details.verdict.startswith("not ranked")
    assert hollow.status == INVALID and hollow.rank is None and "val_loss" in hollow.reason
    assert hollow.details.verdict == f"invalid, not ranked: {hollow.reason}"
    assert all(c.mean is None for c in crash.cells.values())
    assert hollow.cells["arc_easy"].mean is None  # a value of an unranked run is no score
    mixed = row_of(table, "mixed")
    assert (mixed.rank, mixed.n, mixed.n_failed) == (1, 1, 1)
    assert [r.rank is not None for r in table.rows] == [True, True, False, False]


def test_in_progress_results_are_not_final(tmp_path: Path) -> None:
    done = write_result(tmp_path, vanilla("done", 3.0))
    running = write_result(tmp_path, vanilla("running", 2.0))
    data = json.loads(running.read_text())
    data["status"] = "running"
    atomic_write_json(running, data)
    board = build_board([tmp_path])
    assert [r.entrant for r in only_table(board).rows] == ["done"]
    assert sum(board.skipped.values()) == 1 and done.exists()
    # Shown as running beside the table, with nothing to show of its progress yet.
    (shown,) = board.live
    assert (shown.name, shown.status, shown.iter, shown.train_curve) == \
        (parse_record(running.read_bytes()).submission["name"], "running", None, [])
    assert shown.attempt_dir == str(running.parent)
    page = render_page(board, tmp_path)
    assert "Running now (1)" in page and "no progress reported yet" in page
    assert 'class="plot running-plot"' not in page  # no curve, no empty plot
    write_board(board, tmp_path / "board.json")
    assert read_board(tmp_path / "board.json").live == board.live


def test_unreadable_records_are_listed_not_dropped(tmp_path: Path) -> None:
    write_result(tmp_path, vanilla("fine", 3.0))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")
    future = write_result(tmp_path, vanilla("future", 2.0))
    data = json.loads(future.read_text())
    data["schema_version"] = 99
    atomic_write_json(future, data)
    board = build_board([tmp_path])
    reasons = sorted(p.reason for p in board.problems)
    assert len(reasons) == 2 and "not valid JSON" in reasons[0] and "99" in reasons[1]
    assert [r.entrant for r in only_table(board).rows] == ["fine"]


# --- no duplicate or contradictory rows ----------------------------------------------------


def test_the_same_attempt_fed_twice_is_one_row_of_one_seed(tmp_path: Path) -> None:
    path = write_result(tmp_path, vanilla("twice", 3.0))
    board = build_board([tmp_path, tmp_path], files=[path, path])
    table = only_table(board)
    assert len(table.rows) == 1 and table.rows[0].n == 1
    assert [a.attempt_id for a in table.rows[0].attempts] == [path.parent.name]


def test_two_copies_of_one_attempt_that_disagree_are_invalid(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    path = write_result(a, vanilla("edited", 3.0))
    shutil.copytree(path.parent, b / path.parent.name)
    copy = b / path.parent.name / "result.json"
    data = json.loads(copy.read_text())
    data["metrics"]["val_loss"] = 1.0  # someone "improved" a copy
    atomic_write_json(copy, data)
    table = only_table(build_board([a, b]))
    assert len(table.rows) == 1
    row = table.rows[0]
    assert row.status == INVALID and row.rank is None and "conflicting" in row.reason
    assert "conflicting" in row.details.verdict
    assert row.cells["val_loss"].mean is None  # neither 3.0 nor 1.0 is shown as its score
    assert [a.primary for a in row.attempts] == [None]


def test_two_results_of_one_key_are_one_row(tmp_path: Path) -> None:
    write_result(tmp_path, vanilla("same", 3.0, seed=1))
    write_result(tmp_path, vanilla("same", 3.5, seed=2))
    table = only_table(build_board([tmp_path]))
    assert len(table.rows) == 1 and table.rows[0].n == 2
    assert table.rows[0].cells["val_loss"].mean == pytest.approx(3.25)


KEYS = st.sampled_from([("baseline", "baseline", "-", "binary_sign"),
                        ("baseline", "baseline", "-", "int2_uniform"),
                        ("vanilla", "llm", "model-a", "x"), ("vanilla", "llm", "model-b", "y"),
                        ("agent", "llm", "model-a", "z"), ("vanilla", "-", "-", "anon")])
STATUSES = st.sampled_from(["succeeded", "succeeded", "failed_submission", "failed_infra",
                            "cancelled"])
LOSS = st.floats(min_value=1.0, max_value=12.0, allow_nan=False)


@st.composite
def records(draw: st.DrawFn) -> list[Entry]:
    """Attempts over a few keys and two scales, some read twice, some with a clashing copy."""
    out: list[Entry] = []
    for i in range(draw(st.integers(1, 25))):
        mode, agent, model, name = draw(KEYS)
        status = draw(STATUSES)
        metrics = {"val_loss": draw(LOSS), "arc_easy": draw(st.floats(0, 100))}
        rec = Entry(
            attempt_id=f"att-{i}", source=draw(st.sampled_from(["runs", "ledger"])),
            task=TASK.name, task_version=TASK.version,
            scale=draw(st.sampled_from(["smoke", "gpt-345m"])), name=name, agent=agent,
            mode=mode, model=model, status=status, reason="r",
            metrics=metrics if status == "succeeded" else {},
            finished_at=f"2026-01-01T00:00:{i:02d}Z")
        out.append(rec)
        if draw(st.booleans()):  # the same attempt read again (another runs dir, a copy)
            out.append(rec)
        if status == "succeeded" and draw(st.integers(0, 5)) == 0:  # an edited copy
            out.append(Entry(**{**rec.__dict__, "metrics": {**metrics,
                                                                    "val_loss": 0.5}}))
    return draw(st.permutations(out))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records())
def test_property_one_row_per_key_and_values_from_distinct_attempts(
        recs: list[Entry]) -> None:
    board = aggregate(Collected(records=list(recs)))
    keys = [r.key for t in board.tables for r in t.rows]
    assert len(keys) == len(set(keys)), "two rows for one key"
    by_id: dict[str, set[str]] = {}
    for rec in recs:
        by_id.setdefault(rec.attempt_id, set()).add(rec.fingerprint())
    for t in board.tables:
        assert {r.scale for r in t.rows} == {t.scale}
        ids = [a.attempt_id for r in t.rows for a in r.attempts]
        assert len(ids) == len(set(ids)), "an attempt counted in two rows or twice"
        for r in t.rows:
            trusted = [rec for rec in {x.attempt_id: x for x in recs}.values()
                       if "/".join(rec.key) == r.key and rec.status == "succeeded"
                       and len(by_id[rec.attempt_id]) == 1]
            assert r.n == len(trusted)
            if trusted:
                losses = [x.metrics["val_loss"] for x in trusted]
                assert r.cells["val_loss"].mean == pytest.approx(statistics.mean(losses))
                assert r.status == "succeeded" and r.rank is not None
            else:
                assert r.rank is None and r.cells["val_loss"].mean is None
        ranked = [r for r in t.rows if r.rank is not None]
        values = [r.cells["val_loss"].mean for r in ranked]
        assert values == sorted(values)  # rank order is val_loss order (lower is better)
        assert all(r.rank is None for r in t.rows[len(ranked):])


# --- scales, sources -----------------------------------------------------------------------


def test_scales_are_separate_tables(tmp_path: Path) -> None:
    write_result(tmp_path, vanilla("model-a", 7.5))
    write_result(tmp_path, Spec(name="big", mode="vanilla", agent="llm", model="model-a",
                                scale="gpt-345m", metrics=metrics_for(2.6)))
    board = build_board([tmp_path])
    smoke, big = only_table(board, "smoke"), only_table(board, "gpt-345m")
    assert [r.scale for r in smoke.rows] == ["smoke"] and [r.scale for r in big.rows] == [
        "gpt-345m"]
    assert smoke.rows[0].cells["val_loss"].mean == 7.5
    assert big.rows[0].cells["val_loss"].mean == 2.6
    page = render_page(board, tmp_path)
    sections = re.findall(r'<table class="board" data-scale="([^"]+)"', page)
    assert sorted(sections) == ["gpt-345m", "smoke"]
    assert "GPT-2 Medium" in page  # each table states its scale's description


def test_ledger_contributes_only_final_submissions(tmp_path: Path) -> None:
    home, runs = tmp_path / "home", tmp_path / "runs"
    write_result(runs, baseline("binary_sign", 3.0))
    sid = ledger_session(home, agent="claude", model="opus", tests=[
        Spec(name="t", metrics=metrics_for(2.9)), Spec(name="t", metrics=metrics_for(2.7)),
        Spec(name="t", status="failed_submission", reason="NaN")], submit=1)
    ledger_session(home, agent="gpt", model="five", tests=[
        Spec(name="t", metrics=metrics_for(2.0))], submit=None)
    # The home's own runs/ holds every test's folder: scanning it adds nothing.
    board = build_board([runs, home / "runs"], home=home)
    table = only_table(board)
    agent_row = row_of(table, "opus")
    assert len(table.rows) == 2 and agent_row.mode == "agent"
    assert agent_row.cells["val_loss"].mean == 2.9  # test #1, the submitted one, not #2's 2.7
    assert agent_row.attempts[0].source == "ledger"
    assert agent_row.attempts[0].audit.startswith("harness audit ")
    assert board.skipped[SKIP_NO_SUBMISSION] == 1
    assert board.skipped[SKIP_SESSION_TEST] == 4
    assert sid in agent_row.name


def test_session_tests_in_a_runs_dir_without_the_ledger_are_not_ranked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ledger_session(home, agent="claude", model="opus",
                   tests=[Spec(name="t", metrics=metrics_for(2.9))], submit=1)
    # Without the ledger, which test was final is unknown: none of them is a result.
    with pytest.raises(UserError, match="1 session tests"):
        build_board([home / "runs"])
    write_result(home / "runs", vanilla("plain", 3.0))
    board = build_board([home / "runs"])
    assert [r.entrant for r in only_table(board).rows] == ["plain"]
    assert board.skipped[SKIP_SESSION_TEST] == 1


def test_a_tampered_submission_is_invalid(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ledger_session(home, agent="claude", model="opus",
                   tests=[Spec(name="t", metrics=metrics_for(2.9))], submit=1)
    result = next((home / "runs").glob("*/result.json"))
    data = json.loads(result.read_text())
    data["metrics"]["val_loss"] = 1.5
    atomic_write_json(result, data)
    row = only_table(build_board(home=home)).rows[0]
    assert row.status == INVALID and row.rank is None
    assert "changed since the ledger recorded it" in row.reason


def test_nothing_to_aggregate_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no final results"):
        build_board([tmp_path])
    with pytest.raises(UserError, match="no runs directory"):
        collect([tmp_path / "missing"])


# --- the board file, exports ---------------------------------------------------------------


def test_board_file_round_trips(tmp_path: Path) -> None:
    write_result(tmp_path / "runs", baseline("binary_sign", 3.0))
    write_result(tmp_path / "runs", vanilla("a", 2.5))
    board = build_board([tmp_path / "runs"])
    write_board(board, tmp_path / "board.json")
    assert read_board(tmp_path / "board.json") == board


def test_records_of_every_schema_harness_record_reads_are_on_the_board(tmp_path: Path
                                                                       ) -> None:
    old = write_result(tmp_path, vanilla("old", 3.0))
    as_schema_1(old)
    write_result(tmp_path, vanilla("new", 2.0))
    board = build_board([tmp_path])
    assert [r.entrant for r in only_table(board).rows] == ["new", "old"]
    assert not board.problems


def test_session_tests_are_known_by_their_origin_not_their_name(tmp_path: Path) -> None:
    # Schema 2: the origin says it, whatever the name (no name is guessed at).
    write_result(tmp_path, vanilla("plain-name", 2.0),
                 origin=Origin("session", session_id="ses-20261123-abcd", number=1))
    # Schema 1 had no origin: harness.record's migration recovers it from the test's name.
    old = write_result(tmp_path, Spec(name="ses-abcd-t2", metrics=metrics_for(2.5)))
    as_schema_1(old)
    # A name that looks like a session test's on a plain run of schema 2 is a plain run.
    write_result(tmp_path, Spec(name="ses-abcd-t3", mode="vanilla", agent="llm",
                                model="lookalike", metrics=metrics_for(2.7)))
    # A final re-run of a session's submission counts as a plain run, for now.
    write_result(tmp_path, vanilla("rerun", 2.9),
                 origin=Origin("final", session_id="ses-20261123-abcd", number=1))
    board = build_board([tmp_path])
    assert [r.entrant for r in only_table(board).rows] == ["lookalike", "rerun"]
    assert board.skipped[SKIP_SESSION_TEST] == 2


def test_mls_key_mapping() -> None:
    assert {mls_key(m, "gpt-345m") for m in TASK.metrics} == MLS_345M
    assert {mls_key(m, "smoke") for m in TASK.metrics} == {
        k.replace("gpt-345m", "smoke").replace("345m", "smoke") for k in MLS_345M}


def test_exports_carry_the_mls_keys(tmp_path: Path) -> None:
    write_result(tmp_path, baseline("int2_uniform", 2.44))
    write_result(tmp_path, Spec(name="b", mode="baseline", agent="baseline", code="int2_uniform",
                                scale="gpt-345m", metrics=metrics_for(2.4395, arc_easy=53.83)))
    board = build_board([tmp_path])
    exported = json.loads(export(board, "json"))
    big = [r for r in exported["rows"] if r["scale"] == "gpt-345m"]
    assert len(big) == 1 and set(big[0]) >= MLS_345M
    assert big[0]["val_loss_gpt-345m"] == 2.4395 and big[0]["arc_easy_lm-eval-345m"] == 53.83
    small = next(r for r in exported["rows"] if r["scale"] == "smoke")
    assert "val_loss_smoke" in small and "arc_easy_lm-eval-smoke" in small
    assert not MLS_345M & set(small)
    table = list(csv.DictReader(io.StringIO(export(board, "csv"))))
    assert {r["scale"] for r in table} == {"smoke", "gpt-345m"}
    assert float(next(r for r in table if r["scale"] == "gpt-345m")["val_loss_gpt-345m"]) \
        == 2.4395
    md = export(board, "md")
    assert "`val_loss_gpt-345m`" in md and "`val_loss_smoke`" in md
    assert md.count("| Rank |") == 2
    with pytest.raises(UserError):
        export(board, "xlsx")


# --- the page ------------------------------------------------------------------------------


def test_page_is_self_contained_and_marks_rows(tmp_path: Path) -> None:
    write_result(tmp_path / "runs", baseline("binary_sign", 3.0))
    write_result(tmp_path / "runs", vanilla("a", 2.5))
    write_result(tmp_path / "runs", Spec(name="f", mode="vanilla", agent="llm", model="fails",
                                         status="failed_submission", reason="boom"))
    out = baselines_page(sorted((tmp_path / "runs").glob("*/result.json")), tmp_path / "lb")
    page = out.read_text()
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and not [r for r in refs if re.match(r"(?i)(https?:)?//", r)]
    assert "<link" not in page and "<script src" not in page and "@import" not in page
    assert "url(" not in page.replace('url(#', '')  # only in-page SVG references
    assert page.count("<svg") == 1
    assert page.count('<tbody class="entry') == 3
    assert page.count('class="entry baseline"') == 1 and 'class="entry unranked"' in page
    assert "↓" in page and "↑" in page
    # Each run links to its own result.json, relative to the page.
    for link in (r for r in refs if r.endswith("result.json")):
        assert (out.parent / link).resolve().is_file()
    assert (tmp_path / "lb" / "board.json").is_file()


# --- the command line ----------------------------------------------------------------------


def test_cli_build_render_export(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "nohome"))
    write_result(tmp_path / "runs", baseline("binary_sign", 3.0))
    board, page = tmp_path / "lb" / "board.json", tmp_path / "lb" / "index.html"
    assert main(["leaderboard", "build", "--runs-dir", str(tmp_path / "runs"),
                 "-o", str(board)]) == 0
    assert main(["leaderboard", "render", "--board", str(board), "-o", str(page)]) == 0
    assert "<svg" in page.read_text()
    capsys.readouterr()
    assert main(["leaderboard", "export", "--format", "json", "--board", str(board)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["model"] for r in rows] == ["binary_sign"]


def test_help_leaves_the_leaderboard_libraries_unimported() -> None:
    # pandas, jinja2 and matplotlib load inside the leaderboard commands only.
    code = ("import sys\nfrom harness.cli import main\n"
            "try:\n    main(['leaderboard', 'build', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('pandas', 'jinja2', 'matplotlib') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert "usage: harness leaderboard build" in proc.stdout
    assert proc.stdout.strip().endswith("[]")


@pytest.mark.parametrize("argv, message", [
    (["leaderboard", "render", "--board", "{missing}"], "no leaderboard file"),
    (["leaderboard", "export", "--format", "csv", "--board", "{notboard}"],
     "not a leaderboard file"),
    (["leaderboard", "build", "--runs-dir", "{missing}"], "no runs directory"),
    (["leaderboard", "build", "--runs-dir", "{empty}", "--no-ledger"], "no final results"),
    (["leaderboard", "build", "--runs-dir", "{empty}", "--home", "{empty}"], "no ledger"),
])
def test_cli_bad_input_is_one_clean_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notboard.json").write_text('{"schema": "something else"}')
    paths = {"missing": tmp_path / "missing.json", "notboard": tmp_path / "notboard.json",
             "empty": tmp_path / "empty"}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
