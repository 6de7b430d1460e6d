"""One attempt end to end: splice, static checks, pretrain stage, result.json.

Scores travel only in files the frozen template writes; nothing is read from stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import __version__
from harness.checks.static import RegionText, check_spliced
from harness.errors import CheckFailed, UserError
from harness.paths import (
    AttemptPaths,
    atomic_write_json,
    atomic_write_text,
    new_attempt_id,
    sha256_bytes,
    sha256_file,
)
from harness.regions import parse_layout, splice, unified_diff
from harness.runners.base import Outcome, Runner
from harness.stages import pretrain
from harness.submission import Submission, load_submission
from harness.task import ScaleSpec, TaskSpec

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Prepared:
    """A submission that passed splicing and the static checks."""

    submission: Submission
    spliced: str
    diff: str


def region_texts(spliced: str) -> list[RegionText]:
    layout = parse_layout(spliced, where="spliced file")
    return [RegionText(r.id, "\n".join(r.lines), layout.span(r.id)[0]) for r in layout.regions]


def prepare(submission_path: Path, task: TaskSpec) -> Prepared:
    """Load, splice and statically check; CheckFailed (exit 2) lists every finding."""
    sub = load_submission(submission_path, task)
    template = task.template_text()
    spliced = splice(template, sub.regions)
    findings = check_spliced(task, spliced, region_texts(spliced))
    if findings:
        raise CheckFailed(findings, where=str(submission_path))
    return Prepared(sub, spliced, unified_diff(template, spliced))


def data_root(explicit: Path | None = None) -> Path:
    return explicit or Path(os.environ.get("HARNESS_DATA", "data"))


def dataset_dir(scale: ScaleSpec, root: Path) -> Path:
    """The scale's token shards; the embedded smoke corpus is built on first use."""
    path = root / scale.dataset
    if scale.dataset == "smoke":
        from harness.data.smoke import prepare_smoke

        prepare_smoke(path)
        return path.resolve()
    if not (path / "manifest.json").is_file():
        raise UserError(f"no prepared dataset {scale.dataset!r} at {path}",
                        fix=f"run `harness data prepare fineweb --out {path}` or pass --data-dir")
    return path.resolve()


@dataclass
class Result:
    """result.json: one record per attempt, versioned."""

    attempt_id: str
    task: dict[str, str]
    scale: str
    submission: dict[str, Any]
    template_sha256: str
    spliced_sha256: str
    status: str
    runner: str
    schema_version: int = SCHEMA_VERSION
    harness_version: str = __version__
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, str] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sha(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def run_attempt(prepared: Prepared, task: TaskSpec, scale: ScaleSpec, *, runs_dir: Path,
                data: Path, runner: Runner) -> tuple[Result, AttemptPaths]:
    from harness.envinfo import environment

    sub = prepared.submission
    # Resolved before the attempt exists: missing data is the user's to fix, not a crash.
    data_dir = dataset_dir(scale, data)
    paths = AttemptPaths.create(runs_dir, new_attempt_id(sub.name, sub.sha256))
    atomic_write_text(paths.spliced, prepared.spliced)
    atomic_write_text(paths.diff, prepared.diff)
    atomic_write_json(paths.regions, {"kind": sub.kind, "source": str(sub.source),
                                      "meta": sub.meta, "regions": sub.regions})
    for name in task.frozen_files:
        if name != task.template:
            shutil.copyfile(task.root / name, paths.root / name)
    result = Result(
        attempt_id=paths.root.name, task={"name": task.name, "version": task.version},
        scale=scale.name,
        submission={"name": sub.name, "kind": sub.kind, "sha256": sub.sha256,
                    "source": str(sub.source), "meta": sub.meta},
        template_sha256=_sha(task.template_text()), spliced_sha256=_sha(prepared.spliced),
        status="running", runner=runner.name, environment=environment(), started_at=_now(),
    )
    # The record exists before the work starts: a crash leaves a visible "running" row.
    atomic_write_json(paths.result, asdict(result))

    out_dir = paths.stage_dir(pretrain.STAGE)
    result.dataset = {"name": scale.dataset, "dir": str(data_dir),
                      "manifest_sha256": sha256_file(data_dir / "manifest.json")}
    spec = pretrain.build(scale, attempt_dir=paths.root, script=paths.spliced,
                          data_dir=data_dir, out_dir=out_dir)
    run = runner.run(spec)
    got = pretrain.collect(run, out_dir)
    result.status = got.outcome.value
    result.reason = got.reason
    result.metrics = got.metrics
    result.stages[pretrain.STAGE] = {
        "returncode": run.returncode, "wall_s": round(run.wall_s, 3), "timed_out": run.timed_out,
        "final": got.final, "curve": got.curve, "argv": list(spec.argv),
        "stderr_tail": run.stderr_tail() if got.outcome is not Outcome.SUCCEEDED else "",
        "traceback": got.traceback,
    }
    result.finished_at = _now()
    result.artifacts = paths.manifest()
    atomic_write_json(paths.result, asdict(result))
    return result, paths


def load_result(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
