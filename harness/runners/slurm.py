"""Slurm runner: each stage is one batch job, followed by one shared, batched poller.

    render_sbatch(spec, settings, command=...)  the exact batch script (pure, golden-tested)
    SlurmRunner.launch     writes it next to the stage's logs and submits it (`sbatch --parsable`)
    SlurmPoller            one per process: one `sacct -j a,b,c` for every job, `squeue` for the
                           jobs sacct has no row for yet, back-off between poll_s and max_poll_s
    SlurmRunner.kill       `scancel`, then waits until the job has left the queue

The stage's time limit is enforced inside the job by coreutils `timeout` (exit 124: the
submission's time ran out, `timed_out`, as the local runner's watchdog); Slurm's own `--time`
is that limit plus a margin, a backstop whose firing is ours (infra). Queue time never counts:
`Job.started` moves to the moment the job is first seen running. The states Slurm reports are
classified in `classify` (docs/runners.md, "## Slurm", has the table).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from harness.runners.apptainer import ApptainerRunner
from harness.runners.base import Exit, Job, RunnerError, StagedRunner, StageRun, StageSpec
from harness.runners.config import SlurmSettings
from harness.runners.local import scrubbed_env
from harness.runners.memory import parse_size, vet_limit
from harness.runtime.fileio import atomic_write_text
from harness.runtime.procs import OUTSIDE_SIGNALS, kill_tagged

SCRIPT_NAME = "job.sbatch"
KILL_AFTER_S = 30  # `timeout --kill-after`: SIGKILL this long after the SIGTERM
# The job's exit code when the stage's own time limit ended it: the script turns both of
# coreutils timeout's outcomes (124: SIGTERM sufficed; 137: --kill-after's SIGKILL was needed,
# which kills timeout's whole process group, timeout included) into 124. A stage that died of
# any other signal ends the job by that same signal (Slurm records `0:SIG`), never 128+SIG.
TIMEOUT_EXIT = 124
# 125: timeout itself failed (or the script's `cd` did), 126: the command cannot run, 127: it
# was not found. The stage never started: ours, as a failed Popen is for the local runner.
NOT_STARTED_EXITS = {125: "timeout or the working directory failed",
                     126: "the command could not be executed",
                     127: "the command was not found"}
# Slurm hands the job its GPUs through these: the submitting host's values must not reach it.
SLURM_GPU_ENV = ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES")
NOT_EXPORTED = (*SLURM_GPU_ENV, "NVIDIA_VISIBLE_DEVICES")
CLIENTS = ("sbatch", "sacct", "squeue", "scancel")
SUBPROCESS_TIMEOUT_S = 60.0
KILL_WAIT_S = 120.0  # after scancel (Slurm's KillWait is 30 s by default), then SIGKILL --full
LEFTOVER_KILL_S = 10.0  # cleanup: for the job's escaped processes on this host to die
_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JOB_ID = re.compile(r"\d+(_\d+)?")

# Slurm job states (squeue --states / sacct State). Queued: the stage's clock has not started.
QUEUED = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                    "RESV_DEL_HOLD", "POWER_UP_NODE"})
ACTIVE = QUEUED | {"RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING",
                   "STAGE_OUT", "STOPPED"}
# Terminal states that are never the submission's doing, with the reason recorded.
INFRA_STATES = {
    "TIMEOUT": "reached Slurm's own time limit (--time={time}, the stage's limit plus a "
               "{margin} s margin) before the stage's own `timeout` ended it",
    "NODE_FAIL": "was ended by a failure of node {node} (NODE_FAIL)",
    "BOOT_FAIL": "could not start: node {node} failed to boot (BOOT_FAIL)",
    "PREEMPTED": "was preempted by the scheduler for another job (PREEMPTED)",
    # Without a --mem of ours vetted against a measured peak, the limit was not ours to judge.
    "OUT_OF_MEMORY": "was killed by the out-of-memory killer on node {node} (OUT_OF_MEMORY)",
    "DEADLINE": "reached its deadline before it could run to the end (DEADLINE)",
    "CANCELLED": "was cancelled outside the harness ({detail}: scancel by an operator or the "
                 "cluster)",
    "VANISHED": "vanished from the scheduler: neither sacct nor squeue knows it any more",
}


# --- the batch script -----------------------------------------------------------------------


def slurm_time(seconds: float) -> str:
    """A --time value: whole minutes, rounded up, as D-HH:MM:SS."""
    minutes = max(1, math.ceil(seconds / 60))
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def directive_value(value: str) -> str:
    """A value as an #SBATCH line parses it back. sbatch reads directives with its own
    tokenizer, not a shell: a space ends the value even after a backslash, while inside '...'
    or "..." a backslash still escapes the next character. So shlex.quote (which relies on
    '\\' being literal inside single quotes) is wrong here: values that need quoting go in
    double quotes with '\\' and '"' escaped."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"an #SBATCH value cannot contain a line break: {value!r}")
    if _SAFE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filename_pattern(path: Path) -> str:
    """--output/--error take a filename pattern: '%' must be doubled. Slurm drops every
    backslash from such a pattern (its "do not expand" mark), so no such path can be named."""
    text = str(path)
    if "\\" in text:
        raise ValueError(f"Slurm cannot write a log to a path containing a backslash: {text!r}; "
                         f"use a runs folder without one")
    return directive_value(text.replace("%", "%%"))


