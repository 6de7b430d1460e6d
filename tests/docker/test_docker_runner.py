"""The docker runner on a real engine (pytest -m docker; scripts/ci_docker.sh sets it up).

Each sandbox test runs a small stage in the harness image with an attempt's mount layout
(output folder writable, attempt and data read-only, same paths as on the host; the paths
have spaces and quotes) and asserts on a file the stage wrote, not on its stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.attempt import prepare, run_submission
from harness.record import Status
from harness.runners.base import Mount, StageRun, StageSpec
from harness.runners.config import DockerSettings
from harness.runners.docker import LABEL, DockerRunner
from harness.runners.local import LocalRunner
from harness.session import Session
from harness.stages import pretrain
from harness.task import TaskSpec
from tests.conftest import REPO

pytestmark = pytest.mark.docker


def _layout(tmp: Path) -> tuple[Path, Path, Path]:
    attempt = tmp / "runs" / "it's an \"attempt\" dir"
    out, data = attempt / "stage", tmp / "data $(x)"
    out.mkdir(parents=True)
    data.mkdir()
    (attempt / "input.txt").write_text("frozen")
    (data / "shard.bin").write_bytes(b"\0" * 16)
    # World-writable on the host: only the read-only mount can stop a write to them.
    (attempt / "input.txt").chmod(0o666)
    (data / "shard.bin").chmod(0o666)
    return attempt, out, data


def _stage(tmp: Path, code: str, *, timeout: float = 120.0) -> tuple[StageSpec, Path, Path, Path]:
    attempt, out, data = _layout(tmp)
    spec = StageSpec(name="probe", argv=(sys.executable, "-c", code, str(out), str(attempt),
                                         str(data)),
                     cwd=attempt, log_dir=out, timeout_s=timeout,
                     mounts=(Mount(out, str(out), writable=True), Mount(attempt, str(attempt)),
                             Mount(data, str(data))),
                     job_name=f"harness-test-{tmp.name}")
    return spec, attempt, out, data


def _wait_for(what: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _docker_kill(name: str) -> None:
    """`docker kill` from outside the harness: the CLI, as an operator would."""
    cli = shutil.which("docker")
    assert cli, "the docker CLI is missing (apt-get install docker.io)"
    subprocess.run([cli, "kill", name], check=True, capture_output=True, timeout=60)


def _running(client: Any, label: str) -> str | None:
    found = client.containers.list(filters={"label": label, "status": "running"})
    return str(found[0].name) if found else None


NETWORK = r"""
import errno, json, socket, sys
out = sys.argv[1]
result = {}
def attempt(name, fn):
    try:
        fn()
        result[name] = "ok"
    except OSError as e:
        result[name] = f"{type(e).__name__}:{errno.errorcode.get(e.errno, e.errno)}"
attempt("tcp", lambda: socket.create_connection(("1.1.1.1", 443), timeout=5).close())
attempt("tcp_gateway", lambda: socket.create_connection(("172.17.0.1", 2375), timeout=5).close())
attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443))
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
attempt("loopback", lambda: socket.create_connection(server.getsockname(), timeout=5).close())
lines = open("/proc/net/dev").read().splitlines()[2:]
result["interfaces"] = sorted(line.split(":")[0].strip() for line in lines)
json.dump(result, open(out + "/network.json", "w"))
"""


def test_a_container_has_no_network(tmp_path: Path, settings: DockerSettings) -> None:
    spec, _, out, _ = _stage(tmp_path, NETWORK)
    run = DockerRunner(settings).run(spec)
    assert (run.started, run.returncode, run.infra) == (True, 0, None), run.stderr_tail()
    got = json.loads((out / "network.json").read_text())
    assert got["interfaces"] == ["lo"]
    assert got["tcp"] == "OSError:ENETUNREACH"
    assert got["tcp_gateway"] == "OSError:ENETUNREACH"  # not even the docker bridge
    assert got["dns"].startswith("gaierror:")
    assert got["loopback"] == "ok"  # torchrun's local rendezvous still works


WRITES = r"""
import errno, json, os, sys
out, attempt, data = sys.argv[1:4]
targets = {"out": out + "/x", "tmp": "/tmp/x", "attempt": attempt + "/x",
           "attempt_input": attempt + "/input.txt", "data": data + "/x",
           "data_shard": data + "/shard.bin", "etc": "/etc/x", "image_venv": "/opt/harness/x",
           "root": "/x"}
result = {}
for name, path in targets.items():
    try:
        with open(path, "a") as f:
            f.write("x")
        result[name] = "ok"
    except OSError as e:
        result[name] = errno.errorcode.get(e.errno, str(e.errno))
