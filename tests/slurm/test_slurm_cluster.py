"""The Slurm runner on a real one-node cluster (-m slurm; scripts/ci_slurm.sh sets the cluster
up and runs this). Without a cluster these fail loudly: they are never skipped.

Agent sessions go through the real command line (`harness session test --runner slurm`), the
ledger and `harness cancel`, at smoke scale: a test that succeeds and is recorded with its
metrics, one cancelled midway through the harness (not charged), and one whose job is
scancel'ed from outside (failed_infra, refunded).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.ledger import AttemptRow, Ledger
from harness.runners.base import StageSpec
from harness.runners.config import SlurmSettings
from harness.runners.slurm import SlurmPoller, SlurmRunner
from tests.conftest import PYTHON, REPO, wait_for
from tests.slurm.conftest import sh as _sh

pytestmark = pytest.mark.slurm

GOOD = (REPO / "tests" / "data" / "seed001_per_tensor.py").read_text()
FAST = SlurmSettings(poll_s=0.25, max_poll_s=1.0, time_margin_s=120)
HOST = socket.gethostname().split(".")[0]


@pytest.fixture
def home_dir(tmp_path: Path) -> Path:
    return tmp_path / "home"


def cli(*args: str, home: Path, data: Path | None = None, stdin: str | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    extra = ["--home", str(home)] + (["--data-dir", str(data)] if data else [])
    return subprocess.run([PYTHON, "-m", "harness", *args, *extra], capture_output=True,
                          text=True, cwd=REPO, input=stdin, timeout=timeout)


@pytest.fixture(scope="module")
def short_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task with one more scale, `slurm-ci`: the smoke scale cut to 10 iterations, to keep
    the succeeding test short (the cancelled ones stop early on the real smoke scale)."""
    root = tmp_path_factory.mktemp("task") / "llm-pretrain-bitlinear"
    shutil.copytree(REPO / "tasks" / "llm-pretrain-bitlinear", root,
                    ignore=shutil.ignore_patterns("__pycache__"))
    text = (root / "scales" / "smoke.toml").read_text()
    for old, new in (('name = "smoke"', 'name = "slurm-ci"'), ("max_iters = 30", "max_iters = 10"),
                     ("eval_interval = 10", "eval_interval = 5"),
                     ("log_interval = 10", "log_interval = 5")):
        assert old in text, old
        text = text.replace(old, new)
    (root / "scales" / "slurm-ci.toml").write_text(text)
    return root


def start_session(home: Path, *task: str) -> str:
    """A session on a budget of 3 whose file holds a known-good BitLinear."""
    sid = cli("session", "start", "--agent", "slurm-ci", "--budget", "3", "--no-preflight",
              *task, home=home).stdout.strip()
    assert sid.startswith("ses-"), sid
    view = cli("session", "view", sid, "--start", "1", "--end", "1", home=home).stdout
    first, last = map(int, re.findall(r"(\d+)–(\d+)", view.splitlines()[0])[0])
    edit = cli("session", "edit", sid, "--start", str(first), "--end", str(last),
               "--content-file", "-", home=home, stdin=GOOD)
    assert edit.returncode == 0, edit.stderr
    return sid


def session_test(sid: str, config: Path) -> list[str]:
    return ["session", "test", sid, "--runner", "slurm", "--config", str(config)]


def attempts(home: Path, sid: str) -> list[AttemptRow]:
    with Ledger(home, create=False) as ledger:
        return ledger.attempts(sid)


def used(home: Path, sid: str) -> int:
    with Ledger(home, create=False) as ledger:
        return ledger.used(sid)


def job_of(attempt_dir: Path, stage: str = "pretrain") -> tuple[str, str]:
    """The (job id, state) of an attempt's stage, by its job name, from the queue."""
    name = f"harness-{attempt_dir.name}-{stage}"
    line = _sh("squeue", "-h", "--states=all", "-n", name, "-O", "JobID:|,State:|").strip()
    job, _, state = line.partition("|")
    return job, state.strip("|")


def running_midway(home: Path, sid: str) -> tuple[Path, str]:
    """Wait until the session's test is training inside its Slurm job (its first evaluation
    written), and return its attempt folder and job id."""
    folder = Path(wait_for(lambda: next((a.attempt_dir for a in attempts(home, sid)
                                         if a.attempt_dir and a.in_progress), None), 120))
    wait_for(lambda: (folder / "pretrain" / "metrics.jsonl").exists(), 180)
    job, state = job_of(folder)
    assert job.isdigit() and state == "RUNNING", (job, state)
    return folder, job