def job_name(spec: StageSpec) -> str:
    """spec.job_name (it carries the attempt id) with anything but [A-Za-z0-9._-] replaced:
    Slurm's job-completion log is space-separated key=value text, and a name with a space
    there corrupts the job's state for `sacct --completion`."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", spec.job_name or f"harness-{spec.name}")


def job_env(spec: StageSpec, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the job exports: the local runner's scrubbed environment (or `env`), less the
    variables through which Slurm hands the job its GPUs."""
    full = dict(scrubbed_env(spec.env) if env is None else env)
    for key in full:
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"not a valid environment variable name: {key!r}")
    return {k: v for k, v in sorted(full.items()) if k not in NOT_EXPORTED}


def render_sbatch(spec: StageSpec, settings: SlurmSettings, *, command: Sequence[str],
                  env: Mapping[str, str] | None = None) -> str:
    """The batch script that runs `command` for `spec`. Pure given `env` (None: the local
    runner's scrubbed copy of this process's environment plus spec.env, as the runner uses).
    Raises ValueError for what Slurm cannot express (a line break, a backslash in a log path)."""
    if not command:
        raise ValueError("empty command")
    out, err = spec.log_dir / "stdout.log", spec.log_dir / "stderr.log"
    limit_s = math.ceil(spec.timeout_s)
    options = [
        f"--job-name={job_name(spec)}",
        f"--output={filename_pattern(out)}",
        f"--error={filename_pattern(err)}",
        f"--chdir={directive_value(str(spec.cwd))}",
        "--nodes=1",
        "--ntasks=1",
    ]
    if spec.gpus > 0:
        options.append(f"--gres=gpu:{spec.gpus}")
    options.append(f"--time={slurm_time(limit_s + settings.time_margin_s)}")
    for flag, value in (("--partition", settings.partition), ("--account", settings.account),
                        ("--qos", settings.qos), ("--mem", settings.mem)):
        if value:
            options.append(f"{flag}={directive_value(value)}")
    if settings.cpus_per_task > 0:
        options.append(f"--cpus-per-task={settings.cpus_per_task}")
    for extra in settings.extra_args:
        flag, eq, value = extra.partition("=")
        if not flag.startswith("-") or not _SAFE.fullmatch(flag):
            raise ValueError(f"extra_args entries are sbatch options (--flag or --flag=value), "
                             f"not {extra!r}")
        options.append(f"{flag}={directive_value(value)}" if eq else flag)
    options += ["--export=NONE", "--no-requeue"]
    keep = "|".join(["SLURM_*", "SLURMD_*", *SLURM_GPU_ENV])
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options),
             f"# Rendered by harness.runners.slurm for stage {spec.name!r}; the harness does not",
             "# read this file back. The stage's own time limit is the `timeout` below (exit 124:",
             f"# timed out); Slurm's --time is a backstop {settings.time_margin_s} s later.",
             "# --export=NONE keeps the submitting shell's variables out, but Slurm may load the",
             "# user's login environment on the node: keep only what Slurm set for this job.",
             "for _v in $(compgen -e); do",
             "    case $_v in",
             f"        {keep}) ;;",
             "        *) unset \"$_v\" 2>/dev/null ;;",
             "    esac",
             "done",
             "unset _v",
             "# Job steps (srun, multi-node) inherit the environment below, not NONE.",
             "export SLURM_EXPORT_ENV=ALL"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job_env(spec, env).items()]
    lines.append(f"cd -- {shlex.quote(str(spec.cwd))} || exit 125")
    run = ["timeout", "--signal=TERM", f"--kill-after={KILL_AFTER_S}", f"{limit_s}s"]
    lines.append(" ".join(run) + " \\")
    quoted = [shlex.quote(a) for a in command]
    lines += [f"    {a} \\" for a in quoted[:-1]] + [f"    {quoted[-1]}"]
    lines += [
        "rc=$?",
        "# The stage's time limit: timeout's 124 (SIGTERM sufficed), or 137 once --kill-after's",
        "# SIGKILL was needed. Either way the job ends with 124.",
        f'if [ "$rc" -eq 124 ] || {{ [ "$rc" -eq 137 ] && [ "$SECONDS" -ge {limit_s} ]; }}; then',
        "    exit 124",
        "fi",
        "# Killed by a signal: end the same way, so that Slurm records the signal (0:SIG).",
        'if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then',
        '    kill -s "$((rc - 128))" "$$"',
        "fi",
        'exit "$rc"']
    return "\n".join(lines) + "\n"


