"""The lm-eval stage: the frozen eval_lm.py scores the trained checkpoint; scores come from
the eval.json it writes.

Metric names and units live here, so the entry script, the stage and the docs agree:
accuracies are percent (46.68, not 0.4668), as in the task statement's table; perplexities
are plain ratios; bits_per_byte is in bits.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.runners.base import Outcome, StageRun, StageSpec
from harness.task import ScaleSpec

STAGE = "lm-eval"
SCRIPT = "eval_lm.py"
EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
ERROR_FILE = "error.json"
FORMAT = "harness-lm-eval/1"
CONVENTION = ("accuracies (acc, acc_norm) and their stderr are percent: 46.68 means 46.68%; "
              "perplexities are ratios (exp of the mean negative log-likelihood per word or "
              "token); bits_per_byte is in bits")

# Our name -> (lm-eval task, lm-eval metric). Headline metrics are the task's own (task.toml).
HEADLINE: dict[str, tuple[str, str]] = {
    "wikitext2_ppl": ("wikitext", "word_perplexity"),
    "lambada_ppl": ("lambada_openai", "perplexity"),
    "arc_easy": ("arc_easy", "acc"),
    "hellaswag": ("hellaswag", "acc_norm"),
    "piqa": ("piqa", "acc"),
    "winogrande": ("winogrande", "acc"),
}
SECONDARY: dict[str, tuple[str, str]] = {
    "wikitext2_byte_ppl": ("wikitext", "byte_perplexity"),
    "wikitext2_bits_per_byte": ("wikitext", "bits_per_byte"),
    "lambada_acc": ("lambada_openai", "acc"),
    "arc_easy_acc_norm": ("arc_easy", "acc_norm"),
    "hellaswag_acc": ("hellaswag", "acc"),
    "piqa_acc_norm": ("piqa", "acc_norm"),
}
PERCENT_METRICS = frozenset({"acc", "acc_norm"})

# The smoke scale proves the path, not the numbers: a few documents per task, and a short
# bootstrap for lambada's perplexity stderr (lm-eval's default is 100000 resamples).
SMOKE_LIMIT = 8
SMOKE_BOOTSTRAP_ITERS = 1000
FULL_BOOTSTRAP_ITERS = 100_000


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


def evals_dir(scale: ScaleSpec, data_root: Path) -> Path:
    """Where a scale's eval sets live; the smoke ones are built on first use from the corpus."""
    from harness.data.evals import prepare_smoke_evals, read_manifest

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
          settings: EvalSettings, timeout_s: float, python: str = sys.executable,
          data_dir: Path | None = None) -> StageSpec:
    argv = [python, str(script), f"--attempt-dir={attempt_dir}", f"--checkpoint={checkpoint}",
            f"--evals={evals}", f"--out={out_dir / EVAL_FILE}",
            f"--bootstrap-iters={settings.bootstrap_iters}", f"--device={settings.device}"]
    if data_dir is not None:
        argv.append(f"--data-dir={data_dir}")
    if settings.limit is not None:
        argv.append(f"--limit={settings.limit}")
    return StageSpec(name=STAGE, argv=tuple(argv), cwd=attempt_dir, log_dir=out_dir,
                     timeout_s=timeout_s, env={})


# --- eval.json --------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    """lm-eval's value as a float; its "N/A" (no stderr for this metric) as None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _scaled(metric: str, value: float | None) -> float | None:
    if value is None or metric not in PERCENT_METRICS:
        return value
    return 100.0 * value


