"""Adversarial submissions against the real docker sandbox (pytest -m docker; issue #24).

Each region of tests/docker/sandbox_attacks.py is spliced WITHOUT the static checks (as if a
static escape had been found) and run as a real smoke attempt through `run_submission` and the
`DockerRunner`. Every attack must be denied (the errno the sandbox answered, and the rule that
gives it: a read-only mount, no network, not mounted, no capabilities, seccomp) or detected
(the harness's rule that caught it), and the attempt's record must say so. Besides what the
region reports from inside, every test checks on the host what no attack may achieve: a
connection to the host's listeners, a changed file outside the attempt's output folder, a file
left in the host's /tmp, a process or container outliving the attempt, a ranked row.

An attempt that tries many things records each outcome in `sandbox_report.json` in its own
output folder (read by the test after the run), so that one docker attempt (tens of seconds
on two cores) covers a whole family of attacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.attempt import Prepared, run_submission
from harness.leaderboard import build_board
from harness.ledger import LEDGER_FILE, Ledger
from harness.record import Attempt, AttemptRecord, Status
from harness.runners.config import DockerSettings
from harness.runners.docker import LABEL, DockerRunner
from harness.runtime.fileio import sha256_file
from harness.task import ScaleSpec, TaskSpec
from tests.docker import sandbox_attacks as sa
from tests.security.attacks import pretrain_only, unchecked

pytestmark = pytest.mark.docker

HARNESS_FILES = {"result.json", "custom_pretrain.py", "submission.diff", "submission.json",
                 "checks.json", "model.py", "eval_lm.py"}
STAGE_DIRS = {"pretrain", "lm-eval"}


# --- the host side: listeners, secrets, the files no attack may change ------------------------

class Listeners:
    """TCP and UDP on one port of every host address, and an abstract unix socket; each counts
    what reaches it."""

    def __init__(self) -> None:
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", self.port))
        self.abstract = f"harness-attack-{secrets.token_hex(6)}"
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind("\0" + self.abstract)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._threads = []
        for sock in (self.tcp, self.unix):
            sock.listen(8)
        for sock in (self.tcp, self.udp, self.unix):
            sock.settimeout(0.2)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                if sock.type == socket.SOCK_DGRAM:
                    _, peer = sock.recvfrom(4096)
                    self.seen.append(f"udp from {peer}")
                else:
                    conn, peer = sock.accept()
                    self.seen.append(f"{sock.family.name} from {peer!r}")
                    conn.close()
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in (self.tcp, self.udp, self.unix):
            sock.close()


def primary_ip() -> str:
    """The host's address on its default route (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.123", 9))
        return str(s.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())
    finally:
        s.close()


def bridge_ip(client: Any) -> str:
    """The host's address on docker's default bridge: its gateway, else the address of its
    interface (dockerd 20.10 leaves the gateway out of the network's IPAM config)."""
    import fcntl
    import struct

    attrs = client.networks.get("bridge").attrs
    for config in attrs["IPAM"]["Config"] or []:
        if config.get("Gateway"):
            return str(config["Gateway"])
    name = attrs["Options"].get("com.docker.network.bridge.name", "docker0")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                             struct.pack("256s", name[:15].encode()))
    finally:
        s.close()
    return socket.inet_ntoa(packed[20:24])


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def processes_with(marker: str) -> list[str]:
    """The host's processes whose command line holds `marker` (this host's /proc sees every
    container's processes), other than this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def size_bytes(text: str) -> int:
    """A docker size ("8g", "7372m", "512k", "1024") in bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmg]?)", text.strip().lower())
    assert found, f"not a docker size: {text!r}"
    return int(float(found[1]) * units[found[2]])


def host_cgroup_memory_limit(container_id: str) -> str | None:
    """The container's memory limit as the host's kernel holds it (cgroup v1 or v2)."""
    for path in (f"/sys/fs/cgroup/memory/docker/{container_id}/memory.limit_in_bytes",
                 f"/sys/fs/cgroup/memory/system.slice/docker-{container_id}.scope/"
                 "memory.limit_in_bytes",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.max",
                 f"/sys/fs/cgroup/docker/{container_id}/memory.max"):
        try:
            return Path(path).read_text().strip()
        except OSError:
            continue
    return None


