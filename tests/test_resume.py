"""Checkpoints, resume and the watchdogs: a killed run continues to the same result, a run
whose loss blows up stops early as the submission's, a hung one is stopped as ours; and a
running attempt's progress is shown as it goes.

The end-to-end cases train for real (torchrun, 2 gloo processes) on a copy of the task with
one more scale: the smoke model with a 256-token vocabulary, long enough to be killed in the
middle. The template's CPU settings are deterministic, so "the same result" is bitwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.attempt import prepare, resume_attempt, run_attempt
from harness.errors import UserError
from harness.ledger import current_owner
from harness.record import Attempt, AttemptRecord, Origin, Status
from harness.runners.base import StageRun, StageSpec
from harness.runners.local import LocalRunner
from harness.runtime.fileio import sha256_file
from harness.session import Session
from harness.stages.base import Unresumable
from harness.stages.pretrain import RESUME_INDEX, resume_point
from harness.task import TaskSpec, load_task
from tests.conftest import PYTHON, REPO, wait_for, write_shards
from tests.session_fakes import FakeRunner

VOCAB = 256
SCALE = f"""
[scale]
name = "resume-test"
description = "the smoke model, a 256-token vocabulary, long enough to be killed midway"
device = "cpu"
nproc_per_node = 2
dataset = "cycle"
stages = ["pretrain"]
timeout_s = 600
stall_timeout_s = 120

[config]
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32
vocab_size = {VOCAB}
dropout = 0.1
batch_size = 4
gradient_accumulation_steps = 2
max_iters = 240
warmup_iters = 3
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 60
eval_iters = 2
log_interval = 1
checkpoint_interval = 40
max_train_loss = 16.0
compile = false
dtype = "float32"
"""


@pytest.fixture(scope="module")
def resume_task(tmp_path_factory: pytest.TempPathFactory) -> TaskSpec:
    """The real task (same template, same frozen files) with the resume-test scale."""
    root = tmp_path_factory.mktemp("task") / "llm-pretrain-bitlinear"
    shutil.copytree(REPO / "tasks" / "llm-pretrain-bitlinear", root)
    (root / "scales" / "resume-test.toml").write_text(SCALE)
    return load_task(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    # A learnable stream with some noise, so dropout and the data order both matter.
    cycle = np.tile(np.arange(10, 60), 400)
    noisy = np.where(rng.random(cycle.size) < 0.1, rng.integers(0, VOCAB, cycle.size), cycle)
    write_shards(root / "cycle", noisy, np.tile(np.arange(10, 60), 40))
    manifest = json.loads((root / "cycle" / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = VOCAB
    (root / "cycle" / "manifest.json").write_text(json.dumps(manifest))
    return root


def run(task: TaskSpec, data: Path, runs: Path, name: str, *, retries: int,
        kill_at: int | None = None, submission: Path = REPO / "baselines" / "ternary_158bit"
        ) -> tuple[AttemptRecord, Attempt]:
    attempt = Attempt.create(runs, name)
    killer = None
    if kill_at is not None:
        killer = threading.Thread(target=kill_rank_after, daemon=True,
                                  args=(attempt, attempt.file(task.template), 1, kill_at))
        killer.start()
    record = run_attempt(prepare(submission, task), task, task.scale("resume-test"),
                         attempt=attempt, origin=Origin("run"), data=data, runner=LocalRunner(),
                         retries=retries)
    if killer is not None:
        killer.join(timeout=5)
    return record, attempt


def rank_pid(script: Path, rank: int) -> int | None:
    """The pid of one torchrun worker of this attempt, found by its command and RANK."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"harness.runtime.guard" in argv and str(script).encode() in argv \
                and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def kill_rank_after(attempt: Attempt, script: Path, rank: int, at: int) -> None:
    """SIGKILL one rank once training has passed iteration `at` (a checkpoint behind it)."""
    progress = attempt.root / "pretrain" / "progress.json"

    def reached() -> bool:
        try:
            return int(json.loads(progress.read_text())["iter"]) >= at
        except (OSError, ValueError, KeyError):
            return False

    pid = wait_for(lambda: rank_pid(script, rank), timeout=120, step=0.05)
    wait_for(reached, timeout=300, step=0.01)
    os.kill(pid, signal.SIGKILL)


def rows(attempt: Attempt, name: str) -> list[dict[str, Any]]:
    lines = (attempt.root / "pretrain" / name).read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]


