"""The host reads a stage's folder as untrusted: never through a link the stage planted, never
blocking on a FIFO, and a folder holding either is the submission's rule violation (issue #24:
`final.json -> another attempt's submission.json` was followed and copied into the record)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.record import Status
from harness.runners.base import StageRun
from harness.runtime.fileio import read_stage_file, read_stage_json
from harness.stages import lmeval, pretrain


def _run(tmp_path: Path) -> StageRun:
    return StageRun(0, True, False, 1.0, tmp_path / "o", tmp_path / "e")


def test_a_stage_file_is_read_only_when_regular(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"val_loss": 0.1}))
    (tmp_path / "plain.json").write_text(json.dumps({"val_loss": 7.0}))
    (tmp_path / "link.json").symlink_to(secret)
    os.mkfifo(tmp_path / "fifo.json")  # opened without O_NONBLOCK, this read would hang
    (tmp_path / "big.json").write_bytes(b" " * 101)
    assert read_stage_json(tmp_path / "plain.json") == {"val_loss": 7.0}
    assert read_stage_json(tmp_path / "link.json") is None
    assert read_stage_json(tmp_path / "fifo.json") is None
    assert read_stage_file(tmp_path / "big.json", limit=100) is None
    assert read_stage_file(tmp_path / "big.json", limit=101) == b" " * 101
    assert read_stage_json(tmp_path / "missing.json") is None


@pytest.mark.parametrize("where", ["final.json", "segment-1/metrics.jsonl"])
def test_a_planted_link_is_a_rule_violation_of_the_pretrain_stage(tmp_path: Path,
                                                                   where: str) -> None:
    other = tmp_path / "other-attempt" / "submission.json"
    other.parent.mkdir()
    other.write_text('{"regions": "someone else\'s code"}')
    out = tmp_path / "pretrain"
    (out / "segment-1").mkdir(parents=True)
    (out / "final.json").write_text(json.dumps({"val_loss": 7.0}))
    (out / where).unlink(missing_ok=True)
    (out / where).symlink_to(other)
    got = pretrain.collect(_run(tmp_path), out, ["val_loss"])
    assert got.status is Status.RULE_VIOLATION
    assert got.reason == (f"rule violation (stage-files): pretrain/{where} is a symbolic link; "
                          f"the stage's frozen code writes regular files only")
    assert "someone else" not in json.dumps(got.details)


def test_a_planted_fifo_is_a_rule_violation_of_the_eval_stage(tmp_path: Path) -> None:
    out = tmp_path / "lm-eval"
    out.mkdir()
    os.mkfifo(out / "eval.json")
    got = lmeval.collect(_run(tmp_path), out, ["val_loss"])
    assert got.status is Status.RULE_VIOLATION
    assert got.reason.startswith("rule violation (stage-files): lm-eval/eval.json is not a "
                                 "regular file")
