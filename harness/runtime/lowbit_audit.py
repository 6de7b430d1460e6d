"""The pre-flight's low-bit check, run again on the real model while it trains and once more on
the final checkpoint.

Pre-flight sees a tiny model for a few calls; a submission could keep float weights for later
(after N calls, past some step, once a buffer says so). Here the same matmul-operand capture
(runtime/preflight_lowbit.py) runs on the model being trained, on every rank, at every
evaluation of the pretrain stage, and on the model rebuilt from the checkpoint in the eval
stage: one forward in train() with autograd on, as training runs it, and one in eval() under
no_grad, as scoring runs it. Both use the uncompiled module: the capture works at the torch
function level, which a compiled graph never reaches.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from harness.runtime.preflight_lowbit import capture_modes, summarise

# Rows of the batch the audit forwards: one sequence is enough to reach every matmul, and
# keeps the extra memory of a forward with autograd small next to training's.
AUDIT_ROWS = 1


class LowBitViolation(Exception):
    """A BitLinear matmul saw a weight with more than the allowed levels during the run."""


@dataclass
class AuditRecord:
    where: str  # "step 1000", "final checkpoint"
    layers: int
    seconds: float
    summary: str
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"where": self.where, "layers": self.layers, "seconds": round(self.seconds, 3),
                "summary": self.summary, "problems": self.problems}


def bitlinears(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)
            and isinstance(m, nn.Module)}


def audit(model: nn.Module, cls: type, idx: torch.Tensor, targets: torch.Tensor | None, *,
          where: str, autocast: AbstractContextManager[Any] | None = None) -> AuditRecord:
    """Capture every BitLinear's matmul operands in train() and eval(); the model's mode is
    restored afterwards. The record lists one problem per failing layer and mode."""
    t0 = time.monotonic()
    layers = bitlinears(model, cls)
    idx = idx[:AUDIT_ROWS]
    targets = None if targets is None else targets[:AUDIT_ROWS]
    verdicts = capture_modes(model, layers, lambda: model(idx, targets), autocast)
    problems = [f"{v.layer} in {v.mode}(): {v.problem}" for v in verdicts if v.problem]
    if not layers:
        problems.append(f"the model has no {cls.__name__} layers")
    return AuditRecord(where, len(layers), time.monotonic() - t0, summarise(verdicts), problems)


def require(record: AuditRecord) -> None:
    if record.problems:
        more = f" (and {len(record.problems) - 1} more)" if len(record.problems) > 1 else ""
        raise LowBitViolation(f"low-bit audit at {record.where}: {record.problems[0]}{more}")