def test_a_smoke_test_through_slurm_succeeds_and_is_recorded(home_dir: Path, smoke_data: Path,
                                                            config: Path,
                                                            short_task: Path) -> None:
    sid = start_session(home_dir, "--task", str(short_task), "--scale", "slurm-ci")
    t0 = time.monotonic()
    got = cli(*session_test(sid, config), home=home_dir, data=smoke_data)
    wall = time.monotonic() - t0
    assert got.returncode == 0, got.stdout + got.stderr
    assert re.search(r"^Final metrics \(slurm-ci\): val_loss_slurm-ci=\d", got.stdout,
                     re.MULTILINE), got.stdout
    (row,) = attempts(home_dir, sid)
    assert (row.status, row.charged, row.refunded, row.runner) == ("succeeded", True, False,
                                                                   "slurm")
    assert used(home_dir, sid) == 1
    with Ledger(home_dir, create=False) as ledger:
        metrics = ledger.results(row.id)
    assert "val_loss" in metrics and len(metrics) >= 2  # val_loss and the lm-eval scores
    assert row.attempt_dir is not None
    result = json.loads((Path(row.attempt_dir) / "result.json").read_text())
    assert result["status"] == "succeeded" and result["runner"] == "slurm"
    assert result["metrics"] == pytest.approx(metrics)
    jobs = []
    for stage in ("pretrain", "lm-eval"):
        info = result["stages"][stage]["runner"]
        assert info["node"] == HOST and info["state"] == "COMPLETED", info
        script = Path(info["script"]).read_text()
        assert f"#SBATCH --job-name=harness-{row.id}-{stage}\n" in script
        jobs.append(info["job_id"])
        # The scheduler's own record agrees with what the harness recorded.
        assert job_of(Path(row.attempt_dir), stage) == (info["job_id"], "COMPLETED")
    assert jobs[0] != jobs[1]
    print(f"\nslurm smoke attempt: {wall:.1f} s wall for `harness session test` "
          f"(pretrain {result['stages']['pretrain']['wall_s']:.1f} s, "
          f"lm-eval {result['stages']['lm-eval']['wall_s']:.1f} s, queued "
          f"{result['stages']['pretrain']['runner']['queued_s']:.1f} s + "
          f"{result['stages']['lm-eval']['runner']['queued_s']:.1f} s)")