@dataclasses.dataclass
class Arena:
    """Everything an attempt is let loose on, and the host-side checks after it."""

    task: TaskSpec
    tmp: Path
    data: Path  # the data root
    home: Path  # the harness home: ledger.sqlite3, runs/
    runs: Path
    sibling: Path  # another attempt's folder, with secrets
    user_home: Path  # $HOME of the harness, with fake credentials
    listeners: Listeners
    secrets: dict[str, str]
    marker: str
    bridge_ip: str
    primary_ip: str
    client: Any
    watched: dict[str, Path] = dataclasses.field(default_factory=dict)
    before: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def snapshot(self) -> dict[str, dict[str, str]]:
        """The watched folders' files and their sha256; the harness home's outside runs/ (the
        attempt is created there)."""
        got = {k: digests(v) for k, v in self.watched.items()}
        got["harness_home"] = {k: v for k, v in got["harness_home"].items()
                               if not k.startswith("runs/")}
        return got

    def targets(self, data_dir: Path) -> sa.Targets:
        task_dir = self.task.root
        at = "@attempt"
        return sa.Targets(
            port=self.listeners.port, abstract=self.listeners.abstract, bridge_ip=self.bridge_ip,
            primary_ip=self.primary_ip, marker=self.marker, data_dir=str(data_dir),
            writes={"attempt_script": f"{at}/custom_pretrain.py",
                    "attempt_model": f"{at}/model.py",
                    "attempt_record": f"{at}/result.json",
                    "attempt_new": f"{at}/escaped.txt",
                    "task_template": str(task_dir / "custom_pretrain.py"),
                    "data_manifest": str(data_dir / "manifest.json"),
                    "data_new": str(data_dir / "escaped.txt"),
                    "ledger": str(self.home / LEDGER_FILE),
                    "harness_home_new": str(self.home / "escaped.txt"),
                    "runs_new": str(self.runs / "escaped.txt"),
                    "sibling_new": str(self.sibling / "escaped.txt"),
                    "user_home_new": str(self.user_home / "escaped.txt"),
                    "etc": "/etc/escaped.txt",
                    "root": "/escaped.txt",
                    "image_venv": "/opt/harness/escaped.txt"},
            reads={"ledger": str(self.home / LEDGER_FILE),
                   "sibling_secret": str(self.sibling / "secret.txt"),
                   "sibling_submission": str(self.sibling / "submission.json"),
                   "user_aws": str(self.user_home / ".aws" / "credentials"),
                   "user_netrc": str(self.user_home / ".netrc"),
                   "user_ssh": str(self.user_home / ".ssh" / "id_rsa"),
                   "root_ssh": "/root/.ssh/id_rsa"},
            listdirs={"runs": str(self.runs), "harness_home": str(self.home),
                      "data_root": str(self.data)},
            link_source=f"{at}/custom_pretrain.py")

    def run(self, prepared: Prepared, scale: ScaleSpec, settings: DockerSettings
            ) -> tuple[AttemptRecord, Attempt]:
        t0 = time.monotonic()
        result, attempt = run_submission(prepared, self.task, scale, runs_dir=self.runs,
                                         data=self.data, runner=DockerRunner(settings))
        print(f"{prepared.submission.name}: {result.status.value} in "
              f"{time.monotonic() - t0:.1f}s: {result.reason}")
        return result, attempt

    def check_host(self, attempt: Attempt) -> None:
        """What no attack may achieve, seen on the host after the attempt."""
        root = attempt.root
        # no ranked row
        board = build_board([self.runs])
        assert not [r for t in board.tables for r in t.rows if r.ranked]
        # nothing changed outside the attempt, nor its frozen copies
        assert self.snapshot() == self.before
        for name in self.task.frozen_files:
            if name != self.task.template:
                assert (root / name).read_bytes() == (self.task.root / name).read_bytes()
        # nothing written in the attempt folder beside the output folders
        top = {p.name for p in root.iterdir()}
        assert top - STAGE_DIRS <= HARNESS_FILES, top
        assert {p.name for p in self.runs.iterdir()} == {root.name, self.sibling.name}
        # nothing reached the host's listeners
        assert self.listeners.seen == []
        # nothing of the attempt runs on: no process, no container
        assert processes_with(self.marker) == []
        assert self.client.containers.list(
            all=True, filters={"label": f"{LABEL}.attempt_dir={root}"}) == []
        # nothing of the container's /tmp or /dev/shm on the host
        for where in {Path("/tmp"), Path("/dev/shm"), Path(tempfile.gettempdir())}:
            assert not list(where.glob(f"{self.marker}*")), where


