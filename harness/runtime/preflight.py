"""Pre-flight: run the spliced template briefly on CPU and refuse what cannot train.

A full test costs GPU-hours, so a submission that reaches the GPU stage must train. After
the static checks, pre-flight imports the spliced file in a separate worker process (its
module-level region code runs, `main()` does not), builds the template's own GPT at a tiny
size and checks, each under a stable id:

  interface  BitLinear's constructor, weight and forward shapes; weight_quant and
             activation_quant return (quantized, scale) pairs whose product approximates
             the input (fail past PRODUCT_ERROR_BOUND after a per-row least-squares fit;
             warn when only the raw product is far off, e.g. a scale applied twice)
  low-bit    the operand that reaches every matmul of every BitLinear, captured at the torch
             level in train() and eval(), has at most 4 levels per tensor/row/column/group
  one-path   the same input gives the same output in train() and eval()
  gradients  one backward gives every BitLinear weight, and every parameter the submission
             added, a finite gradient that is not all zero
  compile    torch.compile(fullgraph=True, backend="aot_eager") runs forward and backward
             and agrees with eager; any graph break fails
  ddp        the spliced template itself trains 10 iterations in two processes under
             torchrun (gloo, CPU); every rank ends with the same parameters
  numerics   that run's losses are finite and the last validation loss is not more than
             MAX_VAL_LOSS_RISE above the first

This module is the orchestrator, the pre-flight stage's own process, run by the runner the
operator configured (in its container with --runner docker; harness.checks.preflight builds
the stage and reads its report):

    python -m harness.runtime.preflight --spliced=FILE --work-dir=DIR --timeout-s=S \
        --memory-mb=N [--full-shape=OUTxIN ...] [--check=ID ...] --report=FILE

It runs the worker (harness.runtime.preflight_worker: checks 1-5 in one process), then the
2-process torchrun, each through harness.runtime.procs.run, and writes the report as JSON.
It imports only the standard library and harness.runtime: it never imports the submission,
so it can always say which check was running when a limit ran out.

The worker runs under a memory limit (RLIMIT_DATA) and the whole pre-flight under one
wall-clock deadline; the process tree is killed when it passes. The worker records when
each check starts and ends, so a hang or an allocation without bound is reported as a
failure of the check that was running. Statuses: pass, warn (allowed), fail (the
submission's fault) and error (ours: the check itself could not run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.runtime.fileio import atomic_write_json, sha256_bytes
from harness.runtime.procs import ProcessRun
from harness.runtime.procs import run as run_process

CHECK_IDS = ("interface", "low-bit", "one-path", "gradients", "compile", "ddp", "numerics")
WORKER_CHECKS = CHECK_IDS[:5]

# The tiny GPT every check builds: the template's own model code, small enough for seconds
# on a CPU. 48 tokens per batch is no dimension of any layer, so an activation can never be
# mistaken for a weight by its shape.
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "vocab_size": 512,
              "dropout": 0.0, "bias": False}
TINY_BATCH, TINY_TOKENS = 2, 24
# ||q * s - w|| / ||w|| after the best per-row scalar fit may not exceed this: ternary
# quantization of a Gaussian is ~0.5 off, binary ~0.6, int2 ~0.4.
PRODUCT_ERROR_BOUND = 0.9
# The short DDP run may learn nothing (a long warmup in CONFIG_OVERRIDES), but its last
# validation loss may not end this far above the first: that is divergence.
MAX_VAL_LOSS_RISE = 0.5
DDP_PROCESSES = 2
# A torchrun that fails without a word from any rank is tried once more (_unexplained).
DDP_TRIES = 2
DDP_ARGS = (
    "--max_iters=10", "--eval_interval=5", "--eval_iters=2", "--log_interval=1",
    "--batch_size=4", "--gradient_accumulation_steps=2", "--compile=false",
    "--dtype=float32", "--device=cpu", "--backend=gloo", "--learning_rate=1e-2",
    "--min_lr=1e-3", "--warmup_iters=2", "--save_checkpoint=false",
)
# A repeating cycle of this many distinct tokens: learnable in a few steps.
DDP_CYCLE = 50
# What the stage writes into its work folder, read back by the host.
REPORT_FILE = "preflight.json"


STATUSES = ("pass", "warn", "fail", "error")


@dataclass
class CheckResult:
    id: str
    status: str  # pass | warn | fail | error
    duration_s: float
    reason: str  # one line
    details: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        return f"{self.status.upper():<5} {self.id:<9} {self.duration_s:5.1f}s  {self.reason}"


@dataclass
class PreflightReport:
    checks: list[CheckResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not run: an earlier check stopped them
    # Where the stage ran, as its runner saw it (runner name, container id, image...): set
    # by the host, never read from the stage's own file.
    runner: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.skipped and not self.failed

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status in ("fail", "error")]

    @property
    def duration_s(self) -> float:
        return round(sum(c.duration_s for c in self.checks), 3)

    def to_dict(self) -> dict[str, Any]:
        out = {"ok": self.ok, "duration_s": self.duration_s,
               "checks": [asdict(c) for c in self.checks], "skipped": list(self.skipped)}
        if self.runner:
            out["runner"] = dict(self.runner)
        return out

    def summary(self) -> dict[str, Any]:
        """to_dict() without the per-check details: what result.json keeps."""
        out = self.to_dict()
        out["checks"] = [{k: v for k, v in c.items() if k != "details"} for c in out["checks"]]
        return out

    def render(self) -> str:
        lines = [c.render() for c in self.checks]
        if self.ok:
            warned = sum(c.status == "warn" for c in self.checks)
            note = f" ({warned} with a warning)" if warned else ""
            lines.append(f"pre-flight passed: {len(self.checks)} checks in "
                         f"{self.duration_s:.1f}s{note}")
        else:
            ids = ", ".join(c.id for c in self.failed) or "no check ran"
            lines.append(f"pre-flight failed: {ids}")
        if self.skipped:
            lines.append(f"not run: {', '.join(self.skipped)} (stopped by the failure above)")
        return "\n".join(lines)

    def get(self, check_id: str) -> CheckResult | None:
        return next((c for c in self.checks if c.id == check_id), None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreflightReport:
        """The report to_dict() wrote; ValueError (or KeyError, TypeError) when it is not."""
        checks = [result_from_dict(c) for c in d["checks"]]
        skipped = [str(c) for c in d.get("skipped") or []]
        known = set(CHECK_IDS)
        if any(c.id not in known or c.status not in STATUSES for c in checks) \
                or not set(skipped) <= known:
            raise ValueError("a pre-flight report with unknown check ids or statuses")
        return cls(checks, skipped)


def result_from_dict(d: dict[str, Any]) -> CheckResult:
    return CheckResult(str(d["id"]), str(d["status"]), float(d["duration_s"]),
                       str(d["reason"]), dict(d.get("details") or {}))


# --- running the pieces -------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))  # NaN and Infinity parse as floats
            except ValueError:
                break  # a torn last line from a killed run
    return rows


def _limited(memory_mb: int, argv: Sequence[str]) -> list[str]:
    """argv run under the memory limit, set by the worker module before it execs argv."""
    return [sys.executable, "-m", "harness.runtime.preflight_worker", "exec",
            f"--memory-mb={memory_mb}", "--", *argv]


# --- the worker (checks 1-5) --------------------------------------------------------------


@dataclass
class _Started:
    id: str
    at: float  # time.time() in the worker when the check started


def _read_progress(path: Path) -> tuple[list[CheckResult], _Started | None, bool]:
    """Finished checks, the check that started but never finished, and whether the worker
    said it was done (it stops early on purpose after some failures)."""
    done: list[CheckResult] = []
    running: _Started | None = None
    for event in _read_jsonl(path):
        if event.get("event") == "start":
            running = _Started(str(event["id"]), float(event["t"]))
        elif event.get("event") == "result":
            done.append(result_from_dict(event))
            running = None
        elif event.get("event") == "end":
            return done, None, True
    return done, running, False


def _worker_stopped(run: ProcessRun, started: _Started, timeout_s: float,
                    memory_mb: int) -> CheckResult:
    running = started.id
    elapsed = round(max(0.0, time.time() - started.at), 3)
    tail = {"worker_log_tail": run.tail()}
    if run.timed_out:
        return CheckResult(running, "fail", elapsed,
                           f"still running when the {timeout_s:.0f}s pre-flight time limit "
                           "ran out: the submission hangs or is far too slow", tail)
    rc = run.returncode
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name
        hint = (f" (the memory limit is {memory_mb} MiB)" if -rc in (signal.SIGKILL,
                                                                     signal.SIGSEGV) else "")
        return CheckResult(running, "fail", elapsed,
                           f"the worker process died of {name} during this check{hint}", tail)
    return CheckResult(running, "error", elapsed,
                       f"the worker exited with code {rc} during this check", tail)


def _run_worker(script: Path, work_dir: Path, deadline: float, timeout_s: float,
                memory_mb: int, shapes: list[tuple[int, int]],
                checks: list[str]) -> list[CheckResult]:
    progress = work_dir / "progress.jsonl"
    progress.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "harness.runtime.preflight_worker", "run",
            f"--spliced={script}", f"--progress={progress}", f"--memory-mb={memory_mb}",
            *(f"--full-shape={o}x{i}" for o, i in shapes), *(f"--check={c}" for c in checks)]
    run = run_process(argv, cwd=work_dir, log=work_dir / "worker.log", deadline=deadline,
                      env=_env())
    done, running, ended = _read_progress(progress)
    if running is not None:
        done.append(_worker_stopped(run, running, timeout_s, memory_mb))
    elif not ended:
        # Between checks only harness code runs (imports, start-up): ours, not the
        # submission's, even on a timeout.
        nxt = checks[min(len(done), len(checks) - 1)]
        why = "the time limit ran out" if run.timed_out else f"exit code {run.returncode}"
        done.append(CheckResult(nxt, "error", round(run.wall_s, 3),
                                f"the pre-flight worker stopped before this check started "
                                f"({why})", {"worker_log_tail": run.tail()}))
    return done


# --- ddp and numerics: the template itself under torchrun ---------------------------------


def write_ddp_data(root: Path) -> Path:
    """Token shards in the template's format: a fixed permutation of DDP_CYCLE tokens,
    repeated, inside the tiny vocabulary (numpy is not needed for uint16 little-endian)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = int(TINY_MODEL["vocab_size"])
    cycle = [(7 + 37 * k) % vocab for k in range(DDP_CYCLE)]
    splits = {}
    for split, repeats in (("train", 200), ("val", 40)):
        tokens = cycle * repeats
        name = f"{split}_000000.bin"
        raw = b"".join(t.to_bytes(2, "little") for t in tokens)
        (root / name).write_bytes(raw)
        splits[split] = [{"file": name, "tokens": len(tokens), "sha256": sha256_bytes(raw)}]
    manifest = {"format": "harness-token-shards/1",
                "tokenizer": {"name": "gpt2", "dtype": "uint16", "vocab_size": vocab,
                              "eot": vocab - 1},
                "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def _ddp_argv(script: Path, data: Path, out: Path, memory_mb: int) -> list[str]:
    model = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in TINY_MODEL.items()]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={DDP_PROCESSES}", str(script), *model, *DDP_ARGS,
                f"--data_dir={data}", f"--out_dir={out}"]
    # Per process: the launcher and each rank inherit the limit, so split it between ranks.
    return _limited(max(1024, memory_mb // DDP_PROCESSES), torchrun)


_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(: .*|Error|Exception|Exit|Interrupt)")


def exception_line(message: str) -> str:
    """The line that names the exception ("RuntimeError: ...") in a recorded traceback.

    Multi-line messages (DDP's) continue below that line, so it is searched from the end
    for the last unindented `Name: text` line; the first line of a traceback says nothing."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.fullmatch(line):
            return _clip(line)
    return _clip(lines[-1]) if lines else "?"


def _clip(line: str, limit: int = 240) -> str:
    """At most `limit` characters, cut after a whole sentence where there is one."""
    if len(line) <= limit:
        return line
    cut = line.rfind(". ", 0, limit)
    return line[:cut + 1] if cut > 0 else line[:limit - 3] + "..."


def _error_records(out: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(out.glob("error_rank*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found.append({"file": path.name, **data})
    return found


def judge_ddp(run: ProcessRun, out: Path) -> CheckResult:
    wall = round(run.wall_s, 3)
    errors = _error_records(out)
    if run.timed_out:
        # Before the error records: ranks stopped by our signals may leave some behind.
        return CheckResult("ddp", "fail", wall, "still running when the pre-flight time limit "
                           "ran out: the submission hangs or is far too slow",
                           {"log_tail": run.tail(), "error_records": errors})
    if errors and errors[0].get("kind") == "diverged":
        # The template's loss watchdog stopped the run: a numerics failure (that check
        # reports it), not a sign that DDP itself is broken.
        return CheckResult("ddp", "warn", wall, f"not judged: the run stopped early, "
                           f"{errors[0].get('message')}", {"file": errors[0]["file"]})
    if errors:
        first = errors[0]
        message = str(first.get("message", ""))
        details = {"traceback": message, "file": first["file"]}
        status = "error" if first.get("kind") in ("config", "data") else "fail"
        return CheckResult("ddp", status, wall,
                           f"{first['file'].removesuffix('.json')}: {exception_line(message)}",
                           details)
    tail = {"log_tail": run.tail()}
    if run.returncode != 0:
        # No rank said why (tried twice, _run_ddp): the launcher or the machine, not the
        # submission, whose own failures leave an error record. Ours: nothing refused.
        return CheckResult("ddp", "error", wall,
                           f"torchrun exited with code {run.returncode} without an error record",
                           tail)
    try:
        final = json.loads((out / "final.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return CheckResult("ddp", "error", wall, "torchrun exited 0 without final.json", tail)
    sums = final.get("rank_param_checksums") or []
    details = {"world_size": final.get("world_size"), "rank_param_checksums": sums}
    if final.get("world_size") != DDP_PROCESSES or len(sums) != DDP_PROCESSES:
        return CheckResult("ddp", "fail", wall,
                           f"world_size {final.get('world_size')} with {len(sums)} checksum(s), "
                           f"expected {DDP_PROCESSES}", details)
    if len(set(sums)) != 1:
        return CheckResult("ddp", "fail", wall, "ranks ended with different parameters "
                           f"(checksums {sums}): DDP did not keep them in sync", details)
    return CheckResult("ddp", "pass", wall,
                       f"{DDP_PROCESSES} processes trained 10 iterations; parameters equal "
                       "on every rank", details)


def judge_numerics(out: Path, ddp: CheckResult) -> CheckResult | None:
    """Finite losses and no divergence, from the DDP run's metrics.jsonl (and train_log.jsonl,
    every iteration's train loss, where the template writes one). None: nothing to judge
    because the run failed early (the ddp check says why)."""
    t0 = time.monotonic()
    rows = _read_jsonl(out / "metrics.jsonl")
    logged = _read_jsonl(out / "train_log.jsonl")
    losses = [(r.get("step"), key, r.get(key)) for r in rows + logged
              for key in ("train_loss", "val_loss") if r.get(key) is not None]
    vals = [float(r["val_loss"]) for r in rows if r.get("val_loss") is not None]

    def done(status: str, reason: str) -> CheckResult:
        return CheckResult("numerics", status, round(time.monotonic() - t0, 3), reason,
                           {"curve": rows})

    bad = [(s, k, v) for s, k, v in losses
           if not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        step, key, value = bad[0]
        return done("fail", f"{key} is {value} at step {step}")
    stopped = [e for e in _error_records(out) if e.get("kind") == "diverged"]
    if stopped:
        return done("fail", f"{stopped[0].get('message')}: the loss left the scale's bound")
    if len(vals) < 2:
        if ddp.status != "pass":
            return None
        return done("fail", f"the DDP run left {len(vals)} evaluation(s), expected 3")
    if vals[-1] > vals[0] + MAX_VAL_LOSS_RISE:
        return done("fail", f"val_loss rose from {vals[0]:.3f} to {vals[-1]:.3f} in 10 "
                    f"iterations (more than {MAX_VAL_LOSS_RISE} up): training diverges")
    return done("pass", f"losses finite; val_loss {vals[0]:.3f} -> {vals[-1]:.3f}")


def _unexplained(run: ProcessRun, out: Path) -> bool:
    """torchrun failed and no rank said why: no error record, no time limit. Seen under CPU
    load with valid submissions that pass when run again (a launcher or gloo teardown flake);
    a submission that crashes on its own leaves an error record, and fails twice anyway."""
    return run.returncode not in (0, None) and not run.timed_out and not _error_records(out)


def _run_ddp(script: Path, work_dir: Path, deadline: float, memory_mb: int) -> list[CheckResult]:
    data = write_ddp_data(work_dir / "data")
    out = work_dir / "ddp"
    env = {**_env(), "OMP_NUM_THREADS": "1"}  # two ranks share the cores
    first: tuple[ProcessRun, str] | None = None  # a failed first try and its log's tail
    for _ in range(DDP_TRIES):
        shutil.rmtree(out, ignore_errors=True)  # a reused work_dir must not judge old files
        out.mkdir()
        run = run_process(_ddp_argv(script, data, out, memory_mb), cwd=work_dir,
                          log=out / "torchrun.log", deadline=deadline, env=env)
        if not _unexplained(run, out) or deadline - time.monotonic() < 2 * run.wall_s:
            break
        first = first or (run, run.tail())
    ddp = judge_ddp(run, out)
    if first is not None:
        ddp = replace(ddp, reason=f"{ddp.reason} (run twice: the first try's torchrun exited "
                                  f"with code {first[0].returncode} without an error record)",
                      details={**ddp.details, "first_try_log_tail": first[1]})
    numerics = judge_numerics(out, ddp)
    return [ddp] if numerics is None else [ddp, numerics]


# --- the stage -----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The worker's and torchrun's environment: the stage's own, as its runner set it."""
    return dict(os.environ)


def run_checks(script: Path, work_dir: Path, *, timeout_s: float, memory_mb: int,
               shapes: list[tuple[int, int]],
               checks: Sequence[str] = CHECK_IDS) -> PreflightReport:
    """The checks (all by default) on the spliced template at `script`, inside work_dir,
    within timeout_s from now."""
    deadline = time.monotonic() + timeout_s
    results: list[CheckResult] = []
    in_worker = [c for c in WORKER_CHECKS if c in checks]
    if in_worker:
        results += _run_worker(script, work_dir, deadline, timeout_s, memory_mb, shapes,
                               in_worker)
    # The worker stops early on a broken interface, a memory limit, a crash or the deadline;
    # the DDP run would then only fail the same way, later.
    complete = len(results) == len(in_worker)
    if {"ddp", "numerics"} & set(checks) and complete:
        if time.monotonic() < deadline - 1.0:
            results += [r for r in _run_ddp(script, work_dir, deadline, memory_mb)
                        if r.id in checks]
        else:
            results.append(CheckResult("ddp", "fail", 0.0, "not started: the earlier checks "
                                       f"used up the {timeout_s:.0f}s pre-flight time limit"))
    done = {r.id for r in results}
    return PreflightReport(results, skipped=[c for c in CHECK_IDS if c in checks
                                             and c not in done])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.runtime.preflight")
    p.add_argument("--spliced", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--timeout-s", type=float, required=True)
    p.add_argument("--memory-mb", type=int, required=True)
    p.add_argument("--full-shape", action="append", default=[], help="OUTxIN")
    p.add_argument("--check", action="append", default=[], choices=CHECK_IDS)
    p.add_argument("--report", type=Path, required=True)
    args = p.parse_args(argv)
    shapes = [(int(o), int(i)) for o, i in (s.split("x") for s in args.full_shape)]
    report = run_checks(args.spliced.resolve(), args.work_dir.resolve(),
                        timeout_s=args.timeout_s, memory_mb=args.memory_mb, shapes=shapes,
                        checks=args.check or CHECK_IDS)
    atomic_write_json(args.report, report.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
