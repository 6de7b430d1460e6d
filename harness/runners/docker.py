"""Docker runner: one container per stage, through the Docker Engine API (`docker` package).

The container sees only what the stage needs, at the same absolute paths as on the host:
its output folder (the one writable mount), the attempt folder and its inputs (read-only).
Everything else is shut: no network (`network_mode="none"`: loopback only, enough for
torchrun's local rendezvous), a read-only root filesystem with a private tmpfs on /tmp, a
non-root user, no capabilities, no privilege escalation, and hard limits on memory (no swap),
CPUs, processes and /dev/shm.

`container_args` is a pure function from a stage to the exact keyword arguments of
`client.containers.create(...)`, so a golden file pins them (tests/golden/). `classify_exit`
is pure too: a container's State dict in, an Exit out, with the failures that are ours (an
OOM kill the stage's memory watcher does not show at its own vetted limit, a kill from outside
the harness, a container that vanished) marked `infra`, which the ledger refunds, and an OOM
kill at the stage's own limit marked `over_limit`, which is charged (harness/runners/memory.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import InfraError
from harness.runners.base import Exit, Job, Mount, RunnerError, StagedRunner, StageSpec
from harness.runners.config import DockerSettings
from harness.runners.local import container_env, scrubbed_env
from harness.runners.memory import judge_kill, parse_size, vet_limit
from harness.runtime.fileio import read_stage_json
from harness.runtime.memwatch import MEMORY_FILE
from harness.runtime.procs import outside_exit_code

NOBODY = "65534:65534"
# A limit at or above the machine's memory is capped to this share of it.
HOST_SHARE = 0.9
TMPFS = "rw,exec,nosuid,nodev,size=4g,mode=1777"  # exec: torch.compile loads .so from /tmp
# Host values that mean nothing inside the image: the image's own PATH and library path stay,
# HOME and TMPDIR point into the container's /tmp, GPUs are chosen by device request.
DROP_ENV = ("PATH", "HOME", "LD_LIBRARY_PATH", "TMPDIR", "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES")
CONTAINER_ENV = {"HOME": "/tmp", "TMPDIR": "/tmp",
                 # getpass.getuser() (torch.compile's cache dir) needs a name for a uid that
                 # has no passwd entry in the image.
                 "USER": "harness", "LOGNAME": "harness"}
LABEL = "org.bitlinear-harness"
HOSTNAME = "harness"
STOP_GRACE_S = 10
RUNNING = ("created", "running", "paused", "restarting")
MAX_POLL_ERRORS = 5
LOG_JOIN_S = 10.0
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")
# (image id, with GPUs): images whose probe passed in this process (DockerRunner.verify).
VERIFIED: set[tuple[str, bool]] = set()
PROBE_TARGET = "/tmp/harness_image_probe.py"


def _env(spec: StageSpec) -> tuple[dict[str, str], list[str]]:
    """The container's environment (scrubbed host values less DROP_ENV, the stage's own, then
    ours) and the host's visible GPU ids, if it names any."""
    visible = scrubbed_env({}).get("CUDA_VISIBLE_DEVICES", "").strip()
    env = container_env(spec.env, drop=DROP_ENV, inside=CONTAINER_ENV)
    return env, [d.strip() for d in visible.split(",") if d.strip()]


def container_name(spec: StageSpec, suffix: str) -> str:
    base = spec.job_name or f"harness-{spec.name}"
    name = _NAME_BAD.sub("_", f"{base}-{suffix}" if suffix else base)
    return name if name[0].isalnum() else f"h{name}"