@pytest.fixture()
def arena(task: TaskSpec, data_root: Path, tmp_path: Path, docker_client: Any,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Arena]:
    from harness.attempt import dataset_dir
    from harness.stages import lmeval

    smoke = task.scale("smoke")
    dataset_dir(smoke, data_root)
    lmeval.evals_dir(smoke, data_root)
    home = tmp_path / "harness home"
    Ledger(home).conn.close()  # a real ledger file to aim at
    runs = home / "runs"
    sibling = runs / "20260101-000000-sibling-0000000000-0000"
    (sibling / "pretrain").mkdir(parents=True)
    token = secrets.token_hex(8)
    found = {"sibling": f"sibling-secret-{token}", "submission": f"stolen-region-{token}",
             "aws": f"aws-file-secret-{token}", "netrc": f"netrc-password-{token}",
             "ssh": f"ssh-private-key-{token}", "env_aws": f"env-aws-{token}",
             "env_hf": f"hf_env_{token}", "env_gh": f"ghp_env_{token}",
             "env_own": f"harness-env-{token}"}
    (sibling / "secret.txt").write_text(found["sibling"])
    (sibling / "submission.json").write_text(json.dumps(
        {"kind": "file", "regions": {"bitlinear": found["submission"]}}))
    user_home = tmp_path / "user home"
    (user_home / ".aws").mkdir(parents=True)
    (user_home / ".ssh").mkdir()
    (user_home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = AKIA{token}\naws_secret_access_key = {found['aws']}\n")
    (user_home / ".netrc").write_text(f"machine api.example.com login me password "
                                      f"{found['netrc']}\n")
    (user_home / ".ssh" / "id_rsa").write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n"
                                               f"{found['ssh']}\n")
    for p in ((user_home / ".aws" / "credentials"), user_home / ".netrc",
              user_home / ".ssh" / "id_rsa"):
        p.chmod(0o600)
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", found["env_aws"])
    monkeypatch.setenv("HF_TOKEN", found["env_hf"])
    monkeypatch.setenv("GITHUB_TOKEN", found["env_gh"])
    monkeypatch.setenv("HARNESS_TEST_SECRET", found["env_own"])
    listeners = Listeners()
    a = Arena(task=task, tmp=tmp_path, data=data_root, home=home, runs=runs, sibling=sibling,
              user_home=user_home, listeners=listeners, secrets=found,
              marker=f"harness-orphan-{token}", bridge_ip=bridge_ip(docker_client),
              primary_ip=primary_ip(), client=docker_client)
    a.watched = {"task": task.root, "data": data_root, "sibling": sibling,
                 "user_home": user_home, "harness_home": home}
    a.before = a.snapshot()
    try:
        yield a
    finally:
        listeners.close()


# --- 1. escape: network, files, secrets, processes, privileges, memory -----------------------

# What the sandbox must answer to each attack of the escape region, and the rule behind it.
NO_NETWORK = "network_mode none: no interface but the container's own loopback"
OWN_LOOPBACK = "its own network namespace: nothing listens on its loopback"
READ_ONLY = "read-only mount (attempt, data) or read-only root filesystem"
NOT_MOUNTED = "not mounted: the path does not exist in the container"
NO_CAPS = "cap_drop ALL, no-new-privileges, seccomp"
CGROUP_RO = "the cgroup filesystem is mounted read-only"
PRIVATE_HOME = "HOME is the container's private /tmp"
# The errno Python raises with, and its text, for the errnos a denied write can get.
RAISED = {"EACCES": ("PermissionError", "[Errno 13] Permission denied"),
          "EROFS": ("OSError", "[Errno 30] Read-only file system")}