@pytest.fixture(scope="module")
def uninterrupted(resume_task: TaskSpec, data: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[AttemptRecord, Attempt]:
    record, attempt = run(resume_task, data, tmp_path_factory.mktemp("runs"), "whole",
                          retries=0)
    assert record.status is Status.SUCCEEDED, record.reason
    return record, attempt


@pytest.mark.slow
def test_a_rank_killed_midway_resumes_to_the_same_result(
        resume_task: TaskSpec, data: Path, tmp_path: Path,
        uninterrupted: tuple[AttemptRecord, Attempt]) -> None:
    whole, whole_attempt = uninterrupted
    record, attempt = run(resume_task, data, tmp_path, "killed", retries=1, kill_at=100)
    assert record.status is Status.SUCCEEDED, record.reason
    first, second = record.stages["pretrain"].segments
    assert first["outcome"] == "failed_infra" and "rank 1 was killed by SIGKILL" in first["reason"]
    # It went on from the last checkpoint before the kill, not from zero.
    assert first["checkpoint"]["iter"] >= 80 and second["from_iter"] == first["checkpoint"]["iter"]
    assert second["outcome"] == "succeeded"
    # Bitwise the same run: the final score, every evaluation, every logged train loss.
    assert record.metrics["val_loss"] == whole.metrics["val_loss"]
    assert rows(attempt, "metrics.jsonl") == rows(whole_attempt, "metrics.jsonl")
    assert rows(attempt, "train_log.jsonl") == rows(whole_attempt, "train_log.jsonl")
    # The stopped launch's files are kept aside, and the record names the final checkpoint.
    assert (attempt.root / "pretrain" / "segment-1" / "stderr.log").is_file()
    index = json.loads((attempt.root / "pretrain" / RESUME_INDEX).read_text())
    assert second["checkpoint"]["sha256"] == index["sha256"] == sha256_file(
        attempt.root / "pretrain" / index["file"])
    assert index["iter"] == 240


@pytest.mark.slow
def test_harness_resume_continues_a_stopped_attempt_and_refuses_a_changed_one(
        resume_task: TaskSpec, data: Path, tmp_path: Path,
        uninterrupted: tuple[AttemptRecord, Attempt]) -> None:
    record, attempt = run(resume_task, data, tmp_path, "stopped", retries=0, kill_at=60)
    assert record.status is Status.FAILED_INFRA
    cli = [PYTHON, "-m", "harness", "resume", str(attempt.root), "--task", str(resume_task.root),
           "--data-dir", str(data), "--runner", "local"]
    # A changed spliced script is refused, naming what differs, and nothing moves.
    script = attempt.file(resume_task.template)
    original = script.read_text()
    script.write_text(original.replace("max_train_loss and loss > max_train_loss", "False"))
    refused = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "spliced script differs from the one recorded" in refused.stderr
    assert attempt.read().status is Status.FAILED_INFRA
    script.write_text(original)

    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = attempt.read()
    assert resumed.status is Status.SUCCEEDED
    assert [s["outcome"] for s in resumed.stages["pretrain"].segments] == [
        "failed_infra", "succeeded"]
    assert resumed.metrics["val_loss"] == uninterrupted[0].metrics["val_loss"]
    # Finished: a second resume is refused with what to do.
    again = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "ended succeeded" in again.stderr


@pytest.mark.slow
def test_the_template_refuses_a_checkpoint_that_does_not_fit(
        resume_task: TaskSpec, data: Path, uninterrupted: tuple[AttemptRecord, Attempt],
        tmp_path: Path) -> None:
    _, attempt = uninterrupted
    index = json.loads((attempt.root / "pretrain" / RESUME_INDEX).read_text())
    ckpt = attempt.root / "pretrain" / index["file"]
    scale = resume_task.scale("resume-test")

    def resume_directly(sha: str) -> tuple[int, dict[str, Any]]:
        out = tmp_path / sha[:8]
        proc = subprocess.run(
            [PYTHON, str(attempt.file(resume_task.template)), *scale.cli_args(),
             f"--data_dir={data / 'cycle'}", f"--out_dir={out}", f"--resume_from={ckpt}",
             f"--resume_sha256={sha}"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        return proc.returncode, json.loads((out / "error_rank0.json").read_text())

    # One process, where two wrote it: refused as ours (kind resume), never half-loaded.
    code, error = resume_directly(index["sha256"])
    assert code == 2 and error["kind"] == "resume"
    assert "written by 2 process(es), this run has 1" in error["message"]
    code, error = resume_directly("0" * 64)
    assert code == 2 and "sha256 differs" in error["message"]


@pytest.mark.slow
def test_a_diverging_submission_stops_at_once_and_is_its_own_failure(
        resume_task: TaskSpec, data: Path, tmp_path: Path) -> None:
    template = resume_task.template_text()
    region = template.split("# >>> EDITABLE REGION bitlinear >>>\n")[1].split(
        "# <<< EDITABLE REGION bitlinear <<<")[0]
    sub = tmp_path / "blows_up"
    sub.mkdir()
    # Every output is divided by zero: the first train loss is not finite.
    (sub / "bitlinear.py").write_text(region.replace(
        "y = y * (x_scale * w_scale)", "y = y * (x_scale * w_scale) / 0.0"))
    record, attempt = run(resume_task, data, tmp_path / "runs", "diverged", retries=2,
                          submission=sub)
    assert record.status is Status.FAILED_SUBMISSION and not record.status.refundable
    assert record.reason == "diverged at step 0 (loss nan)"
    # Stopped within the first log interval, not after 240 iterations, and never resumed.
    assert rows(attempt, "train_log.jsonl") == []
    assert len(record.stages["pretrain"].segments) == 1


# --- the stall watchdog ---------------------------------------------------------------------


def _spec(tmp_path: Path, code: str, stall_s: float) -> StageSpec:
    return StageSpec(name="stall", argv=(sys.executable, "-c", code), cwd=tmp_path,
                     log_dir=tmp_path / "logs", timeout_s=60.0,
                     progress_file=tmp_path / "progress.json", stall_s=stall_s)


def test_a_stage_without_progress_is_stopped_as_ours(tmp_path: Path) -> None:
    got = LocalRunner().run(_spec(tmp_path, "import time; time.sleep(60)", stall_s=1.0))
    assert got.infra is not None and got.infra.startswith("no progress for")
    assert not got.timed_out and got.wall_s < 20


def test_a_stage_that_reports_progress_is_left_to_run(tmp_path: Path) -> None:
    beat = ("import pathlib, time\n"
            f"p = pathlib.Path({str(tmp_path / 'progress.json')!r})\n"
            "for _ in range(15):\n    p.write_text('{}'); time.sleep(0.2)\n")
    got = LocalRunner().run(_spec(tmp_path, beat, stall_s=1.0))
    assert got.infra is None and got.returncode == 0 and got.wall_s > 2.5


# --- checkpoints that cannot be trusted -------------------------------------------------------


def _checkpoint(out: Path, body: bytes = b"weights" * 100, it: int = 10) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"resume-{it:07d}.pt"
    file.write_bytes(body)
    (out / RESUME_INDEX).write_text(json.dumps({"file": file.name, "iter": it,
                                                "sha256": sha256_file(file),
                                                "bytes": len(body)}))
    return file


def test_a_whole_checkpoint_verifies(tmp_path: Path) -> None:
    file = _checkpoint(tmp_path)
    point = resume_point(tmp_path, {"iter": 10, "sha256": sha256_file(file)})
    assert point.file == file and point.iter == 10


@pytest.mark.parametrize("damage, says", [
    ("flip", "sha256 differs"),
    ("truncate", "truncated or replaced"),
    ("remove", "names is missing"),
    ("no index", "no resume checkpoint"),
    ("foreign index", "not a resume index the template wrote"),
    ("other record", "not the checkpoint the attempt's record names"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path, damage: str,
                                                         says: str) -> None:
    file = _checkpoint(tmp_path)
    recorded = {"iter": 10, "sha256": sha256_file(file)}
    if damage == "flip":
        body = bytearray(file.read_bytes())
        body[5] ^= 1
        file.write_bytes(bytes(body))
    elif damage == "truncate":
        file.write_bytes(file.read_bytes()[:-1])
    elif damage == "remove":
        file.unlink()
    elif damage == "no index":
        (tmp_path / RESUME_INDEX).unlink()
    elif damage == "foreign index":
        index = json.loads((tmp_path / RESUME_INDEX).read_text())
        (tmp_path / RESUME_INDEX).write_text(json.dumps({**index, "file": "../../etc/passwd"}))
    else:
        recorded = {"iter": 20, "sha256": "0" * 64}
    with pytest.raises(Unresumable, match=says) as e:
        resume_point(tmp_path, recorded)
    assert str(tmp_path) in str(e.value)


# --- sessions: a resumed test is charged once ----------------------------------------------


@dataclass
class FlakyPretrain:
    """Pretrain that loses its node `failures` times (leaving a checkpoint behind), then
    succeeds; every other stage as the session fakes run it."""

    failures: int
    name: str = "flaky"
    launches: list[list[str]] = field(default_factory=list)

    def run(self, spec: StageSpec) -> StageRun:
        if spec.name != "pretrain":
            return FakeRunner().run(spec)
        self.launches.append(list(spec.argv))
        if len(self.launches) > self.failures:
            return FakeRunner().run(spec)
        out = spec.log_dir
        _checkpoint(out, it=10 * len(self.launches))
        for log in ("stdout.log", "stderr.log"):
            (out / log).write_text("lost\n")
        return StageRun(None, True, False, 1.0, out / "stdout.log", out / "stderr.log",
                        infra="the node was lost")


def test_a_session_test_resumed_by_itself_is_charged_once(tmp_path: Path,
                                                          smoke_data: Path) -> None:
    runner = FlakyPretrain(failures=1)
    with Session.create(agent="unit", home=tmp_path, data_dir=smoke_data, budget=2,
                        preflight=False, runner=runner) as s:
        report = s.run_test()
        assert report.status == "succeeded" and report.charged and not report.refunded
        assert s.ledger.used(s.id) == 1
        segments = Attempt(Path(s.ledger.attempts(s.id)[0].attempt_dir)).read() \
            .stages["pretrain"].segments
    assert [x["outcome"] for x in segments] == ["failed_infra", "succeeded"]
    # The second launch continued from the checkpoint the first left.
    assert any(a.startswith("--resume_from=") and a.endswith("resume-0000010.pt")
               for a in runner.launches[1])


def test_a_session_test_resumed_by_hand_is_charged_once(tmp_path: Path,
                                                        smoke_data: Path) -> None:
    # More failures than the retries (2 by default): the test ends refunded, then resumes.
    runner = FlakyPretrain(failures=3)
    with Session.create(agent="unit", home=tmp_path, data_dir=smoke_data, budget=1,
                        preflight=False, runner=runner) as s:
        stopped = s.run_test()
        assert stopped.status == "failed_infra" and stopped.refunded
        assert s.ledger.used(s.id) == 0
        resumed = s.resume_test(stopped.attempt_id)
        assert resumed.status == "succeeded" and resumed.charged and not resumed.refunded
        assert s.ledger.used(s.id) == 1
        # Settled as succeeded, it cannot be taken up (and charged) again.
        with pytest.raises(UserError, match="only a test stopped by a failure of ours"):
            s.ledger.reopen(stopped.attempt_id, current_owner())
    record = Attempt(tmp_path / "runs" / stopped.attempt_id).read()
    assert [x["outcome"] for x in record.stages["pretrain"].segments] == [
        "failed_infra"] * 3 + ["succeeded"]


def test_resuming_a_finished_attempt_is_refused(tmp_path: Path, task: TaskSpec,
                                                smoke_data: Path) -> None:
    attempt = Attempt.create(tmp_path, "done")
    run_attempt(prepare(REPO / "baselines" / "ternary_158bit", task), task, task.scale("smoke"),
                attempt=attempt, origin=Origin("run"), data=smoke_data,
                runner=FakeRunner(), retries=0)
    with pytest.raises(UserError, match="ended succeeded") as e:
        resume_attempt(attempt, task, data=smoke_data, runner=FakeRunner())
    assert "run the submission again" in (e.value.fix or "")


HANG_IN_RESUME = """
import sys, time
from pathlib import Path
from harness.session import Session
from tests.session_fakes import FakeRunner

class Hang:
    name = "hang"
    def run(self, spec):
        if spec.name != "pretrain":
            return FakeRunner().run(spec)
        Path(sys.argv[5]).write_text("resumed")
        time.sleep(600)

home, data, sid, aid = sys.argv[1:5]
Session.open(sid, home=home, data_dir=Path(data), runner=Hang()).resume_test(aid)
"""


def test_a_harness_killed_during_a_resume_is_settled_by_recover(tmp_path: Path,
                                                                smoke_data: Path) -> None:
    from harness.ledger import Ledger

    home = tmp_path / "home"
    with Session.create(agent="unit", home=home, data_dir=smoke_data, budget=1,
                        preflight=False, runner=FlakyPretrain(failures=3)) as s:
        sid, stopped = s.id, s.run_test()
    assert stopped.status == "failed_infra" and stopped.refunded
    marker = tmp_path / "resumed"
    proc = subprocess.Popen([PYTHON, "-c", HANG_IN_RESUME, str(home), str(smoke_data), sid,
                             stopped.attempt_id, str(marker)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(marker.exists, timeout=120)
        with Ledger(home) as led:  # reopened: in progress, charged again
            assert (led.attempt(stopped.attempt_id).status, led.used(sid)) == ("running", 1)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = subprocess.run([PYTHON, "-m", "harness", "recover", "--home", str(home)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "test #1" in out.stdout and "failed_infra, refunded" in out.stdout, out.stdout
    with Ledger(home) as led:
        a = led.attempt(stopped.attempt_id)
        assert (a.status, a.charged, a.refunded) == ("failed_infra", True, True)
        assert led.used(sid) == 0 and led.integrity_check() == []
    record = Attempt(Path(a.attempt_dir or "")).read()
    assert record.status is Status.FAILED_INFRA and "harness recover" in record.reason
    # The segments of the launches before the kill are all still there.
    assert [x["outcome"] for x in record.stages["pretrain"].segments][:3] == ["failed_infra"] * 3
    # Nothing was lost: it resumes once more and ends charged once.
    with Session.open(sid, home=home, data_dir=smoke_data,
                      runner=FlakyPretrain(failures=0)) as s:
        assert s.resume_test(stopped.attempt_id).status == "succeeded"
        assert s.ledger.used(sid) == 1


# --- live progress on the leaderboard page -----------------------------------------------------


@pytest.mark.slow
def test_the_page_shows_a_running_test_and_its_curves_so_far(resume_task: TaskSpec, data: Path,
                                                             tmp_path: Path) -> None:
    from harness.leaderboard import build_board, read_board, write_board
    from harness.leaderboard.page import render_page
    from harness.ledger import LEDGER_FILE, Ledger

    home = tmp_path / "home"
    started: dict[str, Any] = {}

    def test_in_a_thread() -> None:  # the ledger's connection belongs to its thread
        with Session.create(agent="live", task=resume_task.root, scale="resume-test",
                            home=home, data_dir=data, budget=1, preflight=False,
                            runner=LocalRunner()) as s:
            started["sid"] = s.id
            started["report"] = s.run_test()

    worker = threading.Thread(target=test_in_a_thread, daemon=True)
    worker.start()

    def folder() -> Path | None:
        if not (home / LEDGER_FILE).exists():
            return None
        with Ledger(home) as led:
            rows = led.in_progress()
        return Path(rows[0].attempt_dir) if rows and rows[0].attempt_dir else None

    attempt_dir = wait_for(folder, timeout=120)
    progress = attempt_dir / "pretrain" / "progress.json"
    wait_for(lambda: progress.exists() and json.loads(progress.read_text())["iter"] >= 100,
             timeout=300, step=0.05)
    board = build_board(home=home)
    page = render_page(board, tmp_path)
    worker.join(timeout=600)
    assert started["report"].status == "succeeded"

    (r,) = board.live
    assert (r.name, r.scale, r.total) == (f"{started['sid']} test #1", "resume-test", 240)
    assert r.iter is not None and 100 <= r.iter < 240 and r.eta_s is not None
    assert board.tables == []  # shown, never ranked
    # The curves so far are the run's own rows, a prefix of what it logged in the end.
    logged = {x["step"]: x["train_loss"] for x in rows(Attempt(attempt_dir), "train_log.jsonl")}
    assert len(r.train_curve) >= 100
    assert all(logged[step] == loss for step, loss in r.train_curve)
    evaluated = {x["step"]: x["val_loss"] for x in rows(Attempt(attempt_dir), "metrics.jsonl")}
    assert [s for s, _ in r.val_curve][:2] == [0, 60]
    assert all(evaluated[step] == loss for step, loss in r.val_curve)
    write_board(board, tmp_path / "board.json")
    assert read_board(tmp_path / "board.json") == board
    assert 'id="running"' in page and r.attempt_id in page
    assert f'<progress max="240" value="{r.iter}">' in page
    assert f'<figure class="plot running-plot" data-attempt="{r.attempt_id}">\n<svg' in page
    # Finished, it is no longer running; unsubmitted, it is not on the board either.
    with pytest.raises(UserError, match="no final results"):
        build_board(home=home)


def test_an_attempt_at_another_seed_resumes_at_its_own_seeds(tmp_path: Path, task: TaskSpec,
                                                               smoke_data: Path) -> None:
    attempt = Attempt.create(tmp_path, "seed1")
    stopped = run_attempt(prepare(REPO / "baselines" / "ternary_158bit", task),
                          task, task.scale("smoke").seed_run(1), attempt=attempt,
                          origin=Origin("run"), data=smoke_data,
                          runner=FlakyPretrain(failures=1), retries=0)
    assert stopped.status is Status.FAILED_INFRA and stopped.seeds == {"init": 43, "data": 43}
    runner = FlakyPretrain(failures=0)
    resumed = resume_attempt(attempt, task, data=smoke_data, runner=runner)
    assert resumed.status is Status.SUCCEEDED and resumed.seeds == stopped.seeds
    (argv,) = runner.launches
    assert {"--init_seed=43", "--data_seed=43"} <= set(argv)