def container_args(spec: StageSpec, settings: DockerSettings, *, uid_gid: str,
                   image: str | None = None, name_suffix: str = "") -> dict[str, Any]:
    """The keyword arguments of `client.containers.create(...)` for one stage.

    image: what to create from (the runner passes the image id it resolved, so the container
    runs exactly the image it recorded); default settings.image. name_suffix keeps retries
    of one job name apart. Raises RunnerError for a stage no container can run as asked.
    """
    from docker.types import DeviceRequest, Mount

    if not spec.argv:
        raise RunnerError("the stage has no command")
    if not spec.cwd.is_absolute():
        raise RunnerError(f"the stage's working directory must be absolute: {spec.cwd}")
    uid = uid_gid.split(":", 1)[0]
    if uid in ("0", "root", ""):
        raise RunnerError(f"refusing to run a stage as root in a container (user {uid_gid!r})")
    mounts = []
    for m in spec.mounts:
        if not m.source.is_absolute() or not m.target.startswith("/"):
            raise RunnerError(f"mount paths must be absolute: {m.source} -> {m.target}")
        mounts.append(Mount(target=m.target, source=str(m.source), type="bind",
                            read_only=not m.writable))
    env, visible = _env(spec)
    # A lease names the host's GPUs to give it; docker renumbers them 0.. inside.
    visible = list(spec.devices) or visible
    device_requests = []
    if spec.gpus > 0:
        if visible:
            if len(visible) < spec.gpus:
                raise RunnerError(f"the stage needs {spec.gpus} GPUs but CUDA_VISIBLE_DEVICES "
                                  f"names {len(visible)}: {','.join(visible)}")
            device_requests.append(DeviceRequest(device_ids=visible[:spec.gpus],
                                                 capabilities=[["gpu"]]))
        else:
            device_requests.append(DeviceRequest(count=spec.gpus, capabilities=[["gpu"]]))
    command = [settings.python, *spec.argv[1:]]
    writable = [m for m in spec.mounts if m.writable]
    if writable:
        # The memory watcher reads the container's cgroup once the stage has ended: whether
        # an OOM kill was the stage outgrowing its limit (runtime/memwatch.py).
        command = [settings.python, "-m", "harness.runtime.memwatch",
                   f"{writable[0].target}/{MEMORY_FILE}", "--", *command]
    return {
        "image": image or settings.image,
        "command": command,
        "name": container_name(spec, name_suffix),
        "working_dir": str(spec.cwd),
        "user": uid_gid,
        "environment": env,
        "labels": {f"{LABEL}.job": spec.job_name, f"{LABEL}.stage": spec.name,
                   f"{LABEL}.attempt_dir": str(spec.cwd)},
        "mounts": mounts,
        "network_mode": "none",
        # Without a network the container's own name resolves to nothing, and torchrun's
        # rendezvous (c10d store on this host's name) retries for minutes: name it loopback.
        "hostname": HOSTNAME,
        "extra_hosts": {HOSTNAME: "127.0.0.1"},
        "read_only": True,
        "tmpfs": {"/tmp": TMPFS},
        "mem_limit": settings.memory,
        "memswap_limit": settings.memory,  # equal: no swap
        "nano_cpus": round(settings.cpus * 1e9),
        "pids_limit": settings.pids,
        "shm_size": settings.shm_size,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "init": True,  # a real PID 1: forwards our SIGTERM to torchrun, reaps its workers
        "device_requests": device_requests,
        "stdin_open": False,
        "tty": False,
        "detach": True,
    }


def classify_exit(state: dict[str, Any], *, memory: str, killed_by_us: bool = False,
                  outside_signal: str | None = None, report: dict[str, Any] | None = None,
                  peak_gb: float = 0.0) -> Exit | None:
    """How a container ended, from its State (`docker inspect`): None while it runs.

    outside_signal: a kill the daemon recorded that we did not send (its events), if any.
    report: the stage's memory report (runtime/memwatch.py), None when it wrote none;
    peak_gb: the scale's measured peak. Together they tell an OOM kill at the stage's own
    limit (the submission's) from one of the machine (ours): harness/runners/memory.py.
    """
    status = str(state.get("Status", ""))
    if status in RUNNING:
        return None
    code = state.get("ExitCode")
    returncode = code if isinstance(code, int) else None
    oom = bool(state.get("OOMKilled"))
    error = str(state.get("Error") or "").strip()
    info: dict[str, Any] = {"exit_code": returncode, "oom_killed": oom, "state": status,
                            "finished_at": state.get("FinishedAt")}
    if error:
        info["docker_error"] = error
    if report is not None:
        info["memory"] = report
    if status == "dead":
        return Exit(returncode, infra=f"the container died inside Docker ({error or 'dead'})",
                    info=info)
    if oom:
        over, infra = judge_kill(limit_text=memory, peak_gb=peak_gb, report=report)
        return Exit(returncode, infra=infra, over_limit=over, info=info)
    if error:
        return Exit(returncode, infra=f"Docker reported an error: {error}", info=info)
    if killed_by_us:
        return Exit(returncode, info=info)
    if outside_signal is not None:
        return Exit(returncode, infra=f"container killed from outside the harness "
                                      f"({outside_signal}, exit code {returncode})", info=info)
    outside = outside_exit_code(returncode)
    if outside is not None:
        return Exit(returncode, infra=f"container killed from outside the harness "
                                      f"(exit code {returncode}: {outside})", info=info)
    return Exit(returncode, info=info)


