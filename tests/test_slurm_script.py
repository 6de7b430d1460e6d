"""The Slurm runner without a cluster: the exact batch script (golden files), the state ->
outcome mapping, and the poller and runner against fake Slurm commands placed on PATH.

The fakes are real executables (one Python script under the names sbatch, sacct, squeue and
scancel) that read and write a small JSON "cluster" file, so the runner's subprocess calls,
argument lists and output parsing all run for real. The real one-node cluster is exercised by
tests/slurm (-m slurm, scripts/ci_slurm.sh).

Golden files: REGENERATE_GOLDEN=1 pytest tests/test_slurm_script.py rewrites
tests/golden/slurm_*.sbatch; review the diff before committing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.record import Status
from harness.runners.apptainer import ApptainerRunner
from harness.runners.base import Mount, RunnerError, StageSpec
from harness.runners.config import ApptainerSettings, SlurmSettings
from harness.runners.slurm import (
    JobState,
    SlurmPoller,
    SlurmRunner,
    classify,
    directive_value,
    parse_squeue,
    render_sbatch,
    slurm_time,
)
from harness.stages import pretrain

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("REGENERATE_GOLDEN") == "1"
HOSTILE = Path("/srv/runs with space/it's \"quoted\" %j #1/20261123-att")
PYTHON_IN = "/opt/py env/bin/python"


def hostile_spec(gpus: int) -> StageSpec:
    out = HOSTILE / "pretrain"
    data = Path("/srv/data dir/smoke")
    return StageSpec(
        name="pretrain",
        argv=(PYTHON_IN, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(HOSTILE / "custom_pretrain.py"), "--max_iters=30", f"--data_dir={data}",
              f"--out_dir={out}", "; echo $HOME `id` $(id)"),
        cwd=HOSTILE, log_dir=out, timeout_s=5400.5, env={"OMP_NUM_THREADS": "1"},
        mounts=(Mount(out, str(out), writable=True), Mount(HOSTILE, str(HOSTILE)),
                Mount(data, str(data))),
        gpus=gpus, cancel_file=HOSTILE / "cancel_requested",
        job_name="harness-20261123-att-pretrain")


# A fixed environment, as scrubbed_env would produce it on a submit host.
FIXED_ENV = {"HOME": "/home/résearcher 'x'", "PATH": "/opt/py env/bin:/usr/bin:/bin",
             "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0",
             "CUDA_VISIBLE_DEVICES": "0,1"}
CLUSTER = SlurmSettings(partition="gpu h200", account="lab's", qos="normal", cpus_per_task=16,
                        mem="128G", time_margin_s=600,
                        extra_args=("--constraint=h200&nvlink", "--exclusive"))


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed: REGENERATE_GOLDEN=1"


def test_sbatch_script_cpu_matches_golden() -> None:
    spec = hostile_spec(gpus=0)
    _golden("slurm_cpu.sbatch",
            render_sbatch(spec, SlurmSettings(), command=spec.argv, env=FIXED_ENV))


def test_sbatch_script_gpus_and_cluster_settings_match_golden() -> None:
    spec = hostile_spec(gpus=2)
    _golden("slurm_gpus2.sbatch",
            render_sbatch(spec, CLUSTER, command=spec.argv, env=FIXED_ENV))


def test_sbatch_script_wrapping_apptainer_matches_golden(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    # The apptainer line reads the scrubbed environment itself: pin it.
    for key in list(os.environ):
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("HOME", "/home/r")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-not-pass")
    spec = hostile_spec(gpus=2)
    wrap = ApptainerRunner(ApptainerSettings(image="/images/bit linear's.sif"))
    runner = SlurmRunner(CLUSTER, wrap, poller=SlurmPoller())
    text = runner.script(spec)
    _golden("slurm_apptainer.sbatch", text)
    assert "must-not-pass" not in text
    assert stage_argv(text) == ["timeout", "--signal=TERM", "--kill-after=30", "5401s",
                                *wrap.command(spec)]


def stage_argv(script: str) -> list[str]:
    """The stage's command line in a rendered script, as the shell splits it."""
    start = script.index("\ntimeout ") + 1
    return shlex.split(script[start:script.index("\nrc=$?", start)].replace("\\\n", " "))