def task_metrics(task_results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """One task's lm-eval "metric,filter" keys -> {metric: {value, stderr}}, percent where due."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if filt != "none" or metric.endswith("_stderr") or metric == "alias":
            continue
        stderr = _number(task_results.get(f"{metric}_stderr,{filt}"))
        out[metric] = {"value": _scaled(metric, _number(value)),
                       "stderr": _scaled(metric, stderr)}
    return out


def summarize(results: Mapping[str, Any], tasks: Mapping[str, str]) -> dict[str, Any]:
    """eval.json's metric sections from simple_evaluate's results.

    `tasks` maps lm-eval's task name to the name ours is registered under (harness_...).
    """
    per_task: dict[str, Any] = {}
    for name, ours in tasks.items():
        counts = results.get("n-samples", {}).get(ours, {})
        per_task[name] = {"task": ours, "metrics": task_metrics(results["results"][ours]),
                          "samples": counts.get("effective"), "docs": counts.get("original"),
                          "version": results.get("versions", {}).get(ours)}

    def pick(table: Mapping[str, tuple[str, str]]) -> dict[str, float | None]:
        return {k: per_task[t]["metrics"].get(m, {}).get("value") for k, (t, m) in table.items()}

    detail = {k: {"lm_eval_task": t, "lm_eval_metric": m,
                  "stderr": per_task[t]["metrics"].get(m, {}).get("stderr"),
                  "samples": per_task[t]["samples"]}
              for k, (t, m) in {**HEADLINE, **SECONDARY}.items()}
    return {"metrics": pick(HEADLINE), "secondary": pick(SECONDARY), "detail": detail,
            "tasks": per_task, "convention": CONVENTION}


@dataclass(frozen=True)
class EvalOutcome:
    outcome: Outcome
    reason: str
    metrics: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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


def _failure(out_dir: Path, run: StageRun) -> EvalOutcome | None:
    """The outcome of a run that did not finish cleanly; None when it did."""
    if not run.started:
        return EvalOutcome(Outcome.FAILED_INFRA, run.error or "lm-eval stage did not start", {})
    if run.cancelled:
        return EvalOutcome(Outcome.CANCELLED, "lm-eval: cancelled through the harness", {})
    if run.infra:
        return EvalOutcome(Outcome.FAILED_INFRA, f"lm-eval: {run.infra}", {})
    error = _read_json(out_dir / ERROR_FILE)
    if isinstance(error, dict):
        # eval_lm.py says whose fault it was: the submission's code, or our side.
        kind = {"submission": Outcome.FAILED_SUBMISSION,
                "rule_violation": Outcome.RULE_VIOLATION}.get(str(error.get("kind")),
                                                              Outcome.FAILED_INFRA)
        message = str(error.get("message", "")).strip().splitlines() or ["?"]
        return EvalOutcome(kind, f"lm-eval: {message[-1]}", {}, {"error": error})
    if run.timed_out:
        # Training finished in its own limit, so a slow eval is ours to size: not charged.
        return EvalOutcome(Outcome.FAILED_INFRA,
                           f"lm-eval: time limit reached after {run.wall_s:.0f}s", {})
    if run.returncode != 0:
        return EvalOutcome(Outcome.FAILED_INFRA,
                           f"lm-eval exited with code {run.returncode}", {})
    return None


def collect(run: StageRun, out_dir: Path, expected: Sequence[str]) -> EvalOutcome:
    failed = _failure(out_dir, run)
    if failed is not None:
        return failed
    report = _read_json(out_dir / EVAL_FILE)
    problem = metric_problem(report, expected)
    if problem is not None:
        return EvalOutcome(Outcome.FAILED_INFRA, f"lm-eval: {problem}", {})
    metrics = {name: float(report["metrics"][name]) for name in expected}
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        # The model's own numbers (NaN/inf log-likelihoods): the submission's fault.
        return EvalOutcome(Outcome.FAILED_SUBMISSION,
                           f"lm-eval: non-finite {', '.join(bad)}", {}, report)
    return EvalOutcome(Outcome.SUCCEEDED, "ok", metrics, report)


# --- `harness eval`: the stage on any attempt or checkpoint -------------------------------------

def resolve_target(target: Path, script: Path | None = None) -> tuple[Path, Path, Path]:
    """(attempt dir, spliced script, checkpoint) for an attempt folder or a ckpt.pt file.

    A checkpoint inside an attempt (ATTEMPT/pretrain/ckpt.pt) finds its script there.
    """
    from harness.errors import UserError

    target = Path(target).resolve()
    if target.is_dir():
        attempt, checkpoint = target, target / "pretrain" / "ckpt.pt"
    elif target.is_file():
        checkpoint = target
        attempt = target.parent.parent if target.parent.name == "pretrain" else target.parent
    else:
        raise UserError("no such attempt folder or checkpoint", where=str(target))
    script = Path(script).resolve() if script else attempt / "custom_pretrain.py"
    for path, what in ((checkpoint, "checkpoint"), (script, "spliced custom_pretrain.py")):
        if not path.is_file():
            raise UserError(f"no {what} at {path}", where=str(target),
                            fix="pass an attempt folder, or a ckpt.pt with --script FILE")
    return attempt, script, checkpoint


def run_manual(target: Path, *, evals: Path, out_dir: Path, settings: EvalSettings,
               task_root: Path, script: Path | None = None, timeout_s: float = 24 * 3600,
               expected: Sequence[str] = tuple(HEADLINE)) -> EvalOutcome:
    """The frozen eval_lm.py of the task on `target`, through the local runner."""
    from harness.data.evals import read_manifest
    from harness.runners.local import LocalRunner

    attempt, spliced, checkpoint = resolve_target(target, script)
    read_manifest(evals)  # unprepared eval sets are the user's to fix: exit 2, not a failure
    out_dir = Path(out_dir).resolve()
    spec = build(script=task_root / SCRIPT, attempt_dir=attempt, checkpoint=checkpoint,
                 evals=Path(evals).resolve(), out_dir=out_dir, settings=settings,
                 timeout_s=timeout_s)
    spec = StageSpec(name=spec.name, argv=(*spec.argv, f"--script={spliced}"), cwd=spec.cwd,
                     log_dir=spec.log_dir, timeout_s=spec.timeout_s, env=spec.env)
    return collect(LocalRunner().run(spec), out_dir, expected)
