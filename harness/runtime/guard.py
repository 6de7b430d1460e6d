"""The pretrain stage's entry point: torchrun starts this, not the spliced template itself.

    python -m torch.distributed.run ... -m harness.runtime.guard SPLICED.py --name=value ...

On every rank, before any submission code runs, it takes the table of torch functions the
template relies on (integrity.TorchTable). It then imports the spliced file as a module (the
region code runs; `main()` does not), checks that the frozen functions and the torch table are
unmodified, installs the template's RUN_AUDIT hook and calls the template's own `run()`. The
template calls the hook at every iteration. Before every evaluation it runs the integrity
check again, then the low-bit audit on the uncompiled model; at SPOT_AUDITS other steps, drawn
in secret when the run starts, the low-bit audit alone ("spot audits"); at every other step it
returns at once. What each audit forwards (rows, lengths, the weight rows counted) is drawn
from the same secret source, random.SystemRandom: the operating system's, which the
submission can neither read nor predict, and never torch's, whose streams the training run
owns. Each audit is appended to the audit file; a violation is recorded in
violation_rank<R>.json before the run is stopped, and the stage reads that file first.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import traceback
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.runtime.fileio import atomic_write_json

MODULE_NAME = "custom_pretrain"
EXIT_VIOLATION = 3
# Spot audits per rank over a whole run, at steps between evaluations drawn in secret; a
# resumed launch does its share of the iterations left. Each costs one audit (about a second
# at gpt-345m on one GPU, docs/security.md), and every rank draws its own steps.
SPOT_AUDITS = 3


def rank() -> str:
    return os.environ.get("RANK", "0")


def violation_file(out_dir: Path) -> Path:
    return out_dir / f"violation_rank{rank()}.json"


def audit_file(out_dir: Path) -> Path:
    return out_dir / f"audit_rank{rank()}.jsonl"


def record_violation(out_dir: Path, rule: str, message: str, **extra: Any) -> None:
    atomic_write_json(violation_file(out_dir), {"rule": rule, "message": message, "rank": rank(),
                                          **extra})


def out_dir_of(args: list[str]) -> Path:
    for arg in args:
        if arg.startswith("--out_dir="):
            return Path(arg.split("=", 1)[1])
    return Path("out")


def resumed_at(args: list[str]) -> int:
    """The iteration a resumed launch starts at, from the checkpoint's name (resume-NNNNNNN.pt,
    which the template checks against the iteration the file holds); 0 for a first launch."""
    for arg in args:
        if arg.startswith("--resume_from="):
            found = re.search(r"resume-(\d{7})\.pt$", arg)
            return int(found[1]) if found else 0
    return 0


def spot_steps(rng: random.Random, start: int, last: int, every: int,
               count: int = SPOT_AUDITS) -> list[int]:
    """Steps in [start, last) that are no evaluation's, for a launch starting at `start` of a
    run of `last` iterations: `count` over a whole run, a share of them for a resumed one."""
    between = [s for s in range(start, last) if s % every]
    share = math.ceil(count * (last - start) / last) if last else 0
    return sorted(rng.sample(between, min(share, len(between))))


class Auditor:
    """The template's RUN_AUDIT, called at every iteration: integrity and the low-bit audit
    before each evaluation, the low-bit audit alone at the secret spot steps."""

    def __init__(self, module: ModuleType, source: str, table: Any, out_dir: Path,
                 start: int = 0) -> None:
        self.module, self.source, self.table, self.out_dir = module, source, table, out_dir
        self.start = start
        self.random = random.SystemRandom()
        self.steps: list[int] = []  # evaluations audited
        self.spots: list[int] | None = None  # the secret schedule, drawn at the first call
        self.spotted: list[int] = []  # spot audits done

    def __call__(self, model: Any, idx: Any, targets: Any,
                 autocast: AbstractContextManager[Any], step: int,
                 evaluation: bool = True) -> None:
        if self.spots is None:
            # The template's globals hold the run's settings by the first call.
            self.spots = spot_steps(self.random, self.start, int(self.module.max_iters),
                                    int(self.module.eval_interval))
        if not evaluation:
            if step in self.spots:
                self.spotted.append(step)
                self._audit(model, idx, autocast, step, f"step {step} (spot)")
            return
        from harness.runtime.integrity import IntegrityError, verify

        self.steps.append(step)
        try:
            verify(self.module, self.source, self.table, when=f"before the evaluation at step "
                                                               f"{step}")
        except IntegrityError as e:
            record_violation(self.out_dir, "integrity", str(e), step=step)
            raise
        self._audit(model, idx, autocast, step, f"step {step}")

    def _audit(self, model: Any, idx: Any, autocast: AbstractContextManager[Any], step: int,
               where: str) -> None:
        from harness.runtime.lowbit_audit import LowBitViolation, audit, draw_plan, require

        plan = draw_plan(self.random, int(idx.shape[0]), int(idx.shape[1]))
        # Logits only: the loss is no BitLinear's, and the whole batch's would cost gigabytes.
        record = audit(model, self.module.BitLinear, idx, None, where=where, autocast=autocast,
                       plan=plan)
        kind = "spot" if where.endswith("(spot)") else "evaluation"
        with audit_file(self.out_dir).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "kind": kind, **record.as_dict()}) + "\n")
        try:
            require(record)
        except LowBitViolation as e:
            record_violation(self.out_dir, "low-bit", str(e), step=step)
            raise


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m harness.runtime.guard SPLICED.py [--name=value ...]",
              file=sys.stderr)
        return 2
    script, args = Path(argv[0]).resolve(), argv[1:]
    out_dir = out_dir_of(args)
    # Before the submission's code exists in this process: the reference it is compared to.
    from harness.runtime.integrity import IntegrityError, TorchTable, verify

    table = TorchTable()
    source = script.read_text(encoding="utf-8")
    from harness.runtime.spliced import load_spliced

    # From here on a failure can be the submission's; before it, only ours (the stage reads
    # this marker: no marker on any rank means the submission never ran).
    atomic_write_json(out_dir / f"guard_rank{rank()}.json", {"rank": rank(), "started": True})

    try:
        module = load_spliced(script, MODULE_NAME)
    except BaseException as e:
        # The region's module-level code raised: the submission's failure, as in the template.
        atomic_write_json(out_dir / f"error_rank{rank()}.json",
                    {"kind": "exception",
                     "message": "".join(traceback.format_exception(e))[-4000:]})
        raise
    try:
        verify(module, source, table, when="after importing the submission")
    except IntegrityError as e:
        record_violation(out_dir, "integrity", str(e), step=None)
        print(f"rule violation: {e}", file=sys.stderr)
        return EXIT_VIOLATION
    auditor = Auditor(module, source, table, out_dir, resumed_at(args))
    setattr(module, "RUN_AUDIT", auditor)  # noqa: B010 (a template global, not an attribute mypy knows)
    module.run(args)
    missed = skipped_audits(module, auditor, auditor.start)
    if missed:
        record_violation(out_dir, "audit-skipped", missed, step=None)
        print(f"rule violation: {missed}", file=sys.stderr)
        return EXIT_VIOLATION
    return 0


def skipped_audits(module: ModuleType, auditor: Auditor, start: int = 0) -> str | None:
    """Why the run was not audited at every evaluation and every spot step from iteration
    `start` on, or None: a run that unhooked the audit could have used float weights between
    pre-flight and the checkpoint. A resumed launch's earlier evaluations were audited by the
    launches before."""
    if getattr(module, "RUN_AUDIT", None) is not auditor:
        return "the template's RUN_AUDIT hook was replaced during the run"
    last, every = int(module.max_iters), int(module.eval_interval)
    expected = [s for s in sorted({*range(0, last + 1, every), last}) if s >= start]
    if auditor.steps != expected:
        return (f"audited at steps {auditor.steps[:5]}, expected {expected[:5]} "
                f"({len(auditor.steps)} of {len(expected)} evaluations)")
    if auditor.spotted != (auditor.spots or []):
        return (f"{len(auditor.spotted)} of {len(auditor.spots or [])} spot audits ran: the "
                f"hook was not called at every iteration")
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
