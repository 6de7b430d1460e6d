"""Collect: every final attempt record, as board entries.

Two sources, in the formats the harness already writes:
  * `runs/<id>/result.json` of plain attempts (`harness run`, `harness baselines`), read
    through harness.record (parse_record: the typed record, older schemas migrated);
  * the final submissions of agent sessions in the ledger (Ledger.final_submissions): the
    session names the entrant, the results table holds the metrics, and the attempt's
    result.json (re-hashed against the sha256 the ledger recorded) the curve, hashes and
    environment.

A session's other tests are never entries: the record's origin says which attempts are
session tests, and the ledger which of them was submitted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.leaderboard.board import INVALID, NO_LABEL, Collected, Entry, Problem
from harness.leaderboard.running import running_of_record, running_of_test
from harness.ledger import AttemptRow, Ledger, SessionRow
from harness.record import (
    RESULT_FILE,
    Attempt,
    AttemptRecord,
    RecordError,
    StageRecord,
    Status,
    parse_record,
)
from harness.runtime.fileio import sha256_bytes

SKIP_SESSION_TEST = "session tests: only a session's final submission counts, from the ledger"
SKIP_NO_SUBMISSION = "sessions without a final submission"


def skip_in_progress(status: Status) -> str:
    return f"in progress (status {status.value}): not final"


class _Skip(Exception):
    """Not a final result: counted, not shown."""


# --- one record ----------------------------------------------------------------------------


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A sub-object of a record, {} when it is missing or not an object."""
    found = data.get(key)
    return found if isinstance(found, dict) else {}


def _text(value: Any, default: str = NO_LABEL) -> str:
    return value.strip() if isinstance(value, str) and value.strip() else default


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def finite_metrics(raw: Any) -> dict[str, float]:
    """The finite numeric metrics; NaN or inf are no score (the ledger drops them too)."""
    if not isinstance(raw, dict):
        return {}
    return {k: x for k, v in raw.items() if isinstance(k, str) and (x := _finite(v)) is not None}


def shown(status: Status) -> str:
    """A rule broken at run time is shown as invalid (never ranked); its reason says which."""
    return INVALID if status is Status.RULE_VIOLATION else status.value


def hardware_summary(env: Mapping[str, Any], stages: Mapping[str, StageRecord]) -> str:
    """Host, platform, CPUs, then what training saw (device, processes, GPU, peak memory)."""
    host = _table(env, "host")
    # The stage that trained records its device in `final` (its last metrics row).
    final = next((f for s in stages.values() if (f := _table(s.details, "final"))), {})
    parts = [_text(host.get("hostname"), ""), _text(host.get("platform"), "")]
    if isinstance(host.get("cpu_count"), int):
        parts.append(f"{host['cpu_count']} CPUs")
    # Runners may record GPUs under a key of their own: show any that names one.
    for where in (env, host):
        for k, v in where.items():
            if ("gpu" in k.lower() or "cuda" in k.lower()) and v:
                parts.append(f"{k}: {v if isinstance(v, str) else json.dumps(v)}")
    if final.get("device"):
        parts.append(f"trained on {final['device']} × {final.get('world_size', '?')}")
        if _finite(final.get("peak_memory_gb")) is not None:
            parts.append(f"peak {final['peak_memory_gb']:.1f} GB")
    torch = _table(env, "packages").get("torch")
    if torch:
        parts.append(f"torch {torch}")
    return " · ".join(p for p in parts if p)


def _hashes(record: AttemptRecord, result_sha256: str) -> dict[str, str]:
    git = _table(record.environment, "git")
    out = {"submission": _text(record.submission.get("sha256"), ""),
           "template": _text(record.template_sha256, ""),
           "spliced": _text(record.spliced_sha256, ""),
           RESULT_FILE: result_sha256}
    if git.get("commit"):
        out["harness commit"] = f"{git['commit']}{' (dirty)' if git.get('dirty') else ''}"
    return {k: v for k, v in out.items() if v}


