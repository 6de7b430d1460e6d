"""The lm-eval stage: the frozen eval_lm.py scores the trained checkpoint; scores come from
the eval.json it writes.

eval.json's format (units, the secondary numbers) lives in harness.runtime.lmeval_report,
which the stage's own process writes it with; the headline metrics are the task's, each
declared in task.toml with the lm-eval task and metric it is (`source`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.record import Status
from harness.runners.base import StageRun, StageSpec
from harness.runtime.fileio import read_stage_json
from harness.runtime.lmeval_report import FORMAT, FULL_BOOTSTRAP_ITERS
from harness.stages.base import StageContext, StageOutcome, outcome, planted_file
from harness.task import ScaleSpec, TaskSpec

STAGE = "lm-eval"
EVAL_FILE = "eval.json"
ERROR_FILE = "error.json"
# The smoke scale proves the path, not the numbers: a few documents per task, and a short
# bootstrap for lambada's perplexity stderr (lm-eval's default is 100000 resamples).
SMOKE_LIMIT = 8
SMOKE_BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class EvalSettings:
    limit: int | None = None  # documents per task (lm-eval's --limit); None: all
    bootstrap_iters: int = FULL_BOOTSTRAP_ITERS
    device: str = "auto"


def settings_for(scale: ScaleSpec) -> EvalSettings:
    if "smoke" in (scale.name, scale.dataset):
        return EvalSettings(limit=SMOKE_LIMIT, bootstrap_iters=SMOKE_BOOTSTRAP_ITERS,
                            device=scale.device)
    return EvalSettings(device=scale.device)


def _sources(task: TaskSpec) -> tuple[dict[str, tuple[str, str]], list[str]]:
    from harness.runtime.evalsets import TASK_NAMES

    out, problems = {}, []
    for m in task.metrics:
        if m.stage != STAGE:
            continue
        lm_task, _, lm_metric = m.source.partition("/")
        if lm_metric and lm_task in TASK_NAMES:
            out[m.name] = (lm_task, lm_metric)
        else:
            problems.append(f"metric {m.name}: source {m.source!r} is not an lm-eval "
                            "'task/metric' of the tasks this stage runs")
    return out, problems


def headline(task: TaskSpec) -> dict[str, tuple[str, str]]:
    """The task's lm-eval metrics: name -> (lm-eval task, lm-eval metric), from `source`."""
    from harness.errors import UserError
    from harness.runtime.evalsets import TASK_NAMES

    out, problems = _sources(task)
    if problems:
        raise UserError("; ".join(problems), where=str(task.root / "task.toml"),
                        fix=f"set source = \"TASK/METRIC\", TASK one of {', '.join(TASK_NAMES)}")
    return out


def evals_dir(scale: ScaleSpec, data_root: Path) -> Path:
    """Where a scale's eval sets live; the smoke ones are built on first use from the corpus."""
    from harness.data.evals import prepare_smoke_evals
    from harness.runtime.evalsets import read_manifest

    if scale.dataset == "smoke":
        from harness.data.smoke import prepare_smoke

        corpus = data_root / scale.dataset
        prepare_smoke(corpus)  # idempotent: an intact corpus is kept as it is
        path = data_root / "smoke-evals"
        prepare_smoke_evals(path, corpus)
        return path.resolve()
    path = data_root / "evals"
    read_manifest(path)  # UserError with the fix when they were never prepared
    return path.resolve()


def build(*, script: Path, attempt_dir: Path, checkpoint: Path, evals: Path, out_dir: Path,
          settings: EvalSettings, timeout_s: float, metrics: Mapping[str, tuple[str, str]],
          python: str = sys.executable, data_dir: Path | None = None) -> StageSpec:
    argv = [python, str(script), f"--attempt-dir={attempt_dir}", f"--checkpoint={checkpoint}",
            f"--evals={evals}", f"--out={out_dir / EVAL_FILE}",
            f"--bootstrap-iters={settings.bootstrap_iters}", f"--device={settings.device}"]
    argv += [f"--metric={name}={task}/{metric}" for name, (task, metric) in metrics.items()]
    if data_dir is not None:
        argv.append(f"--data-dir={data_dir}")
    if settings.limit is not None:
        argv.append(f"--limit={settings.limit}")
    return StageSpec(name=STAGE, argv=tuple(argv), cwd=attempt_dir, log_dir=out_dir,
                     timeout_s=timeout_s, env={})