def expected_denials(arena: Arena) -> dict[str, tuple[str, str]]:
    """attack -> (the errno it must get, the rule that gives it)."""
    # An existing file of a read-only mount: as root the harness runs the stage as nobody,
    # and the file mode refuses first (the harness's files are not writable by others);
    # as any other user the stage runs as that user, the file's owner: the mount refuses.
    owned = ("EACCES", "the file's mode (stage user nobody), and a read-only mount") \
        if os.getuid() == 0 else ("EROFS", READ_ONLY)
    # The harness home and runs/ exist inside only as the folders docker made above the
    # mounted attempt: on the private /tmp tmpfs (root's, 0755) when they lie under /tmp,
    # else on the read-only root. The ledger and the sibling do not exist inside at all.
    above = ("EACCES", "a folder docker made (root's) on the private /tmp") \
        if arena.home.is_relative_to("/tmp") else ("EROFS", READ_ONLY)
    return {
        "tcp_loopback": ("ECONNREFUSED", OWN_LOOPBACK),
        "tcp_bridge": ("ENETUNREACH", NO_NETWORK),
        "tcp_primary": ("ENETUNREACH", NO_NETWORK),
        "tcp_internet": ("ENETUNREACH", NO_NETWORK),
        "udp_bridge": ("ENETUNREACH", NO_NETWORK),
        "udp_primary": ("ENETUNREACH", NO_NETWORK),
        "docker_socket": ("ENOENT", NOT_MOUNTED),
        "abstract_socket": ("ECONNREFUSED", "abstract unix sockets are per network namespace"),
        "write_attempt_script": owned,
        "write_attempt_model": owned,
        "write_attempt_record": owned,
        "write_attempt_new": ("EROFS", READ_ONLY),
        "write_task_template": ("ENOENT", NOT_MOUNTED),
        "write_data_manifest": owned,
        "write_data_new": ("EROFS", READ_ONLY),
        "write_ledger": above,
        "write_harness_home_new": above,
        "write_runs_new": above,
        "write_sibling_new": ("ENOENT", NOT_MOUNTED),
        "write_user_home_new": ("ENOENT", NOT_MOUNTED),
        "write_etc": ("EROFS", READ_ONLY),
        "write_root": ("EROFS", READ_ONLY),
        "write_image_venv": ("EROFS", READ_ONLY),
        "read_ledger": ("ENOENT", NOT_MOUNTED),
        "read_sibling_secret": ("ENOENT", NOT_MOUNTED),
        "read_sibling_submission": ("ENOENT", NOT_MOUNTED),
        "read_user_aws": ("ENOENT", NOT_MOUNTED),
        "read_user_netrc": ("ENOENT", NOT_MOUNTED),
        "read_user_ssh": ("ENOENT", NOT_MOUNTED),
        "read_root_ssh": ("EACCES", "the image's /root is root's; the stage is not root"),
        "read_home_.aws/credentials": ("ENOENT", PRIVATE_HOME),
        "read_home_.netrc": ("ENOENT", PRIVATE_HOME),
        "read_home_.ssh/id_rsa": ("ENOENT", PRIVATE_HOME),
        "read_etc_shadow": ("EACCES", "the image's /etc/shadow is root's; the stage is not root"),
        "hardlink_input": ("EXDEV", "no link across mounts, read-only input to the output"),
        "chmod_input": ("EROFS", READ_ONLY),
        "unlink_input": ("EROFS", READ_ONLY),
        "mkdir_root": ("EROFS", READ_ONLY),
        "write_cgroup1_memory_limit": ("EROFS", CGROUP_RO),
        "write_cgroup1_memsw_limit": ("EROFS", CGROUP_RO),
        "write_cgroup1_pids_max": ("EROFS", CGROUP_RO),
        "write_cgroup2_memory_max": ("EACCES", "cgroup v1: not a file, on a read-only tmpfs"),
        "write_cgroup2_pids_max": ("EACCES", "cgroup v1: not a file, on a read-only tmpfs"),
        "remount_root_rw": ("EPERM", NO_CAPS),
        "remount_data_rw": ("EPERM", NO_CAPS),
        "mount_cgroup": ("EPERM", NO_CAPS),
        "unshare_user_ns": ("EPERM", NO_CAPS),
        "unshare_mount_ns": ("EPERM", NO_CAPS),
        "setuid_root": ("EPERM", NO_CAPS),
        "tcp_loopback_in_forward": ("ECONNREFUSED", OWN_LOOPBACK),
        "tcp_bridge_in_forward": ("ENETUNREACH", NO_NETWORK),
        "tcp_primary_in_forward": ("ENETUNREACH", NO_NETWORK),
        "read_sibling_in_forward": ("ENOENT", NOT_MOUNTED),
        "write_attempt_script_in_forward": owned,
    }


