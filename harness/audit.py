"""Operator views over the ledger: audit (history + re-hash of every recorded file), logs,
and recover (settle attempts whose process died).

Trust chain: the ledger stores the sha256 of each attempt's result.json, and result.json
stores the sha256 of every other file of the attempt. So re-hashing result.json against the
ledger, then each artifact against result.json, finds any file changed or removed since.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from harness.errors import UserError
from harness.ledger import (
    FINISHED,
    REFUNDABLE,
    AttemptRow,
    Ledger,
    SessionRow,
    Settlement,
    now_iso,
    owner_state,
)
from harness.paths import AttemptPaths, atomic_write_json, sha256_file

STAGES = ("pretrain", "lm-eval")
KILL_WAIT_S = 5.0


# --- result.json of an attempt that ended abnormally ---------------------------------


def close_record(root: Path, status: str, reason: str) -> str | None:
    """Complete a result.json left `running` (crash, refusal); the sha256 it now has."""
    path = root / "result.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("status") == "running":
        data.update(status=status, reason=reason, finished_at=now_iso(),
                    artifacts=AttemptPaths(root).manifest())
        atomic_write_json(path, data)
    return sha256_file(path)


# --- audit -----------------------------------------------------------------------------


def verify_attempt(a: AttemptRow, metrics: dict[str, float]) -> tuple[list[str], int]:
    """Problems with an attempt's recorded files, and how many files were re-hashed."""
    if not a.attempt_dir or not a.result_sha256:
        return [], 0  # nothing was recorded to compare against
    root = Path(a.attempt_dir)
    result = root / "result.json"
    if not result.is_file():
        return [f"result.json vanished (the folder {root} "
                f"{'exists' if root.is_dir() else 'is gone too'})"], 1
    problems = []
    now = sha256_file(result)
    if now != a.result_sha256:
        problems.append(f"result.json changed (recorded {a.result_sha256[:12]}, now {now[:12]})")
    try:
        data = json.loads(result.read_text(encoding="utf-8"))
    except ValueError:
        return [*problems, "result.json is not valid JSON"], 1
    artifacts: dict[str, str] = data.get("artifacts") or {}
    for rel, digest in sorted(artifacts.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} vanished")
        elif (got := sha256_file(path)) != digest:
            problems.append(f"{rel} changed (recorded {digest[:12]}, now {got[:12]})")
    if a.status == "succeeded" and (data.get("metrics") or {}) != metrics:
        problems.append("the metrics in result.json differ from the ledger's")
    return problems, 1 + len(artifacts)


@dataclass
class AuditEntry:
    attempt: AttemptRow
    metrics: dict[str, float]
    problems: list[str]
    files: int

    def findings(self) -> list[str]:
        report = json.loads(self.attempt.check_report or "{}")
        found = [f"{f['rule']} {f['line']}:{f['col']} {f['message']}"
                 for f in report.get("findings", [])]
        return found or ([report["error"]] if report.get("error") else [])

    def logs(self) -> list[str]:
        """The stage logs; for a test no stage ran for, its checks.json instead."""
        if not self.attempt.attempt_dir:
            return []
        root = Path(self.attempt.attempt_dir)
        logs = [root / s / n for s in STAGES for n in ("stdout.log", "stderr.log")]
        found = [p for p in logs if p.exists()] or [root / "checks.json"]
        return [str(p) for p in found if p.exists()]


@dataclass
class AuditReport:
    session: SessionRow
    submitted: AttemptRow | None
    used: int
    entries: list[AuditEntry]
    ledger_problems: list[str] = field(default_factory=list)

    @property
    def tampered(self) -> bool:
        return bool(self.ledger_problems) or any(e.problems for e in self.entries)

    def as_json(self) -> dict[str, Any]:
        return {
            "session": self.session.__dict__, "used": self.used,
            "submitted": self.submitted.number if self.submitted else None,
            "attempts": [{**e.attempt.__dict__, "metrics": e.metrics, "problems": e.problems,
                          "checks": e.findings(), "logs": e.logs(),
                          "duration_s": e.attempt.duration_s()} for e in self.entries],
            "ledger_problems": self.ledger_problems, "tampered": self.tampered,
        }

    def text(self) -> str:
        s = self.session
        lines = [f"Session {s.id}: task {s.task} {s.task_version}, scale {s.scale}, agent "
                 f"{s.agent} (mode {s.mode}{', model ' + s.model if s.model else ''})",
                 f"Budget: {self.used} of {s.budget} used; submitted: " +
                 (f"test #{self.submitted.number} ({self.submitted.id})" if self.submitted
                  else "nothing"),
                 f"  {'#':>2}  {'status':<17}  {'charge':<11}  {'duration':>8}  result"]
        for e in self.entries:
            lines += _entry_lines(e)
        return "\n".join([*lines, *self._summary()])

    def _summary(self) -> list[str]:
        files = sum(e.files for e in self.entries)
        bad = [f"TAMPERED #{e.attempt.number} ({e.attempt.id}): {p}"
               for e in self.entries for p in e.problems]
        bad += [f"LEDGER: {p}" for p in self.ledger_problems]
        if not bad:
            return [f"Integrity: OK ({files} recorded file(s) re-hashed; ledger consistent)"]
        return [*bad, f"Integrity: {len(bad)} problem(s) ({files} recorded file(s) re-hashed)"]


