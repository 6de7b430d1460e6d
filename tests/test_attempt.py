"""Attempts end to end: the record, its hashes, and how failures are classified."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.record import Status
from harness.runners.base import StageRun
from harness.runtime.fileio import sha256_file
from harness.stages.pretrain import collect
from harness.submission import load_submission
from harness.task import TaskSpec
from tests.conftest import PYTHON, REPO, TEMPLATE

CRASH_AT_STEP = '''
class _Counter:
    calls = 0


def weight_quant(weight):
    scale = weight.abs().mean().clamp(min=1e-5)
    w = weight / scale
    return w + (w.round().clamp(-1, 1) - w).detach(), scale


def activation_quant(x):
    return x, torch.ones((), device=x.device)


class BitLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        _Counter.calls += 1
        if _Counter.calls > 200:
            raise RuntimeError("submission bug: exploded after a few steps")
        w_q, s = weight_quant(self.weight)
        return F.linear(x, w_q * s, self.bias)
'''


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_baselines_command_records_success_and_submission_failure(tmp_path: Path,
                                                                  task: TaskSpec) -> None:
    subs = tmp_path / "subs"
    shutil.copytree(REPO / "baselines" / "int2_uniform", subs / "int2_uniform")
    (subs / "crashes").mkdir()
    (subs / "crashes" / "bitlinear.py").write_text(CRASH_AT_STEP)
    data = tmp_path / "data"
    # Relative directories, as `make run` uses them: stages run in the attempt's folder.
    proc = run_cli("baselines", "--scale", "smoke", "--baselines-dir", str(subs),
                   "--runs-dir", "runs", "--data-dir", "data", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]  # worst of the rows: a submission failure
    lines = proc.stdout.splitlines()
    # The table, then the leaderboard page of these runs (what `make run` ends with).
    assert lines[-1].startswith("leaderboard: ")
    page = tmp_path / lines[-1].removeprefix("leaderboard: ")
    assert page.is_file() and "int2_uniform" in page.read_text()
    table = lines[:-1]
    assert table[-4].split()[:4] == ["baseline", "seeds", "status", "val_loss"]
    by_name = {line.split()[0]: line.split() for line in table[-2:]}
    assert by_name["crashes"][1:3] == ["42/42", "failed_submission"]
    assert by_name["int2_uniform"][1:3] == ["42/42", "succeeded"]

    # The table shows result paths relative to the directory the command ran in.
    good_path, bad_path = tmp_path / by_name["int2_uniform"][-1], tmp_path / by_name["crashes"][-1]
    assert good_path.parent.parent == tmp_path / "runs"
    good = json.loads(good_path.read_text())
    assert good["schema_version"] == 2 and good["status"] == "succeeded"
    assert good["origin"] == {"kind": "baseline", "session_id": None, "number": None}
    assert good["seeds"] == {"init": 42, "data": 42}
    assert good["task"] == {"name": "llm-pretrain-bitlinear", "version": task.version}
    attempt = good_path.parent
    final = json.loads((attempt / "pretrain" / "final.json").read_text())
    assert (final["config"]["init_seed"], final["config"]["data_seed"]) == (42, 42)
    # The official val_loss is the eval stage's recomputation from the checkpoint (one
    # process, float32 on CPU); training's own number agrees to float32 rounding.
    scored = json.loads((attempt / "lm-eval" / "eval.json").read_text())["val_loss"]
    assert good["metrics"]["val_loss"] == scored["value"] and math.isfinite(scored["value"])
    assert good["stages"]["pretrain"]["trained_metrics"]["val_loss"] == final["val_loss"]
    assert abs(scored["value"] - final["val_loss"]) < 1e-5
    assert scored["windows"] == 4 * 4 * 2  # eval_iters x batch_size x world of the smoke scale
    assert final["world_size"] == 2
    assert good["submission"]["sha256"] == load_submission(subs / "int2_uniform", task).sha256
    assert good["template_sha256"] == sha256_file(TEMPLATE)
    assert good["spliced_sha256"] == sha256_file(attempt / "custom_pretrain.py")
    assert good["dataset"]["manifest_sha256"] == sha256_file(data / "smoke" / "manifest.json")
    for rel, digest in good["artifacts"].items():
        assert sha256_file(attempt / rel) == digest, rel
    assert {"pretrain/ckpt.pt", "pretrain/metrics.jsonl", "submission.diff"} <= set(
        good["artifacts"])
    assert good["environment"]["packages"]["torch"].startswith("2.")

    bad = json.loads(bad_path.read_text())
    assert bad["status"] == "failed_submission" and bad["metrics"] == {}
    assert bad["reason"] == ("training raised: RuntimeError: "
                             "submission bug: exploded after a few steps")
    assert "in forward" in bad["stages"]["pretrain"]["traceback"]


@pytest.mark.slow
def test_seeds_are_attempts_of_their_own_and_one_row_of_the_board(tmp_path: Path) -> None:
    from harness.leaderboard import build_board

    subs = tmp_path / "subs"
    shutil.copytree(REPO / "baselines" / "int2_uniform", subs / "int2_uniform")
    proc = run_cli("baselines", "--scale", "smoke", "--seeds", "2", "--baselines-dir",
                   str(subs), "--runs-dir", "runs", "--data-dir", "data", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "int2_uniform: running at scale smoke (seed 2 of 2)" in proc.stdout
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob(
        "*/result.json"))]
    assert sorted(r["seeds"]["init"] for r in records) == [42, 43]
    assert all(r["seeds"]["data"] == r["seeds"]["init"] for r in records)
    # The knob is live: another seed trains another model.
    losses = [r["metrics"]["val_loss"] for r in records]
    assert losses[0] != losses[1]
    # One row of two seeds, with its interval, on the page of these runs.
    (row,) = build_board([tmp_path / "runs"]).tables[0].rows
    assert row.n == 2 and row.cells["val_loss"].ci95 is not None
    page = (tmp_path / "runs" / "leaderboard" / "index.html").read_text()
    assert "over 2 seeds" in page


@pytest.mark.parametrize("count", ["0", "-1", "21"])
def test_a_seed_count_out_of_range_is_refused(tmp_path: Path, count: str) -> None:
    proc = run_cli("run", str(REPO / "baselines" / "int2_uniform"), "--seeds", count,
                   "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"--seeds {count}: each seed is a whole attempt" in proc.stderr
    assert "pass a count from 1 to 20" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


def _stage_run(tmp_path: Path, *, guard: bool = True, **kw: object) -> StageRun:
    """guard: the ranks got as far as importing the submission (the guard's marker)."""
    if guard:
        (tmp_path / "guard_rank0.json").write_text('{"started": true}')
    args: dict[str, object] = {"returncode": 0, "started": True, "timed_out": False,
                               "wall_s": 1.0, "stdout": tmp_path / "o", "stderr": tmp_path / "e"}
    args.update(kw)
    return StageRun(**args)  # type: ignore[arg-type]


def test_a_stage_that_failed_before_the_submission_ran_is_infra(tmp_path: Path) -> None:
    # harness.runtime.launch or the guard could not even start (no harness in the image, say).
    got = collect(_stage_run(tmp_path, guard=False, returncode=1), tmp_path)
    assert got.status is Status.FAILED_INFRA
    assert got.reason.startswith("the stage failed before the submission ran (exit code 1")
    # The same exit once a rank had imported the submission: the submission's.
    assert collect(_stage_run(tmp_path, returncode=1), tmp_path).status is \
        Status.FAILED_SUBMISSION


def test_a_stage_that_never_started_is_infra(tmp_path: Path) -> None:
    got = collect(_stage_run(tmp_path, started=False, returncode=None, error="no torchrun"),
                  tmp_path)
    assert got.status is Status.FAILED_INFRA and got.reason == "no torchrun"


def test_frozen_code_refusing_our_data_is_infra_even_with_a_crash_code(tmp_path: Path) -> None:
    (tmp_path / "error_rank1.json").write_text(json.dumps({"kind": "data", "message": "bad"}))
    got = collect(_stage_run(tmp_path, returncode=1), tmp_path)
    assert got.status is Status.FAILED_INFRA and "data error: bad" in got.reason


SAME = [1234.5678, 1234.5678]


@pytest.mark.parametrize("final,outcome", [
    ({"val_loss": float("nan"), "rank_param_checksums": SAME}, Status.FAILED_SUBMISSION),
    ({"val_loss": 3.5, "rank_param_checksums": SAME}, Status.SUCCEEDED),
    # Ranks that end with other parameters behaved differently: a rule violation, no score.
    ({"val_loss": 3.5, "rank_param_checksums": [1234.5678, 1234.5679]}, Status.RULE_VIOLATION),
    ({"val_loss": 3.5}, Status.RULE_VIOLATION),
])
def test_final_record_decides_the_pretrain_outcome(tmp_path: Path, final: dict[str, Any],
                                                   outcome: Status) -> None:
    (tmp_path / "final.json").write_text(json.dumps(final))
    got = collect(_stage_run(tmp_path), tmp_path, ["val_loss"])
    assert got.status is outcome
    assert got.metrics == ({"val_loss": 3.5} if outcome is Status.SUCCEEDED else {})


def test_a_recorded_violation_wins_over_the_ranks_crash_files(tmp_path: Path) -> None:
    (tmp_path / "error_rank0.json").write_text(json.dumps({"kind": "exception",
                                                           "message": "LowBitViolation: ..."}))
    (tmp_path / "violation_rank0.json").write_text(json.dumps(
        {"rule": "low-bit", "rank": "0", "message": "low-bit audit at step 10: lm_head ..."}))
    got = collect(_stage_run(tmp_path, returncode=1), tmp_path)
    assert got.status is Status.RULE_VIOLATION
    assert got.reason == ("rule violation (low-bit, rank 0): low-bit audit at step 10: "
                          "lm_head ...")


def test_an_exception_recorded_by_frozen_code_is_the_submissions(tmp_path: Path) -> None:
    # Even SystemExit(0) from submitted code must not pass for an infra failure (a refund).
    (tmp_path / "error_rank0.json").write_text(json.dumps(
        {"kind": "exception", "message": "Traceback ...\nSystemExit: 0\n"}))
    got = collect(_stage_run(tmp_path, returncode=0), tmp_path)
    assert got.status is Status.FAILED_SUBMISSION
    assert got.reason == "training raised: SystemExit: 0"


def test_timeout_and_crash_are_charged_to_the_submission(tmp_path: Path) -> None:
    assert collect(_stage_run(tmp_path, timed_out=True, returncode=None),
                   tmp_path).status is Status.FAILED_SUBMISSION
    assert collect(_stage_run(tmp_path, returncode=1), tmp_path).status is \
        Status.FAILED_SUBMISSION
