"""Whose out-of-memory kill it was: the memory watcher's cgroup reading, the policy, and the
Slurm and scale ends of it (the docker end: tests/test_docker_args.py and tests/docker)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.record import Status
from harness.runners.base import RunnerError, StageRun
from harness.runners.memory import judge_kill, parse_size, vet_limit
from harness.runners.slurm import JobState, classify
from harness.runtime.memwatch import read_cgroup
from harness.stages import lmeval, pretrain
from harness.task import load_task

TASK_DIR = Path(__file__).resolve().parents[1] / "tasks" / "llm-pretrain-bitlinear"


@pytest.mark.parametrize(("text", "unit", "size"), [
    ("16g", "b", 16 * 2**30), ("512m", "b", 512 * 2**20), ("1.5G", "b", 3 * 2**29),
    ("8GiB", "b", 8 * 2**30), ("4000", "m", 4000 * 2**20), ("2T", "m", 2 * 2**40),
    ("1024", "b", 1024),
])
def test_sizes_as_docker_and_slurm_write_them(text: str, unit: str, size: int) -> None:
    assert parse_size(text, default_unit=unit) == size


@pytest.mark.parametrize("text", ["", "lots", "16 gigs", "-1g"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size(text)


def test_a_limit_is_vetted_against_the_measured_peak_only() -> None:
    vet_limit(2**30, 0.0, setting="x")  # no measured peak: nothing to vet against
    vet_limit(int(2.25 * 2**30), 1.5, setting="x")  # exactly 1.5 x
    with pytest.raises(RunnerError, match=r"x = 2\.24 GiB is below 1\.5 x"):
        vet_limit(int(2.24 * 2**30), 1.5, setting="x")


def test_the_verdicts_of_an_oom_kill() -> None:
    reached = {"limit_reached": True, "peak_bytes": 2**31}
    over, infra = judge_kill(limit_text="2g", peak_gb=1.0, report=reached)
    assert infra is None and over is not None and "outgrew its memory limit of 2g" in over
    for report, peak, says in [(None, 1.0, "memory report is missing"),
                               ({"limit_reached": False}, 1.0, "the machine ran out"),
                               ({}, 1.0, "the machine ran out"),  # no cgroup could be read
                               (reached, 0.0, "no measured peak")]:
        over, infra = judge_kill(limit_text="2g", peak_gb=peak, report=report)
        assert over is None and infra is not None and says in infra


# --- the watcher, on cgroup files as the kernel lays them out --------------------------------

def _files(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


V1_KILLED = {"memory.limit_in_bytes": "268435456\n", "memory.max_usage_in_bytes": "268435456\n",
             "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"}


def test_cgroup_v1_at_its_limit_with_a_kill(tmp_path: Path) -> None:
    v1 = _files(tmp_path / "v1", V1_KILLED)
    got = read_cgroup(v1, tmp_path / "none")
    assert got == {"cgroup": "v1", "limit_bytes": 2**28, "peak_bytes": 2**28, "oom_kills": 1,
                   "limit_reached": True}


def test_cgroup_v1_killed_below_its_limit_is_not_its_limit(tmp_path: Path) -> None:
    # A parent cgroup (the machine) ran out: the kernel killed in here, below our limit.
    v1 = _files(tmp_path / "v1", {**V1_KILLED, "memory.max_usage_in_bytes": "100000000\n"})
    assert read_cgroup(v1, tmp_path / "none")["limit_reached"] is False


def test_cgroup_v1_at_its_limit_without_a_kill_is_not_a_kill(tmp_path: Path) -> None:
    # Page cache fills a cgroup to its limit all the time; only a kill counts.
    v1 = _files(tmp_path / "v1", {**V1_KILLED, "memory.oom_control": "oom_kill 0\n"})
    assert read_cgroup(v1, tmp_path / "none")["limit_reached"] is False


def test_cgroup_v2_counts_hitting_its_own_max(tmp_path: Path) -> None:
    v2 = _files(tmp_path / "v2", {"memory.max": "1073741824\n", "memory.peak": "1073741824\n",
                                  "memory.events": "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n"})
    assert read_cgroup(tmp_path / "none", v2) == {
        "cgroup": "v2", "limit_bytes": 2**30, "peak_bytes": 2**30, "oom_kills": 1,
        "limit_reached": True}
    # A global OOM kill counts in oom_kill but not in oom (this cgroup's own max).
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 1\n")
    (v2 / "memory.max").write_text("max\n")
    got = read_cgroup(tmp_path / "none", v2)
    assert (got["limit_reached"], got["limit_bytes"], got["oom_kills"]) == (False, None, 1)


def test_no_memory_cgroup_reads_as_nothing(tmp_path: Path) -> None:
    assert read_cgroup(tmp_path / "a", tmp_path / "b") == {}


@pytest.mark.parametrize(("code", "exit_code"), [("pass", 0), ("raise SystemExit(3)", 3),
                                                  ("import os; os.kill(os.getpid(), 9)", 137)])
def test_the_watcher_runs_the_command_and_reports_its_end(tmp_path: Path, code: str,
                                                          exit_code: int) -> None:
    report = tmp_path / "memory.json"
    got = subprocess.run([sys.executable, "-m", "harness.runtime.memwatch", str(report), "--",
                          sys.executable, "-c", code], check=False, timeout=60)
    assert got.returncode == exit_code
    data = json.loads(report.read_text())
    assert data["exit_code"] == (-9 if exit_code == 137 else exit_code)


def test_the_watcher_without_a_command_is_a_usage_error(tmp_path: Path) -> None:
    got = subprocess.run([sys.executable, "-m", "harness.runtime.memwatch", "r.json"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert got.returncode == 2 and "usage:" in got.stderr


# --- the Slurm end -------------------------------------------------------------------------

def _oom_job() -> JobState:
    return JobState("42", "OUT_OF_MEMORY", 0, 9, "node1", "", "OUT_OF_MEMORY", "sacct")


def test_slurm_out_of_memory_under_our_vetted_mem_is_the_submissions() -> None:
    end = classify(_oom_job(), mem="8G", peak_gb=1.5)
    assert end.infra is None
    assert end.over_limit == ("Slurm job 42 outgrew its memory limit (--mem=8G) on node node1 "
                              "(OUT_OF_MEMORY); the template's own measured peak at this scale "
                              "is 1.5 GiB")


@pytest.mark.parametrize(("mem", "peak"), [("", 1.5), ("8G", 0.0)])
def test_slurm_out_of_memory_without_a_vetted_limit_is_ours(mem: str, peak: float) -> None:
    end = classify(_oom_job(), mem=mem, peak_gb=peak)
    assert end.over_limit is None
    assert end.infra == "Slurm job 42 was killed by the out-of-memory killer on node node1 " \
                        "(OUT_OF_MEMORY)"


# --- what the stages make of it --------------------------------------------------------------

def test_both_stages_charge_an_over_limit_kill(tmp_path: Path) -> None:
    # The surviving rank's collective error is not why the run ended: the kill is.
    (tmp_path / "error_rank1.json").write_text(json.dumps(
        {"kind": "submission", "message": "RuntimeError: Connection reset by peer"}))
    run = StageRun(1, True, False, 1.0, tmp_path / "o", tmp_path / "e", over_limit="too big")
    got = pretrain.collect(run, tmp_path)
    assert (got.status, got.reason) == (Status.FAILED_SUBMISSION, "out of memory: too big")
    evaled = lmeval.collect(run, tmp_path, ["val_loss"])
    assert (evaled.status, evaled.reason) == (Status.FAILED_SUBMISSION,
                                              "lm-eval: out of memory: too big")


def test_the_smoke_scale_declares_its_measured_peak() -> None:
    assert load_task(TASK_DIR).scale("smoke").peak_memory_gb > 0


def test_a_negative_peak_is_refused(tmp_path: Path) -> None:
    import shutil

    task_dir = tmp_path / "task"
    shutil.copytree(TASK_DIR, task_dir)
    smoke = task_dir / "scales" / "smoke.toml"
    text = smoke.read_text()
    assert "\npeak_memory_gb = " in text
    smoke.write_text(re.sub(r"\npeak_memory_gb = .*\n", "\npeak_memory_gb = -1\n", text))
    with pytest.raises(UserError, match=r"peak_memory_gb = -1\.0"):
        load_task(task_dir).scale("smoke")