def entry_of(record: AttemptRecord, path: Path, digest: str, *, source: str = "runs") -> Entry:
    """The board's entry of a finished record; _Skip for one still in progress."""
    if not record.status.finished:
        raise _Skip(skip_in_progress(record.status))
    meta = record.meta
    name = _text(record.submission.get("name"), _text(meta.get("name"), record.attempt_id))
    stages = record.stages
    return Entry(
        attempt_id=record.attempt_id, source=source, task=record.task["name"],
        task_version=_text(record.task.get("version"), "?"), scale=record.scale, name=name,
        agent=_text(meta.get("agent")), mode=_text(meta.get("mode")),
        model=_text(meta.get("model")), status=shown(record.status),
        reason=_text(record.reason, ""), metrics=finite_metrics(record.metrics),
        finished_at=_text(record.finished_at, ""), result_path=str(path),
        attempt_dir=str(path.parent), audit=str(path), runner=_text(record.runner, ""),
        hardware=hardware_summary(record.environment, stages),
        stage_seconds={k: s.wall_s for k, s in stages.items() if math.isfinite(s.wall_s)},
        hashes=_hashes(record, digest), preflight=dict(record.preflight),
        curves={k: tuple(c) for k, s in stages.items()
                if isinstance(c := s.details.get("curve"), list)},
        stderr=lm_eval_stderrs(stages))


def lm_eval_stderrs(stages: Mapping[str, StageRecord]) -> dict[str, float]:
    """lm-eval's standard error of each metric, from the eval stage's `detail` (eval.json)."""
    out = {}
    for stage in stages.values():
        for name, d in _table(stage.details, "detail").items():
            value = _finite(d.get("stderr")) if isinstance(d, Mapping) else None
            if value is not None:
                out[str(name)] = value
    return out


# --- runs dirs -----------------------------------------------------------------------------


def collect_files(paths: Iterable[Path], out: Collected, *, skip_ids: set[str]) -> None:
    """Plain attempts from result.json files; a session's tests are left to the ledger."""
    for path in paths:
        try:
            raw = path.read_bytes()
            record = parse_record(raw)
            # abspath, not resolve(): no syscall per path component, for thousands of files.
            entry = entry_of(record, Path(os.path.abspath(path)), sha256_bytes(raw))
        except OSError as e:
            out.problems.append(Problem(str(path), f"cannot read: {e.strerror}"))
            continue
        except RecordError as e:
            out.problems.append(Problem(str(path), str(e)))
            continue
        except _Skip as e:
            out.skipped[str(e)] += 1
            # Shown as running (a session's test from the ledger, which knows its owner).
            if not record.status.finished and not record.origin.session_test \
                    and record.attempt_id not in skip_ids:
                out.live.append(running_of_record(record, Path(os.path.abspath(path))))
            continue
        # A `final` re-run of a session's submission counts as a plain run, for now.
        if record.attempt_id in skip_ids or record.origin.session_test:
            out.skipped[SKIP_SESSION_TEST] += 1
            continue
        out.records.append(entry)


def result_files(runs_dir: Path) -> list[Path]:
    """Every runs/<id>/result.json, in a fixed order."""
    return sorted(runs_dir.glob(f"*/{RESULT_FILE}"))


# --- the ledger ----------------------------------------------------------------------------


def _invalid(entry: Entry, reason: str) -> Entry:
    return replace(entry, status=INVALID, reason=reason)


def _ledger_entry(s: SessionRow, a: AttemptRow, metrics: dict[str, float], home: Path) -> Entry:
    """The session's final submission; INVALID when its files disagree with the ledger."""
    base = Entry(
        attempt_id=a.id, source="ledger", task=s.task, task_version=s.task_version,
        scale=s.scale, name=s.id, agent=_text(s.agent), mode=_text(s.mode),
        model=_text(s.model), status=shown(Status(a.status)), reason=a.reason or "",
        metrics=finite_metrics(metrics), finished_at=a.finished_at or "",
        attempt_dir=a.attempt_dir or "", session_id=s.id,
        audit=f"harness audit {a.id} --home {home}", runner=a.runner or "",
        region_diff=a.region_diff,
    )
    folder = Attempt(Path(a.attempt_dir or ""))
    path = folder.record_path
    try:
        if not a.attempt_dir:
            raise FileNotFoundError(path)
        raw = folder.read_bytes()
    except OSError:
        return _invalid(base, f"result.json is missing ({path})")
    digest = sha256_bytes(raw)
    if a.result_sha256 and digest != a.result_sha256:
        return _invalid(base, "result.json changed since the ledger recorded it "
                              f"(recorded {a.result_sha256[:12]}, now {digest[:12]})")
    try:
        parsed = entry_of(parse_record(raw), path, digest, source="ledger")
    except (RecordError, _Skip) as e:
        return _invalid(base, f"result.json: {e}")
    if parsed.metrics != base.metrics:
        return _invalid(base, "the metrics in result.json differ from the ledger's")
    if parsed.scale != s.scale or parsed.task != s.task:
        return _invalid(base, f"result.json is for {parsed.task}/{parsed.scale}, the session "
                              f"for {s.task}/{s.scale}")
    return replace(base, result_path=str(path), runner=parsed.runner,
                   hardware=parsed.hardware, stage_seconds=parsed.stage_seconds,
                   hashes={**parsed.hashes, "ledger's result.json": a.result_sha256 or ""},
                   # The ledger's copy of the pre-flight only when result.json lacks one.
                   preflight=parsed.preflight or _ledger_preflight(a.check_report),
                   curves=parsed.curves, stderr=parsed.stderr)


