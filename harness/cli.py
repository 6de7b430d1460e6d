"""The `harness` command: parse arguments, call the library, map errors to exit codes.

Exit codes: 0 ok; 2 bad input or a refused submission (one readable message);
3 our infrastructure failed; 4 the attempt ran and the submission failed;
1 with a traceback is a bug of ours. Heavy imports (torch, numpy) stay inside the
commands that need them, so `harness --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness import __version__
from harness.errors import HarnessError

EXIT_SUBMISSION_FAILED = 4

Handler = Callable[[argparse.Namespace], int]


def _task_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="llm-pretrain-bitlinear",
                   help="task name under tasks/ or a task folder (default: %(default)s)")


def _run_args(p: argparse.ArgumentParser) -> None:
    _task_arg(p)
    p.add_argument("--scale", default="smoke",
                   help="scale under the task's scales/ (default: smoke)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where attempts are written (default: $HARNESS_RUNS or ./runs)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="root of prepared datasets (default: $HARNESS_DATA or ./data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Benchmark harness for low-bit BitLinear submissions to GPT-2 pretraining.",
    )
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="splice a submission and run the static checks (free)")
    p.add_argument("submission", type=Path,
                   help="directory, region .py, full .py or edit-log .json")
    _task_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("rules", help="list the static-check rules")
    p.set_defaults(func=cmd_rules)

    p = sub.add_parser("splice", help="print (or write) the spliced training script")
    p.add_argument("submission", type=Path)
    _task_arg(p)
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    p.set_defaults(func=cmd_splice)

    p = sub.add_parser("run", help="check, then train at a scale; writes runs/<id>/result.json")
    p.add_argument("submission", type=Path)
    _run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("baselines", help="run every baseline under baselines/ and print a table")
    _run_args(p)
    p.add_argument("--baselines-dir", type=Path, default=None,
                   help="folder of baseline submissions (default: the repo's baselines/)")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("validate-task", help="check a task folder against its template")
    p.add_argument("task", nargs="?", default="llm-pretrain-bitlinear")
    p.set_defaults(func=cmd_validate_task)

    p = sub.add_parser("data", help="prepare or verify token shards")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("prepare", help="build a dataset")
    q.add_argument("dataset", choices=["smoke"], help="smoke: Python stdlib docstrings (embedded)")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--max-tokens", type=int, default=2_000_000)
    q.set_defaults(func=cmd_data_prepare)
    q = dsub.add_parser("verify", help="re-hash shards against their manifest")
    q.add_argument("dir", type=Path)
    q.set_defaults(func=cmd_data_verify)
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    from harness.attempt import prepare
    from harness.errors import CheckFailed
    from harness.task import load_task

    task = load_task(args.task)
    try:
        prepared = prepare(args.submission, task)
    except CheckFailed as e:
        if args.json:
            print(json.dumps({"ok": False, "findings": [f.__dict__ for f in e.findings]}, indent=2))
            return 2
        raise
    if args.json:
        sub = prepared.submission
        print(json.dumps({"ok": True, "findings": [], "submission_sha256": sub.sha256,
                          "regions": sorted(sub.regions)}, indent=2))
    else:
        changed = ", ".join(sorted(prepared.submission.regions)) or "none (template defaults)"
        print(f"OK: {args.submission} passes the static checks (regions set: {changed})")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from harness.checks.static import RULES

    width = max(map(len, RULES))
    for rule, text in RULES.items():
        print(f"{rule:<{width}}  {text}")
    return 0


def cmd_splice(args: argparse.Namespace) -> int:
    from harness.attempt import prepare
    from harness.paths import atomic_write_text
    from harness.task import load_task

    prepared = prepare(args.submission, load_task(args.task))
    if args.output:
        atomic_write_text(args.output, prepared.spliced)
    else:
        sys.stdout.write(prepared.spliced)
    return 0


def _runs_dir(args: argparse.Namespace) -> Path:
    import os

    return Path(args.runs_dir or os.environ.get("HARNESS_RUNS", "runs"))


def _run_one(submission: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from harness.attempt import data_root, prepare, run_attempt
    from harness.runners.local import LocalRunner
    from harness.task import load_task

    task = load_task(args.task)
    scale = task.scale(args.scale)
    prepared = prepare(submission, task)
    result, paths = run_attempt(prepared, task, scale, runs_dir=_runs_dir(args),
                                data=data_root(args.data_dir), runner=LocalRunner())
    out = asdict(result)
    out["result_path"] = str(paths.result)
    return out


def _exit_for(status: str) -> int:
    return {"succeeded": 0, "failed_infra": 3}.get(status, EXIT_SUBMISSION_FAILED)


def cmd_run(args: argparse.Namespace) -> int:
    r = _run_one(args.submission, args)
    val = r["metrics"].get("val_loss")
    shown = f"val_loss={val:.4f}" if val is not None else r["reason"]
    print(f"{r['status']}: {r['submission']['name']} at scale {r['scale']}: {shown}")
    stage = r["stages"].get("pretrain", {})
    if r["status"] != "succeeded" and (stage.get("traceback") or stage.get("stderr_tail")):
        # The submission's own traceback when frozen code caught one, else the raw stderr.
        label = "traceback" if stage.get("traceback") else "last lines of the stage's stderr"
        print(f"--- {label} ---", file=sys.stderr)
        print(stage.get("traceback") or stage["stderr_tail"], file=sys.stderr)
    print(f"result: {_shown(r['result_path'])}")
    return _exit_for(r["status"])


def cmd_baselines(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.task import REPO_ROOT

    root = args.baselines_dir or REPO_ROOT / "baselines"
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(f"no baseline folders in {root}")
    rows = []
    for d in dirs:
        print(f"[baselines] {d.name}: running at scale {args.scale} ...", flush=True)
        rows.append(_run_one(d, args))
    print(format_table(rows))
    return max(_exit_for(r["status"]) for r in rows)


def _shown(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("baseline", "status", "val_loss", "train s", "result")
    body = []
    for r in rows:
        val = r["metrics"].get("val_loss")
        wall = r["stages"].get("pretrain", {}).get("wall_s")
        body.append((r["submission"]["name"], r["status"],
                     f"{val:.4f}" if val is not None else "-",
                     f"{wall:.1f}" if wall is not None else "-", _shown(r["result_path"])))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)


def cmd_validate_task(args: argparse.Namespace) -> int:
    from harness.validate import validate_task

    problems, task = validate_task(args.task)
    if problems:
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print(f"error: task {args.task} has {len(problems)} problem(s)", file=sys.stderr)
        return 2
    print(f"OK: task {task.name} {task.version}: {len(task.regions)} regions, "
          f"{len(task.scale_names())} scales ({', '.join(task.scale_names())})")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from harness.data.smoke import prepare_smoke

    manifest = prepare_smoke(args.out, max_tokens=args.max_tokens)
    counts = {s: sum(e["tokens"] for e in files) for s, files in manifest["splits"].items()}
    print(f"OK: {args.out}: " + ", ".join(f"{s} {n:,} tokens" for s, n in counts.items()))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from harness.data.shards import verify

    problems = verify(args.dir)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    if problems:
        print(f"error: {args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 2
    print(f"OK: {args.dir}: every shard matches its manifest")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