# Denied without an errno: Python's own refusal of the kernel's EPERM (no CAP_SYS_RESOURCE).
RAISE_LIMIT = ("ValueError", "not allowed to raise maximum limit")


def _inspect_while_it_runs(arena: Arena, facts: dict[str, Any]) -> None:
    """While the escape waits: the container's limits from docker inspect and from the host's
    cgroup, and the orphan in the host's process table; then let it go on."""
    try:
        deadline = time.monotonic() + 300
        container = None
        while container is None and time.monotonic() < deadline:
            for c in arena.client.containers.list(
                    filters={"label": f"{LABEL}.stage=pretrain", "status": "running"}):
                if c.labels.get(f"{LABEL}.attempt_dir", "").startswith(str(arena.runs) + "/"):
                    container = c
            time.sleep(0.2)
        assert container is not None, "no pretrain container of this test ran"
        out = Path(container.labels[f"{LABEL}.attempt_dir"]) / "pretrain"
        while not (out / sa.ATTACKED).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        facts["attacked"] = (out / sa.ATTACKED).exists()
        container.reload()
        host = container.attrs["HostConfig"]
        facts["host_config"] = {k: host.get(k) for k in (
            "Memory", "MemorySwap", "PidsLimit", "NanoCpus", "ReadonlyRootfs", "CapDrop",
            "SecurityOpt", "NetworkMode", "Privileged")}
        facts["cgroup_memory_limit"] = host_cgroup_memory_limit(container.id)
        facts["orphans_running"] = processes_with(arena.marker)
        facts["attempt_dir"] = str(out.parent)
        (out / sa.INSPECTED).touch()
    except BaseException as e:  # reported by the test, not lost in the thread
        facts["error"] = repr(e)


def _denied(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: got for phase in ("import", "forward") for name, got in report[phase].items()
            if got.get("outcome") == "denied"}


def _outcome(report: dict[str, Any], name: str) -> dict[str, Any]:
    for phase in ("import", "forward"):
        if name in report[phase]:
            return dict(report[phase][name])
    raise AssertionError(f"the escape did not try {name}: {sorted(report['import'])}")


