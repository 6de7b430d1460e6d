"""The agent API: one session is one agent's edits, tests and final submission on one task.

Every call may be a new process (a CLI call, a stdio server request): the session's state
lives in the ledger. The editable file is the task template plus the session's recorded edit
ops, replayed on open; tests, charges and the submission are ledger rows.

Budget rules (docs/sessions.md):
  * a test is refused before anything runs when the budget is used up;
  * static checks (and any pre-flight inside `prepare`) are free: a refusal there is recorded
    as failed_submission with charged = 0;
  * a test is charged when its pretrain stage starts, in a transaction that first checks the
    budget again;
  * a failure on our side (failed_infra) or an interruption (cancelled) refunds the charge;
    the submission's own failure (exception, NaN, time limit) stays charged;
  * submit(n) takes one finished, succeeded test of the session, once; the session is then
    closed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.attempt import (
    Prepared,
    data_root,
    new_record,
    preflight_or_refuse,
    prepare,
    resume_attempt,
    run_attempt,
    stages_of,
    submission_info,
)
from harness.errors import EXIT_INFRA, CheckFailed, InfraError, UserError
from harness.leaderboard.stats import seeds_line
from harness.ledger import (
    MODES,
    AttemptRow,
    Ledger,
    NoTestsLeft,
    SessionRow,
    Settlement,
    current_owner,
    now_iso,
)
from harness.progress import attempt_progress
from harness.record import Attempt, AttemptRecord, Origin, Status, new_attempt_id
from harness.regions import EditSession, unified_diff
from harness.runners.base import Runner
from harness.runtime.fileio import atomic_write_text, sha256_bytes
from harness.runtime.layout import text_to_lines
from harness.runtime.preflight import PreflightReport
from harness.stages import pretrain
from harness.task import DEFAULT_TASK, MAX_SEEDS, ScaleSpec, TaskSpec, load_task

SUCCEEDED = Status.SUCCEEDED.value
SUBMIT_HINT = "call submit(n=N) to choose which test result to submit as final"
LAST_TEST_NOTE = ("[NOTE] This was your last test. You MUST now call submit(n=X) to choose which "
                  "test result to submit as your final answer.")
CURVE_ROWS = 5  # TRAIN_METRICS lines shown per test, as in the transcript
TRACEBACK_LINES = 20
EXCERPT_LINES = 24  # longer views after an edit are elided in the middle


@dataclass(frozen=True)
class TestReport:
    __test__ = False  # not a pytest test class, despite its name

    number: int
    attempt_id: str
    status: str
    charged: bool
    refunded: bool
    free: bool  # refused by the checks before anything ran
    message: str


class Session:
    """view / replace / undo / test / submit / status on one session of the ledger."""

    def __init__(self, ledger: Ledger, row: SessionRow, *, runner: Runner | None = None,
                 data_dir: Path | None = None) -> None:
        self.ledger = ledger
        self.row = row
        self.task = _load_session_task(row)
        self.runner = runner
        self.data_dir = data_root(data_dir, home=ledger.home)
        self.filename = Path(self.task.template).name
        self._edits, self._seq = self._replay()

    # -- opening --

    @classmethod
    def create(cls, *, agent: str, task: str | Path = DEFAULT_TASK, scale: str | None = None,
               mode: str = "agent", model: str | None = None, budget: int | None = None,
               preflight: bool = True, home: Path | str | None = None,
               runner: Runner | None = None, data_dir: Path | None = None) -> Session:
        spec = load_task(task)
        scale_name = scale or spec.default_scale
        # An unknown scale, or a task its stages cannot run, is refused now, not at a test.
        stages_of(spec, spec.scale(scale_name))
        _check_start_args(agent, mode, budget)
        ledger = Ledger(home)
        row = SessionRow(
            id=new_session_id(), task=spec.name, task_version=spec.version,
            task_root=str(spec.root), template_sha256=sha256_bytes(spec.template_text().encode()),
            scale=scale_name, agent=agent, mode=mode, model=model, created_at=now_iso(),
            budget=spec.test_budget if budget is None else budget, preflight=preflight)
        try:
            ledger.create_session(row)
            return cls(ledger, row, runner=runner, data_dir=data_dir)
        except BaseException:
            ledger.close()
            raise

    @classmethod
    def open(cls, session_id: str, *, home: Path | str | None = None,
             runner: Runner | None = None, data_dir: Path | None = None) -> Session:
        ledger = Ledger(home, create=False)
        try:
            return cls(ledger, ledger.session(session_id), runner=runner, data_dir=data_dir)
        except BaseException:
            ledger.close()
            raise

    @property
    def id(self) -> str:
        return self.row.id

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replay(self) -> tuple[EditSession, int]:
        edits = EditSession(self.task.template_text(), filename=self.filename)
        ops = self.ledger.edits(self.id)
        edits.apply_log([op.as_log() for op in ops], where=f"session {self.id} edit history")
        return edits, len(ops)

    # -- the editable file --

    def view(self, path: str | None = None, start: int | None = None,
             end: int | None = None) -> str:
        name = self._resolve(path, editable=False)
        if name == self.filename:
            return self._edits.view(start, end)
        return _view_read_only(self.task.root / name, name, start, end)

    def replace(self, path: str | None, start_line: int, end_line: int, content: str) -> str:
        self._resolve(path, editable=True)
        self._require_open()
        done = self._edits.replace(start_line, end_line, content)
        self._record({"op": "replace", "start_line": start_line, "end_line": end_line,
                      "content": content})
        shown = len(text_to_lines(content))
        return f"{done}\n{self._excerpt(start_line, start_line + max(shown, 1) - 1)}"

    def undo(self, n: int = 1) -> str:
        self._require_open()
        done = self._edits.undo(n)
        self._record({"op": "undo", "n": n})
        return done

    def _record(self, op: dict[str, Any]) -> None:
        try:
            self.ledger.append_edit(self.id, self._seq, op)
        except BaseException:
            # The op is not in the ledger: drop it here too, so memory matches the record.
            self._edits, self._seq = self._replay()
            raise
        self._seq += 1

    def _resolve(self, path: str | None, *, editable: bool) -> str:
        """The file a call names: the template by default; a path may carry directories."""
        if path is None or Path(path).name == self.filename:
            return self.filename
        name = Path(path).name
        if name in self.task.frozen_files:
            if editable:
                raise UserError(f"{path} is read-only", where=f"session {self.id}",
                                fix=f"only {self.filename} has editable regions")
            return name
        raise UserError(f"no file {path!r} in this task", where=f"session {self.id}",
                        fix=f"files: {', '.join(self.task.frozen_files)}")

    def _excerpt(self, first: int, last: int) -> str:
        """The view around an edit, elided in the middle when long."""
        total = len(self._edits.layout.lines())
        lines = self._edits.view(max(1, first - 3), max(1, min(total, last + 3))).split("\n")
        body = lines[1:]
        if len(body) > EXCERPT_LINES:
            head, tail = body[:12], body[-6:]
            body = [*head, f"... ({len(body) - 18} more lines) ...", *tail]
        return "\n".join([lines[0], *body])

    # -- tests --

    def test(self) -> str:
        return self.run_test().message

    def run_test(self) -> TestReport:
        """One test of the current file: checks (free), then training (charged at its start)."""
        self._require_open()
        row = self.ledger.new_attempt(self.id, current_owner(), self._attempt_id)
        state = _Progress(row.id)
        try:
            # The folder takes the row's id, once: the ledger and runs/ name it alike.
            state.attempt = Attempt.create(self.ledger.runs_dir, row.id)
            return self._run(row, state.attempt, state)
        except BaseException as e:
            self._settle_crash(state, e)
            raise

    def _attempt_id(self, number: int) -> str:
        digest = sha256_bytes(json.dumps(self._edits.regions(), sort_keys=True).encode())
        return new_attempt_id(test_name(self.id, number), digest)

    def _origin(self, number: int) -> Origin:
        return Origin("session", session_id=self.id, number=number)

    def _run(self, row: AttemptRow, attempt: Attempt, state: _Progress) -> TestReport:
        scale = self.task.scale(self.row.scale)
        snapshot = self._write_snapshot(row.number)
        runner = self.runner or configured_runner()
        # The runner is known from here: the pre-flight is the test's first stage, and
        # `harness recover` looks for a dead harness's containers or jobs by it.
        self.ledger.set_status(row.id, Status.CHECKING, attempt_dir=str(attempt.root),
                               runner=runner.name)
        try:
            prepared = prepare(snapshot, self.task)
            checks = self._preflight(prepared, runner, row, attempt)
        except UserError as e:
            return self._refused_by_checks(row, attempt, e)
        except InfraError:
            if attempt.cancel_file.exists():
                return self._cancelled_in_checks(row, attempt)
            raise
        if runner.name == "local":
            from harness.runners.local import warn_not_a_sandbox

            warn_not_a_sandbox()
        self.ledger.set_status(
            row.id, Status.RUNNING, started_at=now_iso(), runner=runner.name,
            spliced_sha256=sha256_bytes(prepared.spliced.encode()), region_diff=prepared.diff,
            check_report=json.dumps({"ok": True, "findings": [], "preflight":
                                     checks.to_dict() if checks is not None else None}))
        record = run_attempt(prepared, self.task, scale, attempt=attempt,
                             origin=self._origin(row.number), data=self.data_dir, runner=runner,
                             on_event=self._charge_hook(row.id), checks=checks)
        settled = self.ledger.finish(row.id, Settlement(
            status=record.status, reason=record.reason, metrics=record.metrics,
            attempt_dir=str(attempt.root), result_sha256=attempt.record_sha256(),
            gpu_seconds=_gpu_seconds(record, scale.device, scale.nproc_per_node)))
        state.settled = True
        return self._report(settled, record, attempt.root)

    def resume_test(self, attempt_id: str) -> TestReport:
        """Continue this session's test stopped by a failure of ours from its last checkpoint
        (`harness resume`): the same test, re-verified, charged again for the refund its stop
        gave (so charged once in all), settled like any test. UserError, with nothing
        changed, when it cannot be resumed."""
        self._require_open()
        row = self.ledger.attempt(attempt_id)
        if row.session_id != self.id or not row.attempt_dir:
            raise UserError(f"attempt {attempt_id} is not a test of session {self.id} with a "
                            f"folder", where=attempt_id)
        attempt = Attempt(Path(row.attempt_dir))
        runner = self.runner or configured_runner()
        state = _Progress(row.id, attempt)
        reopened = False

        def reopen(_record: AttemptRecord) -> None:
            nonlocal reopened
            self.ledger.reopen(row.id, current_owner())
            reopened = True

        try:
            record = resume_attempt(attempt, self.task, data=self.data_dir, runner=runner,
                                    on_event=self._charge_hook(row.id), before_start=reopen)
        except BaseException as e:
            if reopened:
                self._settle_crash(state, e)
            raise
        settled = self.ledger.finish(row.id, Settlement(
            status=record.status, reason=record.reason, metrics=record.metrics,
            attempt_dir=str(attempt.root), result_sha256=attempt.record_sha256(),
            gpu_seconds=_gpu_seconds(record, self.task.scale(self.row.scale).device,
                                     self.task.scale(self.row.scale).nproc_per_node)))
        state.settled = True
        return self._report(settled, record, attempt.root)

    def _preflight(self, prepared: Prepared, runner: Runner, row: AttemptRow,
                   attempt: Attempt) -> PreflightReport | None:
        """The pre-flight report, run here rather than in run_attempt so that its refusal is
        told apart from other errors and recorded as free; None when the session skips it.

        It runs the submission's code, so the test's record exists first (`checking`): a
        harness that dies meanwhile leaves one that `harness recover` closes, and the
        pre-flight runs in the test's folder under its id, where recover finds it."""
        if not self.row.preflight:
            return None
        attempt.write(new_record(attempt, self._origin(row.number), self.task,
                                 self.task.scale(self.row.scale), spliced=prepared.spliced,
                                 submission=submission_info(prepared.submission),
                                 runner=runner.name,
                                 status=Status.CHECKING, started_at=row.created_at))
        try:
            return preflight_or_refuse(prepared, self.task, runner, attempt=attempt)
        except UserError as e:
            raise UserError(e.what, where=e.where, details=e.details,
                            fix="fix the submission; pre-flight is free, so this test was not "
                                "charged") from None

    def _cancelled_in_checks(self, row: AttemptRow, attempt: Attempt) -> TestReport:
        """`harness cancel` stopped the pre-flight: cancelled, free, its record closed."""
        reason = "cancelled during the pre-flight (harness cancel)"
        sha = attempt.close_unfinished(Status.CANCELLED, reason)
        settled = self.ledger.finish(row.id, Settlement(
            status=Status.CANCELLED, reason=reason, attempt_dir=str(attempt.root),
            result_sha256=sha))
        message = "\n".join([self._header(settled.number),
                             "[NOT CHARGED] This test was cancelled during its pre-flight "
                             "checks; it did not use your budget."])
        return TestReport(settled.number, settled.id, settled.status, False, False, False,
                          message)

    def check(self, static_only: bool = False) -> str:
        """`harness check` on the current file, recording nothing: splice and static checks,
        then the pre-flight unless `static_only` (asked for, it runs even in a session whose
        tests skip it: it is free either way). UserError when they refuse the file;
        InfraError when the pre-flight could not run."""
        import tempfile

        regions = self._edits.regions()
        with tempfile.TemporaryDirectory(prefix="harness-check-") as tmp:
            for spec in self.task.regions:
                if spec.id in regions:
                    atomic_write_text(Path(tmp) / spec.submission_file, regions[spec.id])
            try:
                prepared = prepare(Path(tmp), self.task)
                report = None if static_only else preflight_or_refuse(
                    prepared, self.task, self.runner or configured_runner(),
                    work_root=self.ledger.runs_dir)
            except UserError as e:  # named by the session: the temporary folder is gone
                raise UserError(e.what, where=f"session {self.id}", details=e.details,
                                fix=e.fix or "fix the file; checks are free") from None
        return "\n".join(["OK: the static checks pass.",
                          report.render() if report else "Pre-flight: not run (static_only).",
                          "Free: nothing was recorded and no test was used."])

    def _charge_hook(self, attempt_id: str) -> Callable[[str, dict[str, Any]], None]:
        def hook(kind: str, info: dict[str, Any]) -> None:
            if kind == "stage_start" and info["stage"] == pretrain.STAGE:
                # Raises (and so stops the launch) when the budget is used up.
                self.ledger.charge(attempt_id)
        return hook

    def _settle_crash(self, state: _Progress, error: BaseException) -> None:
        """An exception left the attempt unsettled: settle it so no row stays in progress."""
        if state.settled:
            return
        # Not an Exception (Ctrl-C, SIGTERM via the CLI, SystemExit): someone stopped it.
        status = Status.FAILED_INFRA if isinstance(error, Exception) else Status.CANCELLED
        said = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {said[0]}" if said else type(error).__name__
        if isinstance(error, NoTestsLeft):  # the charge re-checks the budget: nothing ran
            status, reason = Status.CANCELLED, "refused at stage start: no tests remaining"
        attempt = state.attempt
        sha = attempt.close_unfinished(status, reason) if attempt is not None else None
        with contextlib.suppress(UserError):  # settled by another process: its record stands
            self.ledger.finish(state.attempt_id, Settlement(
                status=status, reason=reason,
                attempt_dir=str(attempt.root) if attempt is not None else None,
                result_sha256=sha))

    def _write_snapshot(self, number: int) -> Path:
        """The file as tested, as a submission directory (region files + meta.toml)."""
        snap = self.ledger.sessions_dir / self.id / "tests" / str(number)
        snap.mkdir(parents=True, exist_ok=True)
        regions = self._edits.regions()
        for spec in self.task.regions:
            if spec.id in regions:
                atomic_write_text(snap / spec.submission_file, regions[spec.id])
        meta = {"name": test_name(self.id, number), "agent": self.row.agent,
                "mode": self.row.mode, "model": self.row.model or ""}
        atomic_write_text(snap / "meta.toml", "[submission]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in meta.items()))
        return snap

    def _refused_by_checks(self, row: AttemptRow, attempt: Attempt,
                           error: UserError) -> TestReport:
        """Checks refused the file: free. The attempt still gets a folder and a result.json."""
        spliced = self._edits.text()
        diff = unified_diff(self.task.template_text(), spliced)
        report = {"ok": False, "error": error.what, "details": error.details,
                  "findings": [f.__dict__ for f in error.findings]
                  if isinstance(error, CheckFailed) else []}
        reason = f"refused by the checks: {error.what}"
        sha = self._write_refusal(row, attempt, spliced, diff, report, reason)
        settled = self.ledger.finish(row.id, Settlement(
            status=Status.FAILED_SUBMISSION, reason=reason, attempt_dir=str(attempt.root),
            result_sha256=sha, spliced_sha256=sha256_bytes(spliced.encode()),
            region_diff=diff, check_report=json.dumps(report)))
        body = UserError(error.what, fix=error.fix, details=error.details).render()
        message = "\n".join([
            self._header(settled.number),
            "[NOT CHARGED] The checks refused this file before anything ran; this test did "
            "not use your budget.",
            "### checks", body])
        return TestReport(settled.number, settled.id, settled.status, False, False, True,
                          message)

    def _write_refusal(self, row: AttemptRow, attempt: Attempt, spliced: str, diff: str,
                       report: dict[str, Any], reason: str) -> str:
        """A refused test's folder, like any attempt's, so that audit can verify it; the
        sha256 of its result.json."""
        from harness.runtime.fileio import atomic_write_json

        name = test_name(self.id, row.number)
        atomic_write_json(attempt.checks, report)
        atomic_write_text(attempt.file(self.task.template), spliced)
        atomic_write_text(attempt.diff, diff)
        atomic_write_json(attempt.regions, {"kind": "directory", "meta": {"name": name},
                                            "regions": self._edits.regions()})
        record = new_record(attempt, self._origin(row.number), self.task,
                            self.task.scale(self.row.scale), spliced=spliced,
                            submission={"name": name, "kind": "directory", "session": self.id},
                            runner="none", started_at=row.created_at)
        return attempt.close(record, Status.FAILED_SUBMISSION, reason)

    def _report(self, a: AttemptRow, result: AttemptRecord, root: Path) -> TestReport:
        lines = [self._header(a.number)]
        if a.refunded:
            lines.append(f"[REFUNDED] This test failed on our side ({a.reason}); it was not "
                         "charged to your budget.")
        elif self._remaining() == 0:
            lines += [LAST_TEST_NOTE, self._submittable()]
        lines += _stage_sections(result, root, self.task, self.row.scale)
        return TestReport(a.number, a.id, a.status, a.charged, a.refunded, False,
                          "\n".join(lines))

    def _header(self, number: int) -> str:
        left = self._remaining()
        return f"[Test #{number}] ({left} test{'' if left == 1 else 's'} remaining; {SUBMIT_HINT})"

    def _remaining(self) -> int:
        return self.row.budget - self.ledger.used(self.id)

    def _submittable(self) -> str:
        ok = self.ledger.succeeded_numbers(self.id)
        if not ok:
            return "No test has succeeded, so there is nothing to submit."
        return f"Tests you can submit: {', '.join(f'n={n}' for n in ok)}."

    # -- submission and status --

    def submit(self, n: int) -> str:
        a = self.ledger.submit(self.id, n)
        metrics = self.ledger.results(a.id)
        # The task's own metric order: the primary metric (val_loss) first, as in the board.
        order = {m.name: i for i, m in enumerate(self.task.metrics)}
        shown = ", ".join(f"{k}_{self.row.scale}={v:.4f}"
                          for k, v in sorted(metrics.items(), key=lambda kv: order.get(kv[0], 99)))
        seeds = self.task.finals_at(self.task.scale(self.row.scale))
        more = (f" Its exact files are scored at {seeds - 1} more seed(s), outside your budget "
                f"(`harness session finals {self.id}`)." if seeds > 1 else "")
        return (f"Submitted test #{a.number} as your final answer ({shown}). The session is "
                f"closed: no more edits or tests.{more}")

    # -- finals: the submission at its other seeds --

    def run_finals(self, seeds: int | None = None) -> FinalsReport:
        """Score the final submission over `seeds` seeds (default: the task's final_seeds at
        this scale): the submitted test is seed 0; its exact files are run again at seeds
        1..seeds-1 of the scale, each its own attempt, outside the budget, recorded in the
        ledger as final runs. A seed that already succeeded is not run again; one that did
        not is. UserError, before anything runs, when there is no submission or its files
        are no longer those the test ran."""
        sub = self.ledger.submission(self.id)
        if sub is None:
            raise UserError("the session has no final submission to re-run",
                            where=f"session {self.id}",
                            fix=f"submit a succeeded test first: `harness session submit "
                                f"{self.id} N`")
        scale = self.task.scale(self.row.scale)
        total = self.task.finals_at(scale) if seeds is None else seeds
        if not 1 <= total <= MAX_SEEDS:
            raise UserError(f"{total} seeds: a final runs at 1 to {MAX_SEEDS} seeds (the "
                            "submitted test is the first)", where=f"session {self.id}")
        # A seed with its outcome is never run again; one stopped by a failure of ours is.
        done = {a.seed for a in self.ledger.finals(self.id)
                if not (a.state.finished and a.state.refundable)}
        todo = [k for k in range(1, total) if k not in done]
        if todo:
            prepared = self._final_files(sub)
            runner = self.runner or configured_runner()
            for k in todo:
                print(f"[finals] seed {k} of {total - 1} more (test #{sub.number})", flush=True)
                self._run_final(sub, k, prepared, scale.seed_run(k), runner)
        return self.finals_report(total)

    def _final_files(self, sub: AttemptRow) -> Prepared:
        """The submitted test's snapshot, prepared (static checks again) and proved to be the
        very files the test ran, on the template the session started with."""
        where = str(self.ledger.sessions_dir / self.id / "tests" / str(sub.number))
        template = sha256_bytes(self.task.template_text().encode())
        if template != self.row.template_sha256:
            raise UserError(f"the task's template changed since the session started (now "
                            f"{template[:12]}, then {self.row.template_sha256[:12]}): a "
                            "final must run on the template its test ran on", where=where,
                            fix="run the finals with the harness version the session used")
        prepared = prepare(Path(where), self.task)
        spliced = sha256_bytes(prepared.spliced.encode())
        if spliced != sub.spliced_sha256:
            raise UserError(f"the submitted test's files changed since it ran (spliced script "
                            f"now {spliced[:12]}, tested {str(sub.spliced_sha256)[:12]}): no "
                            "final seed was run", where=where,
                            fix="restore the session folder from its backup; `harness audit "
                                f"{self.id}` shows what else changed")
        return prepared

    def _run_final(self, sub: AttemptRow, k: int, prepared: Prepared, scale: ScaleSpec,
                   runner: Runner) -> AttemptRow:
        digest = sha256_bytes(prepared.spliced.encode())
        name = f"{test_name(self.id, sub.number)}-seed{k}"
        row = self.ledger.new_final(self.id, k, current_owner(),
                                    lambda _n: new_attempt_id(name, digest))
        state = _Progress(row.id)
        try:
            state.attempt = attempt = Attempt.create(self.ledger.runs_dir, row.id)
            self.ledger.set_status(
                row.id, Status.RUNNING, started_at=now_iso(), runner=runner.name,
                attempt_dir=str(attempt.root), spliced_sha256=digest,
                region_diff=prepared.diff, check_report=sub.check_report)
            checks = json.loads(sub.check_report or "{}").get("preflight")
            record = run_attempt(
                prepared, self.task, scale, attempt=attempt,
                origin=Origin("final", session_id=self.id, number=sub.number),
                data=self.data_dir, runner=runner,
                checks=PreflightReport.from_dict(checks) if checks else None)
            settled = self.ledger.finish(row.id, Settlement(
                status=record.status, reason=record.reason, metrics=record.metrics,
                attempt_dir=str(attempt.root), result_sha256=attempt.record_sha256(),
                gpu_seconds=_gpu_seconds(record, scale.device, scale.nproc_per_node)))
            state.settled = True
            return settled
        except BaseException as e:
            self._settle_crash(state, e)
            raise

    def finals_report(self, total: int | None = None) -> FinalsReport:
        """Each seed of the final, the submitted test first, and the mean over them."""
        sub = self.ledger.submission(self.id)
        if sub is None:
            return FinalsReport("No final submission yet.", [])
        scale = self.task.scale(self.row.scale)
        total = self.task.finals_at(scale) if total is None else total
        runs = self.ledger.finals(self.id)
        primary = self.task.primary_metric
        lines = [f"Final of session {self.id}: test #{sub.number} over {total} seed(s), "
                 "the test itself first"]
        values: list[float] = []
        statuses: list[Status | None] = []
        for k in range(total):
            tries = [sub] if k == 0 else [a for a in runs if a.seed == k]
            last = next((a for a in tries if not a.state.refundable), tries[-1] if tries else None)
            if last is None:
                lines.append(f"  seed {k}: not run")
                statuses.append(None)
                continue
            statuses.append(last.state)
            value = self.ledger.results(last.id).get(primary)
            if last.status == SUCCEEDED and value is not None:
                values.append(value)
            shown = f"{primary}={value:.4f}" if value is not None else (last.reason or "")
            lines.append(f"  seed {k}: {last.status:<17} {shown}  ({last.id}"
                         f"{f', {len(tries)} tries' if len(tries) > 1 else ''})")
        lines.append(seeds_line(primary, values, total))
        return FinalsReport("\n".join(lines), statuses)

    def _require_open(self) -> None:
        sub = self.ledger.submission(self.id)
        if sub is not None:
            raise UserError(f"the session is closed: test #{sub.number} was submitted as final",
                            where=f"session {self.id}", fix="start a new session to keep working")

    def status_data(self) -> dict[str, Any]:
        with self.ledger.snapshot():
            attempts = self.ledger.attempts(self.id)
            sub = self.ledger.submission(self.id)
            used = self.ledger.used(self.id)
            tests = [{**_attempt_summary(a), "metrics": self.ledger.results(a.id)}
                     for a in attempts]
            finals = [{**_attempt_summary(a), "seed": a.seed,
                       "metrics": self.ledger.results(a.id)}
                      for a in self.ledger.finals(self.id)]
        for t, a in zip(tests, attempts, strict=True):
            now = attempt_progress(a.attempt_dir) if a.in_progress and a.attempt_dir else None
            t["progress"] = None if now is None else \
                {**asdict(now), "eta_s": now.eta_s, "line": now.line()}
        return {"session": asdict(self.row), "used": used,
                "remaining": self.row.budget - used, "tests": tests,
                "submitted": sub.number if sub else None, "finals": finals,
                "editable": self._edits.ranges_text(), "undo_depth": self._edits.undo_depth()}

    def status(self) -> str:
        d = self.status_data()
        r = self.row
        lines = [f"Session {r.id}: task {r.task} {r.task_version}, scale {r.scale}, agent "
                 f"{r.agent} (mode {r.mode}{', model ' + r.model if r.model else ''})",
                 f"Tests: {d['used']} of {r.budget} used, {d['remaining']} remaining"]
        for t in d["tests"]:
            lines.append(_status_line(t, r.scale))
            if t["progress"] is not None:
                lines.append(f"      {t['progress']['line']}")
        lines.append(f"Submitted: test #{d['submitted']}" if d["submitted"] is not None
                     else f"Submitted: nothing yet ({SUBMIT_HINT})")
        for f in d["finals"]:  # outside the budget: the submission at its other seeds
            metrics = ", ".join(f"{k}_{r.scale}={v:.4f}" for k, v in f["metrics"].items())
            lines.append(f"  final seed {f['seed']} (run #{f['number']}) {f['status']:<17} "
                         f"{metrics or f['reason'] or ''}")
        lines.append(f"[{self.filename} | editable: {d['editable']} | "
                     f"{d['undo_depth']} edit(s) can be undone]")
        return "\n".join(lines)


@dataclass(frozen=True)
class FinalsReport:
    message: str
    statuses: list[Status | None]  # by seed, the submitted test first; None: not run yet

    @property
    def complete(self) -> bool:
        return all(st == Status.SUCCEEDED for st in self.statuses)

    @property
    def exit_code(self) -> int:
        """0 when every seed succeeded; a seed not run counts as ours (run finals again)."""
        return max((EXIT_INFRA if st is None else st.exit_code for st in self.statuses),
                   default=0)


@dataclass
class _Progress:
    """What a running test has learnt so far, for settling it if it crashes."""

    attempt_id: str
    attempt: Attempt | None = None
    settled: bool = False


# --- helpers -----------------------------------------------------------------------


def test_name(session_id: str, number: int) -> str:
    """Test #number's submission name, which its attempt id embeds for people reading runs/
    (what it is comes from the record's origin, never from this name). Without the session's
    timestamp: the attempt id that embeds this name has its own."""
    return f"ses-{session_id.rsplit('-', 1)[-1]}-t{number}"


def new_session_id() -> str:
    import secrets
    import time

    return f"ses-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def _check_start_args(agent: str, mode: str, budget: int | None) -> None:
    if not agent.strip():
        raise UserError("the agent name is empty", fix="pass --agent NAME")
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if budget is not None and budget < 0:
        raise UserError(f"the budget must be 0 or more, not {budget}")


def _load_session_task(row: SessionRow) -> TaskSpec:
    task = load_task(row.task_root if Path(row.task_root).is_dir() else row.task)
    current = sha256_bytes(task.template_text().encode())
    if current != row.template_sha256 or task.version != row.task_version:
        raise UserError(f"the task changed since session {row.id} started (template or version "
                        f"{row.task_version} -> {task.version})", where=str(task.root),
                        fix="finish the session with the harness checkout it started with, or "
                            "start a new session")
    return task


def configured_runner() -> Runner:
    """harness.toml's runner ($HARNESS_CONFIG or ./harness.toml), else the local one."""
    from harness.runners import make_runner
    from harness.runners.config import load_config

    return make_runner(load_config())


def _gpu_seconds(result: AttemptRecord, device: str, nproc: int) -> float:
    """Wall time times GPUs over all stages; 0 on CPU scales."""
    if device != "cuda":
        return 0.0
    return sum(s.wall_s for s in result.stages.values()) * nproc


def _view_read_only(path: Path, name: str, start: int | None, end: int | None) -> str:
    lines = text_to_lines(path.read_text(encoding="utf-8"))
    first, last = start or 1, end or len(lines)
    if not 1 <= first <= last <= len(lines):
        raise UserError(f"cannot view lines {first}..{last}", where=name,
                        fix=f"use 1 <= start <= end <= {len(lines)}")
    width = max(4, len(str(len(lines))))
    body = [f"{n:>{width}} | {lines[n - 1]}" for n in range(first, last + 1)]
    return "\n".join([f"[Read-only file: {name} | total: {len(lines)} lines]", *body])


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "nan"


def train_metrics_lines(stage_dir: Path, rows: int = CURVE_ROWS) -> list[str]:
    """The last TRAIN_METRICS lines, rebuilt from metrics.jsonl (never from stdout)."""
    curve = pretrain.read_curve(stage_dir)[-rows:]
    return [f"TRAIN_METRICS: step={r.get('step')}, train_loss={_fmt(r.get('train_loss'))}, "
            f"val_loss={_fmt(r.get('val_loss'))}" for r in curve]


def _stage_sections(result: AttemptRecord, root: Path, task: TaskSpec, scale: str
                    ) -> list[str]:
    """One "### stage (scale)" section per stage that ran, then the failure, if any."""
    stage_of = {m.name: m.stage for m in task.metrics}
    out: list[str] = []
    for stage, info in result.stages.items():
        out.append(f"### {stage} ({scale})")
        curve = train_metrics_lines(root / stage) if stage == pretrain.STAGE else []
        if curve:
            out += ["Training metrics (last steps):", *curve]
        mine = {k: v for k, v in result.metrics.items()
                if stage_of.get(k, pretrain.STAGE) == stage}
        if mine and result.status.ranked:
            out.append(f"Final metrics ({scale}): " + ", ".join(
                f"{k}_{scale}={v:.4f}" for k, v in mine.items()))
        trace = info.details.get("traceback") or info.stderr_tail
        if trace:
            label = "Traceback" if info.details.get("traceback") else "Last lines of stderr"
            out += [f"{label} (last lines):",
                    *str(trace).rstrip().splitlines()[-TRACEBACK_LINES:]]
    if result.status is Status.FAILED_SUBMISSION:  # an infra failure has its [REFUNDED] line
        out.append(f"[FAILED] {result.reason}")
    elif result.status is Status.RULE_VIOLATION:
        out.append(f"[RULE VIOLATION] {result.reason}. This test was charged and its result "
                   "can never be submitted or ranked; see docs/security.md.")
    return out


def _attempt_summary(a: AttemptRow) -> dict[str, Any]:
    return {"number": a.number, "attempt_id": a.id, "status": a.status, "charged": a.charged,
            "refunded": a.refunded, "reason": a.reason, "finished": a.state.finished}


def _charge_label(t: dict[str, Any]) -> str:
    if t["refunded"]:
        return "refunded"
    return "charged" if t["charged"] else "not charged"


def _status_line(t: dict[str, Any], scale: str) -> str:
    metrics = ", ".join(f"{k}_{scale}={v:.4f}" for k, v in t["metrics"].items())
    return (f"  #{t['number']} {t['status']:<17} {_charge_label(t):<11} "
            f"{metrics or t['reason'] or ''}")