def _sbatch_tokens(value: str) -> str:
    """sbatch's own directive tokenizer (src/sbatch/opt.c, _get_argument), for one token."""
    out, quote, escape = [], "", False
    for ch in value:
        if escape:
            out.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                out.append(ch)
        elif ch in "'\"":
            quote = ch
        elif ch.isspace() or ch == "#":
            raise AssertionError(f"token ends early at {ch!r}: {value!r}")
        else:
            out.append(ch)
    assert not quote and not escape
    return "".join(out)


@pytest.mark.parametrize("value", ["plain", "a b", "it's", 'say "hi"', "a#b", "back\\slash",
                                   "%j 'x' \"y\" #z \\w", "tab\there"])
def test_directive_values_read_back_as_written(value: str) -> None:
    assert _sbatch_tokens(directive_value(value)) == value


def test_what_slurm_cannot_express_is_refused() -> None:
    spec = hostile_spec(0)
    with pytest.raises(ValueError, match="line break"):
        directive_value("a\nb")
    bad = StageSpec(name="t", argv=("x",), cwd=Path("/a"), log_dir=Path("/a\\b"), timeout_s=1)
    with pytest.raises(ValueError, match="backslash"):
        render_sbatch(bad, SlurmSettings(), command=bad.argv, env={})
    with pytest.raises(ValueError, match="sbatch options"):
        render_sbatch(spec, SlurmSettings(extra_args=("echo hi",)), command=spec.argv, env={})
    with pytest.raises(ValueError, match="variable name"):
        render_sbatch(spec, SlurmSettings(), command=spec.argv, env={"A B": "1"})


def test_the_script_runs_the_command_exactly_under_bash(tmp_path: Path) -> None:
    """The shell part of a rendered script, run by bash: each argument arrives intact, the
    environment is exactly the exported one, the working directory is the stage's."""
    cwd = tmp_path / "it's \"a\" dir; echo pwned"
    cwd.mkdir()
    argv = (sys.executable, "-c", "import json, os, sys; print(json.dumps([sys.argv[1:], "
            "os.getcwd(), {k: v for k, v in os.environ.items() if k.startswith('T_')}]))",
            "a b", "'q'", '"dq"', "$HOME", "`id`", "; rm -rf /")
    spec = StageSpec(name="t", argv=argv, cwd=cwd, log_dir=tmp_path / "logs", timeout_s=30)
    text = render_sbatch(spec, SlurmSettings(), command=argv,
                         env={"T_X": "it's $x", "PATH": os.environ["PATH"]})
    got = subprocess.run(["bash", "-c", text], capture_output=True, text=True, check=True,
                         env={**os.environ, "T_SECRET": "leak"})
    args, where, env = json.loads(got.stdout)
    assert args == list(argv[3:])
    assert where == str(cwd)
    assert env == {"T_X": "it's $x"}


@pytest.mark.parametrize(("argv", "want"), [
    (["sleep", "30"], 124),  # the time limit: SIGTERM suffices
    (["bash", "-c", "trap '' TERM; sleep 30"], 124),  # ... SIGKILL needed: still 124
    (["bash", "-c", "exit 3"], 3),
    (["bash", "-c", "kill -KILL $$"], -9),  # died of a signal: the script dies of it too
    (["/nonexistent/stage"], 127),
])
def test_the_scripts_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 argv: list[str], want: int) -> None:
    monkeypatch.setattr("harness.runners.slurm.KILL_AFTER_S", 1)
    spec = StageSpec(name="t", argv=tuple(argv), cwd=tmp_path, log_dir=tmp_path, timeout_s=1)
    text = render_sbatch(spec, SlurmSettings(), command=argv, env={"PATH": os.environ["PATH"]})
    t0 = time.monotonic()
    got = subprocess.run(["bash", "-c", text], capture_output=True, check=False, timeout=20)
    assert got.returncode == want, got.stderr
    assert time.monotonic() - t0 < 10