@pytest.mark.slow
def test_an_escaped_submission_is_denied_everything_the_sandbox_shuts(
        arena: Arena, task: TaskSpec, settings: DockerSettings) -> None:
    from harness.attempt import dataset_dir

    data_dir = dataset_dir(task.scale("smoke"), arena.data)
    region = sa.escape(task, arena.targets(data_dir))
    facts: dict[str, Any] = {}
    inspector = threading.Thread(target=_inspect_while_it_runs, args=(arena, facts),
                                 daemon=True)
    inspector.start()
    result, attempt = arena.run(unchecked(task, region, "escape"), pretrain_only(task),
                                settings)
    inspector.join(timeout=30)
    out = attempt.stage_dir("pretrain")
    report = json.loads((out / sa.REPORT).read_text())
    report_text = (out / sa.REPORT).read_text()

    # The record: the submission's failure, charged, with the real errno text of the denial
    # it raised in forward (the write to its spliced script). Every earlier denial is chained
    # to it as its cause: the record's traceback keeps only its last 4000 characters (the
    # raised one's own frames fill them), the stage's stderr.log, written by the runner from
    # the container's log, has the whole chain.
    expected = expected_denials(arena)
    assert result.status is Status.FAILED_SUBMISSION, result.reason
    script = attempt.root / "custom_pretrain.py"
    kind, text = RAISED[expected["write_attempt_script_in_forward"][0]]
    assert result.reason == f"training raised: {kind}: {text}: '{script}'"
    recorded = json.loads(attempt.record_path.read_text())
    assert recorded["status"] == Status.FAILED_SUBMISSION.value
    assert recorded["reason"] == result.reason
    traceback = str(result.stages["pretrain"].details.get("traceback", ""))
    assert traceback.endswith(f"{kind}: {text}: '{script}'"), traceback[-300:]
    stderr = (out / "stderr.log").read_text()
    unlogged = [name for name, got in _denied(report).items()
                if f"{got['type']}: {got['message']}" not in stderr]
    assert unlogged == [], unlogged

    # Every attack: denied, with the errno the rule gives.
    wrong = {}
    for name, (errno_name, _rule) in expected.items():
        got = _outcome(report, name)
        if got["outcome"] != "denied" or got["errno"] != errno_name:
            wrong[name] = got
    assert wrong == {}, json.dumps(wrong, indent=1)
    unexpected = set(_denied(report)) - set(expected) - {
        "dns", "setrlimit_nofile_above_hard", "setrlimit_nproc_above_hard"}
    assert unexpected == set(), {n: _denied(report)[n] for n in unexpected}
    assert _outcome(report, "dns")["type"] == "gaierror"  # no resolver reachable
    for name in ("setrlimit_nofile_above_hard", "setrlimit_nproc_above_hard"):
        got = _outcome(report, name)
        assert (got["outcome"], got["type"], got["message"]) == ("denied", *RAISE_LIMIT), got

    # What it could do stays in the container: its private /tmp and /dev/shm (checked absent
    # on the host below), and listing the folders that hold its mounts shows only those.
    assert _outcome(report, "write_tmp")["outcome"] == "done"
    assert _outcome(report, "write_dev_shm")["outcome"] == "done"
    assert _outcome(report, "home")["value"] == "/tmp"
    assert _outcome(report, "list_runs")["value"] == [attempt.root.name]
    assert _outcome(report, "list_harness_home")["value"] == ["runs"]
    assert _outcome(report, "list_data_root")["value"] == [data_dir.name]
    # mountinfo writes a space (and other odd bytes) as an octal escape
    points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), p)
              for p in _outcome(report, "mountinfo")["value"]]
    mounts = {m for m in points if m.startswith((str(arena.tmp), str(arena.data)))}
    assert mounts == {str(attempt.root), str(out), str(data_dir)}, mounts
    status = _outcome(report, "status")["value"]
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status, status
    assert "Seccomp:\t2" in status, status  # docker's default seccomp profile, filtering

    # No secret of the host in anything it read: its environment, every /proc/*/environ it
    # could see (its own processes only: the pid namespace), the files it tried.
    assert _outcome(report, "environ")["outcome"] == "done"
    assert "HOME" in _outcome(report, "environ")["value"]  # the dump worked
    leaked = [k for k, v in arena.secrets.items() if v in report_text]
    assert leaked == [], leaked
    assert "SQLite format 3" not in report_text  # the ledger's header
    procs = _outcome(report, "proc")["value"]
    assert procs["1"]["cmdline"].startswith("/sbin/docker-init"), procs["1"]
    # The pid namespace: only the stage's own processes (init, the memory watcher, torchrun,
    # its ranks, the orphan), none of the host's, this test's process included.
    ours = Path("/proc/self/cmdline").read_bytes().decode(errors="replace")
    argv0 = {p["cmdline"].split("\0")[0] for p in procs.values()}
    assert ours not in [p["cmdline"] for p in procs.values()]
    assert len(procs) <= 10 and all(a == "/sbin/docker-init" or "python" in a for a in argv0), \
        {pid: p["cmdline"][:120] for pid, p in procs.items()}

    # Memory: the limit is unchanged, inside, in docker inspect and in the host's cgroup.
    assert "error" not in facts, facts.get("error")
    assert facts["attacked"] and _outcome(report, "host_inspected")["value"] is True
    # The limit the runner set (and recorded): the configured one, or the host's cap of it.
    limit = size_bytes(str(result.stages["pretrain"].runner["limits"]["memory"]))
    assert facts["host_config"]["Memory"] == limit
    assert facts["host_config"]["MemorySwap"] == limit
    assert facts["host_config"]["PidsLimit"] == settings.pids
    assert facts["host_config"]["ReadonlyRootfs"] is True
    assert facts["host_config"]["NetworkMode"] == "none"
    assert facts["host_config"]["CapDrop"] == ["ALL"]
    assert facts["host_config"]["Privileged"] is False
    assert facts["cgroup_memory_limit"] == str(limit)
    assert _outcome(report, "memory_limit_seen")["value"] == str(limit)

    # The orphan: it ran (the host saw it while the stage ran) and did not outlive it.
    assert _outcome(report, "orphan")["value"] is True
    assert facts["orphans_running"], "the orphan never showed in the host's process table"
    beat = out / sa.HEARTBEAT
    size = beat.stat().st_size
    time.sleep(1.5)  # it wrote every 0.25 s while alive
    assert beat.stat().st_size == size
    arena.check_host(attempt)


