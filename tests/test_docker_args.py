"""The docker runner without a daemon: the exact create() arguments (golden files), how a
container's end is classified, and the runner's lifecycle against a fake Docker client.

Golden files: REGENERATE_GOLDEN=1 pytest tests/test_docker_args.py rewrites
tests/golden/docker_args_gpus{0,2}.json and docker_args_preflight.json; review the diff
before committing it.
The tests that need a real Docker engine are in tests/docker/ (pytest -m docker).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import docker.errors
import pytest

from harness.record import Status
from harness.runners.base import Exit, Mount, RunnerError, StageRun, StageSpec
from harness.runners.config import DockerSettings
from harness.runners.docker import (
    NOBODY,
    DockerRunner,
    classify_exit,
    container_args,
    grant_access,
    invoking_user,
)
from harness.stages import pretrain

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("REGENERATE_GOLDEN") == "1"
SETTINGS = DockerSettings(image="bitlinear-harness:test", python="python3", memory="12g",
                          cpus=3.5, pids=2048, shm_size="4g")


def _awkward_spec(root: Path, gpus: int) -> StageSpec:
    """Paths with spaces, quotes and shell syntax: the API takes them as they are."""
    attempt = root / "runs" / "it's a \"quoted\" run; echo pwned"
    out = attempt / "pretrain"
    data = root / "data dir" / "smoke $(id) `x`"
    return StageSpec(
        name="pretrain",
        argv=("/host/venv/bin/python3", "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={max(gpus, 1)}", str(attempt / "custom_pretrain.py"),
              f"--data_dir={data}", f"--out_dir={out}"),
        cwd=attempt, log_dir=out, timeout_s=600, env={"OMP_NUM_THREADS": "1"},
        mounts=(Mount(out, str(out), writable=True), Mount(attempt, str(attempt)),
                Mount(data, str(data))),
        gpus=gpus, job_name="harness-20261123-it's a run-pretrain")


def _fixed_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("gpus", [0, 2])
def test_container_args_match_golden(gpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed_env(monkeypatch, PATH="/host/bin", HOME="/root", LANG="C.UTF-8",
               LD_LIBRARY_PATH="/host/lib", NCCL_NVLS_ENABLE="0", AWS_SECRET_ACCESS_KEY="leak",
               **({"CUDA_VISIBLE_DEVICES": "3,5,7"} if gpus else {}))
    spec = _awkward_spec(Path("/srv/bench"), gpus)
    args = container_args(spec, SETTINGS, uid_gid="1000:1000", name_suffix="a1b2c3")
    text = json.dumps(args, indent=1, sort_keys=True) + "\n"
    golden = GOLDEN / f"docker_args_gpus{gpus}.json"
    if REGENERATE:
        golden.write_text(text)
    assert text == golden.read_text()


class _DockerNamed:
    name = "docker"

    def run(self, spec: StageSpec) -> StageRun:
        raise AssertionError("not run here")


def test_preflight_container_args_match_golden(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's pre-flight stage in a container: its folder in the attempt the one writable
    mount and the working directory, its caches there, no GPU, the orchestrator from the
    image's own harness, named for the attempt (recover finds it so)."""
    from harness.checks import preflight
    from harness.runtime.preflight import CHECK_IDS
    from harness.task import load_task

    _fixed_env(monkeypatch, PATH="/host/bin", HOME="/root", LANG="C.UTF-8",
               LD_LIBRARY_PATH="/host/lib", OMP_NUM_THREADS="4", AWS_SECRET_ACCESS_KEY="leak",
               CUDA_VISIBLE_DEVICES="3,5,7")
    work = Path("/srv/bench/runs/it's a \"quoted\" run; echo pwned/preflight")
    spec = preflight.build(load_task(), work_dir=work, runner=_DockerNamed(), timeout_s=120,
                           memory_mb=6144, checks=CHECK_IDS,
                           python="/host/venv/bin/python3",
                           job_name="harness-20261207-0940-ses-1-t1-ab12cd34-ef01-preflight")
    args = container_args(spec, SETTINGS, uid_gid="1000:1000", name_suffix="a1b2c3")
    assert args["device_requests"] == [] and args["network_mode"] == "none"
    assert [(m["Source"], m["ReadOnly"]) for m in args["mounts"]] == [(str(work), False)]
    assert "PYTHONPATH" not in args["environment"]
    text = json.dumps(args, indent=1, sort_keys=True) + "\n"
    golden = GOLDEN / "docker_args_preflight.json"
    if REGENERATE:
        golden.write_text(text)
    assert text == golden.read_text()