# --- eval.json (its format: harness.runtime.lmeval_report) ---------------------------------
# What of eval.json the attempt's record keeps beside the runner's fields.
RECORD_KEYS = ("lm_eval_version", "convention", "metrics", "secondary", "detail", "settings",
               "evals", "samples_sha256", "error", "val_loss", "lowbit_audit")


def _read_json(path: Path) -> Any:
    return read_stage_json(path)  # never through a link the stage left (fileio)


def metric_problem(report: Any, expected: Sequence[str]) -> str | None:
    """What keeps eval.json's headline metrics from being recorded, or None."""
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        return f"{EVAL_FILE} is missing or not a {FORMAT} record"
    metrics = report.get("metrics")
    if not isinstance(metrics, dict):
        return f"{EVAL_FILE} has no metrics"
    for name in expected:
        value = metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{EVAL_FILE} lacks metric {name}"
    return None


def _failure(out_dir: Path, run: StageRun) -> StageOutcome | None:
    """The outcome of a run that did not finish cleanly; None when it did."""
    if not run.started:
        return outcome(Status.FAILED_INFRA, run.error or "lm-eval stage did not start")
    if run.cancelled:
        return outcome(Status.CANCELLED, "lm-eval: cancelled through the harness")
    planted = planted_file(out_dir)
    if planted:
        return outcome(Status.RULE_VIOLATION, planted)
    if run.over_limit:
        return outcome(Status.FAILED_SUBMISSION, f"lm-eval: out of memory: {run.over_limit}")
    if run.infra:
        return outcome(Status.FAILED_INFRA, f"lm-eval: {run.infra}")
    error = _read_json(out_dir / ERROR_FILE)
    if isinstance(error, dict):
        # eval_lm.py says whose fault it was: the submission's code, or our side.
        kind = {"submission": Status.FAILED_SUBMISSION,
                Status.RULE_VIOLATION.value: Status.RULE_VIOLATION}.get(str(error.get("kind")),
                                                             Status.FAILED_INFRA)
        message = str(error.get("message", "")).strip().splitlines() or ["?"]
        return outcome(kind, f"lm-eval: {message[-1]}", error=error)
    if run.timed_out:
        # Training finished in its own limit, so a slow eval is ours to size: not charged.
        return outcome(Status.FAILED_INFRA, f"lm-eval: time limit reached after "
                                            f"{run.wall_s:.0f}s")
    if run.returncode != 0:
        return outcome(Status.FAILED_INFRA, f"lm-eval exited with code {run.returncode}")
    return None


def collect(run: StageRun, out_dir: Path, expected: Sequence[str]) -> StageOutcome:
    """The stage's outcome; `details` holds what of eval.json the attempt's record keeps."""
    failed = _failure(out_dir, run)
    if failed is not None:
        return failed
    report = _read_json(out_dir / EVAL_FILE)
    problem = metric_problem(report, expected)
    if problem is not None:
        return outcome(Status.FAILED_INFRA, f"lm-eval: {problem}")
    kept = {k: report[k] for k in RECORD_KEYS if k in report}
    metrics = {name: float(report["metrics"][name]) for name in expected}
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        # The model's own numbers (NaN/inf log-likelihoods): the submission's fault.
        return StageOutcome(Status.FAILED_SUBMISSION, f"lm-eval: non-finite {', '.join(bad)}",
                            {}, kept)
    return StageOutcome(Status.SUCCEEDED, "ok", metrics, kept)


