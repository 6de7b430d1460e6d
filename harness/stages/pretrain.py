"""The pretrain stage: torchrun over the spliced template; scores come from its files."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.launch import LAUNCH_FILE
from harness.runners.base import Outcome, StageRun, StageSpec
from harness.runners.local import outside_signal
from harness.task import ScaleSpec

STAGE = "pretrain"
GUARD = "harness.guard"
LAUNCHER = "harness.launch"
# Parameter checksums (float64 sums) of the ranks may differ by this much, relatively.
CHECKSUM_RTOL = 1e-9


def build(scale: ScaleSpec, *, attempt_dir: Path, script: Path, data_dir: Path,
          out_dir: Path, python: str = sys.executable) -> StageSpec:
    # torchrun through harness.launch, which records how each rank ended; every rank starts
    # in the guard, which checks and audits the spliced script (harness/guard.py), then runs it.
    argv = [
        python, "-m", LAUNCHER, "--standalone",
        f"--nproc_per_node={scale.nproc_per_node}", "-m", GUARD, str(script),
        *scale.cli_args(), f"--data_dir={data_dir}", f"--out_dir={out_dir}",
    ]
    # On CPU each process gets one thread: N processes share the machine's cores.
    env = {"OMP_NUM_THREADS": "1"} if scale.device == "cpu" else {}
    return StageSpec(name=STAGE, argv=tuple(argv), cwd=attempt_dir, log_dir=out_dir,
                     timeout_s=float(scale.timeout_s), env=env)


@dataclass(frozen=True)
class PretrainOutcome:
    outcome: Outcome
    reason: str
    metrics: dict[str, float]
    curve: list[dict[str, Any]]
    final: dict[str, Any]
    traceback: str = ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_curve(out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    path = out_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a torn last line from a killed run
    return rows


def rank_records(out_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The readable <kind>_rank<R>.json records of the ranks, in rank order."""
    found = [_read_json(p) for p in sorted(out_dir.glob(f"{kind}_rank*.json"))]
    return [r for r in found if isinstance(r, dict)]


def frozen_errors(out_dir: Path) -> list[dict[str, Any]]:
    """Refusals the frozen template recorded itself (bad scale config or data)."""
    return rank_records(out_dir, "error")


def violations(out_dir: Path) -> list[dict[str, Any]]:
    """Rule violations the guard recorded (harness/guard.py), one per rank that saw one."""
    return rank_records(out_dir, "violation")


def rank_divergence(final: dict[str, Any]) -> str | None:
    """DDP leaves every rank with bitwise the same parameters; a submission that behaves
    differently on some rank (in-place updates, rank-dependent randomness) does not."""
    sums = final.get("rank_param_checksums")
    if not isinstance(sums, list) or not sums:
        return "final.json has no per-rank parameter checksums"
    ref = sums[0]
    if not all(isinstance(c, int | float) and math.isfinite(c) for c in sums):
        return f"non-finite parameter checksums per rank: {sums}"
    if any(abs(c - ref) > CHECKSUM_RTOL * max(1.0, abs(ref)) for c in sums):
        return f"ranks ended with different parameters (checksums {sums})"
    return None


def killed_rank(out_dir: Path) -> str | None:
    """Why the run's failure was a kill from outside, from the launcher's record, or None.
    SIGKILL of any rank counts (torchrun only ever sends SIGTERM); another signal counts when
    it hit the rank that failed first."""
    record = _read_json(out_dir / LAUNCH_FILE)
    if not isinstance(record, dict) or not isinstance(record.get("failures"), dict):
        return None
    codes = {rank: f.get("exitcode") for rank, f in record["failures"].items()
             if isinstance(f, dict) and isinstance(f.get("exitcode"), int)}
    for rank, code in sorted(codes.items()):
        if code == -9:
            return f"rank {rank} was killed by SIGKILL (the out-of-memory killer or an operator)"
    first = str(record.get("first"))
    code = codes.get(first)
    # The code running in a rank cannot send these (the static rules refuse os and signal).
    name = outside_signal(code)
    if name is not None:
        return f"rank {first} was killed by {name} from outside the harness"
    return None


def collect(run: StageRun, out_dir: Path) -> PretrainOutcome:
    curve = read_curve(out_dir)
    if not run.started:
        return PretrainOutcome(Outcome.FAILED_INFRA, run.error or "stage did not start", {},
                               curve, {})
    if run.cancelled:
        return PretrainOutcome(Outcome.CANCELLED, "cancelled through the harness", {}, curve, {})
    found = violations(out_dir)
    if found:
        # Before infra and the ranks' error files: the violation is why the run stopped.
        v = found[0]
        return PretrainOutcome(Outcome.RULE_VIOLATION,
                               f"rule violation ({v.get('rule')}, rank {v.get('rank')}): "
                               f"{v.get('message')}", {}, curve, {})
    if run.infra:
        # Before the template's own error files: when the OOM killer or a node failure takes
        # one rank, the others record collective errors that are not the submission's fault.
        return PretrainOutcome(Outcome.FAILED_INFRA, run.infra, {}, curve, {})
    killed = killed_rank(out_dir)
    if killed:
        return PretrainOutcome(Outcome.FAILED_INFRA, killed, {}, curve, {})
    errors = frozen_errors(out_dir)
    ours = [e for e in errors if e.get("kind") in ("config", "data")]
    if ours:
        # The template refused our own inputs: the submission never ran, so never charge it.
        return PretrainOutcome(Outcome.FAILED_INFRA,
                               f"{ours[0]['kind']} error: {ours[0].get('message')}", {}, curve, {})
    if not run.timed_out and run.returncode not in (0, None) \
            and not rank_records(out_dir, "guard"):
        # No rank reached the point where the submission is imported: the launcher, torchrun
        # or the guard itself failed (harness not installed in the image, say).
        return PretrainOutcome(Outcome.FAILED_INFRA,
                               f"the stage failed before the submission ran (exit code "
                               f"{run.returncode}; see the stage's stderr)", {}, curve, {})
    if errors:
        message = str(errors[0].get("message", "")).rstrip()
        return PretrainOutcome(Outcome.FAILED_SUBMISSION,
                               f"training raised: {message.splitlines()[-1] if message else '?'}",
                               {}, curve, {}, traceback=message)
    if run.timed_out:
        return PretrainOutcome(Outcome.FAILED_SUBMISSION,
                               f"time limit reached after {run.wall_s:.0f}s", {}, curve, {})
    if run.returncode != 0:
        return PretrainOutcome(Outcome.FAILED_SUBMISSION,
                               f"training exited with code {run.returncode}", {}, curve, {})
    final = _read_json(out_dir / "final.json")
    if not isinstance(final, dict):
        return PretrainOutcome(Outcome.FAILED_INFRA, "training exited 0 without final.json",
                               {}, curve, {})
    val = final.get("val_loss")
    if not isinstance(val, (int, float)) or not math.isfinite(val):
        return PretrainOutcome(Outcome.FAILED_SUBMISSION, f"val_loss is not finite ({val})", {},
                               curve, final)
    diverged = rank_divergence(final)
    if diverged:
        return PretrainOutcome(Outcome.RULE_VIOLATION, f"rule violation (ranks): {diverged}",
                               {}, curve, final)
    return PretrainOutcome(Outcome.SUCCEEDED, "ok", {"val_loss": float(val)}, curve, final)
