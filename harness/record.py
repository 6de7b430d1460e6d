"""The attempt record: one folder per attempt, one `result.json` in it, one status vocabulary.

Everything that names a status, or reads or writes `result.json`, goes through this module:

    Status          the life of an attempt (pending -> checking -> running -> a finished one)
                    and what each finished one means: refunded, ranked, the CLI's exit code
    Origin          what started the attempt: a plain `run`, a `baseline`, a `session` test
                    (its session and number) or a `final` re-run of a session's submission
    AttemptRecord   the typed, versioned content of result.json; StageRecord one stage of it
    Attempt         the folder: its id (chosen once, by the caller, never renamed) and every
                    file name in it, in the spirit of submitit's JobPaths; `create` allocates
                    it, `write`/`read`/`close` are the only ways to touch result.json

Older records still read: `migrate` brings each earlier schema up to SCHEMA_VERSION, and a
record whose version is newer than this harness knows is refused with a clear reason.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from harness.errors import EXIT_INFRA, EXIT_USER
from harness.runtime.fileio import atomic_write_text, sha256_bytes, sha256_file

SCHEMA_VERSION = 2
RESULT_FILE = "result.json"
CANCEL_FILE = "cancel_requested"
# The exit code of an attempt the submission failed (or broke a rule in), and of a cancelled
# one: neither is a refusal of bad input (2) nor a failure of ours (3).
EXIT_SUBMISSION_FAILED = 4
EXIT_CANCELLED = 5


class Status(str, Enum):
    """Where an attempt is, and for a finished one, how it ended."""

    PENDING = "pending"  # a session's row exists; nothing has run
    CHECKING = "checking"  # static checks and the pre-flight (free)
    RUNNING = "running"  # a stage is running (a session test is charged from here)
    SUCCEEDED = "succeeded"
    FAILED_SUBMISSION = "failed_submission"  # the submission's fault: charged
    FAILED_INFRA = "failed_infra"  # ours: never charged
    CANCELLED = "cancelled"  # stopped through the harness: never charged
    # A rule broken at run time (frozen or torch code changed, a full-precision weight in a
    # matmul, ranks that diverged, scores that disagree): charged, shown invalid, never ranked.
    RULE_VIOLATION = "rule_violation"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def finished(self) -> bool:
        return self not in _IN_PROGRESS

    @property
    def refundable(self) -> bool:
        """A charge for this outcome is returned: it was not the submission's doing."""
        return self in (Status.FAILED_INFRA, Status.CANCELLED)

    @property
    def ranked(self) -> bool:
        """Only a success has scores a board may rank."""
        return self is Status.SUCCEEDED

    @property
    def exit_code(self) -> int:
        """What `harness run` (and a session's test) exits with for this outcome."""
        if not self.finished:
            raise ValueError(f"an attempt that is {self.value} has no exit code yet")
        return _EXIT_CODES[self]


_IN_PROGRESS = frozenset({Status.PENDING, Status.CHECKING, Status.RUNNING})
_EXIT_CODES = {Status.SUCCEEDED: 0, Status.FAILED_INFRA: EXIT_INFRA,
               Status.FAILED_SUBMISSION: EXIT_SUBMISSION_FAILED,
               Status.RULE_VIOLATION: EXIT_SUBMISSION_FAILED, Status.CANCELLED: EXIT_CANCELLED}
assert EXIT_USER not in _EXIT_CODES.values()  # 2 stays the refusal of bad input

IN_PROGRESS: tuple[str, ...] = tuple(s.value for s in Status if not s.finished)
FINISHED: tuple[str, ...] = tuple(s.value for s in Status if s.finished)
REFUNDABLE: tuple[str, ...] = tuple(s.value for s in Status if s.refundable)


def worst_exit_code(statuses: list[Status]) -> int:
    """One exit code for several attempts (`harness baselines`): the highest of theirs."""
    return max((s.exit_code for s in statuses), default=0)


# --- where an attempt came from ----------------------------------------------------------------

# A stage's caches and temp files (inductor, triton, TMPDIR): inside its writable folder,
# removed when it ends, never part of the record.
SCRATCH = ".scratch"
ORIGIN_KINDS = ("run", "baseline", "session", "final")


@dataclass(frozen=True)
class Origin:
    """What started an attempt. A session test and a final re-run name their session and the
    test's number; a plain run and a baseline name neither."""

    kind: str = "run"
    session_id: str | None = None
    number: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ORIGIN_KINDS:
            raise ValueError(f"origin kind must be one of {ORIGIN_KINDS}, not {self.kind!r}")
        in_session = self.kind in ("session", "final")
        if in_session != (self.session_id is not None and self.number is not None):
            raise ValueError(f"an origin of kind {self.kind!r} "
                             f"{'needs' if in_session else 'has no'} session_id and number")

    @property
    def session_test(self) -> bool:
        return self.kind == "session"


