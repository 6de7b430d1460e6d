"""A fast stand-in for the local runner, for session tests that need no real training.

It writes what the frozen template would (metrics.jsonl, final.json, or an error record)
into the stage's folder, so everything downstream of the runner runs for real.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from harness.checks import preflight
from harness.runners.base import StageRun, StageSpec
from harness.runners.local import LocalRunner
from harness.stages import lmeval

STDOUT_DECOY = "TRAIN_METRICS: step=999, train_loss=0.0001, val_loss=0.0001"


@dataclass
class FakeRunner:
    """outcome: "ok" (val_loss), "raise" (the submission raised), "infra" (never started)."""

    outcome: str = "ok"
    val_loss: float = 4.25
    sleep_s: float = 0.0
    name: str = "fake"
    # val_loss moves by this much per seed above the scale's 42 (--init_seed), so that seeds
    # differ; and lm-eval's standard error of every metric, when set.
    per_seed: float = 0.0
    stderr: float | None = None

    def _val_loss(self, spec: StageSpec) -> float:
        seed = next((int(a.split("=", 1)[1]) for a in spec.argv
                     if a.startswith("--init_seed=")), 42)
        return self.val_loss + self.per_seed * (seed - 42)

    def run(self, spec: StageSpec) -> StageRun:
        out = spec.log_dir
        out.mkdir(parents=True, exist_ok=True)
        stdout, stderr = out / "stdout.log", out / "stderr.log"
        if spec.name == preflight.STAGE:  # the free pre-flight runs for real
            return LocalRunner().run(spec)
        if self.outcome == "infra":
            return StageRun(None, False, False, 0.0, stdout, stderr, error="no such image")
        time.sleep(self.sleep_s)
        if spec.name == lmeval.STAGE:
            return self._eval(spec, stdout, stderr)
        rows = [{"step": s, "train_loss": None if s == 0 else 5.0 - s / 100,
                 "val_loss": 5.5 - s / 100} for s in (0, 10, 20, 30)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # A decoy: scores must come from metrics.jsonl, never from what a stage prints.
        stdout.write_text(f"fake stage {spec.name} in {spec.cwd}\n{STDOUT_DECOY}\n")
        stderr.write_text("")
        if self.outcome == "raise":
            (out / "guard_rank0.json").write_text(json.dumps({"started": True}))
            (out / "error_rank0.json").write_text(json.dumps(
                {"kind": "exception", "message": "Traceback ...\nRuntimeError: boom at step 5\n"}))
            return StageRun(1, True, False, 0.01, stdout, stderr)
        (out / "final.json").write_text(json.dumps({"val_loss": self._val_loss(spec),
                                                    "rank_param_checksums": [7.0, 7.0]}))
        return StageRun(0, True, False, 0.01, stdout, stderr)

    def _eval(self, spec: StageSpec, stdout: Path, stderr: Path) -> StageRun:
        """What eval_lm.py writes: an eval.json with every headline metric and, when asked
        to (--data-dir), val_loss recomputed from the checkpoint: here training's own."""
        # Exactly the metrics the stage asked for (--metric NAME=TASK/METRIC), as the script.
        metrics = {a.removeprefix("--metric=").partition("=")[0]: 50.0
                   for a in spec.argv if a.startswith("--metric=")}
        detail = {k: {"stderr": self.stderr} for k in metrics} if self.stderr else {}
        if any(a.startswith("--data-dir=") for a in spec.argv):
            # The checkpoint's own loss: what training recorded in this attempt.
            trained = spec.cwd / "pretrain" / "final.json"
            metrics["val_loss"] = json.loads(trained.read_text())["val_loss"] \
                if trained.is_file() else self.val_loss
        (spec.log_dir / lmeval.EVAL_FILE).write_text(json.dumps(
            {"format": lmeval.FORMAT, "metrics": metrics, "detail": detail}))
        stdout.write_text(f"fake stage {spec.name}\n")
        stderr.write_text("")
        return StageRun(0, True, False, 0.01, stdout, stderr)
