"""Operator views over the ledger: audit (history + re-hash of every recorded file), logs,
and recover (settle attempts whose process died).

Trust chain: the ledger stores the sha256 of each attempt's result.json, and result.json
stores the sha256 of every other file of the attempt. So re-hashing result.json against the
ledger, then each artifact against result.json, finds any file changed or removed since.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from harness.attempt import STAGES
from harness.checks.preflight import STAGE as PREFLIGHT
from harness.errors import UserError
from harness.ledger import (
    AttemptRow,
    Ledger,
    SessionRow,
    Settlement,
)
from harness.record import Attempt, AttemptRecord, RecordError, Status
from harness.runtime.fileio import sha256_file
from harness.runtime.procs import kill_processes_in, owner_state

# Every stage a test can run, in order, the pre-flight first: what logs and recover look for.
TEST_STAGES = (PREFLIGHT, *STAGES)

KILL_WAIT_S = 5.0


# --- audit -----------------------------------------------------------------------------


def verify_attempt(a: AttemptRow, metrics: dict[str, float]) -> tuple[list[str], int]:
    """Problems with an attempt's recorded files, and how many files were re-hashed."""
    if not a.attempt_dir or not a.result_sha256:
        return [], 0  # nothing was recorded to compare against
    attempt = Attempt(Path(a.attempt_dir))
    if not attempt.has_record():
        return [f"result.json vanished (the folder {attempt.root} "
                f"{'exists' if attempt.root.is_dir() else 'is gone too'})"], 1
    problems = []
    now = attempt.record_sha256()
    if now != a.result_sha256:
        problems.append(f"result.json changed (recorded {a.result_sha256[:12]}, now {now[:12]})")
    try:
        record = attempt.read()
    except RecordError as e:
        return [*problems, f"result.json cannot be read: {e}"], 1
    for rel, digest in sorted(record.artifacts.items()):
        path = attempt.root / rel
        if not path.is_file():
            problems.append(f"{rel} vanished")
        elif (got := sha256_file(path)) != digest:
            problems.append(f"{rel} changed (recorded {digest[:12]}, now {got[:12]})")
    if a.state.ranked and record.metrics != metrics:
        problems.append("the metrics in result.json differ from the ledger's")
    return problems, 1 + len(record.artifacts)


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
        logs = [root / s / n for s in TEST_STAGES for n in ("stdout.log", "stderr.log")]
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
        bad = [f"TAMPERED {e.attempt.label} ({e.attempt.id}): {p}"
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
    charge = f"final s{a.seed}" if a.is_final else _charge(a)
    lines = [f"  {a.number:>2}  {a.status:<17}  {charge:<11}  "
             f"{f'{took:.1f}s' if took is not None else '-':>8}  {shown}"]
    if a.refunded:
        lines.append(f"      refund: {a.refund_reason}")
    lines += [f"      check: {f}" for f in e.findings() if not a.state.ranked]
    lines.append(f"      attempt: {a.attempt_dir or a.id}")
    lines += [f"      log: {p}" for p in e.logs()]
    return lines


def audit(ledger: Ledger, ref: str) -> AuditReport:
    """The history of a session (or of the session of one attempt), every file re-hashed."""
    if ledger.has_session(ref):
        # A final submission's runs at its other seeds after the tests: outside the budget.
        session, attempts = ledger.session(ref), [*ledger.attempts(ref), *ledger.finals(ref)]
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
        root = Path(a.attempt_dir)
        ran = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and p.name in TEST_STAGES) if root.is_dir() else []
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
                poll_s: float = 0.5, bar: bool | None = None) -> None:
    """Print a session test's logs and progress as they grow until it is settled."""
    def state() -> tuple[Path | None, bool]:
        row = ledger.attempt(a.id)
        return (Path(row.attempt_dir) if row.attempt_dir else None), row.state.finished
    follow(state, stage, out, poll_s=poll_s, bar=bar)


def follow_attempt(attempt: Attempt, stage: str, out: TextIO, *, poll_s: float = 0.5,
                   bar: bool | None = None) -> None:
    """The same for an attempt outside sessions: until its record says it finished."""
    def state() -> tuple[Path | None, bool]:
        try:
            return attempt.root, attempt.read().status.finished
        except (OSError, RecordError):
            return attempt.root, True
    follow(state, stage, out, poll_s=poll_s, bar=bar)