def test_container_args_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the golden file encodes, said as rules (a regenerated golden file keeps them)."""
    _fixed_env(monkeypatch, PATH="/host/bin", HOME="/root", LD_LIBRARY_PATH="/host/lib",
               TMPDIR="/host/tmp", AWS_SECRET_ACCESS_KEY="leak", GITHUB_TOKEN="leak",
               NCCL_NVLS_ENABLE="0", LANG="C.UTF-8")
    spec = _awkward_spec(Path("/srv/bench"), 0)
    args = container_args(spec, SETTINGS, uid_gid="1000:1000")
    # The stage's command, run by the memory watcher, which reports into the one writable
    # mount (the stage's output folder) whether an OOM kill was at the stage's own limit.
    out = next(m.target for m in spec.mounts if m.writable)
    assert args["command"] == ["python3", "-m", "harness.runtime.memwatch",
                               f"{out}/memory.json", "--", "python3", *spec.argv[1:]]
    assert args["working_dir"] == str(spec.cwd)
    assert (args["network_mode"], args["read_only"], args["cap_drop"], args["security_opt"]) == \
        ("none", True, ["ALL"], ["no-new-privileges"])
    assert args["mem_limit"] == args["memswap_limit"] == "12g"  # no swap
    assert (args["nano_cpus"], args["pids_limit"], args["shm_size"]) == (3_500_000_000, 2048,
                                                                         "4g")
    assert "exec" in args["tmpfs"]["/tmp"].split(",")
    assert args["device_requests"] == []
    # Same path inside as outside; only the stage's output folder is writable.
    mounts = {m["Target"]: m for m in args["mounts"]}
    assert set(mounts) == {m.target for m in spec.mounts}
    assert all(m["Source"] == m["Target"] and m["Type"] == "bind" for m in mounts.values())
    assert [t for t, m in mounts.items() if not m["ReadOnly"]] == [str(spec.log_dir)]
    env = args["environment"]
    assert "AWS_SECRET_ACCESS_KEY" not in env and "GITHUB_TOKEN" not in env
    assert (env["HOME"], env["TMPDIR"], env["OMP_NUM_THREADS"]) == ("/tmp", "/tmp", "1")
    assert "PATH" not in env and "LD_LIBRARY_PATH" not in env  # the image's own stay
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["LANG"] == "C.UTF-8"
    assert args["labels"]["org.bitlinear-harness.job"] == spec.job_name
    # Docker names allow [a-zA-Z0-9_.-] only; retries of one job get different names.
    assert args["name"].startswith("harness-20261123-it_s_a_run-pretrain")
    other = container_args(spec, SETTINGS, uid_gid="1000:1000", name_suffix="ffffff")
    assert other["name"] != args["name"] and other["name"].endswith("-ffffff")


def test_gpu_requests_follow_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed_env(monkeypatch)
    spec = _awkward_spec(Path("/srv"), 2)
    (req,) = container_args(spec, SETTINGS, uid_gid="1:1")["device_requests"]
    assert (req["Count"], req["Capabilities"]) == (2, [["gpu"]])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    with pytest.raises(RunnerError, match="needs 2 GPUs but CUDA_VISIBLE_DEVICES names 1"):
        container_args(spec, SETTINGS, uid_gid="1:1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,4,2")
    args = container_args(spec, SETTINGS, uid_gid="1:1")
    assert args["device_requests"][0]["DeviceIDs"] == ["6", "4"]
    # Renumbered inside the container: the host's list must not follow the stage in.
    assert "CUDA_VISIBLE_DEVICES" not in args["environment"]


def test_refuses_root_and_relative_paths(tmp_path: Path) -> None:
    spec = _awkward_spec(Path("/srv"), 0)
    for user in ("0:0", "0", "root"):
        with pytest.raises(RunnerError, match="as root"):
            container_args(spec, SETTINGS, uid_gid=user)
    rel = StageSpec(name="t", argv=("python", "-V"), cwd=Path("runs/x"), log_dir=tmp_path,
                    timeout_s=1)
    with pytest.raises(RunnerError, match="absolute"):
        container_args(rel, SETTINGS, uid_gid="1:1")


def test_the_container_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "getgid", lambda: 0)
    assert invoking_user(DockerSettings()) == NOBODY == "65534:65534"
    monkeypatch.setattr(os, "getuid", lambda: 1234)
    monkeypatch.setattr(os, "getgid", lambda: 99)
    assert invoking_user(DockerSettings()) == "1234:99"
    assert invoking_user(DockerSettings(user="2000:2000")) == "2000:2000"


def test_grant_access_hands_outputs_to_the_container_user(tmp_path: Path) -> None:
    attempt, out, data = tmp_path / "attempt", tmp_path / "attempt" / "pretrain", tmp_path / "d"
    out.mkdir(parents=True)
    data.mkdir()
    (attempt / "custom_pretrain.py").write_text("x")
    (attempt / "custom_pretrain.py").chmod(0o600)  # as the harness's atomic writes leave it
    (data / "shard.bin").write_bytes(b"\0")
    (data / "shard.bin").chmod(0o640)
    spec = StageSpec(name="t", argv=("python",), cwd=attempt, log_dir=out, timeout_s=1,
                     mounts=(Mount(out, str(out), writable=True), Mount(attempt, str(attempt)),
                             Mount(data, str(data))))
    grant_access(spec, "65534:65534")
    if os.getuid() == 0:
        assert (out.stat().st_uid, out.stat().st_gid) == (65534, 65534)
        assert (attempt / "custom_pretrain.py").stat().st_mode & 0o777 == 0o604
        assert (data / "shard.bin").stat().st_mode & 0o777 == 0o644
        assert attempt.stat().st_uid == 0  # inputs stay root's: only read bits were added
    else:  # not root: nothing is ours to change
        assert out.stat().st_uid == os.getuid()
        assert (attempt / "custom_pretrain.py").stat().st_mode & 0o777 == 0o600


# --- how a container ended --------------------------------------------------------------

def _state(status: str = "exited", code: int = 0, oom: bool = False,
           error: str = "") -> dict[str, Any]:
    return {"Status": status, "Running": status == "running", "OOMKilled": oom,
            "ExitCode": code, "Error": error, "FinishedAt": "2026-11-23T00:00:00Z"}


@pytest.mark.parametrize("status", ["created", "running", "paused", "restarting"])
def test_a_running_container_has_not_ended(status: str) -> None:
    assert classify_exit(_state(status), memory="16g") is None


@pytest.mark.parametrize(("state", "kw", "code", "infra"), [
    (_state(code=0), {}, 0, None),
    (_state(code=1), {}, 1, None),  # the submission's own failure
    (_state(code=137, oom=True), {}, 137,
     "killed by the out-of-memory killer (memory limit 16g); the stage's memory report is "
     "missing, so nothing shows it reached its limit"),
    (_state(code=1, oom=True), {"report": {"limit_reached": False, "peak_bytes": 2**30}}, 1,
     "killed by the out-of-memory killer below its memory limit of 16g, peak 1.00 GiB: the "
     "machine ran out of memory, not the stage"),
    (_state(code=1, oom=True), {"report": {"limit_reached": True}}, 1,
     "killed at its memory limit of 16g, but this scale has no measured peak (peak_memory_gb), "
     "so the limit may be too low for the template itself: not charged"),
    (_state(code=137), {}, 137, "container killed from outside the harness (exit code 137: "
                                "SIGKILL)"),
    (_state(code=143), {}, 143, "container killed from outside the harness (exit code 143: "
                                "SIGTERM)"),
    (_state(code=137), {"killed_by_us": True}, 137, None),  # our watchdog or cancel
    (_state(code=1), {"outside_signal": "SIGTERM"}, 1,  # `docker stop`: torchrun exits 1
     "container killed from outside the harness (SIGTERM, exit code 1)"),
    (_state("dead", code=-1, error="device busy"), {}, -1,
     "the container died inside Docker (device busy)"),
    (_state(code=127, error="OCI runtime exec failed"), {}, 127,
     "Docker reported an error: OCI runtime exec failed"),
])
def test_exit_classification(state: dict[str, Any], kw: dict[str, Any], code: int,
                             infra: str | None) -> None:
    end = classify_exit(state, memory="16g", **kw)
    assert end is not None
    assert (end.returncode, end.infra) == (code, infra)
    assert end.info["exit_code"] == code and end.info["oom_killed"] == state["OOMKilled"]


def test_an_oom_kill_at_the_stages_own_vetted_limit_is_charged(tmp_path: Path) -> None:
    # The watcher saw the container's own limit reached, and the scale has a measured peak
    # the limit was vetted against: the submission asked for more than it was given.
    (tmp_path / "error_rank1.json").write_text(json.dumps(
        {"kind": "submission", "message": "RuntimeError: Connection reset by peer"}))
    report = {"cgroup": "v1", "limit_reached": True, "peak_bytes": 8 * 2**30, "oom_kills": 1}
    end = classify_exit(_state(code=1, oom=True), memory="8g", report=report, peak_gb=1.5)
    assert end is not None and end.infra is None
    assert end.over_limit == ("the stage outgrew its memory limit of 8g, peak 8.00 GiB; the "
                              "template's own measured peak at this scale is 1.5 GiB")
    assert end.info["memory"] == report
    run = StageRun(end.returncode, True, False, 1.0, tmp_path / "o", tmp_path / "e",
                   over_limit=end.over_limit)
    got = pretrain.collect(run, tmp_path)
    assert got.status is Status.FAILED_SUBMISSION
    assert got.reason == f"out of memory: {end.over_limit}"


def test_an_oom_kill_is_never_charged(tmp_path: Path) -> None:
    # The OOM killer takes one rank; the other rank's collective error file must not turn it
    # into the submission's failure.
    (tmp_path / "error_rank1.json").write_text(json.dumps(
        {"kind": "submission", "message": "RuntimeError: Connection reset by peer"}))
    end = classify_exit(_state(code=1, oom=True), memory="8g")
    assert end is not None
    run = StageRun(end.returncode, True, False, 1.0, tmp_path / "o", tmp_path / "e",
                   infra=end.infra)
    got = pretrain.collect(run, tmp_path)
    assert got.status is Status.FAILED_INFRA and "out-of-memory" in got.reason


# --- the lifecycle against a fake client ------------------------------------------------

class FakeContainer:
    def __init__(self, client: FakeClient, args: dict[str, Any]) -> None:
        self.client, self.args = client, args
        self.id = "c0ffee" * 10 + "abcd"
        self.attrs: dict[str, Any] = {"State": _state("created")}
        self.polls = 0
        self.removed = self.stopped = False

    def start(self) -> None:
        if self.client.start_error:
            raise docker.errors.APIError("500", explanation=self.client.start_error)
        self.attrs["State"] = _state("running")
        if self.client.report is not None:  # as the memory watcher writes it, where told to
            command = self.args["command"]
            Path(command[command.index("--") - 1]).write_text(json.dumps(self.client.report))

    def reload(self) -> None:
        if self.client.gone:
            raise docker.errors.NotFound("no such container")
        self.polls += 1
        if self.polls >= 2 and self.attrs["State"]["Status"] == "running":
            self.attrs["State"] = self.client.final

    def logs(self, *, stdout: bool = True, stderr: bool = True, stream: bool = False,
             follow: bool = False) -> Any:
        data = b"out line\n" if stdout else b"err line\n"
        return iter([data]) if stream else data

    def stop(self, timeout: int = 10) -> None:
        self.stopped = True
        self.attrs["State"] = _state(code=143)

    def kill(self) -> None:
        self.attrs["State"] = _state(code=137)

    def wait(self, timeout: int = 10) -> dict[str, Any]:
        return {"StatusCode": self.attrs["State"]["ExitCode"]}

    def remove(self, force: bool = False) -> None:
        self.removed = True


class FakeImage:
    id = "sha256:" + "ab" * 32
    attrs: ClassVar[dict[str, Any]] = {"RepoDigests": []}


class FakeClient:
    def __init__(self, *, image: bool = True, start_error: str = "",
                 final: dict[str, Any] | None = None, events: list[dict[str, Any]] | None = None,
                 report: dict[str, Any] | None = None, mem_total: int = 0) -> None:
        self.image, self.start_error = image, start_error
        self.report, self.mem_total = report, mem_total
        self.final = final or _state(code=0)
        self.gone = False
        self.event_list = events or []
        self.created: list[FakeContainer] = []
        outer = self

        class Images:
            def get(self, tag: str) -> FakeImage:
                if not outer.image:
                    raise docker.errors.ImageNotFound(f"No such image: {tag}")
                return FakeImage()

        class Containers:
            def create(self, **args: Any) -> FakeContainer:
                outer.created.append(FakeContainer(outer, args))
                return outer.created[-1]

        self.images, self.containers = Images(), Containers()

    def ping(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {"NCPU": 2, "MemTotal": self.mem_total or 64 * 2**30}

    def events(self, **kw: Any) -> Any:
        return iter(self.event_list)


def _stage(tmp_path: Path) -> StageSpec:
    out = tmp_path / "out"
    return StageSpec(name="t", argv=(sys.executable, "-c", "pass"), cwd=tmp_path, log_dir=out,
                     timeout_s=30, mounts=(Mount(out, str(out), writable=True),),
                     job_name="harness-test-t")


def test_a_run_records_the_image_and_the_logs(tmp_path: Path) -> None:
    client = FakeClient()
    runner = DockerRunner(DockerSettings(cpus=8.0), client=client, verify_image=False)
    runner.poll_s = 0.01
    run = runner.run(_stage(tmp_path))
    assert (run.started, run.returncode, run.infra, run.error) == (True, 0, None, None)
    assert run.stdout.read_text() == "out line\n" and run.stderr.read_text() == "err line\n"
    assert run.info["image_id"] == FakeImage.id and run.info["image"] == "bitlinear-harness:cpu"
    assert run.info["container_id"] == client.created[0].id
    (container,) = client.created
    assert container.removed  # cleanup
    assert container.args["image"] == FakeImage.id  # exactly the image recorded
    assert container.args["nano_cpus"] == 2_000_000_000  # capped at the host's CPUs


def test_missing_image_names_the_fix(tmp_path: Path) -> None:
    run = DockerRunner(DockerSettings(image="nope:1"), client=FakeClient(image=False),
                       verify_image=False).run(_stage(tmp_path))
    assert not run.started
    assert "'nope:1' is not on this Docker host" in (run.error or "")
    assert "harness image build --tag nope:1" in (run.error or "")
    assert pretrain.collect(run, tmp_path).status is Status.FAILED_INFRA


def test_a_container_that_cannot_start_is_infra(tmp_path: Path) -> None:
    client = FakeClient(start_error='exec: "python3": executable file not found in $PATH')
    run = DockerRunner(client=client, verify_image=False).run(_stage(tmp_path))
    assert not run.started
    assert run.error == ('container could not start: exec: "python3": executable file not '
                         'found in $PATH')
    assert client.created[0].removed


def test_an_unreachable_daemon_is_infra(tmp_path: Path) -> None:
    settings = DockerSettings(base_url=f"unix://{tmp_path}/no-docker.sock")
    run = DockerRunner(settings).run(_stage(tmp_path))
    assert not run.started
    assert (run.error or "").startswith(f"cannot reach the Docker daemon at unix://{tmp_path}")


def test_a_vanished_container_is_infra(tmp_path: Path) -> None:
    client = FakeClient()
    runner = DockerRunner(client=client, verify_image=False)
    spec = _stage(tmp_path)
    runner.prepare(spec)
    job = runner.launch(spec)
    client.gone = True
    end = runner.poll(job)
    assert isinstance(end, Exit) and end.returncode is None
    assert "disappeared" in (end.infra or "")
    runner.cleanup(job)


def test_a_kill_recorded_by_the_daemon_is_outside(tmp_path: Path) -> None:
    # `docker stop` from outside: torchrun exits 1 on SIGTERM, but the daemon saw the kill.
    client = FakeClient(final=_state(code=1), events=[
        {"Action": "kill", "Actor": {"Attributes": {"signal": "15"}}}])
    runner = DockerRunner(client=client, verify_image=False)
    runner.poll_s = 0.01
    run = runner.run(_stage(tmp_path))
    assert run.infra == "container killed from outside the harness (SIGTERM, exit code 1)"


def test_our_own_kill_is_not_outside(tmp_path: Path) -> None:
    client = FakeClient(final=_state("running"), events=[
        {"Action": "kill", "Actor": {"Attributes": {"signal": "15"}}}])
    runner = DockerRunner(client=client, verify_image=False)
    runner.poll_s = 0.01
    spec = _stage(tmp_path)
    run = runner.run(replace(spec, timeout_s=0.05))
    assert run.timed_out and run.infra is None
    assert client.created[0].stopped and client.created[0].removed


def test_a_broken_image_is_refused_before_the_stage_starts(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.runners import docker as docker_runner

    checked: list[tuple[str, bool]] = []

    def check_image(image: str, *, gpu: bool, settings: DockerSettings) -> Any:
        checked.append((image, gpu))
        ok = image == "good:1"
        return docker_runner.CheckReport(image, FakeImage.id, ok, [
            {"id": "torch", "ok": ok, "detail": "ModuleNotFoundError: No module named 'torch'"}],
            {})

    monkeypatch.setattr(docker_runner, "check_image", check_image)
    monkeypatch.setattr(docker_runner, "VERIFIED", set())
    client = FakeClient()
    run = DockerRunner(DockerSettings(image="broken:1"), client=client).run(_stage(tmp_path))
    assert not run.started and client.created == []  # nothing ran, so nothing is charged
    assert run.error == (f"the image 'broken:1' ({FakeImage.id}) lacks what the task needs: "
                         "torch; `harness image check broken:1` says more")
    assert pretrain.collect(run, tmp_path).status is Status.FAILED_INFRA
    # A good image is probed once per process, not once per stage.
    good = DockerRunner(DockerSettings(image="good:1"), client=client)
    good.poll_s = 0.01
    assert good.run(_stage(tmp_path / "a")).returncode == 0
    assert good.run(_stage(tmp_path / "b")).returncode == 0
    assert checked == [("broken:1", False), ("good:1", False)]


# --- the memory policy through the runner -------------------------------------------------

AT_LIMIT = {"cgroup": "v1", "limit_bytes": 4 * 2**30, "peak_bytes": 4 * 2**30, "oom_kills": 1,
            "limit_reached": True}


def test_an_oom_at_the_vetted_limit_reaches_the_stage_as_over_limit(tmp_path: Path) -> None:
    client = FakeClient(final=_state(code=137, oom=True), report=AT_LIMIT)
    runner = DockerRunner(DockerSettings(memory="4g"), client=client, verify_image=False)
    runner.poll_s = 0.01
    run = runner.run(replace(_stage(tmp_path), memory_peak_gb=1.5))
    assert run.infra is None
    assert run.over_limit == ("the stage outgrew its memory limit of 4g, peak 4.00 GiB; the "
                              "template's own measured peak at this scale is 1.5 GiB")
    assert run.info["memory"] == AT_LIMIT
    assert pretrain.collect(run, tmp_path / "out").status is Status.FAILED_SUBMISSION


def test_a_report_left_by_an_earlier_launch_is_not_evidence(tmp_path: Path) -> None:
    # A resumed stage reuses its folder: the first launch's report must not judge the second.
    out = tmp_path / "out"
    out.mkdir()
    (out / "memory.json").write_text(json.dumps(AT_LIMIT))
    client = FakeClient(final=_state(code=137, oom=True))
    runner = DockerRunner(DockerSettings(memory="4g"), client=client, verify_image=False)
    runner.poll_s = 0.01
    run = runner.run(replace(_stage(tmp_path), memory_peak_gb=1.5))
    assert run.over_limit is None
    assert "memory report is missing" in (run.infra or "")
    assert pretrain.collect(run, out).status is Status.FAILED_INFRA


def test_a_limit_below_the_templates_own_need_never_starts(tmp_path: Path) -> None:
    client = FakeClient()
    runner = DockerRunner(DockerSettings(memory="2g"), client=client, verify_image=False)
    run = runner.run(replace(_stage(tmp_path), memory_peak_gb=1.5))
    assert not run.started and not client.created
    assert run.error == ("[runner.docker] memory = 2.00 GiB is below 1.5 x the template's own "
                         "measured peak of 1.5 GiB per stage at this scale (2.25 GiB): raise "
                         "it, or an out-of-memory kill could be the template's and not the "
                         "submission's")
    assert pretrain.collect(run, tmp_path / "out").status is Status.FAILED_INFRA


def test_a_limit_at_the_machines_memory_is_capped_below_it(tmp_path: Path) -> None:
    client = FakeClient(mem_total=8 * 2**30)
    runner = DockerRunner(DockerSettings(memory="16g"), client=client, verify_image=False)
    runner.poll_s = 0.01
    run = runner.run(_stage(tmp_path))
    assert run.started
    capped = f"{int(8 * 2**30 * 0.9) // 2**20}m"
    assert client.created[0].args["mem_limit"] == capped
    assert run.info["limits"]["memory"] == capped