def _memory_file(spec: StageSpec) -> Path | None:
    writable = [m for m in spec.mounts if m.writable]
    return writable[0].source / MEMORY_FILE if writable else None


def _memory_report(spec: StageSpec) -> dict[str, Any] | None:
    """The stage's memory watcher's report on the host, None when there is none (the watcher
    was killed too, or the stage has no writable folder)."""
    path = _memory_file(spec)
    if path is None:
        return None
    data = read_stage_json(path)
    return data if isinstance(data, dict) else None


def invoking_user(settings: DockerSettings) -> str:
    """settings.user, else this process's uid:gid, else nobody when we are root."""
    if settings.user:
        return settings.user
    uid, gid = os.getuid(), os.getgid()
    return NOBODY if uid == 0 else f"{uid}:{gid}"


def _numeric(uid_gid: str) -> tuple[int, int] | None:
    uid, _, gid = uid_gid.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        return None


def grant_access(spec: StageSpec, uid_gid: str) -> None:
    """As root, with the container running as another uid: hand the writable mounts to that
    uid (root's 0755 folders would refuse its outputs) and make the read-only ones readable
    by others (the harness writes attempt files 0600 through mkstemp). Only read bits are
    added; nothing is taken away, and nothing is changed when not root."""
    ids = _numeric(uid_gid)
    if os.getuid() != 0 or ids is None or ids[0] == 0:
        return
    for m in spec.mounts:
        if m.writable:
            m.source.mkdir(parents=True, exist_ok=True)
            for root, dirs, files in os.walk(m.source):
                for name in [*dirs, *files]:
                    os.lchown(os.path.join(root, name), *ids)
            os.chown(m.source, *ids)
    for m in spec.mounts:
        if not m.writable and m.source.exists():
            _add_read(m.source)
            if m.source.is_dir():
                for root, dirs, files in os.walk(m.source):
                    for name in [*dirs, *files]:
                        _add_read(Path(root) / name)


def _add_read(path: Path) -> None:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        want = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        if st.st_mode & want != want:
            path.chmod(stat.S_IMODE(st.st_mode) | want)
    except OSError:
        pass  # not ours to change (a root-squashed share): the stage will say what it lacks