# --- job states --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # Slurm's state word: PENDING, RUNNING, COMPLETED, CANCELLED...
    exit_code: int = 0
    signal: int = 0
    node: str = ""
    reason: str = ""
    detail: str = ""  # Slurm's own text, e.g. "CANCELLED by 0"
    source: str = ""  # sacct | sacct --completion | squeue | none

    @property
    def final(self) -> bool:
        return self.state not in ACTIVE

    @property
    def queued(self) -> bool:
        return self.state in QUEUED


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify(st: JobState, *, time_limit: str = "", margin_s: int = 0, mem: str = "",
             peak_gb: float = 0.0) -> Exit:
    """How a finished job ended, as the stages read it. COMPLETED and FAILED are the stage's
    (its exit code, or the signal as a negative code like Popen's); the `timeout` exits mean
    the stage's time limit (info["job_timeout"], which SlurmRunner.run turns into timed_out);
    every other terminal state is ours, with a precise reason."""
    info: dict[str, Any] = {"job_id": st.job_id, "state": st.detail or st.state,
                            "exit_code": f"{st.exit_code}:{st.signal}", "state_source": st.source}
    if st.node:
        info["node"] = st.node
    rc = -st.signal if st.signal else st.exit_code
    head = f"Slurm job {st.job_id}"
    if st.state == "OUT_OF_MEMORY" and mem and peak_gb > 0:
        # Slurm's cgroup saw the job outgrow the --mem we asked for, a limit vetted against
        # the template's measured peak: the submission's (harness/runners/memory.py).
        return Exit(rc, over_limit=f"{head} outgrew its memory limit (--mem={mem}) on node "
                                   f"{st.node or '?'} (OUT_OF_MEMORY); the template's own "
                                   f"measured peak at this scale is {peak_gb:g} GiB", info=info)
    if st.state in INFRA_STATES:
        text = INFRA_STATES[st.state].format(node=st.node or "?", detail=st.detail or st.state,
                                             time=time_limit or "?", margin=margin_s)
        return Exit(rc, infra=f"{head} {text}", info=info)
    if st.state not in ("COMPLETED", "FAILED"):
        return Exit(rc, infra=f"{head} ended in state {st.detail or st.state}, which is not "
                              f"the stage's doing", info=info)
    if st.reason == "JobLaunchFailure" or st.signal >= 32:
        return Exit(rc, infra=f"{head}: Slurm could not launch the batch script on node "
                              f"{st.node or '?'} ({st.reason or _signal_name(st.signal)}; "
                              f"slurmd's log says why, e.g. an unwritable log folder)",
                    info=info)
    if st.signal:
        if st.signal in OUTSIDE_SIGNALS:
            return Exit(rc, infra=f"{head}: the stage was killed by {_signal_name(st.signal)} "
                                  f"from outside the harness (an operator or the out-of-memory "
                                  f"killer)", info=info)
        return Exit(rc, info=info)  # SIGSEGV, SIGABRT...: the stage's own
    if st.exit_code == TIMEOUT_EXIT:
        return Exit(rc, info={**info, "job_timeout": True})
    if st.exit_code in NOT_STARTED_EXITS:
        return Exit(rc, infra=f"{head}: the stage did not start on node {st.node or '?'} "
                              f"(exit {st.exit_code}: {NOT_STARTED_EXITS[st.exit_code]})",
                    info=info)
    return Exit(rc, info=info)