def test_time_limits() -> None:
    assert slurm_time(1) == "0-00:01:00"
    assert slurm_time(600 + 600) == "0-00:20:00"
    assert slurm_time(5401 + 600) == "0-01:41:00"
    assert slurm_time(2 * 86400 + 61) == "2-00:02:00"
    text = render_sbatch(hostile_spec(0), SlurmSettings(time_margin_s=600),
                         command=("true",), env={})
    assert "#SBATCH --time=0-01:41:00\n" in text and "5401s \\\n    true\nrc=$?\n" in text
    assert '[ "$SECONDS" -ge 5401 ]' in text


# --- state -> outcome ------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "code", "sig", "rc", "infra", "job_timeout"), [
    ("COMPLETED", 0, 0, 0, None, False),
    ("FAILED", 3, 0, 3, None, False),
    ("FAILED", 124, 0, 124, None, True),  # the stage's own time limit
    ("FAILED", 137, 0, 137, None, False),  # the script turns timeout's own 137 into 124
    ("FAILED", 127, 0, 127, "did not start", False),
    ("FAILED", 0, 11, -11, None, False),  # SIGSEGV: the stage's own
    ("FAILED", 0, 9, -9, "killed by SIGKILL from outside", False),
    ("FAILED", 0, 53, -53, "could not launch", False),
    ("CANCELLED", 0, 15, -15, "cancelled outside the harness (CANCELLED by 0", False),
    ("TIMEOUT", 0, 15, -15, "Slurm's own time limit (--time=0-00:20:00", False),
    ("NODE_FAIL", 0, 0, 0, "failure of node gpu7", False),
    ("BOOT_FAIL", 0, 0, 0, "failed to boot", False),
    ("PREEMPTED", 0, 15, -15, "preempted", False),
    ("OUT_OF_MEMORY", 0, 9, -9, "out-of-memory killer on node gpu7", False),
    ("DEADLINE", 0, 0, 0, "deadline", False),
    ("REVOKED", 0, 0, 0, "state REVOKED", False),
    ("VANISHED", 0, 0, 0, "vanished", False),
])
def test_state_to_exit(state: str, code: int, sig: int, rc: int, infra: str | None,
                       job_timeout: bool) -> None:
    detail = "CANCELLED by 0" if state == "CANCELLED" else state
    got = classify(JobState("42", state, code, sig, "gpu7", "", detail, "sacct"),
                   time_limit="0-00:20:00", margin_s=600)
    assert got.returncode == rc
    if infra is None:
        assert got.infra is None
    else:
        assert got.infra is not None and infra in got.infra and "Slurm job 42" in got.infra
    assert bool(got.info.get("job_timeout")) is job_timeout
    assert got.info["job_id"] == "42" and got.info["node"] == "gpu7"


def test_squeue_exit_code_is_a_wait_status() -> None:
    rows = parse_squeue("7|FAILED|768|n1|NonZeroExitCode|\n8|CANCELLED|15|n1|None|\n"
                        "9|RUNNING|0|n2|None|\n10|PENDING|0||Priority|\n", ["7", "8", "9", "10"])
    assert (rows["7"].exit_code, rows["7"].signal) == (3, 0)
    assert (rows["8"].exit_code, rows["8"].signal) == (0, 15)
    assert not rows["9"].final and rows["9"].node == "n2"
    assert rows["10"].queued and rows["10"].reason == "Priority"


# --- fake Slurm commands on PATH ----------------------------------------------------------------