def _daemon_error(e: BaseException) -> str:
    text = str(getattr(e, "explanation", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class _Container:
    container: Any
    stdout: Path
    stderr: Path
    since: int  # unix seconds before creation: where its events start
    spec: StageSpec
    followers: list[threading.Thread] = field(default_factory=list)
    complete: dict[str, bool] = field(default_factory=dict)
    killed_by_us: bool = False
    poll_errors: int = 0
    logs_written: bool = False


class DockerRunner(StagedRunner):
    name = "docker"
    host_devices = True  # starts stages on this host: they lease its GPUs (leases.py)
    poll_s = 0.5

    def __init__(self, settings: DockerSettings | None = None, *, client: Any = None,
                 verify_image: bool = True) -> None:
        self.settings = settings or DockerSettings()
        self.verify_image = verify_image
        self._client = client
        self._image: dict[str, Any] | None = None
        self._running: dict[str, _Container] = {}

    # -- prepare --

    def client(self) -> Any:
        """The Docker client, connected and answering; RunnerError when the daemon is not."""
        if self._client is None:
            import docker

            where = self.settings.base_url or os.environ.get("DOCKER_HOST") or "the local socket"
            try:
                if self.settings.base_url:
                    client = docker.DockerClient(base_url=self.settings.base_url, timeout=60)
                else:
                    client = docker.from_env(timeout=60)
                client.ping()
            except Exception as e:  # DockerException, requests' errors, OSError
                raise RunnerError(f"cannot reach the Docker daemon at {where}: "
                                  f"{_daemon_error(e)} (is dockerd running? set [runner.docker] "
                                  f"base_url or DOCKER_HOST)") from e
            self._client = client
        return self._client

    def image_info(self) -> dict[str, Any]:
        """The configured image's tag, id (sha256) and registry digests; RunnerError with the
        fix when it is not on this Docker host."""
        import docker.errors

        if self._image is None:
            tag = self.settings.image
            try:
                image = self.client().images.get(tag)
            except docker.errors.ImageNotFound as e:
                raise RunnerError(
                    f"the Docker image {tag!r} is not on this Docker host: build it with "
                    f"`harness image build --tag {tag}` (containers/README.md), then "
                    f"`harness image check {tag}`") from e
            except docker.errors.DockerException as e:
                raise RunnerError(f"cannot inspect the Docker image {tag!r}: "
                                  f"{_daemon_error(e)}") from e
            self._image = {"image": tag, "image_id": image.id,
                           "image_digests": list(image.attrs.get("RepoDigests") or [])}
        return self._image

    def verify(self, gpu: bool) -> None:
        """`harness image check` once per image and process, before the first stage starts:
        a broken image (no torch, wrong lm-eval, missing tokenizer files) is then our failure
        (refunded), not a stage that crashes and is charged to the submission."""
        from harness.errors import HarnessError

        image = self.image_info()
        key = (str(image["image_id"]), gpu)
        if key in VERIFIED:
            return
        try:
            report = check_image(self.settings.image, gpu=gpu, settings=self.settings)
        except HarnessError as e:
            raise RunnerError(f"could not check the image {self.settings.image!r}: {e}") from e
        if not report.ok:
            missing = ", ".join(c["id"] for c in report.checks if not c["ok"]) or report.error
            raise RunnerError(f"the image {self.settings.image!r} ({image['image_id']}) lacks "
                              f"what the task needs: {missing}; `harness image check "
                              f"{self.settings.image}{' --gpu' if gpu else ''}` says more")
        VERIFIED.add(key)

    def prepare(self, spec: StageSpec) -> None:
        client = self.client()
        self.image_info()
        if self.verify_image:
            self.verify(spec.gpus > 0)
        try:
            ncpu = int(client.info().get("NCPU") or 0)
        except Exception:  # only a refinement: the limit stays as configured
            ncpu = 0
        if ncpu and self.settings.cpus > ncpu:
            # Docker refuses a CPU limit above the host's count; the host's count is the cap.
            self.settings = replace(self.settings, cpus=float(ncpu))
        self._vet_memory(spec, client)

    def _vet_memory(self, spec: StageSpec, client: Any) -> None:
        """The stage's memory limit, below the machine's and above the template's own need:
        an OOM kill inside it is then the submission's (harness/runners/memory.py)."""
        try:
            limit = parse_size(self.settings.memory)
        except ValueError as e:
            raise RunnerError(f"[runner.docker] memory: {e}") from None
        try:
            total = int(client.info().get("MemTotal") or 0)
        except Exception:
            total = 0
        if total and limit >= total:
            # At or above the machine's memory, the machine runs out first: cap it below.
            capped = int(total * HOST_SHARE) // 2**20
            self.settings = replace(self.settings, memory=f"{capped}m")
            limit = capped * 2**20
        vet_limit(limit, spec.memory_peak_gb, setting="[runner.docker] memory",
                  scale_hint=" at this scale")

    # -- launch / poll / kill / cleanup --

    def launch(self, spec: StageSpec) -> Job:
        import docker.errors

        client = self.client()
        stale = _memory_file(spec)
        if stale is not None:  # a report of an earlier launch in this folder says nothing now
            stale.unlink(missing_ok=True)
        image = self.image_info()
        user = invoking_user(self.settings)
        try:
            grant_access(spec, user)
        except OSError as e:
            raise RunnerError(f"cannot make {e.filename} writable for the container's user "
                              f"{user}: {e.strerror}") from e
        args = container_args(spec, self.settings, uid_gid=user, image=image["image_id"],
                              name_suffix=secrets.token_hex(3))
        out, err = self.logs(spec)
        out.write_bytes(b"")
        err.write_bytes(b"")
        since = int(time.time()) - 1
        container = None
        try:
            container = client.containers.create(**args)
            container.start()
        except docker.errors.DockerException as e:
            if container is not None:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
            raise RunnerError(f"container could not start: {_daemon_error(e)}") from e
        run = _Container(container, out, err, since, spec)
        self._running[container.id] = run
        for key, path in (("stdout", out), ("stderr", err)):
            thread = threading.Thread(target=self._follow, args=(run, key, path), daemon=True,
                                      name=f"docker-logs-{key}-{container.id[:12]}")
            thread.start()
            run.followers.append(thread)
        info = {**image, "container_id": container.id, "container_name": args["name"],
                "user": user, "limits": {"memory": self.settings.memory,
                                         "cpus": self.settings.cpus, "pids": self.settings.pids,
                                         "shm_size": self.settings.shm_size}}
        return Job(spec, container.id, time.monotonic(), info)

    @staticmethod
    def _follow(run: _Container, key: str, path: Path) -> None:
        """Copy one stream of the container's log into the stage's log file as it comes, so
        `harness logs --follow` sees it live; ends when the container stops."""
        try:
            stream = run.container.logs(stdout=key == "stdout", stderr=key == "stderr",
                                        stream=True, follow=True)
            with path.open("ab") as f:
                for chunk in stream:
                    f.write(chunk)
                    f.flush()
            run.complete[key] = True
        except Exception:
            run.complete[key] = False  # _write_logs fetches the whole log instead

    def _write_logs(self, run: _Container) -> None:
        """Once the container has stopped: make sure both log files hold its whole output."""
        if run.logs_written:
            return
        for thread in run.followers:
            thread.join(timeout=LOG_JOIN_S)
        for key, path in (("stdout", run.stdout), ("stderr", run.stderr)):
            if run.complete.get(key):
                continue
            with contextlib.suppress(Exception):
                path.write_bytes(run.container.logs(stdout=key == "stdout",
                                                    stderr=key == "stderr"))
        run.logs_written = True

    def _outside_signal(self, run: _Container) -> str | None:
        """A kill (or stop) the daemon recorded for this container that we did not send."""
        if run.killed_by_us:
            return None
        try:
            events = self.client().events(
                since=run.since, until=int(time.time()) + 1, decode=True,
                filters={"container": run.container.id, "event": ["kill", "stop"]})
            for event in events:
                raw = (event.get("Actor") or {}).get("Attributes", {}).get("signal")
                try:
                    return signal.Signals(int(raw)).name
                except (TypeError, ValueError):
                    return f"docker {event.get('Action') or event.get('status')}"
        except Exception:
            return None  # the exit code still tells a SIGKILL/SIGTERM apart
        return None

    def _ended(self, run: _Container, state: dict[str, Any]) -> Exit | None:
        outside = None if state.get("Status") in RUNNING else self._outside_signal(run)
        report = None if state.get("Status") in RUNNING else _memory_report(run.spec)
        end = classify_exit(state, memory=self.settings.memory, killed_by_us=run.killed_by_us,
                            outside_signal=outside, report=report,
                            peak_gb=run.spec.memory_peak_gb)
        if end is not None:
            self._write_logs(run)
        return end

    def poll(self, job: Job) -> Exit | None:
        import docker.errors

        run = self._running[job.handle]
        try:
            run.container.reload()
        except docker.errors.NotFound:
            self._write_logs(run)
            return Exit(None, infra="the container disappeared: removed outside the harness "
                                    "(docker rm -f) or by a daemon restart")
        except Exception as e:
            run.poll_errors += 1
            if run.poll_errors < MAX_POLL_ERRORS:
                return None
            return Exit(None, infra=f"lost contact with the Docker daemon: {_daemon_error(e)}")
        run.poll_errors = 0
        return self._ended(run, run.container.attrs.get("State") or {})

    def kill(self, job: Job) -> Exit:
        """SIGTERM (through docker-init, to torchrun), STOP_GRACE_S to finish, then SIGKILL."""
        run = self._running[job.handle]
        run.killed_by_us = True
        c = run.container
        with contextlib.suppress(Exception):
            c.stop(timeout=STOP_GRACE_S)
        try:
            c.reload()
            if c.attrs.get("State", {}).get("Status") in RUNNING:
                c.kill()
                c.wait(timeout=STOP_GRACE_S)
                c.reload()
            end = self._ended(run, c.attrs.get("State") or {})
        except Exception:
            end = None
        self._write_logs(run)
        return end if end is not None else Exit(None)

    def cleanup(self, job: Job) -> None:
        run = self._running.pop(job.handle, None)
        if run is None:
            return
        with contextlib.suppress(Exception):
            run.container.reload()
            if run.container.attrs.get("State", {}).get("Status") in RUNNING:
                run.killed_by_us = True
                run.container.kill()
        with contextlib.suppress(Exception):
            self._write_logs(run)
        with contextlib.suppress(Exception):
            run.container.remove(force=True)


def remove_leftover_containers(attempt_id: str, settings: DockerSettings) -> list[str]:
    """Remove (force) the containers of an attempt whose harness died (`harness recover`),
    found by the names the runner gave them; their names. Nothing when no daemon answers."""
    try:
        client = DockerRunner(settings).client()
        found = client.containers.list(all=True, filters={"name": f"harness-{attempt_id}-"})
    except Exception:  # no daemon, no SDK: nothing this host can remove
        return []
    removed = []
    for c in found:
        with contextlib.suppress(Exception):
            c.remove(force=True)
            removed.append(str(c.name))
    return removed


# --- checking an image (`harness image check`, DockerRunner.verify) ------------------------

@dataclass
class CheckReport:
    image: str
    image_id: str | None
    ok: bool
    checks: list[dict[str, Any]]
    facts: dict[str, Any]
    error: str | None = None  # the probe could not run at all

    def render(self) -> str:
        lines = [f"image {self.image}" + (f" ({self.image_id})" if self.image_id else "")]
        if self.error:
            lines.append(f"  MISSING  image: {self.error}")
        for c in self.checks:
            lines.append(f"  {'ok     ' if c['ok'] else 'MISSING'}  {c['id']}: {c['detail']}")
        lines.append("all present" if self.ok else
                     "missing: " + ", ".join([c["id"] for c in self.checks if not c["ok"]]
                                             or ["image"]))
        return "\n".join(lines)


def check_image(image: str, *, gpu: bool = False,
                settings: DockerSettings | None = None) -> CheckReport:
    """Run the probe in the image through the docker runner (same sandbox as a stage)."""
    import harness
    from harness.envinfo import task_pins
    from harness.runtime import image_probe

    settings = replace(settings or DockerSettings(), image=image)
    runner = DockerRunner(settings, verify_image=False)
    pins = [f"--pin={n}=={v}" for n, v in task_pins().items()]
    here = image_probe.source_digest(Path(harness.__file__).resolve().parent)
    # This host's probe, mounted as a script: it reports on an image without the harness too.
    probe = Mount(Path(image_probe.__file__).resolve(), PROBE_TARGET)
    with tempfile.TemporaryDirectory(prefix="harness-image-check-") as tmp:
        spec = StageSpec(name="image-check",
                         argv=(settings.python, PROBE_TARGET, *pins, f"--source-sha256={here}",
                               *(["--gpu"] if gpu else [])),
                         cwd=Path("/tmp"), log_dir=Path(tmp), timeout_s=600.0, mounts=(probe,),
                         gpus=1 if gpu else 0, job_name="harness-image-check")
        run = runner.run(spec)
        image_id = run.info.get("image_id")
        if not run.started:
            if "Docker daemon" in (run.error or ""):
                raise InfraError(run.error or "")
            return CheckReport(image, image_id, False, [], {}, error=run.error)
        stdout = run.stdout.read_text(encoding="utf-8", errors="replace")
        try:
            report = json.loads(stdout[stdout.index("{"):])
        except ValueError:
            tail = run.stderr_tail(10) or stdout[-2000:]
            return CheckReport(image, image_id, False, [], {},
                               error=f"the probe did not run (exit {run.returncode}"
                                     f"{', ' + run.infra if run.infra else ''}): {tail}")
    return CheckReport(image, image_id, bool(report["ok"]), report["checks"], report["facts"])