def follow(state: Callable[[], tuple[Path | None, bool]], stage: str, out: TextIO, *,
           poll_s: float = 0.5, bar: bool | None = None) -> None:
    """Like tail -f on the stage's stdout and stderr, plus its training progress: a progress
    bar (tqdm) on a terminal, a plain `[progress]` line per change otherwise. state() gives
    the attempt's folder (None until it has one) and whether it finished."""
    from harness.progress import attempt_progress

    if bar is None:
        bar = out.isatty()
    offsets: dict[Path, int] = {}
    last: Path | None = None
    shown = None
    pbar: Any = None

    def write(text: str) -> None:
        if pbar is not None:
            pbar.write(text, end="")
        else:
            out.write(text)
            out.flush()

    try:
        while True:
            root, done = state()
            paths = [] if root is None else [root / stage / n for n in ("stdout.log",
                                                                        "stderr.log")]
            for p in paths:
                if _size(p) < offsets.get(p, 0):
                    offsets[p] = 0  # a resumed launch started a new log
                chunk = _read_from(p, offsets.get(p, 0))
                if chunk:
                    if p != last:
                        write(f"\n==> {p} <==\n")
                        last = p
                    write(chunk.decode("utf-8", errors="replace"))
                    offsets[p] = offsets.get(p, 0) + len(chunk)
            now = attempt_progress(root) if root is not None and stage == "pretrain" else None
            if now is not None and now != shown:
                if bar:
                    pbar = _show_bar(pbar, now, out)
                else:
                    write(f"[progress] {now.line()}\n")
                shown = now
            if done:
                return
            time.sleep(poll_s)
    finally:
        if pbar is not None:
            pbar.close()


def _show_bar(pbar: Any, now: Any, out: TextIO) -> Any:
    from tqdm import tqdm

    from harness.progress import clock

    if pbar is None:
        pbar = tqdm(total=now.total, file=out, unit="it", dynamic_ncols=True,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                               "{postfix}", desc="pretrain")
    pbar.n = now.iter
    extra = {"elapsed": clock(now.elapsed_s)} if now.elapsed_s is not None else {}
    if now.eta_s is not None:
        extra["ETA"] = clock(now.eta_s)
    pbar.set_postfix({**extra, **now.fields()}, refresh=False)
    pbar.refresh()
    return pbar


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


# --- cancel --------------------------------------------------------------------------------


def request_cancel(ref: str, *, home: Path | None = None) -> str:
    """Touch the cancel marker of a running attempt (its folder, or a session test by id or
    SESSION:N); the process running it stops the stage (any runner: its poll loop watches the
    marker) and settles it as cancelled. When that process is gone (its harness died), nothing
    would ever read the marker: the attempt is settled now, as `harness recover` settles it
    (its container or Slurm job stopped, ours, refunded). What was done, in a line."""
    attempt = Attempt(Path(ref))
    row: AttemptRow | None = None
    if not attempt.has_record():
        with Ledger(home, create=False) as ledger:
            row = ledger.find_attempt(ref)
        if not row.in_progress or not row.attempt_dir:
            raise UserError(f"attempt {row.id} is {row.status}: nothing to cancel", where=ref)
        attempt = Attempt(Path(row.attempt_dir))
    try:
        status = attempt.read().status
    except (OSError, RecordError) as e:
        raise UserError(f"its result.json cannot be read: {e}", where=str(attempt.root),
                        fix="`harness recover` settles an attempt whose record is broken") \
            from None
    if status.finished:
        raise UserError(f"the attempt is {status}: nothing to cancel", where=str(attempt.root))
    attempt.cancel_file.touch()
    orphaned = _recover_orphan(row.id if row else attempt.root.name, home)
    if orphaned is not None:
        return f"its harness had died, so nothing would see the request: {orphaned.render()}"
    return f"cancel requested: {attempt.root}"


def _recover_orphan(attempt_id: str, home: Path | None) -> Recovered | None:
    """Settle one attempt whose owner process is gone; None when it has an owner alive, or
    no ledger row (a plain `harness run` folder: its owner is the terminal that runs it)."""
    try:
        with Ledger(home, create=False) as ledger:
            found = recover(ledger, only=attempt_id)
    except UserError:
        return None
    settled = [r for r in found if r.action == "settled"]
    return settled[0] if settled else None


