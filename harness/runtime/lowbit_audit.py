"""The pre-flight's low-bit check, run again on the real model while it trains and once more on
the final checkpoint.

Pre-flight sees a tiny model for a few calls; a submission could keep float weights for later
(after N calls, past some step, once a buffer says so), or for inputs the check never shows it
(more rows, other lengths). Here the same matmul-operand capture (runtime/preflight_lowbit.py)
runs on the model being trained, on every rank: at every evaluation of the pretrain stage, at
a few steps between them that the guard draws in secret (runtime/guard.py), and on the model
rebuilt from the checkpoint in the eval stage. Each audit is a `Plan` of forwards, drawn from
the guard's secret random source (`draw_plan`):

* train() with autograd, as training runs it, on a few random rows of the batch and a window
  of random length and offset (so the shape is never one the submission can wait for);
* eval() under no_grad, as scoring runs it, on another such draw;
* eval() on the full sequence length the validation loss is scored at, on random rows.

Every pass takes at most AUDIT_ROWS rows: measured on one H100 (2026-12-07, gpt-345m), an
eval() forward of the whole 64-row batch on the uncompiled model took 19.7 GiB beyond the
model, 12.3 GiB of it float32 logits.

The weight rows whose levels are counted are drawn from a secret seed too. Every forward uses
the uncompiled module: the capture works at the torch function level, which a compiled graph
never reaches. An audit leaves no trace in the run (`untouched`): the torch random streams,
the module buffers and the modules' plain number attributes are as they were before it, so a
run is the same whichever steps were audited, and a resumed run the same as an uninterrupted
one.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from harness.runtime.preflight_lowbit import Pass, capture_passes, summarise

# Rows of the batch any audit forward takes at most: the uncompiled model materialises its
# float32 logits (rows x block_size x vocab: 12.3 GiB for a 64-row gpt-345m micro-batch), and
# a forward with autograd keeps every intermediate. A few rows of a 64-row micro-batch stay
# small next to training's memory.
AUDIT_ROWS = 8
TRAIN_ROWS = AUDIT_ROWS


class LowBitViolation(Exception):
    """A BitLinear matmul saw a weight with more than the allowed levels during the run."""


@dataclass(frozen=True)
class Window:
    """Rows of a (batch, tokens) tensor and a run of token positions: one audit forward's input."""

    rows: tuple[int, ...]
    start: int
    length: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        picked = t.index_select(0, torch.tensor(self.rows, device=t.device))
        return picked[:, self.start:self.start + self.length]

    def shape(self) -> str:
        return f"{len(self.rows)}x{self.length} tokens"

    def as_dict(self) -> dict[str, Any]:
        return {"rows": len(self.rows), "start": self.start, "tokens": self.length}


@dataclass(frozen=True)
class Plan:
    """What one audit forwards: (mode, window) pairs, and the seed of the weight rows counted."""

    passes: tuple[tuple[str, Window], ...]
    row_seed: int


def whole(rows: int, tokens: int) -> Window:
    return Window(tuple(range(rows)), 0, tokens)


def _window(rng: random.Random, rows: int, tokens: int, most_rows: int) -> Window:
    least = min(2, rows)  # several sequences whenever the batch has them
    picked = sorted(rng.sample(range(rows), rng.randint(least, max(least, min(rows, most_rows)))))
    length = rng.randint(1, tokens)
    return Window(tuple(picked), rng.randint(0, tokens - length), length)


def draw_plan(rng: random.Random, rows: int, tokens: int) -> Plan:
    """A train() forward on a random window, an eval() one on another, and eval() at the full
    sequence length on random rows, each at most AUDIT_ROWS rows of the (rows, tokens)
    batch. `rng` must be a source the submission cannot read or predict (random.SystemRandom):
    never torch's, which would also move the training run's."""
    return Plan((("train", _window(rng, rows, tokens, TRAIN_ROWS)),
                 ("eval", _window(rng, rows, tokens, AUDIT_ROWS)),
                 ("eval", _full_length(rng, rows, tokens))), rng.getrandbits(63))


def _full_length(rng: random.Random, rows: int, tokens: int) -> Window:
    if rows <= AUDIT_ROWS:
        return whole(rows, tokens)
    return Window(tuple(sorted(rng.sample(range(rows), AUDIT_ROWS))), 0, tokens)


def secret_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class AuditRecord:
    where: str  # "step 1000", "step 1234 (spot)", "final checkpoint"
    layers: int
    seconds: float
    summary: str
    problems: list[str] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"where": self.where, "layers": self.layers, "seconds": round(self.seconds, 3),
                "summary": self.summary, "problems": self.problems, "passes": self.passes}


def bitlinears(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)
            and isinstance(m, nn.Module)}


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run the block, then put back what a forward may have moved: the CPU and CUDA random
    streams (dropout in train() draws from them), every module's buffers (values and which
    tensor each name holds) and its plain bool/int/float attributes (counters). Parameters are
    not copied: a forward that writes its own weights in place is no quantizer's."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    saved = []
    for module in model.modules():
        buffers = dict(module._buffers)
        values = {k: b.detach().clone() for k, b in buffers.items() if b is not None}
        numbers = {k: v for k, v in vars(module).items()
                   if type(v) in (bool, int, float)}
        saved.append((module, buffers, values, numbers))
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        try:
            yield
        finally:
            with torch.no_grad():
                for module, buffers, values, numbers in saved:
                    module._buffers.clear()
                    module._buffers.update(buffers)
                    for k, v in values.items():
                        b = buffers[k]
                        assert b is not None
                        b.copy_(v)
                    vars(module).update(numbers)


def audit(model: nn.Module, cls: type, idx: torch.Tensor, targets: torch.Tensor | None, *,
          where: str, autocast: AbstractContextManager[Any] | None = None,
          plan: Plan | None = None) -> AuditRecord:
    """Capture every BitLinear's matmul operands in the plan's forwards (by default the whole
    batch in train() and in eval(), with secret weight rows); the model's mode, random streams
    and buffers are restored afterwards. The record lists one problem per failing layer and
    forward."""
    t0 = time.monotonic()
    layers = bitlinears(model, cls)
    if plan is None:
        everything = whole(int(idx.shape[0]), int(idx.shape[1]))
        plan = Plan((("train", everything), ("eval", everything)), secret_seed())

    def forward(w: Window) -> Any:
        return lambda: model(w.take(idx), None if targets is None else w.take(targets))

    passes = [Pass(mode, f"{mode}() on {w.shape()}", forward(w)) for mode, w in plan.passes]
    with untouched(model):
        verdicts = capture_passes(model, layers, passes, autocast, plan.row_seed)
    problems = [f"{v.layer} in {v.mode}: {v.problem}" for v in verdicts if v.problem]
    if not layers:
        problems.append(f"the model has no {cls.__name__} layers")
    return AuditRecord(where, len(layers), time.monotonic() - t0, summarise(verdicts), problems,
                       [{"mode": mode, **w.as_dict()} for mode, w in plan.passes])


def require(record: AuditRecord) -> None:
    if record.problems:
        more = f" (and {len(record.problems) - 1} more)" if len(record.problems) > 1 else ""
        raise LowBitViolation(f"low-bit audit at {record.where}: {record.problems[0]}{more}")