FAKE = r'''
import json, os, sys
name = os.path.basename(sys.argv[0])
path = os.environ["FAKE_SLURM"]
with open(path) as f:
    c = json.load(f)
c["calls"].append([name, *sys.argv[1:]])


def save():
    with open(path + ".tmp", "w") as f:
        json.dump(c, f)
    os.replace(path + ".tmp", path)


def fail(message):
    save()
    print(message, file=sys.stderr)
    sys.exit(1)


def ids():
    return sys.argv[sys.argv.index("-j") + 1].split(",")


def now(job):
    # Each sacct call (the first query of every poller refresh) moves a job one step along
    # its timeline; squeue in the same refresh sees the same step.
    j = c["jobs"][job]
    return j["timeline"][min(max(j["step"], 0), len(j["timeline"]) - 1)]


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
if name == "sbatch":
    if c.get("sbatch_error"):
        fail(c["sbatch_error"])
    job = str(c["next_id"])
    c["next_id"] += 1
    c["jobs"][job] = {"timeline": c["timeline"], "step": -1, "script": sys.argv[-1],
                      "sbatch_env": sorted(k for k in os.environ if k.startswith("SBATCH_"))}
    print(job + ";local")
elif name == "sacct":
    if c["accounting"] == "disabled" and "--completion" not in sys.argv:
        fail("Slurm accounting storage is disabled")
    for job in ids():
        if job in c["jobs"]:
            c["jobs"][job]["step"] += 1
    for job in ids():
        if job not in c["jobs"]:
            continue
        state, code, sig = now(job)
        if c["accounting"] == "lagging" or ("--completion" in sys.argv and state not in FINAL):
            continue
        detail = state + (" by 0" if state == "CANCELLED" else "")
        print(f"{job}|{detail}|{code}:{sig}|node1")
elif name == "squeue" and "-o" in sys.argv:  # is it still in the queue?
    job = ids()[0]
    j = c["jobs"][job]
    if j.get("completing", 0) > 0:  # scancel'ed: the record is final, slurmd still reaps
        j["completing"] -= 1
        print(job)
    elif now(job)[0] in ("PENDING", "RUNNING"):
        print(job)
elif name == "squeue":
    known = [j for j in ids() if j in c["jobs"]]
    if not known:
        fail("slurm_load_jobs error: Invalid job id specified")
    for job in known:
        state, code, sig = now(job)
        node = "" if state == "PENDING" else "node1"
        print(f"{job}|{state}|{(code << 8) | sig}|{node}|None|")
elif name == "scancel":
    job = sys.argv[-1]
    c["jobs"][job]["timeline"] = [["CANCELLED", 0, 15]]
    c["jobs"][job]["step"] = -1
    c["jobs"][job]["completing"] = 3
save()
'''


