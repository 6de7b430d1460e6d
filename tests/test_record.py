"""The attempt record: its status vocabulary, its schema, reading old records, one writer."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from harness.record import (
    FINISHED,
    IN_PROGRESS,
    SCHEMA_VERSION,
    Attempt,
    AttemptRecord,
    Origin,
    RecordError,
    StageRecord,
    Status,
    migrate,
    new_attempt_id,
    parse_record,
)
from tests.conftest import REPO

HARNESS = REPO / "harness"


def test_status_meanings() -> None:
    assert [s.value for s in Status if not s.finished] == ["pending", "checking", "running"]
    assert {s for s in Status if s.refundable} == {Status.FAILED_INFRA, Status.CANCELLED}
    assert {s for s in Status if s.ranked} == {Status.SUCCEEDED}
    codes = {s: s.exit_code for s in Status if s.finished}
    assert codes == {Status.SUCCEEDED: 0, Status.FAILED_INFRA: 3,
                     Status.FAILED_SUBMISSION: 4, Status.RULE_VIOLATION: 4,
                     Status.CANCELLED: 5}
    # Cancelled is not "the submission failed", nor a refusal of bad input (2).
    assert 2 not in codes.values()
    with pytest.raises(ValueError, match="no exit code"):
        _ = Status.RUNNING.exit_code
    assert f"{Status.FAILED_INFRA}" == str(Status.FAILED_INFRA) == "failed_infra"
    assert set(IN_PROGRESS) | set(FINISHED) == {s.value for s in Status}


@pytest.mark.parametrize("kwargs", [{"kind": "nope"}, {"kind": "session"},
                                    {"kind": "run", "session_id": "s", "number": 1},
                                    {"kind": "final", "session_id": "s"}])
def test_an_origin_that_contradicts_itself_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Origin(**kwargs)


def _record(**over: Any) -> AttemptRecord:
    base: dict[str, Any] = dict(
        attempt_id="20261206-000000-x-00000000-abcd", origin=Origin("session", "ses-1", 2),
        task={"name": "t", "version": "1"}, scale="smoke",
        submission={"name": "x", "meta": {"mode": "agent"}}, template_sha256="a" * 64,
        spliced_sha256="b" * 64, status=Status.SUCCEEDED, runner="local",
        metrics={"val_loss": 3.25},
        stages={"pretrain": StageRecord(Status.SUCCEEDED, "ok", returncode=0, wall_s=1.5,
                                        argv=["python"], details={"curve": [{"step": 0}]})})
    base.update(over)
    return AttemptRecord(**base)


def test_the_schema_of_result_json(tmp_path: Path) -> None:
    """The keys a reader of result.json sees, and that a record round-trips through them."""
    attempt = Attempt.create(tmp_path, new_attempt_id("x", "f" * 64))
    record = _record(attempt_id=attempt.id)
    sha = attempt.write(record)
    data = json.loads(attempt.record_path.read_text())
    assert sha == attempt.record_sha256()
    assert set(data) == {f.name for f in fields(AttemptRecord)}
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert data["status"] == "succeeded"
    assert data["origin"] == {"kind": "session", "session_id": "ses-1", "number": 2}
    # A stage's own fields are written flat beside the common ones, as schema 1 did.
    stage = data["stages"]["pretrain"]
    assert stage["curve"] == [{"step": 0}] and stage["outcome"] == "succeeded"
    assert {"returncode", "wall_s", "timed_out", "infra", "cancelled", "runner", "argv",
            "stderr_tail", "reason"} <= set(stage)
    assert attempt.read() == record


def test_close_finishes_only_an_unfinished_record(tmp_path: Path) -> None:
    attempt = Attempt.create(tmp_path, "a")
    (attempt.root / "x.txt").write_text("x")
    attempt.write(_record(status=Status.RUNNING, metrics={}))
    sha = attempt.close_unfinished(Status.FAILED_INFRA, "the harness died")
    got = attempt.read()
    assert (got.status, got.reason) == (Status.FAILED_INFRA, "the harness died")
    assert got.finished_at and got.artifacts == {"x.txt": attempt.manifest()["x.txt"]}
    assert sha == attempt.record_sha256()
    # A finished record stands.
    assert attempt.close_unfinished(Status.CANCELLED, "later") == sha
    assert attempt.read().status is Status.FAILED_INFRA
    assert Attempt.create(tmp_path, "b").close_unfinished(Status.FAILED_INFRA, "x") is None


# Records as schema 1 wrote them (harness.attempt.Result before the record module), trimmed
# to the keys that decide their migration.
V1 = {"schema_version": 1, "attempt_id": "20261123-000000-ses-ab12cd-t3-00000000-0000",
      "task": {"name": "llm-pretrain-bitlinear", "version": "1.0.0"}, "scale": "smoke",
      "submission": {"name": "ses-ab12cd-t3", "kind": "directory", "meta": {}},
      "template_sha256": "", "spliced_sha256": "", "status": "succeeded", "runner": "local",
      "metrics": {"val_loss": 7.8},
      "stages": {"pretrain": {"returncode": 0, "wall_s": 12.0, "timed_out": False,
                              "runner": {"pid": 1}, "infra": None, "cancelled": False,
                              "final": {"val_loss": 7.8}, "curve": [], "argv": ["x"],
                              "stderr_tail": "", "traceback": ""}}}


@pytest.mark.parametrize("submission,origin", [
    ({"name": "ses-ab12cd-t3", "meta": {}},
     {"kind": "session", "session_id": "ses-?-ab12cd", "number": 3}),
    ({"name": "ses-ab12cd-t1", "kind": "directory", "session": "ses-20261123-000000-ab12cd"},
     {"kind": "session", "session_id": "ses-20261123-000000-ab12cd", "number": 1}),
    ({"name": "ternary_158bit", "meta": {"mode": "baseline"}}, {"kind": "baseline"}),
    ({"name": "mine", "meta": {"mode": "agent"}}, {"kind": "run"}),
])
def test_schema_1_records_still_read(submission: dict[str, Any],
                                     origin: dict[str, Any]) -> None:
    record = parse_record(json.dumps({**V1, "submission": submission}).encode())
    assert record.schema_version == SCHEMA_VERSION
    assert record.origin == Origin(**origin)
    stage = record.stages["pretrain"]
    # Schema 1's pretrain stage had no outcome of its own: it was the attempt's.
    assert stage.wall_s == 12.0 and stage.details["final"] == {"val_loss": 7.8}


def test_real_schema_1_files_in_the_repository_still_read() -> None:
    """Every result.json kept in docs/ (written by earlier harness versions) migrates."""
    found = [p for p in (REPO / "docs").rglob("*.json")
             if '"schema_version": 1' in p.read_text(encoding="utf-8")
             and '"attempt_id"' in p.read_text(encoding="utf-8")]
    for path in found:
        data = json.loads(path.read_text(encoding="utf-8"))
        for rec in _records_in(data):
            assert migrate(rec)["schema_version"] == SCHEMA_VERSION


def _records_in(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        if "attempt_id" in data and "schema_version" in data and "status" in data:
            return [data]
        return [r for v in data.values() for r in _records_in(v)]
    if isinstance(data, list):
        return [r for v in data for r in _records_in(v)]
    return []


@pytest.mark.parametrize("raw,why", [
    (b"{", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({**V1, "schema_version": 99}).encode(), "schema_version 99"),
    (json.dumps({**V1, "schema_version": True}).encode(), "schema_version True"),
    (json.dumps({**V1, "status": "winning"}).encode(), "unknown status 'winning'"),
    (json.dumps({**V1, "task": "t"}).encode(), "task is not an object"),
    (json.dumps({k: v for k, v in V1.items() if k != "attempt_id"}).encode(), "no attempt_id"),
])
def test_unreadable_records_say_why(raw: bytes, why: str) -> None:
    with pytest.raises(RecordError, match=why.replace("(", r"\(")):
        parse_record(raw)


# --- the reviewer's checks: one writer, one vocabulary --------------------------------------

def _modules() -> list[Path]:
    return sorted(p for p in HARNESS.rglob("*.py"))


def test_result_json_is_named_only_by_the_record_module() -> None:
    """No other module builds the path of result.json, so none can write or parse it."""
    offenders = []
    for path in _modules():
        if path.name == "record.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "result.json" \
                    and id(node) not in docstrings:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


# Literals equal to a status word that are not ours: Docker's container states, and the
# ledger's migrations, whose shipped text never changes.
NOT_OURS = {("runners/docker.py", "running"), ("ledger.py", "pending"), ("ledger.py", "checking"),
            ("ledger.py", "running"), ("ledger.py", "succeeded"),
            ("ledger.py", "failed_submission"), ("ledger.py", "failed_infra"),
            ("ledger.py", "cancelled")}


def test_status_words_are_spelled_only_in_the_record_module() -> None:
    words = {s.value for s in Status}
    found = set()
    for path in _modules():
        rel = str(path.relative_to(HARNESS))
        if rel == "record.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in words:
                found.add((rel, node.value, node.lineno))
    assert sorted(f for f in found if (f[0], f[1]) not in NOT_OURS) == []