def _exit_pair(text: str) -> tuple[int, int]:
    """sacct's ExitCode "code:signal"."""
    code, _, sig = text.partition(":")
    try:
        return int(code or 0), int(sig or 0)
    except ValueError:
        return 0, 0


def _wait_status(text: str) -> tuple[int, int]:
    """squeue's exit_code: the raw wait status (768 = exit 3, 15 = SIGTERM)."""
    try:
        raw = int(text)
    except ValueError:
        return 0, 0
    return (raw >> 8) & 0xFF, raw & 0x7F


def parse_sacct(text: str, wanted: Sequence[str], source: str) -> dict[str, JobState]:
    """`sacct -n -P --format=JobID,State,ExitCode,NodeList` rows for the wanted jobs."""
    rows: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 4 or parts[0] not in wanted:
            continue
        detail = parts[1].strip()
        if not detail:
            # The job-completion log is space-separated key=value text: a value with a space
            # before JobState (a job name) loses the state. No row beats a wrong one.
            continue
        code, sig = _exit_pair(parts[2].strip())
        node = parts[3].strip()
        rows[parts[0]] = JobState(parts[0], detail.split(" ")[0].rstrip("+"), code, sig,
                                  "" if node.startswith("None") else node, "", detail, source)
    return rows


def parse_squeue(text: str, wanted: Sequence[str]) -> dict[str, JobState]:
    """`squeue -O JobID:|,State:|,exit_code:|,NodeList:|,Reason:|` rows for the wanted jobs."""
    rows: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 5 or parts[0] not in wanted:
            continue
        code, sig = _wait_status(parts[2])
        node = "" if parts[3] in ("", "(null)") else parts[3]
        rows[parts[0]] = JobState(parts[0], parts[1], code, sig, node,
                                  "" if parts[4] == "None" else parts[4], parts[1], "squeue")
    return rows


# --- the poller ------------------------------------------------------------------------------


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)