class FakeSlurm:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        script = f"#!{sys.executable}\n{FAKE}"
        for name in ("sbatch", "sacct", "squeue", "scancel"):
            (self.bin / name).write_text(script)
            (self.bin / name).chmod(0o755)
        self.state = root / "cluster.json"
        self.write({"next_id": 100, "jobs": {}, "calls": [], "timeline": [],
                    "accounting": "on"})
        monkeypatch.setenv("FAKE_SLURM", str(self.state))
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")

    def read(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state.read_text())
        return data

    def write(self, data: dict[str, Any]) -> None:
        self.state.write_text(json.dumps(data))

    def set(self, **values: Any) -> None:
        self.write({**self.read(), **values})

    def add_job(self, job: str, timeline: list[list[Any]]) -> None:
        data = self.read()
        data["jobs"][job] = {"timeline": timeline, "step": -1, "script": ""}
        self.write(data)

    def calls(self, name: str) -> list[list[str]]:
        return [c[1:] for c in self.read()["calls"] if c[0] == name]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    return FakeSlurm(tmp_path, monkeypatch)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_poller_asks_once_for_every_watched_job(fake: FakeSlurm) -> None:
    fake.add_job("11", [["RUNNING", 0, 0]])
    fake.add_job("12", [["COMPLETED", 0, 0]])
    fake.set(accounting="lagging")  # sacct has no rows yet: squeue answers for all three
    fake.add_job("13", [["PENDING", 0, 0]])
    clock = Clock()
    poller = SlurmPoller(poll_s=5.0, max_poll_s=60.0, clock=clock)
    for job in ("11", "12", "13"):
        poller.watch(job)
    got = {job: poller.state(job) for job in ("13", "11", "12")}
    assert fake.calls("sacct") == [["-j", "11,12,13", "-n", "-P", "-X",
                                    "--format=JobID,State,ExitCode,NodeList"]]
    assert [c[:5] for c in fake.calls("squeue")] == [["-h", "--states=all", "-j", "11,12,13",
                                                      "-O"]]
    assert {j: (s.state if s else None) for j, s in got.items()} == {
        "11": "RUNNING", "12": "COMPLETED", "13": "PENDING"}
    assert got["12"] is not None and got["12"].source == "squeue"
    # sacct catches up: its rows win, and squeue is asked only for the rest.
    fake.set(accounting="on")
    clock.t += 5.0
    assert poller.state("11") is not None
    assert len(fake.calls("sacct")) == 2 and len(fake.calls("squeue")) == 1
    assert poller.state("12") == JobState("12", "COMPLETED", 0, 0, "node1", "", "COMPLETED",
                                          "sacct")


def test_poller_backs_off_while_nothing_changes(fake: FakeSlurm) -> None:
    fake.add_job("21", [["RUNNING", 0, 0]] * 8 + [["COMPLETED", 0, 0]])
    clock = Clock()
    poller = SlurmPoller(poll_s=1.0, max_poll_s=3.0, backoff=1.5, clock=clock)
    intervals = []
    for _ in range(12):
        before = len(fake.calls("sacct"))
        for _ in range(3):  # stages polling in between: served from the cache
            poller.state("21")
        assert len(fake.calls("sacct")) == before + 1
        intervals.append(poller.interval)
        clock.t += poller.interval
    # 1 (a new job's first answer), growing while it keeps RUNNING, capped at 3, back to 1
    # when it completes (a change), then growing again.
    assert intervals == [1.0, 1.5, 2.25, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.5, 2.25, 3.0]
    last = poller.state("21")
    assert last is not None and last.state == "COMPLETED"


def test_poller_reads_the_completion_log_when_accounting_is_off(fake: FakeSlurm) -> None:
    fake.set(accounting="disabled")
    fake.add_job("31", [["RUNNING", 0, 0], ["FAILED", 3, 0]])
    clock = Clock()
    poller = SlurmPoller(poll_s=1.0, clock=clock)
    first = poller.state("31")
    assert first is not None and first.state == "RUNNING" and first.source == "squeue"
    assert poller.mode == "completion"
    clock.t += 10
    done = poller.state("31")
    assert done is not None and (done.state, done.exit_code) == ("FAILED", 3)
    assert done.source == "sacct --completion"
    sacct = fake.calls("sacct")
    # One refused plain call, then only --completion.
    assert ["--completion" in c for c in sacct] == [False, True, True]


def test_a_job_no_source_knows_vanishes_after_the_grace(fake: FakeSlurm) -> None:
    clock = Clock()
    poller = SlurmPoller(poll_s=1.0, max_poll_s=1.0, vanish_s=30.0, clock=clock)
    assert poller.state("404") is None
    clock.t += 31
    gone = poller.state("404")
    assert gone is not None and gone.state == "VANISHED"
    assert classify(gone).infra is not None


# --- the runner, end to end through base.run, against the fakes --------------------------------

FAST = SlurmSettings(poll_s=0.01, max_poll_s=0.05, time_margin_s=60)


