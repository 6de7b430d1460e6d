"""The runner contract on the local runner, the runner config, and the apptainer line."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.record import Status
from harness.runners import make_runner
from harness.runners.apptainer import ApptainerRunner, command
from harness.runners.base import Mount, StageRun, StageSpec
from harness.runners.config import ApptainerSettings, load_config, parse_config, with_overrides
from harness.runners.leased import LeasedRunner
from harness.runners.local import LocalRunner
from harness.stages import pretrain

GOLDEN = Path(__file__).parent / "golden"
# REGENERATE_GOLDEN=1 pytest tests/test_runners.py rewrites the golden files; review the diff.
REGENERATE = os.environ.get("REGENERATE_GOLDEN") == "1"


def _spec(tmp: Path, code: str, *, timeout: float = 30.0, cancel: Path | None = None
          ) -> StageSpec:
    return StageSpec(name="t", argv=(sys.executable, "-c", code), cwd=tmp, log_dir=tmp / "logs",
                     timeout_s=timeout, cancel_file=cancel)


def test_local_runner_reports_exit_code_and_logs(tmp_path: Path) -> None:
    run = LocalRunner().run(_spec(tmp_path, "import sys; print('out'); sys.exit(3)"))
    assert (run.started, run.returncode, run.timed_out, run.infra, run.cancelled) == \
        (True, 3, False, None, False)
    assert run.stdout.read_text().strip() == "out"


def test_local_runner_watchdog_kills_the_whole_group(tmp_path: Path) -> None:
    # A child that ignores SIGTERM in the group must die too (SIGKILL after the grace).
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "open('child_started', 'w').close(); time.sleep(60)")
    t0 = time.monotonic()
    run = LocalRunner().run(_spec(tmp_path, code, timeout=2.0))
    assert run.timed_out and run.infra is None and not run.cancelled
    assert time.monotonic() - t0 < 20
    assert (tmp_path / "child_started").exists()


def test_cancel_marker_stops_the_stage_as_cancelled(tmp_path: Path) -> None:
    marker = tmp_path / "cancel_requested"
    code = "import time; open('started', 'w').close(); time.sleep(60)"

    def cancel_when_started() -> None:
        while not (tmp_path / "started").exists():
            time.sleep(0.05)
        marker.touch()

    threading.Thread(target=cancel_when_started, daemon=True).start()
    run = LocalRunner().run(_spec(tmp_path, code, cancel=marker))
    assert run.cancelled and not run.timed_out and run.infra is None
    assert run.wall_s < 20
    got = pretrain.collect(run, tmp_path / "logs")
    assert got.status is Status.CANCELLED


def test_kill_from_outside_is_infra_not_the_submissions(tmp_path: Path) -> None:
    code = "import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(60)"

    def kill_when_started() -> None:
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
            time.sleep(0.05)
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)

    threading.Thread(target=kill_when_started, daemon=True).start()
    run = LocalRunner().run(_spec(tmp_path, code))
    assert run.returncode == -signal.SIGKILL
    assert run.infra is not None and "SIGKILL from outside" in run.infra
    got = pretrain.collect(run, tmp_path / "logs")
    assert got.status is Status.FAILED_INFRA and got.reason == run.infra


def test_a_stage_that_cannot_start_is_infra(tmp_path: Path) -> None:
    spec = StageSpec(name="t", argv=(str(tmp_path / "no such python"),), cwd=tmp_path,
                     log_dir=tmp_path / "logs", timeout_s=5)
    run = LocalRunner().run(spec)
    assert not run.started and run.error and "could not start" in run.error
    assert pretrain.collect(run, tmp_path / "logs").status is Status.FAILED_INFRA


def test_infra_outranks_the_ranks_own_error_files(tmp_path: Path) -> None:
    # A rank killed by the OOM killer leaves the others' collective errors behind.
    (tmp_path / "error_rank1.json").write_text(json.dumps(
        {"kind": "exception", "message": "RuntimeError: connection reset by peer"}))
    run = StageRun(1, True, False, 1.0, tmp_path / "o", tmp_path / "e",
                   infra="killed by the out-of-memory killer")
    got = pretrain.collect(run, tmp_path)
    assert got.status is Status.FAILED_INFRA and "out-of-memory" in got.reason


# --- configuration ------------------------------------------------------------------------

def test_config_file_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "harness.toml"
    cfg.write_text('[runner]\nkind = "apptainer"\n[runner.apptainer]\nimage = "/img/h.sif"\n'
                   '[runner.docker]\ncpus = 4\nmemory = "8g"\n'
                   '[runner.slurm]\npartition = "gpu"\nwrap = "apptainer"\n'
                   'extra_args = ["--constraint=h200"]\n')
    monkeypatch.setenv("HARNESS_CONFIG", str(cfg))
    config = load_config()
    assert config.kind == "apptainer" and config.apptainer.image == "/img/h.sif"
    assert config.docker.cpus == 4.0 and config.docker.memory == "8g"
    assert config.slurm.extra_args == ("--constraint=h200",)
    # Runners on this host come wrapped in their GPU leases; Slurm allocates its own.
    leased = make_runner(config)
    assert isinstance(leased, LeasedRunner) and isinstance(leased.inner, ApptainerRunner)
    local = with_overrides(config, kind="local", image="other.sif")
    leased = make_runner(local)
    assert isinstance(leased, LeasedRunner) and isinstance(leased.inner, LocalRunner)
    assert local.apptainer.image == "other.sif" and local.docker.image == "other.sif"


def test_no_config_means_local_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARNESS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config().kind == "local"


@pytest.mark.parametrize(("text", "message"), [
    ('[runner]\nkind = "kubernetes"\n', "unknown runner 'kubernetes'"),
    ('[runner.docker]\nmemroy = "8g"\n', "unknown setting 'memroy'"),
    ('[runner.docker]\ncpus = "four"\n', "cpus must be a float"),
    ('[runner.slurm]\nwrap = "docker"\n', "wrap = 'docker'"),
    ('[runners]\nkind = "local"\n', "unknown table 'runners'"),
    ('[runner.slurm]\nextra_args = "--x"\n', "must be a list of strings"),
])
def test_bad_config_is_one_clear_error(text: str, message: str) -> None:
    import tomllib

    with pytest.raises(UserError) as err:
        parse_config(tomllib.loads(text), "harness.toml")
    assert message in str(err.value)


def test_missing_explicit_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


# --- apptainer: the exact command line ------------------------------------------------------

def _awkward_spec(root: Path, gpus: int) -> StageSpec:
    attempt = root / 'runs with space/it\'s "quoted"/20261123-att'
    out, data = attempt / "pretrain", root / "data dir/smoke"
    return StageSpec(
        name="pretrain",
        argv=(sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node=2", str(attempt / "custom_pretrain.py"), f"--data_dir={data}",
              f"--out_dir={out}"),
        cwd=attempt, log_dir=out, timeout_s=600, env={"OMP_NUM_THREADS": "1"},
        mounts=(Mount(out, str(out), writable=True), Mount(attempt, str(attempt)),
                Mount(data, str(data))),
        gpus=gpus, job_name="harness-20261123-att-pretrain")


@pytest.mark.parametrize("gpus", [0, 2])
def test_apptainer_command_matches_golden(gpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The variables that pass from the host are fixed here so the line is reproducible.
    for key in list(os.environ):
        if key.startswith(("NCCL_", "NVSHMEM_")) or key in ("LANG", "LC_ALL", "TZ",
                                                            "CUDA_VISIBLE_DEVICES",
                                                            "NVIDIA_VISIBLE_DEVICES",
                                                            "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-not-pass")
    argv = command(_awkward_spec(Path("/srv"), gpus),
                   ApptainerSettings(image="/images/bit linear.sif"))
    golden = GOLDEN / f"apptainer_argv_gpus{gpus}.json"
    if REGENERATE:
        golden.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(golden.read_text())
    assert not any("must-not-pass" in a for a in argv)


def test_apptainer_refuses_paths_it_cannot_bind(tmp_path: Path) -> None:
    from harness.runners.base import RunnerError

    spec = StageSpec(name="t", argv=("x",), cwd=tmp_path, log_dir=tmp_path,
                     timeout_s=1, mounts=(Mount(Path("/a:b"), "/a:b"),))
    with pytest.raises(RunnerError, match="cannot bind"):
        command(spec, ApptainerSettings())


def test_apptainer_missing_is_infra_with_a_fix(tmp_path: Path) -> None:
    runner = ApptainerRunner(ApptainerSettings(executable="apptainer-not-installed"))
    run = runner.run(_spec(tmp_path, "pass"))
    assert not run.started and run.error and "not on PATH" in run.error
    assert pretrain.collect(run, tmp_path).status is Status.FAILED_INFRA


# --- `harness cancel` on a real attempt -----------------------------------------------------

@pytest.mark.slow
def test_harness_cancel_ends_a_running_attempt_cancelled(tmp_path: Path, task: object) -> None:
    import subprocess

    from harness.attempt import prepare, run_submission
    from harness.task import TaskSpec
    from tests.conftest import PYTHON, REPO

    assert isinstance(task, TaskSpec)
    prepared = prepare(REPO / "baselines" / "binary_sign", task)
    started = threading.Event()
    seen: dict[str, str] = {}

    def on_event(kind: str, info: dict[str, object]) -> None:
        if kind == "stage_start" and info["stage"] == "pretrain":
            seen["dir"] = str(info["attempt_dir"])
            started.set()

    def cancel_when_training() -> None:
        started.wait(120)
        time.sleep(2.0)  # torchrun and the ranks are up
        seen["cli"] = subprocess.run([PYTHON, "-m", "harness", "cancel", seen["dir"]],
                                     capture_output=True, text=True, timeout=60).stdout

    threading.Thread(target=cancel_when_training, daemon=True).start()
    t0 = time.monotonic()
    result, paths = run_submission(prepared, task, task.scale("smoke"), runs_dir=tmp_path / "runs",
                                data=tmp_path / "data", runner=LocalRunner(), on_event=on_event)
    assert "cancel requested" in seen.get("cli", ""), (result.status, result.reason, seen)
    assert result.status == "cancelled" and result.reason == "cancelled through the harness"
    assert result.stages["pretrain"].cancelled is True
    assert "lm-eval" not in result.stages  # nothing runs after a cancel
    assert json.loads(paths.record_path.read_text())["status"] == "cancelled"
    assert time.monotonic() - t0 < 120


def test_cancel_refuses_a_finished_attempt(tmp_path: Path) -> None:
    import subprocess

    from harness.record import Attempt, AttemptRecord, Origin
    from tests.conftest import PYTHON

    attempt = Attempt.create(tmp_path / "runs", "done-0001")
    attempt.write(AttemptRecord(attempt_id=attempt.id, origin=Origin("run"),
                                task={"name": "t", "version": "1"}, scale="smoke", submission={},
                                template_sha256="", spliced_sha256="",
                                status=Status.SUCCEEDED, runner="local"))
    tmp_path = attempt.root
    proc = subprocess.run([PYTHON, "-m", "harness", "cancel", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nothing to cancel" in proc.stderr
    assert not (tmp_path / "cancel_requested").exists()
