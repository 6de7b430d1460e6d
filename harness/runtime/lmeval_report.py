"""eval.json's format: what the lm-eval stage's process writes and the host stage reads.

Units live here, so the entry script, the stage and the docs agree: accuracies are percent
(46.68, not 0.4668), as in the task statement's table; perplexities are plain ratios;
bits_per_byte is in bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SAMPLES_FILE = "samples.jsonl"
FORMAT = "harness-lm-eval/1"
FULL_BOOTSTRAP_ITERS = 100_000
CONVENTION = ("accuracies (acc, acc_norm) and their stderr are percent: 46.68 means 46.68%; "
              "perplexities are ratios (exp of the mean negative log-likelihood per word or "
              "token); bits_per_byte is in bits")

# The headline metrics are the task's (task.toml `source`, passed in by the stage). These are
# the other numbers of the same lm-eval tasks, kept beside them for readers: our name ->
# (lm-eval task, lm-eval metric).
SECONDARY: dict[str, tuple[str, str]] = {
    "wikitext2_byte_ppl": ("wikitext", "byte_perplexity"),
    "wikitext2_bits_per_byte": ("wikitext", "bits_per_byte"),
    "lambada_acc": ("lambada_openai", "acc"),
    "arc_easy_acc_norm": ("arc_easy", "acc_norm"),
    "hellaswag_acc": ("hellaswag", "acc"),
    "piqa_acc_norm": ("piqa", "acc_norm"),
}
PERCENT_METRICS = frozenset({"acc", "acc_norm"})


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


def summarize(results: Mapping[str, Any], tasks: Mapping[str, str],
              headline: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """eval.json's metric sections from simple_evaluate's results.

    `tasks` maps lm-eval's task name to the name ours is registered under (harness_...);
    `headline` the task's metric names to (lm-eval task, lm-eval metric).
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
              for k, (t, m) in {**headline, **SECONDARY}.items()}
    return {"metrics": pick(headline), "secondary": pick(SECONDARY), "detail": detail,
            "tasks": per_task, "convention": CONVENTION}
