"""The pre-flight worker process (see harness.runtime.preflight for the checks).

    python -m harness.runtime.preflight_worker run --spliced=FILE --progress=FILE --memory-mb=N
    python -m harness.runtime.preflight_worker exec --memory-mb=N -- ARGV...

`run` limits its memory before torch is imported, imports the spliced file and runs
the in-process checks. It appends one JSON line to the progress file when a check starts
and one when it ends, flushed at once: if the parent has to kill this process (time limit)
or it dies (memory), the last unfinished "start" names the check to blame. `exec` sets the
same limit and replaces itself with ARGV, so the torchrun launcher and its ranks inherit it.

This module imports only the standard library at the top: torch comes after the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from harness.runtime.preflight import WORKER_CHECKS, CheckResult


def limit_memory(memory_mb: int) -> None:
    """RLIMIT_DATA: private writable memory (heap and anonymous mappings, where torch's CPU
    allocator gets tensors; Linux >= 4.7). Not RLIMIT_AS: a CUDA build of torch maps
    gigabytes of libraries at import, which would count against an address-space limit."""
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


class Progress:
    """Start and result events, one JSON line each, flushed as they happen."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def _write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event, default=str) + "\n")
        self._file.flush()

    def start(self, check_id: str) -> None:
        self._write({"event": "start", "id": check_id, "t": time.time()})

    def result(self, result: CheckResult) -> None:
        self._write({"event": "result", **result.__dict__})

    def end(self) -> None:
        self._write({"event": "end", "t": time.time()})


def _run_checks(args: argparse.Namespace) -> int:
    limit_memory(args.memory_mb)
    spliced = Path(args.spliced)
    progress = Progress(Path(args.progress))
    # Imported under the limit: pre-flight must prove torch still works inside it.
    from harness.runtime import preflight_checks as pc

    shapes = [(int(o), int(i)) for o, i in (s.split("x") for s in args.full_shape)]
    ctx: pc.Context | None = None
    for check_id in args.check or WORKER_CHECKS:
        progress.start(check_id)
        t0 = time.monotonic()
        doing = "importing the spliced file" if ctx is None else ""
        try:
            ctx = ctx or pc.Context.load(spliced, shapes)
            doing = ""
            verdict = pc.CHECKS[check_id](ctx)
            status, reason, details = verdict.status, verdict.reason, verdict.details
        except BaseException as exc:  # the submission's code may raise anything
            status, reason, details = _failure(pc, check_id, exc, spliced, args.memory_mb,
                                               doing)
        progress.result(CheckResult(check_id, status, round(time.monotonic() - t0, 3),
                                    reason, details))
        # Later checks would only repeat the cause: when the file did not import or the
        # interface is broken, every check fails on it, and after an allocation past the
        # limit whatever the submission holds on to fails every later check too.
        if ctx is None or reason.startswith("memory limit") or (
                check_id == "interface" and status in ("fail", "error")):
            break
    progress.end()
    return 0


def _failure(pc: ModuleType, check_id: str, exc: BaseException, spliced: Path, memory_mb: int,
             doing: str = "") -> tuple[str, str, dict[str, Any]]:
    text, theirs = pc.describe(exc, spliced)
    details = {"traceback": "".join(traceback.format_exception(exc))[-4000:]}
    if pc.is_memory_error(exc):
        asked = re.search(r"tried to allocate (\d+) bytes", str(exc))
        what = (f"allocating {int(asked.group(1)) / 2**30:.2f} GiB failed" if asked
                else f"{type(exc).__name__}")
        where = text[text.rfind(" (line "):] if " (line " in text else ""
        return "fail", f"memory limit of {memory_mb} MiB reached: {what}{where}", details
    # Torch's compiler raises from its own frames on behalf of the submission's code.
    status = "fail" if theirs or check_id == "compile" else "error"
    return status, f"{doing} raised {text}" if doing else f"raised {text}", details


def _exec(args: argparse.Namespace) -> int:
    limit_memory(args.memory_mb)
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    os.execv(argv[0], argv)
    return 127  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preflight_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--spliced", required=True)
    p.add_argument("--progress", required=True)
    p.add_argument("--memory-mb", type=int, required=True)
    p.add_argument("--full-shape", action="append", default=[], help="OUTxIN")
    p.add_argument("--check", action="append", default=[], choices=WORKER_CHECKS)
    p.set_defaults(func=_run_checks)
    p = sub.add_parser("exec")
    p.add_argument("--memory-mb", type=int, required=True)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_exec)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