def _ledger_preflight(check_report: str | None) -> dict[str, Any]:
    """The pre-flight report harness.session stored in the attempt row, if any."""
    try:
        report = json.loads(check_report or "{}")
    except ValueError:
        return {}
    found = report.get("preflight") if isinstance(report, dict) else None
    return found if isinstance(found, dict) else {}


def collect_ledger(ledger: Ledger, out: Collected) -> set[str]:
    """Each session's final submission; returns the id of every session attempt, so that a
    runs-dir scan leaves them to the ledger."""
    with ledger.snapshot():  # one consistent view even while sessions are running
        ids = ledger.attempt_ids()
        finals = ledger.final_submissions()
        seeds = ledger.final_runs()
        sessions = len(ledger.sessions())
        running = [(a, ledger.session(a.session_id)) for a in ledger.in_progress()]
    out.live += [running_of_test(s, a) for a, s in running if a.attempt_dir]
    if sessions > len(finals):
        out.skipped[SKIP_NO_SUBMISSION] += sessions - len(finals)
    out.records += [_ledger_entry(s, a, metrics, ledger.home) for s, a, metrics in finals]
    # A submission's other seeds: more runs of the same row (the key is the session's).
    submitted = {a.id: a for _, a, _ in finals}
    out.records += [_final_seed_entry(s, a, metrics, ledger.home, submitted.get(a.final_of or ""))
                    for s, a, metrics in _last_tries(seeds)]
    return ids


def _last_tries(runs: list[tuple[SessionRow, AttemptRow, dict[str, float]]]
                ) -> list[tuple[SessionRow, AttemptRow, dict[str, float]]]:
    """One run per seed of a final: the one with an outcome (succeeded, or failed by the
    submission: the ledger allows one), else its latest try, stopped by a failure of ours (a
    seed run again after one is one seed, not a failure and a success)."""
    best: dict[tuple[str, int | None], tuple[SessionRow, AttemptRow, dict[str, float]]] = {}
    for run in runs:  # in run number order
        key = (run[1].session_id, run[1].seed)
        if key not in best or best[key][1].state.refundable:
            best[key] = run
    return list(best.values())


def _final_seed_entry(s: SessionRow, a: AttemptRow, metrics: dict[str, float], home: Path,
                      submitted: AttemptRow | None) -> Entry:
    """A final run at another seed; INVALID unless it ran the submitted test's very files."""
    entry = _ledger_entry(s, a, metrics, home)
    if entry.status == INVALID:
        return entry
    if submitted is None:
        return _invalid(entry, f"{a.label} re-runs {a.final_of}, which is not the session's "
                               "submission")
    ran = entry.hashes.get("spliced", a.spliced_sha256 or "")
    if ran != submitted.spliced_sha256:
        return _invalid(entry, f"{a.label} ran other files than the submitted test "
                               f"#{submitted.number} (spliced {ran[:12]}, submitted "
                               f"{str(submitted.spliced_sha256)[:12]})")
    return entry


# --- both ----------------------------------------------------------------------------------


def collect(runs_dirs: Sequence[Path] = (), *, home: Path | None = None,
            files: Sequence[Path] = ()) -> Collected:
    """Every final result of the ledger in `home` (when given), the runs dirs and files."""
    out = Collected()
    skip: set[str] = set()
    if home is not None:
        with Ledger(home, create=False) as ledger:
            out.sources.append(f"ledger {ledger.path}")
            skip = collect_ledger(ledger, out)
    for d in runs_dirs:
        if not d.is_dir():
            raise UserError(f"no runs directory {d}", fix="pass --runs-dir a folder of "
                            "attempts (runs/<id>/result.json)")
        out.sources.append(f"runs {d.resolve()}")
        collect_files(result_files(d), out, skip_ids=skip)
    if files:
        out.sources.append(f"{len(files)} result file(s)")
        collect_files(files, out, skip_ids=skip)
    return out