# --- 2. forging what the harness reads back ----------------------------------------------------

@pytest.mark.slow
def test_forged_training_scores_fail_the_cross_check(arena: Arena, task: TaskSpec,
                                                     settings: DockerSettings) -> None:
    result, attempt = arena.run(unchecked(task, sa.forge_training(task), "forge-training"),
                                task.scale("smoke"), settings)
    # The forgery landed (the output folder is the submission's to write) ...
    final = json.loads((attempt.stage_dir("pretrain") / "final.json").read_text())
    assert final["val_loss"] == 0.5
    curve = result.stages["pretrain"].details["curve"]
    assert curve and all(row["val_loss"] == 0.5 for row in curve if "val_loss" in row)
    # ... and is caught: the eval stage recomputes val_loss from the checkpoint.
    assert result.status is Status.RULE_VIOLATION, result.reason
    assert re.match(r"rule violation \(cross-check\): val_loss from pretrain \(0\.5\) disagrees "
                    r"with lm-eval's recomputation from the checkpoint \(\d", result.reason), \
        result.reason
    assert result.metrics == {}
    arena.check_host(attempt)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known hole, docs/security.md 'Known limits': code that "
                   "escaped the static policy runs in the eval stage's own process and can "
                   "rewrite eval.json at exit; only the static policy and the integrity guard "
                   "stand in its way")
def test_forging_both_stages_scores_is_detected(arena: Arena, task: TaskSpec,
                                                settings: DockerSettings) -> None:
    """The eval stage imports the submission to build its model, in the process that writes
    eval.json, whose output folder is writable: the region rewrites the recomputed val_loss
    at exit, so that both stages agree on the forged number."""
    result, attempt = arena.run(unchecked(task, sa.forge_both_stages(task), "forge-both"),
                                task.scale("smoke"), settings)
    eval_json = json.loads((attempt.stage_dir("lm-eval") / "eval.json").read_text())
    forged = eval_json["metrics"].get("val_loss") == 0.5
    ranked = [r.key for t in build_board([arena.runs]).tables for r in t.rows if r.ranked]
    assert result.status is not Status.SUCCEEDED and result.metrics.get("val_loss") != 0.5, (
        f"HOLE: a forged val_loss (0.5, in final.json and in eval.json) was accepted: status "
        f"{result.status.value}, metrics {result.metrics}; eval.json forged: {forged}; "
        f"ranked on the leaderboard: {ranked}")
    assert result.status is Status.RULE_VIOLATION, result.reason
    arena.check_host(attempt)


@pytest.mark.slow
def test_a_link_to_another_attempts_file_is_not_followed_by_the_host(
        arena: Arena, task: TaskSpec, settings: DockerSettings) -> None:
    """final.json and metrics.jsonl made links to the sibling attempt's submission.json: the
    container cannot open it (not mounted), the host reading the stage's files must not."""
    target = str(arena.sibling / "submission.json")
    result, attempt = arena.run(unchecked(task, sa.link_to_host_file(task, target), "link"),
                                pretrain_only(task), settings)
    out = attempt.stage_dir("pretrain")
    assert (out / "final.json").is_symlink()  # the links were planted
    record_text = attempt.record_path.read_text()
    arena.check_host(attempt)
    assert result.status is not Status.SUCCEEDED, result.reason
    assert arena.secrets["submission"] not in record_text, (
        f"HOLE: the host followed {out / 'final.json'} -> {target} and copied another "
        f"attempt's file into this attempt's result.json (status {result.status.value}: "
        f"{result.reason})")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known hole, docs/security.md 'Known limits': code that "
                   "escaped the static policy can write the template's own 'data' error record "
                   "(or SIGKILL its own rank) and be refunded")
def test_a_forged_infra_verdict_is_still_charged(arena: Arena, task: TaskSpec,
                                                 settings: DockerSettings) -> None:
    """Every rank writes the template's own "data" error record (ours: refunded) and exits."""
    result, attempt = arena.run(unchecked(task, sa.forge_infra_verdict(task), "forge-infra"),
                                pretrain_only(task), settings)
    arena.check_host(attempt)
    assert result.status is Status.FAILED_SUBMISSION, (
        f"HOLE: a submission that wrote error_rank*.json {{'kind': 'data'}} and exited got "
        f"{result.status.value} ({result.reason}): a failure of ours, refunded, a free test")