def _charge(a: AttemptRow) -> str:
    return "refunded" if a.refunded else "charged" if a.charged else "not charged"


def _entry_lines(e: AuditEntry) -> list[str]:
    a = e.attempt
    took = a.duration_s()
    shown = ", ".join(f"{k}={v:.4f}" for k, v in e.metrics.items()) or a.reason or ""
    lines = [f"  {a.number:>2}  {a.status:<17}  {_charge(a):<11}  "
             f"{f'{took:.1f}s' if took is not None else '-':>8}  {shown}"]
    if a.refunded:
        lines.append(f"      refund: {a.refund_reason}")
    lines += [f"      check: {f}" for f in e.findings() if a.status != "succeeded"]
    lines.append(f"      attempt: {a.attempt_dir or a.id}")
    lines += [f"      log: {p}" for p in e.logs()]
    return lines


def audit(ledger: Ledger, ref: str) -> AuditReport:
    """The history of a session (or of the session of one attempt), every file re-hashed."""
    if ledger.has_session(ref):
        session, attempts = ledger.session(ref), ledger.attempts(ref)
    else:
        one = ledger.find_attempt(ref)
        session, attempts = ledger.session(one.session_id), [one]
    entries = []
    for a in attempts:
        metrics = ledger.results(a.id)
        problems, files = verify_attempt(a, metrics)
        entries.append(AuditEntry(a, metrics, problems, files))
    return AuditReport(session, ledger.submission(session.id), ledger.used(session.id),
                       entries, ledger.integrity_check())


# --- logs ------------------------------------------------------------------------------


def stage_log_paths(a: AttemptRow, stage: str) -> list[Path]:
    if not a.attempt_dir:
        raise UserError(f"test #{a.number} has no folder yet (it is {a.status})",
                        where=a.id, fix="wait until its stage starts, or use --follow")
    stage_dir = Path(a.attempt_dir) / stage
    if not stage_dir.is_dir():
        ran = sorted(p.name for p in Path(a.attempt_dir).iterdir()
                     if p.is_dir() and p.name in STAGES) if Path(a.attempt_dir).is_dir() else []
        raise UserError(f"test #{a.number} ran no {stage} stage", where=a.attempt_dir,
                        fix=f"stages it ran: {', '.join(ran)}" if ran else
                        "it ran no stage at all (see checks.json in its folder)")
    return [stage_dir / "stdout.log", stage_dir / "stderr.log"]


def print_logs(paths: list[Path], out: TextIO) -> None:
    for p in paths:
        out.write(f"==> {p} <==\n")
        text = p.read_text(encoding="utf-8", errors="replace") if p.exists() else "(missing)\n"
        out.write(text if text.endswith("\n") or not text else text + "\n")


def follow_logs(ledger: Ledger, a: AttemptRow, stage: str, out: TextIO, *,
                poll_s: float = 0.5) -> None:
    """Print the logs as they grow until the attempt is settled (like tail -f)."""
    offsets: dict[Path, int] = {}
    last: Path | None = None
    while True:
        # By session and number: an attempt takes its final id when its stage starts.
        a = next(x for x in ledger.attempts(a.session_id) if x.number == a.number)
        done = a.status in FINISHED
        paths = [] if not a.attempt_dir else [Path(a.attempt_dir) / stage / n
                                               for n in ("stdout.log", "stderr.log")]
        for p in paths:
            chunk = _read_from(p, offsets.get(p, 0))
            if chunk:
                if p != last:
                    out.write(f"\n==> {p} <==\n")
                    last = p
                out.write(chunk.decode("utf-8", errors="replace"))
                out.flush()
                offsets[p] = offsets.get(p, 0) + len(chunk)
        if done:
            return
        time.sleep(poll_s)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