# --- recover ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovered:
    attempt: AttemptRow
    action: str  # "settled" | "alive" | "elsewhere"
    killed: tuple[int, ...] = ()
    status: Status = Status.FAILED_INFRA  # how it was settled
    # What its runner left behind, stopped: Slurm job ids, docker container names.
    stopped: tuple[str, ...] = ()

    def render(self) -> str:
        a = self.attempt
        who = f"{a.label} of {a.session_id} ({a.id}), {a.status}, pid {a.pid} on {a.host}"
        if self.action == "alive":
            return f"left alone: {who}: its process is alive"
        if self.action == "elsewhere":
            return f"left alone: {who}: another host; run `harness recover` there"
        refund = ", refunded" if a.charged and self.status.refundable else ""
        kept = " (its final record was written)" if self.status is not Status.FAILED_INFRA \
            else ""
        killed = (f"; killed {len(self.killed)} orphaned stage process(es)"
                  if self.killed else "")
        stopped = f"; stopped {', '.join(self.stopped)}" if self.stopped else ""
        return f"settled: {who}: {self.status}{kept}{refund}{killed}{stopped}"


def attempt_folder(ledger: Ledger, a: AttemptRow) -> Attempt | None:
    """The folder of an attempt: the row's id names it (record.Attempt), whether or not its
    harness lived to record it in the ledger. None when there is none."""
    root = Path(a.attempt_dir) if a.attempt_dir else ledger.runs_dir / a.id
    return Attempt(root) if root.is_dir() else None


def _final_record(attempt: Attempt) -> AttemptRecord | None:
    try:
        record = attempt.read()
    except (OSError, RecordError):
        return None
    return record if record.status.finished else None


def _settlement(attempt: Attempt | None, reason: str) -> Settlement:
    """How recover settles an attempt whose harness died: failed_infra, its result.json
    completed; but a final record the harness wrote before it died (it had settled everything
    but the ledger) stands, and the ledger takes it."""
    record = _final_record(attempt) if attempt is not None else None
    if attempt is not None and record is not None:
        return Settlement(record.status, record.reason,
                          metrics=record.metrics if record.status.ranked else {},
                          attempt_dir=str(attempt.root), result_sha256=attempt.record_sha256())
    sha = attempt.close_unfinished(Status.FAILED_INFRA, reason) if attempt else None
    return Settlement(Status.FAILED_INFRA, reason,
                      attempt_dir=str(attempt.root) if attempt else None, result_sha256=sha)


def recover(ledger: Ledger, *, only: str | None = None) -> list[Recovered]:
    """Settle every in-progress attempt whose owner process is gone (see _settlement);
    only: that attempt id alone."""
    out = []
    for a in ledger.in_progress():
        if only is not None and a.id != only:
            continue
        state = owner_state(a.pid, a.host, a.start_token)
        if state != "gone":
            out.append(Recovered(a, state))
            continue
        attempt = attempt_folder(ledger, a)
        # Its runner's jobs first (scancel lets Slurm end them as it should, wherever they
        # run), then whatever of it still runs on this host.
        stopped = stop_leftovers(a)
        killed = kill_processes_in(attempt.root, KILL_WAIT_S) if attempt else ()
        reason = (f"the harness process (pid {a.pid} on {a.host}) ended while the attempt was "
                  f"{a.status}; settled by `harness recover`")
        settlement = _settlement(attempt, reason)
        try:
            ledger.finish(a.id, settlement)
        except UserError:
            continue  # another recover settled it first
        out.append(Recovered(a, "settled", killed, settlement.status, stopped))
    return out


def stop_leftovers(a: AttemptRow) -> tuple[str, ...]:
    """What the dead harness's runner left running outside this host's process table: its
    Slurm jobs (scancel) or docker containers (removed), found by the names the runner gave
    them (`harness-<attempt id>-<stage>`, the pre-flight's too)."""
    if a.runner == "slurm":
        from harness.runners.slurm import cancel_leftover_jobs

        return tuple(f"Slurm job {j}" for j in cancel_leftover_jobs(a.id, TEST_STAGES))
    if a.runner == "docker":
        from harness.runners.config import load_config
        from harness.runners.docker import remove_leftover_containers

        return tuple(f"container {c}" for c in
                     remove_leftover_containers(a.id, load_config().docker))
    return ()