def _spec(tmp: Path, *, timeout: float = 30.0) -> StageSpec:
    return StageSpec(name="pretrain", argv=(sys.executable, "-c", "pass"), cwd=tmp,
                     log_dir=tmp / "pretrain", timeout_s=timeout, gpus=0,
                     cancel_file=tmp / "cancel_requested", job_name="harness-t-pretrain")


def _runner() -> SlurmRunner:
    return SlurmRunner(FAST, poller=SlurmPoller(poll_s=FAST.poll_s, max_poll_s=FAST.max_poll_s))


def test_runner_success_records_job_and_node(fake: FakeSlurm, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fake.set(timeline=[["PENDING", 0, 0], ["RUNNING", 0, 0], ["COMPLETED", 0, 0]])
    # sbatch's input variables would override the script's directives: not passed on.
    monkeypatch.setenv("SBATCH_PARTITION", "somewhere-else")
    monkeypatch.setenv("SBATCH_EXPORT", "ALL")
    run = _runner().run(_spec(tmp_path))
    assert fake.read()["jobs"]["100"]["sbatch_env"] == []
    assert (run.returncode, run.timed_out, run.infra, run.cancelled) == (0, False, None, False)
    assert run.info["job_id"] == "100" and run.info["node"] == "node1"
    script = Path(run.info["script"])
    assert script == tmp_path / "pretrain" / "job.sbatch" and script.is_file()
    assert fake.calls("sbatch") == [["--parsable", str(script)]]


def test_runner_in_job_timeout_is_the_stages_time_limit(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.set(timeline=[["RUNNING", 0, 0], ["FAILED", 124, 0]])
    run = _runner().run(_spec(tmp_path))
    assert run.timed_out and run.infra is None and run.returncode == 124
    got = pretrain.collect(run, tmp_path / "pretrain")
    assert got.status is Status.FAILED_SUBMISSION and "time limit" in got.reason


def test_queue_time_does_not_count_toward_the_time_limit(fake: FakeSlurm,
                                                         tmp_path: Path) -> None:
    # About 20 polls pending (well over the 0.3 s limit), then a short run.
    fake.set(timeline=[["PENDING", 0, 0]] * 20 + [["RUNNING", 0, 0], ["COMPLETED", 0, 0]])
    t0 = time.monotonic()
    run = _runner().run(_spec(tmp_path, timeout=0.3))
    assert time.monotonic() - t0 > 0.3
    assert not run.timed_out and run.returncode == 0
    assert run.info["queued_s"] > 0.3
    assert run.wall_s < time.monotonic() - t0 - 0.3  # wall_s leaves the queue out


def test_runner_scancel_from_outside_is_infra(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.set(timeline=[["RUNNING", 0, 0]] * 3 + [["CANCELLED", 0, 15]])
    run = _runner().run(_spec(tmp_path))
    assert run.infra is not None and "cancelled outside the harness" in run.infra
    assert not run.cancelled and not run.timed_out
    got = pretrain.collect(run, tmp_path / "pretrain")
    assert got.status is Status.FAILED_INFRA
    assert fake.calls("scancel") == []


def test_runner_cancel_marker_scancels_and_ends_cancelled(fake: FakeSlurm,
                                                          tmp_path: Path) -> None:
    fake.set(timeline=[["RUNNING", 0, 0]])  # runs until cancelled
    spec = _spec(tmp_path)
    assert spec.cancel_file is not None
    threading.Timer(0.3, spec.cancel_file.touch).start()
    run = _runner().run(spec)
    assert run.cancelled and run.infra is None and not run.timed_out
    assert fake.calls("scancel") == [["100"]]
    # kill() waited until the job had left the queue, not only for its final record.
    assert [c[-1] for c in fake.calls("squeue") if "-o" in c] == ["%i"] * 4
    assert pretrain.collect(run, tmp_path / "pretrain").status is Status.CANCELLED


def test_sbatch_refusal_is_a_runner_error_with_its_message(fake: FakeSlurm,
                                                           tmp_path: Path) -> None:
    fake.set(sbatch_error="sbatch: error: invalid partition specified: nope")
    run = _runner().run(_spec(tmp_path))
    assert not run.started and run.error is not None
    assert "sbatch refused the job: sbatch: error: invalid partition specified: nope" in run.error
    assert pretrain.collect(run, tmp_path / "pretrain").status is Status.FAILED_INFRA


def test_missing_slurm_clients_refuse_before_anything_runs(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    run = _runner().run(_spec(tmp_path))
    assert not run.started and run.error is not None and "sbatch" in run.error


class _Wrap:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def command(self, spec: StageSpec) -> list[str]:
        return ["apptainer", "exec", "/img with space.sif", *spec.argv]

    def prepare(self, spec: StageSpec) -> None:
        if self.fail:
            raise RunnerError("image /img with space.sif is missing")


def test_wrapped_runs_the_wrappers_command_and_checks_its_image(fake: FakeSlurm,
                                                                tmp_path: Path) -> None:
    fake.set(timeline=[["COMPLETED", 0, 0]])
    poller = SlurmPoller(poll_s=0.01, max_poll_s=0.05)
    run = SlurmRunner(FAST, _Wrap(), poller=poller).run(_spec(tmp_path))
    assert run.returncode == 0
    text = Path(run.info["script"]).read_text()
    assert "\ntimeout --signal=TERM --kill-after=30 30s \\\n    apptainer \\\n    exec \\\n" \
           "    '/img with space.sif' \\\n" in text
    missing = SlurmRunner(FAST, _Wrap(fail=True), poller=poller).run(_spec(tmp_path / "b"))
    assert not missing.started and missing.error == "image /img with space.sif is missing"
    assert len(fake.calls("sbatch")) == 1  # nothing submitted for the missing image


def test_apptainer_wrap_checks_the_image_and_records_its_digest(fake: FakeSlurm,
                                                                tmp_path: Path) -> None:
    fake.set(timeline=[["COMPLETED", 0, 0]])
    (fake.bin / "apptainer").write_text("#!/bin/sh\nexit 0\n")  # prepare() looks it up on PATH
    (fake.bin / "apptainer").chmod(0o755)
    image = tmp_path / "images" / "bit linear.sif"
    wrap = ApptainerRunner(ApptainerSettings(image=str(image)))
    missing = SlurmRunner(FAST, wrap, poller=SlurmPoller()).run(_spec(tmp_path / "a"))
    assert not missing.started and missing.error is not None and "is missing" in missing.error
    assert fake.calls("sbatch") == []  # nothing submitted, so nothing can be charged
    image.parent.mkdir()
    image.write_bytes(b"SIF" * 1000)
    run = SlurmRunner(FAST, wrap, poller=SlurmPoller(poll_s=0.01, max_poll_s=0.05)).run(
        _spec(tmp_path / "b"))
    assert run.returncode == 0 and run.info["image"] == str(image)
    assert run.info["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert stage_argv(Path(run.info["script"]).read_text())[4:] == wrap.command(
        _spec(tmp_path / "b"))


def test_make_runner_builds_the_slurm_runner_from_config() -> None:
    from harness.runners import make_runner
    from harness.runners.config import RunnerConfig

    plain = make_runner(RunnerConfig(kind="slurm"))
    assert isinstance(plain, SlurmRunner) and plain.wrap is None and plain.name == "slurm"
    wrapped = make_runner(RunnerConfig(kind="slurm", slurm=SlurmSettings(wrap="apptainer"),
                                       apptainer=ApptainerSettings(image="/x.sif")))
    assert isinstance(wrapped, SlurmRunner) and isinstance(wrapped.wrap, ApptainerRunner)
    assert wrapped.poller is plain.poller  # one poller for every job of the process