class LmEvalStage:
    """The stage the attempt loop runs (harness.stages.base.Stage): the task's eval script on
    pretrain's checkpoint. It scores the lm-eval tasks and recomputes the metrics that name
    it as their scorer (val_loss), which must agree with training's own."""

    name = STAGE
    gpus: int | None = 1

    def check(self, task: TaskSpec) -> list[str]:
        return _sources(task)[1]

    def reads(self, ctx: StageContext) -> tuple[Path, ...]:
        assert ctx.eval_sets is not None
        return (ctx.eval_sets, ctx.data_dir)

    def build(self, ctx: StageContext) -> StageSpec:
        assert ctx.eval_sets is not None
        script = ctx.attempt.file(ctx.task.eval_script)
        return build(script=script, attempt_dir=ctx.attempt.root,
                     checkpoint=ctx.attempt.root / ctx.task.checkpoint, evals=ctx.eval_sets,
                     out_dir=ctx.attempt.stage_dir(STAGE), settings=settings_for(ctx.scale),
                     timeout_s=float(ctx.scale.timeout_s), metrics=headline(ctx.task),
                     data_dir=ctx.data_dir)

    def collect(self, ctx: StageContext, run: StageRun, out_dir: Path) -> StageOutcome:
        return collect(run, out_dir, [m.name for m in ctx.task.metrics if m.scorer == STAGE])

    def resume(self, ctx: StageContext, segments: Sequence[dict[str, Any]],
               used_s: float) -> StageSpec:
        # Scoring keeps no checkpoint and only reads pretrain's: it starts over, its earlier
        # launch's logs kept aside; its outputs are written anew.
        out_dir = ctx.attempt.stage_dir(STAGE)
        dest = out_dir / f"segment-{len(segments)}"
        dest.mkdir(exist_ok=True)
        for name in ("stdout.log", "stderr.log"):
            if (out_dir / name).exists():
                (out_dir / name).replace(dest / name)
        spec = self.build(ctx)
        return replace(spec, timeout_s=max(spec.timeout_s - used_s, 120.0))


# --- `harness eval`: the stage on any attempt or checkpoint -------------------------------------

def resolve_target(task: TaskSpec, target: Path,
                   script: Path | None = None) -> tuple[Path, Path, Path]:
    """(attempt dir, spliced script, checkpoint) for an attempt folder or a checkpoint file.

    A checkpoint where the task puts it in an attempt (task.checkpoint, pretrain/ckpt.pt)
    finds the attempt's spliced template there; any other file is its own folder's.
    """
    from harness.errors import UserError

    target = Path(target).resolve()
    inside = Path(task.checkpoint).parts
    if target.is_dir():
        attempt, checkpoint = target, target / task.checkpoint
    elif target.is_file():
        checkpoint = target
        at_home = target.parts[-len(inside):] == inside
        attempt = target.parents[len(inside) - 1] if at_home else target.parent
    else:
        raise UserError("no such attempt folder or checkpoint", where=str(target))
    script = Path(script).resolve() if script else attempt / task.template
    for path, what in ((checkpoint, "checkpoint"), (script, f"spliced {task.template}")):
        if not path.is_file():
            raise UserError(f"no {what} at {path}", where=str(target),
                            fix="pass an attempt folder, or a ckpt.pt with --script FILE")
    return attempt, script, checkpoint


def run_manual(task: TaskSpec, target: Path, *, evals: Path, out_dir: Path,
               settings: EvalSettings, script: Path | None = None,
               timeout_s: float = 24 * 3600) -> StageOutcome:
    """The task's frozen eval script on `target`, through the local runner. With no token
    shards given, the metrics another stage owns (val_loss) are not recomputed."""
    from harness.runners.local import LocalRunner
    from harness.runtime.evalsets import read_manifest

    attempt, spliced, checkpoint = resolve_target(task, target, script)
    read_manifest(evals)  # unprepared eval sets are the user's to fix: exit 2, not a failure
    out_dir = Path(out_dir).resolve()
    metrics = headline(task)
    spec = build(script=task.root / task.eval_script, attempt_dir=attempt,
                 checkpoint=checkpoint, evals=Path(evals).resolve(), out_dir=out_dir,
                 settings=settings, timeout_s=timeout_s, metrics=metrics)
    spec = StageSpec(name=spec.name, argv=(*spec.argv, f"--script={spliced}"), cwd=spec.cwd,
                     log_dir=spec.log_dir, timeout_s=spec.timeout_s, env=spec.env)
    return collect(LocalRunner().run(spec), out_dir, list(metrics))