def test_harness_cancel_midway_ends_cancelled_and_is_not_charged(home_dir: Path,
                                                                 smoke_data: Path,
                                                                 config: Path) -> None:
    sid = start_session(home_dir)
    before = used(home_dir, sid)
    proc = subprocess.Popen([PYTHON, "-m", "harness", *session_test(sid, config), "--home",
                             str(home_dir), "--data-dir", str(smoke_data)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        folder, job = running_midway(home_dir, sid)
        cancel = cli("cancel", f"{sid}:1", home=home_dir)
        assert cancel.returncode == 0, cancel.stderr
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    (row,) = attempts(home_dir, sid)
    assert row.status == "cancelled", out + err
    assert used(home_dir, sid) == before == 0  # the budget is untouched
    assert row.refunded or not row.charged
    result = json.loads((folder / "result.json").read_text())
    stage = result["stages"]["pretrain"]
    assert stage["cancelled"] and stage["infra"] is None and not stage["timed_out"]
    assert stage["runner"]["job_id"] == job
    # The job has left the queue: scancel'ed by the harness, not running on.
    assert job_of(folder) == (job, "CANCELLED")
    assert _sh("squeue", "-h", "-j", job).strip() == ""
    assert "lm-eval" not in result["stages"]


def test_a_job_scancelled_from_outside_is_failed_infra_and_refunded(home_dir: Path,
                                                                   smoke_data: Path,
                                                                   config: Path) -> None:
    sid = start_session(home_dir)
    proc = subprocess.Popen([PYTHON, "-m", "harness", *session_test(sid, config), "--home",
                             str(home_dir), "--data-dir", str(smoke_data)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        folder, job = running_midway(home_dir, sid)
        subprocess.run(["scancel", job], check=True)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 3, out + err  # infra
    (row,) = attempts(home_dir, sid)
    assert (row.status, row.charged, row.refunded) == ("failed_infra", True, True)
    assert row.reason is not None and f"Slurm job {job} was cancelled outside the harness" \
        in row.reason
    assert used(home_dir, sid) == 0
    assert "[REFUNDED]" in out
    stage = json.loads((folder / "result.json").read_text())["stages"]["pretrain"]
    assert not stage["cancelled"] and stage["runner"]["state"].startswith("CANCELLED")
    assert stage["infra"] == row.reason


# --- the runner alone, on the cluster ----------------------------------------------------------

PROBE = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
         "'env': sorted(os.environ)})); sys.exit(int(sys.argv[1]))")


def test_hostile_paths_exit_codes_and_a_scrubbed_environment(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("HARNESS_TEST_SECRET", "must-not-reach-the-job")
    folder = tmp_path / "runs with space" / "it's \"quoted\" %j #1"
    folder.mkdir(parents=True)
    runner = SlurmRunner(FAST, poller=SlurmPoller(poll_s=0.25, max_poll_s=1.0))
    spec = StageSpec(name="probe", argv=(sys.executable, "-c", PROBE, "3", "a b", "'q'", "$HOME"),
                     cwd=folder, log_dir=folder / "logs", timeout_s=60, env={"T_OK": "x y"},
                     job_name="harness-probe")
    run = runner.run(spec)
    assert (run.returncode, run.infra, run.timed_out) == (3, None, False)
    assert run.stdout == folder / "logs" / "stdout.log"
    seen = json.loads(run.stdout.read_text())
    assert seen["argv"] == ["3", "a b", "'q'", "$HOME"] and seen["cwd"] == str(folder)
    assert "T_OK" in seen["env"] and "SLURM_JOB_ID" in seen["env"]
    assert "HARNESS_TEST_SECRET" not in seen["env"]
    assert run.info["node"] == HOST and run.info["job_id"].isdigit()


def test_the_stages_time_limit_is_timed_out_not_infra(tmp_path: Path) -> None:
    runner = SlurmRunner(FAST, poller=SlurmPoller(poll_s=0.25, max_poll_s=1.0))
    spec = StageSpec(name="sleepy", argv=("sleep", "120"), cwd=tmp_path,
                     log_dir=tmp_path / "logs", timeout_s=3, job_name="harness-sleepy")
    t0 = time.monotonic()
    run = runner.run(spec)
    assert run.timed_out and run.infra is None and not run.cancelled
    assert time.monotonic() - t0 < 60
    # Whichever ended it (the job's own `timeout`, or the harness's watchdog scancel), the
    # job is gone from the queue.
    assert _sh("squeue", "-h", "-j", run.info["job_id"]).strip() == ""



def test_a_killed_harness_leaves_its_job_to_recover_which_scancels_it(home_dir: Path,
                                                                     smoke_data: Path,
                                                                     config: Path) -> None:
    sid = start_session(home_dir)
    proc = subprocess.Popen([PYTHON, "-m", "harness", *session_test(sid, config), "--home",
                             str(home_dir), "--data-dir", str(smoke_data)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        folder, job = running_midway(home_dir, sid)
        proc.kill()  # SIGKILL: no handler runs, the job trains on
        proc.wait(30)
        assert job_of(folder)[1] == "RUNNING"
    finally:
        proc.kill()
    got = cli("recover", home=home_dir)
    assert got.returncode == 0, got.stdout + got.stderr
    assert f"stopped Slurm job {job}" in got.stdout, got.stdout
    assert _sh("squeue", "-h", "-j", job).strip() == ""
    (row,) = attempts(home_dir, sid)
    assert (row.status, row.charged, row.refunded) == ("failed_infra", True, True)
    assert used(home_dir, sid) == 0


def test_four_sessions_at_once_each_get_their_own_job(tmp_path: Path, smoke_data: Path,
                                                      config: Path, short_task: Path) -> None:
    home = tmp_path / "home"
    sids = [start_session(home, "--task", str(short_task), "--scale", "slurm-ci")
            for _ in range(4)]
    t0 = time.monotonic()
    procs = [subprocess.Popen([PYTHON, "-m", "harness", *session_test(sid, config), "--home",
                               str(home), "--data-dir", str(smoke_data)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for sid in sids]
    outs = [p.communicate(timeout=900) for p in procs]
    wall = time.monotonic() - t0
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    jobs = set()
    for sid in sids:
        (row,) = attempts(home, sid)
        assert (row.status, row.charged, row.refunded) == ("succeeded", True, False)
        result = json.loads((Path(str(row.attempt_dir)) / "result.json").read_text())
        for stage in ("pretrain", "lm-eval"):
            info = result["stages"][stage]["runner"]
            assert info["node"] == HOST and info["state"] == "COMPLETED", info
            jobs.add(info["job_id"])
    assert len(jobs) == 8  # one job per stage per test, none shared
    audit = [cli("audit", sid, home=home) for sid in sids]
    assert all(a.returncode == 0 for a in audit), [a.stdout for a in audit]
    print(f"\nslurm: 4 sessions at once, 8 jobs, {wall:.1f} s wall")