# --- recover ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovered:
    attempt: AttemptRow
    action: str  # "settled" | "alive" | "elsewhere"
    killed: tuple[int, ...] = ()
    status: str = "failed_infra"  # how it was settled

    def render(self) -> str:
        a = self.attempt
        who = f"test #{a.number} of {a.session_id} ({a.id}), {a.status}, pid {a.pid} on {a.host}"
        if self.action == "alive":
            return f"left alone: {who}: its process is alive"
        if self.action == "elsewhere":
            return f"left alone: {who}: another host; run `harness recover` there"
        refund = ", refunded" if a.charged and self.status in REFUNDABLE else ""
        kept = " (its final record was written)" if self.status != "failed_infra" else ""
        killed = (f"; killed {len(self.killed)} orphaned stage process(es)"
                  if self.killed else "")
        return f"settled: {who}: {self.status}{kept}{refund}{killed}"


def stage_processes(root: Path) -> list[int]:
    """Our processes working in an attempt folder: a stage outlives a killed harness."""
    target = str(root.resolve())
    proc = Path("/proc")
    found = []
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid == os.getuid() and os.readlink(entry / "cwd") == target:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_stage_processes(root: Path, wait_s: float = KILL_WAIT_S) -> tuple[int, ...]:
    """SIGKILL them until none is left (one may have been forking as the first round came)."""
    killed: list[int] = []
    deadline = time.monotonic() + wait_s
    while (pids := stage_processes(root)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.05)
    return tuple(killed)


def _record(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def attempt_folder(ledger: Ledger, a: AttemptRow) -> Path | None:
    """The folder of an attempt, also when its harness died before the ledger learnt it (the
    ledger records it at the charge): a test refused by the checks has the row's id as its
    name; a test's stage folder embeds the test's name. None when there is none."""
    if a.attempt_dir:
        return Path(a.attempt_dir)
    runs = ledger.runs_dir
    if (runs / a.id).is_dir():
        return runs / a.id
    from harness.session import test_name

    known = {r[0] for r in ledger.conn.execute(
        "SELECT attempt_dir FROM attempts WHERE attempt_dir IS NOT NULL")}
    tag = f"-{test_name(a.session_id, a.number)}-"
    found = [p for p in runs.iterdir() if p.is_dir() and tag in p.name
             and str(p) not in known] if runs.is_dir() else []
    return found[0] if len(found) == 1 else None


def _settlement(root: Path | None, reason: str) -> Settlement:
    """How recover settles an attempt whose harness died: failed_infra, its result.json
    completed; but a final record the harness wrote before it died (it had settled everything
    but the ledger) stands, and the ledger takes it."""
    record = _record(root) if root else None
    if root is not None and record is not None and record.get("status") in FINISHED:
        status = str(record["status"])
        metrics = record.get("metrics") if status == "succeeded" else None
        return Settlement(status, str(record.get("reason") or ""),
                          metrics={k: float(v) for k, v in metrics.items()
                                   if isinstance(v, int | float)}
                          if isinstance(metrics, dict) else {},
                          attempt_dir=str(root), result_sha256=sha256_file(root / "result.json"))
    sha = close_record(root, "failed_infra", reason) if root else None
    return Settlement("failed_infra", reason, attempt_dir=str(root) if root else None,
                      result_sha256=sha)


def recover(ledger: Ledger) -> list[Recovered]:
    """Settle every in-progress attempt whose owner process is gone (see _settlement)."""
    out = []
    for a in ledger.in_progress():
        state = owner_state(a.pid, a.host, a.start_token)
        if state != "gone":
            out.append(Recovered(a, state))
            continue
        root = attempt_folder(ledger, a)
        killed = kill_stage_processes(root) if root else ()
        reason = (f"the harness process (pid {a.pid} on {a.host}) ended while the attempt was "
                  f"{a.status}; settled by `harness recover`")
        settlement = _settlement(root, reason)
        try:
            ledger.finish(a.id, settlement)
        except UserError:
            continue  # another recover settled it first
        out.append(Recovered(a, "settled", killed, settlement.status))
    return out