# --- the record --------------------------------------------------------------------------------

# The keys every stage record has; a stage's own fields (the pretrain curve, lm-eval's
# versions and samples hash) sit beside them in `details` and are written flat.
_STAGE_KEYS = ("outcome", "reason", "returncode", "wall_s", "timed_out", "infra", "cancelled",
               "runner", "argv", "stderr_tail", "segments")


@dataclass
class StageRecord:
    """One stage of an attempt as it ran: how the runner saw it end and what the stage made of
    its files. Written flat into result.json's `stages.<name>`."""

    outcome: Status
    reason: str = ""
    returncode: int | None = None
    wall_s: float = 0.0
    timed_out: bool = False
    infra: str | None = None
    cancelled: bool = False
    runner: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    stderr_tail: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    # One entry per launch of the stage: a stage resumed after a failure of ours has several
    # (started_at, ended_at, host, outcome, reason, and the stage's own: iterations, checkpoint).
    segments: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        common = {k: getattr(self, k) for k in _STAGE_KEYS}
        common["outcome"] = self.outcome.value
        return {**self.details, **common}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> StageRecord:
        if not isinstance(data, Mapping):
            raise RecordError(f"{where} is not an object")
        details = {k: v for k, v in data.items() if k not in _STAGE_KEYS}
        outcome = _status(data.get("outcome", Status.FAILED_INFRA.value), f"{where}.outcome")
        wall = data.get("wall_s")
        return cls(outcome=outcome, reason=str(data.get("reason") or ""),
                   returncode=data.get("returncode") if isinstance(data.get("returncode"), int)
                   else None,
                   wall_s=float(wall) if isinstance(wall, int | float) else 0.0,
                   timed_out=bool(data.get("timed_out")), infra=data.get("infra") or None,
                   cancelled=bool(data.get("cancelled")),
                   runner=dict(data.get("runner") or {}), argv=[str(a) for a in
                                                                data.get("argv") or []],
                   stderr_tail=str(data.get("stderr_tail") or ""), details=details,
                   segments=[dict(x) for x in data.get("segments") or [] if isinstance(x, Mapping)])


@dataclass
class AttemptRecord:
    """result.json: one record per attempt, versioned (SCHEMA_VERSION)."""

    attempt_id: str
    origin: Origin
    task: dict[str, str]
    scale: str
    submission: dict[str, Any]
    template_sha256: str
    spliced_sha256: str
    status: Status
    runner: str
    schema_version: int = SCHEMA_VERSION
    harness_version: str = ""
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, str] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    # The pre-flight that cleared the attempt, one line per check (checks.json has the full
    # report). Empty when the caller ran no pre-flight.
    preflight: dict[str, Any] = field(default_factory=dict)
    # The seeds it ran with, by kind (harness.task.SEED_KEYS: "init", "data"); empty in a
    # record written before seeds were recorded (they were the template's 42).
    seeds: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.submission.get("name") or self.attempt_id)

    @property
    def meta(self) -> dict[str, Any]:
        meta = self.submission.get("meta")
        return meta if isinstance(meta, dict) else {}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.value
        out["stages"] = {k: s.to_json() for k, s in self.stages.items()}
        return out

    @classmethod
    def from_json(cls, data: Any) -> AttemptRecord:
        """A record from result.json's parsed content, migrated to SCHEMA_VERSION; RecordError
        names what is wrong with one this harness cannot read."""
        data = migrate(data)
        try:
            known = {f.name for f in fields(cls)}
            body = {k: v for k, v in data.items() if k in known}
            body["status"] = _status(data.get("status"), "status")
            body["origin"] = Origin(**_mapping(data, "origin"))
            body["stages"] = {str(k): StageRecord.from_json(v, f"stages.{k}")
                              for k, v in _mapping(data, "stages").items()}
            for key in ("attempt_id", "scale"):
                if not isinstance(data.get(key), str) or not data[key]:
                    raise RecordError(f"no {key}")
            task = _mapping(data, "task")
            if not isinstance(task.get("name"), str):
                raise RecordError("no task.name")
            body.setdefault("submission", {})
            body.setdefault("template_sha256", "")
            body.setdefault("spliced_sha256", "")
            body.setdefault("runner", "")
            return cls(**body)
        except (TypeError, ValueError) as e:
            if isinstance(e, RecordError):
                raise
            raise RecordError(str(e)) from None


class RecordError(ValueError):
    """A result.json this harness cannot read: the reason, for a board's problem list."""


def _status(value: Any, where: str) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise RecordError(f"{where}: unknown status {value!r}") from None