result["uid"] = os.getuid()
status = open("/proc/self/status").read().splitlines()
result["cap_eff"] = [l.split()[1] for l in status if l.startswith("CapEff")][0]
result["no_new_privs"] = [l.split()[1] for l in status if l.startswith("NoNewPrivs")][0]
json.dump(result, open(out + "/writes.json", "w"))
"""


def test_a_stage_writes_only_its_output_folder(tmp_path: Path, settings: DockerSettings) -> None:
    spec, attempt, out, data = _stage(tmp_path, WRITES)
    run = DockerRunner(settings).run(spec)
    assert (run.started, run.returncode, run.infra) == (True, 0, None), run.stderr_tail()
    got = json.loads((out / "writes.json").read_text())
    assert got["out"] == "ok" and got["tmp"] == "ok"
    for name in ("attempt", "attempt_input", "data", "data_shard", "etc", "image_venv", "root"):
        assert got[name] == "EROFS", (name, got[name])
    assert got["uid"] != 0 and got["cap_eff"] == "0000000000000000"
    assert got["no_new_privs"] == "1"
    # And on the host: the inputs are as they were, the output is there.
    assert (attempt / "input.txt").read_text() == "frozen"
    assert (data / "shard.bin").read_bytes() == b"\0" * 16
    assert not (attempt / "x").exists() and not (data / "x").exists()
    assert (out / "x").read_text() == "x"


HOG = ("import pathlib, sys\npathlib.Path(sys.argv[1], 'started').touch()\n"
       "hog = [bytearray(50 * 2**20) for _ in range(60)]\n")


def test_an_oom_kill_at_a_vetted_limit_is_the_submissions(tmp_path: Path, image: str) -> None:
    # A limit of 256m against a measured peak of 0.1 GiB (1.5 x 0.1 = 154 MiB fits): the
    # watcher in the container sees its own limit reached, so the submission is charged.
    spec, _, out, _ = _stage(tmp_path, HOG)
    run = DockerRunner(DockerSettings(image=image, memory="256m")).run(
        replace(spec, memory_peak_gb=0.1))
    assert (out / "started").exists()
    assert run.infra is None and run.info["oom_killed"] is True
    report = run.info["memory"]
    assert report["limit_reached"] is True and report["limit_bytes"] == 256 * 2**20
    assert report["oom_kills"] >= 1
    assert (run.over_limit or "").startswith("the stage outgrew its memory limit of 256m, peak ")
    got = pretrain.collect(run, out)
    assert got.status is Status.FAILED_SUBMISSION and got.reason.startswith("out of memory: ")


def test_an_oom_kill_without_a_measured_peak_is_infra(tmp_path: Path, image: str) -> None:
    spec, _, out, _ = _stage(tmp_path, HOG)
    run = DockerRunner(DockerSettings(image=image, memory="256m")).run(spec)
    assert (out / "started").exists()
    assert run.info["oom_killed"] is True and run.over_limit is None
    assert (run.infra or "").startswith("killed at its memory limit of 256m, peak ")
    assert "no measured peak" in (run.infra or "")
    assert pretrain.collect(run, out).status is Status.FAILED_INFRA


def test_a_missing_image_is_infra_with_the_fix(tmp_path: Path, docker_client: Any) -> None:
    spec, _, _, _ = _stage(tmp_path, "pass")
    run = DockerRunner(DockerSettings(image="bitlinear-harness:no-such-tag")).run(spec)
    assert not run.started
    assert "harness image build --tag bitlinear-harness:no-such-tag" in (run.error or "")


def test_a_broken_image_is_refused_before_the_stage_starts(tmp_path: Path,
                                                           docker_client: Any) -> None:
    # The bare Debian base: python3, and nothing the task needs.
    base = os.environ.get("HARNESS_BASE_IMAGE", "harness-base:bookworm")
    spec, _, out, _ = _stage(tmp_path, "import pathlib, sys; pathlib.Path(sys.argv[1], 'ran')"
                                       ".touch()")
    run = DockerRunner(DockerSettings(image=base)).run(spec)
    assert not run.started and not (out / "ran").exists()
    assert f"the image {base!r}" in (run.error or "")
    assert "lacks what the task needs: harness, torch, numpy" in (run.error or "")
    assert pretrain.collect(run, out).status is Status.FAILED_INFRA


def test_docker_kill_from_outside_is_infra(tmp_path: Path, settings: DockerSettings,
                                           docker_client: Any) -> None:
    code = ("import pathlib, sys, time\npathlib.Path(sys.argv[1], 'started').touch()\n"
            "time.sleep(120)\n")
    spec, _, out, _ = _stage(tmp_path, code)
    result: dict[str, StageRun] = {}
    thread = threading.Thread(target=lambda: result.update(run=DockerRunner(settings).run(spec)))
    thread.start()
    _wait_for(lambda: (out / "started").exists())
    _docker_kill(_wait_for(lambda: _running(docker_client, f"{LABEL}.job={spec.job_name}")))
    thread.join(timeout=60)
    run = result["run"]
    assert run.returncode == 137 and not run.timed_out and not run.cancelled
    assert run.infra == "container killed from outside the harness (SIGKILL, exit code 137)"
    assert run.wall_s < 60
    assert pretrain.collect(run, out).status is Status.FAILED_INFRA
    # cleanup removed the container
    assert not docker_client.containers.list(all=True, filters={
        "label": f"{LABEL}.job={spec.job_name}"})


# --- whole attempts -------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_attempt_in_docker_equals_local(tmp_path: Path, task: TaskSpec,
                                              settings: DockerSettings, data_root: Path,
                                              docker_client: Any) -> None:
    prepared = prepare(REPO / "baselines" / "binary_sign", task)
    scale = task.scale("smoke")
    t0 = time.monotonic()
    local, _ = run_submission(prepared, task, scale, runs_dir=tmp_path / "local runs",
                              data=data_root, runner=LocalRunner())
    t1 = time.monotonic()
    boxed, paths = run_submission(prepared, task, scale, runs_dir=tmp_path / "docker runs",
                                  data=data_root, runner=DockerRunner(settings))
    t2 = time.monotonic()
    print(f"smoke attempt: local {t1 - t0:.1f}s, docker {t2 - t1:.1f}s")
    assert local.status == "succeeded", local.reason
    assert boxed.status == "succeeded", (boxed.reason, boxed.stages)
    assert boxed.runner == "docker"
    assert set(boxed.metrics) == set(local.metrics)
    # Same seed, same CPU torch, one thread per process: the container trains the same model.
    assert boxed.metrics["val_loss"] == pytest.approx(local.metrics["val_loss"], abs=1e-4)
    for name, value in local.metrics.items():
        assert boxed.metrics[name] == pytest.approx(value, rel=1e-3), name
    # The image is recorded per attempt, by digest.
    image_id = docker_client.images.get(settings.image).id
    for stage in ("pretrain", "lm-eval"):
        info = boxed.stages[stage].runner
        assert info["image_id"] == image_id and info["image"] == settings.image
        assert info["exit_code"] == 0 and info["user"] != "0:0"
    recorded = json.loads(paths.record_path.read_text())
    assert recorded["stages"]["pretrain"]["runner"]["image_id"] == image_id


@pytest.mark.slow
def test_killing_a_sessions_container_refunds_the_test(tmp_path: Path,
                                                       settings: DockerSettings,
                                                       data_root: Path,
                                                       docker_client: Any) -> None:
    label = f"{LABEL}.stage=pretrain"

    def kill_when_training() -> None:
        name = _wait_for(lambda: _running(docker_client, label), timeout=300)
        info = docker_client.containers.get(name).labels
        stdout = Path(info[f"{LABEL}.attempt_dir"]) / "pretrain" / "stdout.log"
        _wait_for(lambda: stdout.exists() and "TRAIN_METRICS" in stdout.read_text(), 300)
        _docker_kill(name)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    with Session.create(agent="docker-ci", home=tmp_path / "home", data_dir=data_root,
                        runner=DockerRunner(settings), preflight=False) as session:
        killer.start()
        report = session.run_test()
        killer.join(timeout=10)
        assert (report.status, report.charged, report.refunded) == ("failed_infra", True, True)
        assert session.ledger.used(session.id) == 0  # the budget is as it was
        assert session.status_data()["remaining"] == session.row.budget
        (row,) = session.ledger.attempts(session.id)
        assert "killed from outside the harness" in (row.reason or "")
        result = json.loads((Path(row.attempt_dir or "") / "result.json").read_text())
        assert result["status"] == "failed_infra"
        assert result["stages"]["pretrain"]["runner"]["image_id"].startswith("sha256:")


# --- the pre-flight runs in the container (issue 19) ----------------------------------------

# Module-level code of a submission: it runs when the pre-flight's worker imports the spliced
# file. The static policy refuses all of this; run_preflight itself does not re-check it, so
# this is what the code would see if it had slipped past the policy.
PREFLIGHT_PROBE = """
import json as _j, os as _o, socket as _s
_r = {{"hostname": _s.gethostname(), "dockerenv": _o.path.exists("/.dockerenv"),
       "cwd": _o.getcwd(), "pid1": open("/proc/1/cmdline").read().split(chr(0))[0]}}