class SlurmPoller:
    """One per process (`shared_poller`): every watched job's state from one `sacct` call,
    `squeue` for the jobs sacct has no row for yet (accounting lags, or is off), and a cache
    in between, so that N running stages cost one query per interval, not N. The interval
    starts at poll_s, grows by `backoff` while nothing changes, up to max_poll_s, and drops
    back to poll_s when a job changes state or a new one is watched.

    Accounting: `sacct` reads slurmdbd. Where a cluster has none (AccountingStorageType=none,
    as the CI cluster), sacct fails with "accounting storage is disabled": the poller then
    reads the job-completion log (`sacct --completion`, JobCompType=jobcomp/filetxt) and, if
    that is off too, squeue alone, whose `exit_code` field is the job's wait status while
    slurmctld keeps the finished job (MinJobAge)."""

    def __init__(self, *, poll_s: float = 2.0, max_poll_s: float = 30.0, backoff: float = 1.5,
                 vanish_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.poll_s = poll_s
        self.max_poll_s = max(max_poll_s, poll_s)
        self.backoff = backoff
        # A job neither source knows for this long (after a successful query) is gone.
        self.vanish_s = vanish_s if vanish_s is not None else max(60.0, 3 * self.max_poll_s)
        self.clock = clock
        self.interval = poll_s
        self.mode = "accounting"  # accounting | completion | queue-only
        self.queries = 0  # scheduler commands run, for tests and the docs' numbers
        self.last_error = ""
        self._lock = threading.RLock()
        self._watched: set[str] = set()
        self._states: dict[str, JobState] = {}
        self._missing: dict[str, float] = {}
        self._last = -math.inf

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._watched.add(job_id)
            self.interval = self.poll_s
            self._last = -math.inf  # the next state() asks the scheduler

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._watched.discard(job_id)
            self._states.pop(job_id, None)
            self._missing.pop(job_id, None)

    def state(self, job_id: str, *, fresh: bool = False) -> JobState | None:
        """The job's last known state, refreshed (for every watched job at once) when the
        cache is older than the current interval, or when `fresh`."""
        with self._lock:
            if job_id not in self._watched:
                self.watch(job_id)
            if fresh or self.clock() - self._last >= self.interval:
                self.refresh()
            return self._states.get(job_id)

    def refresh(self) -> None:
        with self._lock:
            ids = sorted(self._watched, key=lambda i: (len(i), i))
            self._last = self.clock()
            if not ids:
                return
            rows = self._sacct(ids)
            rest = [i for i in ids if i not in rows]
            queue_ok = True
            if rest:
                found, queue_ok = self._squeue(rest)
                rows.update(found)
            now = self.clock()
            changed = False
            for job_id in ids:
                got = rows.get(job_id)
                if got is None:
                    if not queue_ok:
                        continue  # the scheduler did not answer: keep what we knew
                    since = self._missing.setdefault(job_id, now)
                    if now - since < self.vanish_s:
                        continue
                    got = JobState(job_id, "VANISHED", source="none")
                else:
                    self._missing.pop(job_id, None)
                if self._states.get(job_id) != got:
                    changed = True
                    self._states[job_id] = got
            self.interval = self.poll_s if changed else min(self.interval * self.backoff,
                                                            self.max_poll_s)

    def _sacct(self, ids: Sequence[str]) -> dict[str, JobState]:
        fmt = ["-j", ",".join(ids), "-n", "-P", "-X", "--format=JobID,State,ExitCode,NodeList"]
        if self.mode == "accounting":
            self.queries += 1
            got = _call(["sacct", *fmt])
            if got is not None and got.returncode == 0:
                return parse_sacct(got.stdout, ids, "sacct")
            said = "" if got is None else (got.stderr or got.stdout)
            if "accounting storage is disabled" not in said.lower():
                self.last_error = f"sacct: {said.strip() or 'no answer'}"
                return {}
            self.mode = "completion"
        if self.mode == "completion":
            self.queries += 1
            got = _call(["sacct", "--completion", *fmt])
            if got is not None and got.returncode == 0:
                return parse_sacct(got.stdout, ids, "sacct --completion")
            said = "" if got is None else (got.stderr or got.stdout).strip()
            self.last_error = f"sacct --completion: {said or 'no answer'}"
            if got is not None:  # it answered, with an error: job completion is off too
                self.mode = "queue-only"
        return {}

    def _squeue(self, ids: Sequence[str]) -> tuple[dict[str, JobState], bool]:
        self.queries += 1
        got = _call(["squeue", "-h", "--states=all", "-j", ",".join(ids),
                     "-O", "JobID:|,State:|,exit_code:|,NodeList:|,Reason:|"])
        if got is None:
            return {}, False
        if got.returncode != 0:
            # Every id unknown (purged after MinJobAge) is an answer too: none of them is queued.
            if "invalid job id" in (got.stderr or "").lower():
                return {}, True
            self.last_error = f"squeue: {(got.stderr or got.stdout).strip()}"
            return {}, False
        return parse_squeue(got.stdout, ids), True

    def in_queue(self, job_id: str) -> bool | None:
        """Whether squeue still lists the job (pending, running or completing); None when it
        cannot say."""
        self.queries += 1
        got = _call(["squeue", "-h", "-j", job_id, "-o", "%i"])
        if got is None:
            return None
        if got.returncode != 0:
            return False if "invalid job id" in (got.stderr or "").lower() else None
        return job_id in got.stdout.split()


def _call(argv: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return _run(argv)
    except (OSError, subprocess.TimeoutExpired):
        return None


def cancel_leftover_jobs(attempt_id: str, stages: Sequence[str]) -> list[str]:
    """scancel the jobs of an attempt whose harness died (`harness recover`), found by the
    names the runner gave them, and wait until they left the queue; their ids. Nothing
    without Slurm's clients on this host."""
    if shutil.which("squeue") is None:
        return []
    names = ",".join(f"harness-{attempt_id}-{s}" for s in stages)

    def queued() -> list[str]:
        got = _call(["squeue", "-h", f"--name={names}", "-o", "%i"])
        return got.stdout.split() if got is not None and got.returncode == 0 else []

    ids = queued()
    if ids:
        _call(["scancel", *ids])
        deadline = time.monotonic() + KILL_WAIT_S
        while queued() and time.monotonic() < deadline:
            time.sleep(0.5)
        if queued():
            _call(["scancel", "--signal=KILL", "--full", *ids])
    return ids


_SHARED: SlurmPoller | None = None
_SHARED_LOCK = threading.Lock()


def shared_poller(settings: SlurmSettings) -> SlurmPoller:
    """The process's one poller; the first runner's poll_s/max_poll_s set its back-off."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = SlurmPoller(poll_s=settings.poll_s, max_poll_s=settings.max_poll_s)
        return _SHARED


# --- the runner ----------------------------------------------------------------------------


class CommandWrapper(Protocol):
    """What SlurmRunner needs of a container runner (ApptainerRunner): the full command line
    that runs a stage in its image, and a check that the image is there before submitting."""

    def command(self, spec: StageSpec) -> list[str]: ...

    def prepare(self, spec: StageSpec) -> None: ...


class SlurmRunner(StagedRunner):
    name = "slurm"

    def __init__(self, settings: SlurmSettings, wrap: CommandWrapper | None = None, *,
                 poller: SlurmPoller | None = None) -> None:
        self.settings = settings
        self.wrap = wrap
        self.poller = poller or shared_poller(settings)
        self.poll_s = settings.poll_s  # run()'s own sleep between polls, as the poller's
        self.max_poll_s = settings.max_poll_s
        self._launched: dict[str, float] = {}

    def prepare(self, spec: StageSpec) -> None:
        missing = [c for c in CLIENTS if shutil.which(c) is None]
        if missing:
            raise RunnerError(f"Slurm's {', '.join(missing)} not on PATH: the slurm runner "
                              f"submits with sbatch and follows jobs with sacct/squeue; run it "
                              f"on a submit host, or choose another runner (--runner local)")
        if self.settings.mem:
            try:
                limit = parse_size(self.settings.mem, default_unit="m")
            except ValueError as e:
                raise RunnerError(f"[runner.slurm] mem: {e}") from None
            vet_limit(limit, spec.memory_peak_gb, setting="[runner.slurm] mem",
                      scale_hint=" at this scale")
        if self.wrap is not None:
            self.wrap.prepare(spec)  # the image must exist before anything is submitted

    def script(self, spec: StageSpec) -> str:
        command = self.wrap.command(spec) if self.wrap is not None else list(spec.argv)
        try:
            return render_sbatch(spec, self.settings, command=command)
        except ValueError as e:
            raise RunnerError(f"cannot write the batch script: {e}") from e

    def launch(self, spec: StageSpec) -> Job:
        self.logs(spec)
        path = spec.log_dir / SCRIPT_NAME
        atomic_write_text(path, self.script(spec))
        # SBATCH_* variables would override the script's directives: the script decides.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SBATCH_")}
        try:
            got = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True,
                                 text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S,
                                 stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RunnerError(f"sbatch did not answer: {e}") from e
        job_id = got.stdout.strip().split(";")[0]
        if got.returncode != 0 or not _JOB_ID.fullmatch(job_id):
            said = (got.stderr or got.stdout).strip() or f"exit code {got.returncode}"
            raise RunnerError(f"sbatch refused the job: {said}")
        now = time.monotonic()
        self._launched[job_id] = now
        self.poller.watch(job_id)
        info: dict[str, Any] = {"job_id": job_id, "script": str(path)}
        if self.settings.partition:
            info["partition"] = self.settings.partition
        if isinstance(self.wrap, ApptainerRunner):  # the image digest, per attempt
            with contextlib.suppress(OSError):
                info.update(image=self.wrap.settings.image, image_sha256=self.wrap.image_sha256())
        return Job(spec, job_id, now, info)

    def poll(self, job: Job) -> Exit | None:
        st = self.poller.state(job.handle)
        now = time.monotonic()
        if st is None:  # the scheduler has not answered yet: not the stage's time either
            job.started = now
            return None
        if st.queued:
            job.started = now  # queue time is not the stage's: its clock starts when it runs
            return None
        if "queued_s" not in job.info:  # first seen running (or already finished)
            job.started = now
            job.info["queued_s"] = round(now - self._launched.get(job.handle, now), 3)
        if st.node:
            job.info["node"] = st.node
        if not st.final:
            return None
        return self._classify(job, st)

    def _classify(self, job: Job, st: JobState) -> Exit:
        limit = slurm_time(math.ceil(job.spec.timeout_s) + self.settings.time_margin_s)
        return classify(st, time_limit=limit, margin_s=self.settings.time_margin_s,
                        mem=self.settings.mem, peak_gb=job.spec.memory_peak_gb)

    def kill(self, job: Job) -> Exit:
        """scancel, then wait until the job has ended and left the queue: its accounting or
        completion record can be final while slurmd still reaps its processes (COMPLETING)."""
        _call(["scancel", job.handle])
        deadline = time.monotonic() + KILL_WAIT_S
        escalated = False
        while True:
            st = self.poller.state(job.handle, fresh=True)
            if st is not None and st.final and self.poller.in_queue(job.handle) is not True:
                return self._classify(job, st)
            if time.monotonic() > deadline:
                if escalated:
                    return Exit(None, infra=f"Slurm job {job.handle} did not leave the queue "
                                            f"after scancel", info={"job_id": job.handle})
                _call(["scancel", "--signal=KILL", "--full", job.handle])
                escalated, deadline = True, time.monotonic() + KILL_AFTER_S
            time.sleep(0.5)

    def cleanup(self, job: Job) -> None:
        # The script stays next to the logs: it is the record of what was submitted.
        self.poller.forget(job.handle)
        self._launched.pop(job.handle, None)
        # Slurm ends a job's processes through its process tracking, and proctrack/linuxproc
        # (a parent-pid tree) loses a rank whose torchrun was killed: reparented to init, it
        # trains on after the job ended, into an attempt whose record is being closed or
        # resumed (tests/slurm/test_slurm_faults.py). The job's processes on this host carry
        # its id: SIGKILL what is left of them (none on a submit host that runs no jobs).
        with contextlib.suppress(Exception):
            kill_tagged(job.handle, var="SLURM_JOB_ID", wait_s=LEFTOVER_KILL_S)

    def run(self, spec: StageSpec) -> StageRun:
        got = super().run(spec)
        # The stage's own limit, enforced inside the job, is timed_out as the local watchdog's;
        # wall_s leaves out the time the job waited in the queue.
        timed_out = got.timed_out or (bool(got.info.get("job_timeout")) and not got.cancelled)
        queued = float(got.info.get("queued_s") or 0.0)
        return replace(got, timed_out=timed_out, wall_s=max(0.0, got.wall_s - queued))