def _mapping(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise RecordError(f"{key} is not an object")
    return value


# --- migrations --------------------------------------------------------------------------------

# How schema 1 named a session test (harness.session's submission name): reading old records is
# the one place where the origin has to be recovered from a name.
_V1_SESSION_TEST = re.compile(r"^ses-([0-9a-f]+)-t([0-9]+)$")


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 adds `origin`; a v1 record's is recovered from its submission."""
    sub = _dict_or_empty(data.get("submission"))
    meta = _dict_or_empty(sub.get("meta"))
    name = str(sub.get("name") or meta.get("name") or "")
    test = _V1_SESSION_TEST.match(name)
    if sub.get("session") or test:
        session = str(sub.get("session") or f"ses-?-{test.group(1) if test else '?'}")
        origin: dict[str, Any] = {"kind": "session", "session_id": session,
                                  "number": int(test.group(2)) if test else 0}
    elif meta.get("mode") == "baseline":
        origin = {"kind": "baseline"}
    else:
        origin = {"kind": "run"}
    return {**data, "origin": origin, "schema_version": 2}


def _dict_or_empty(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


MIGRATIONS = {1: _v1_to_v2}


def migrate(data: Any) -> dict[str, Any]:
    """Bring a parsed result.json up to SCHEMA_VERSION, one step at a time."""
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or \
            version not in (*MIGRATIONS, SCHEMA_VERSION):
        raise RecordError(f"schema_version {version!r} is not one this harness reads "
                          f"({', '.join(map(str, (*MIGRATIONS, SCHEMA_VERSION)))})")
    out: dict[str, Any] = data
    while version != SCHEMA_VERSION:
        out = MIGRATIONS[version](out)
        version = out["schema_version"]
    return out


def parse_record(raw: bytes) -> AttemptRecord:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise RecordError(f"not valid JSON ({e})") from None
    return AttemptRecord.from_json(data)


# --- the folder ----------------------------------------------------------------------------------


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_attempt_id(name: str, digest: str) -> str:
    """Sortable by time, readable, and unique even for two starts in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "submission"
    return f"{stamp}-{safe}-{digest[:8]}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Attempt:
    """One attempt's folder: its id is its name, chosen once by `create`."""

    root: Path

    @classmethod
    def create(cls, runs_dir: Path, attempt_id: str) -> Attempt:
        """The new, empty folder of attempt_id (from new_attempt_id, or the ledger's row) under
        runs_dir; absolute, since stages run with the attempt as their working directory."""
        root = runs_dir.resolve() / attempt_id
        root.mkdir(parents=True, exist_ok=False)
        return cls(root)

    @property
    def id(self) -> str:
        return self.root.name

    # -- its files --

    def file(self, name: str) -> Path:
        """A file the task names (the spliced template, a frozen copy)."""
        return self.root / name

    @property
    def diff(self) -> Path:
        return self.root / "submission.diff"

    @property
    def regions(self) -> Path:
        return self.root / "submission.json"

    @property
    def checks(self) -> Path:
        return self.root / "checks.json"

    @property
    def cancel_file(self) -> Path:
        return self.root / CANCEL_FILE

    def stage_dir(self, stage: str) -> Path:
        d = self.root / stage
        d.mkdir(exist_ok=True)
        return d

    def manifest(self) -> dict[str, str]:
        """sha256 of every file under the attempt, by relative path (result.json and a
        stage's scratch folder excluded)."""
        out = {}
        record = self._record_path
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and p != record and not p.name.endswith(".tmp") \
                    and SCRATCH not in p.relative_to(self.root).parts:
                out[str(p.relative_to(self.root))] = sha256_file(p)
        return out

    # -- its record --

    @property
    def _record_path(self) -> Path:
        return self.root / RESULT_FILE

    @property
    def record_path(self) -> Path:
        """Where result.json is, for messages and for the board's links; read it with read()."""
        return self._record_path

    def has_record(self) -> bool:
        return self._record_path.is_file()

    def write(self, record: AttemptRecord) -> str:
        """Write result.json atomically; its sha256 (what the ledger keeps)."""
        text = json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(self._record_path, text)
        return sha256_bytes(text.encode("utf-8"))

    def read_bytes(self) -> bytes:
        return self._record_path.read_bytes()

    def read(self) -> AttemptRecord:
        """The record; OSError when there is none, RecordError when it cannot be read."""
        return parse_record(self.read_bytes())

    def record_sha256(self) -> str:
        return sha256_file(self._record_path)

    def close(self, record: AttemptRecord, status: Status, reason: str) -> str:
        """Finish the record: status, reason, finish time and the manifest of every file."""
        record.status, record.reason = status, reason
        record.finished_at = now_iso()
        record.artifacts = self.manifest()
        return self.write(record)

    def close_unfinished(self, status: Status, reason: str) -> str | None:
        """Finish a record left in progress (a crash, a refusal, `harness recover`); a finished
        one stands. The sha256 result.json now has, None when there is no readable record."""
        try:
            record = self.read()
        except (OSError, RecordError):
            return None
        if not record.status.finished:
            return self.close(record, status, reason)
        return self.record_sha256()