for _name, _addr in (("host_listener", ("127.0.0.1", {port})), ("internet", ("1.1.1.1", 443))):
    try:
        _s.create_connection(_addr, timeout=3).close()
        _r[_name] = "connected"
    except OSError as _e:
        _r[_name] = type(_e).__name__
try:
    _r["host_file"] = open({secret!r}).read()
except OSError as _e:
    _r["host_file"] = type(_e).__name__
try:
    open({beside!r}, "w").write("escaped")
    _r["write_outside"] = "ok"
except OSError as _e:
    _r["write_outside"] = type(_e).__name__
open(_o.path.join(_o.getcwd(), "probe.json"), "w").write(_j.dumps(_r))
"""


def _baseline_region(task: TaskSpec) -> str:
    from harness.submission import load_submission

    return load_submission(REPO / "baselines" / "binary_sign", task).regions["bitlinear"]


@pytest.mark.slow
def test_the_preflight_worker_runs_in_the_container(tmp_path: Path, task: TaskSpec,
                                                   settings: DockerSettings) -> None:
    """A baseline's whole pre-flight (worker and 2-process torchrun) passes as one stage of
    the docker runner; the report names the container it ran in."""
    from harness.checks.preflight import run_preflight
    from harness.regions import splice

    spliced = splice(task.template_text(), {"bitlinear": _baseline_region(task)})
    report = run_preflight(task, spliced, runner=DockerRunner(settings),
                           work_dir=tmp_path / "preflight work")
    assert report.ok, report.render()
    assert report.runner["name"] == "docker" and report.runner["container_id"]
    assert report.runner["image_id"].startswith("sha256:")
    ddp = report.get("ddp")
    assert ddp is not None and ddp.details["world_size"] == 2


def test_module_level_code_in_the_preflight_cannot_reach_the_host(
        tmp_path: Path, task: TaskSpec, settings: DockerSettings) -> None:
    import socket

    from harness.checks.preflight import run_preflight
    from harness.regions import splice

    secret = tmp_path / "host-only.txt"
    secret.write_text("a host secret")
    beside = tmp_path / "escaped.txt"
    accepted: list[object] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    done = threading.Event()
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    probe = PREFLIGHT_PROBE.format(port=server.getsockname()[1], secret=str(secret),
                                   beside=str(beside))
    spliced = splice(task.template_text(), {"bitlinear": _baseline_region(task) + probe})
    work = tmp_path / "pf"
    try:
        report = run_preflight(task, spliced, runner=DockerRunner(settings), work_dir=work,
                               checks=("interface",))
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()
    assert report.ok, report.render()
    got = json.loads((work / "probe.json").read_text())
    assert got["hostname"] == "harness" and got["dockerenv"] is True, got  # in the container
    assert got["pid1"].endswith("docker-init"), got
    assert got["cwd"] == str(work.resolve())
    assert got["host_listener"] == "ConnectionRefusedError"  # its own loopback, not ours
    assert got["internet"] == "OSError", got  # ENETUNREACH: no network at all
    assert got["host_file"] == "FileNotFoundError"  # only the work folder is mounted
    assert got["write_outside"] in ("OSError", "PermissionError", "FileNotFoundError"), got
    assert not beside.exists() and accepted == []


@pytest.mark.slow
def test_a_killed_harness_leaves_its_container_to_recover_which_removes_it(
        tmp_path: Path, image: str, docker_client: Any, data_root: Path) -> None:
    from harness.ledger import Ledger

    home = tmp_path / "home"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harness", *args, "--home", str(home)],
                              capture_output=True, text=True, cwd=REPO, timeout=600)

    sid = cli("session", "start", "--agent", "docker-ci", "--no-preflight").stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "session", "test", sid,
                             "--runner", "docker", "--image", image, "--home", str(home),
                             "--data-dir", str(data_root)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def attempt_id() -> str | None:
        with Ledger(home, create=False) as ledger:
            rows = ledger.attempts(sid)
        return rows[0].id if rows else None

    try:
        aid = _wait_for(attempt_id, timeout=120)
        name = _wait_for(lambda: next((str(c.name) for c in docker_client.containers.list(
            filters={"name": f"harness-{aid}-", "status": "running"})), None), timeout=300)
        proc.kill()  # SIGKILL: the harness cannot stop or remove its container
        proc.wait(30)
        assert docker_client.containers.get(name).status == "running"
    finally:
        proc.kill()
    got = cli("recover")
    assert got.returncode == 0, got.stdout + got.stderr
    assert f"stopped container {name}" in got.stdout, got.stdout
    assert not docker_client.containers.list(all=True, filters={"name": name})
    with Ledger(home, create=False) as ledger:
        (row,) = ledger.attempts(sid)
        assert (row.status, row.refunded or not row.charged) == ("failed_infra", True)
