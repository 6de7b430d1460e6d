"""The `harness` command: parse arguments, call the library, map errors to exit codes.

Exit codes: 0 ok; 2 bad input or a refused submission (one readable message);
3 our infrastructure failed; 4 the attempt ran and the submission failed (or broke a rule);
5 the attempt was cancelled; 1 with a traceback is a bug of ours (harness.record.Status
maps each outcome to its code). Heavy imports (torch, numpy) stay inside the
commands that need them, so `harness --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import __version__
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.record import AttemptRecord
    from harness.runners.base import Runner
    from harness.runtime.preflight import PreflightReport
    from harness.task import TaskSpec

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
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run each submission N times, at the scale's seeds plus 0..N-1, each "
                        "its own attempt (default 1); the leaderboard aggregates them")
    _runner_args(p)


def _checked_seeds(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.task import MAX_SEEDS

    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UserError(f"--seeds {args.seeds}: each seed is a whole attempt",
                        fix=f"pass a count from 1 to {MAX_SEEDS}")
    return int(args.seeds)


def _runner_args(p: argparse.ArgumentParser) -> None:
    from harness.runners.config import KINDS

    p.add_argument("--runner", choices=KINDS, default=None,
                   help="where stages run (default: [runner] kind of harness.toml, else local)")
    p.add_argument("--image", default=None,
                   help="the docker image or apptainer .sif (overrides harness.toml)")
    p.add_argument("--config", type=Path, default=None,
                   help="runner settings (default: $HARNESS_CONFIG or ./harness.toml)")


def _checked_runner(args: argparse.Namespace) -> Runner:
    """The runner for a command that runs a submission, with the note when it is no sandbox."""
    runner = _runner_from(args)
    if runner.name == "local":
        from harness.runners.local import warn_not_a_sandbox

        warn_not_a_sandbox()
    return runner


def _runner_from(args: argparse.Namespace) -> Runner:
    from harness.runners import make_runner
    from harness.runners.config import load_config, with_overrides

    config = with_overrides(load_config(getattr(args, "config", None)),
                            kind=getattr(args, "runner", None), image=getattr(args, "image", None))
    return make_runner(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Benchmark harness for low-bit BitLinear submissions to GPT-2 pretraining.",
    )
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="static checks, then the CPU pre-flight checks (free)")
    p.add_argument("submission", type=Path,
                   help="directory, region .py, full .py or edit-log .json")
    _task_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--static-only", action="store_true",
                   help="skip the pre-flight checks (which run the code on CPU for ~a minute)")
    _runner_args(p)  # the pre-flight is a stage: it runs where `harness run` would run it
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

    p = sub.add_parser("resume", help="continue an attempt stopped by a failure of ours from "
                                      "its last checkpoint (the same attempt, charged once)")
    p.add_argument("attempt", help="an attempt folder, an attempt id under --runs-dir, or a "
                                   "session test (attempt id or SESSION:N, with --home)")
    _task_arg(p)
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where plain attempts are (default: $HARNESS_RUNS or ./runs)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="root of prepared datasets the attempt ran on (default: $HARNESS_DATA, "
                        "a session's home data, or ./data)")
    _home_arg(p)
    _runner_args(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("baselines", help="run every baseline under baselines/ and print a table")
    _run_args(p)
    p.add_argument("--baselines-dir", type=Path, default=None,
                   help="folder of baseline submissions (default: the repo's baselines/)")
    p.add_argument("--leaderboard-dir", type=Path, default=None,
                   help="where the page of these runs goes (default: <runs-dir>/leaderboard)")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("validate-task", help="check a task folder against its template")
    p.add_argument("task", nargs="?", default="llm-pretrain-bitlinear")
    p.set_defaults(func=cmd_validate_task)

    p = sub.add_parser("data", help="prepare or verify token shards")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("prepare", help="build a dataset")
    q.add_argument("dataset", choices=["smoke", "evals", "fineweb"],
                   help="smoke: Python stdlib docstrings (embedded); evals: the lm-eval sets; "
                        "fineweb: parquet files or a hub id (docs/data.md)")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--max-tokens", type=int, default=None,
                   help="stop at the first document end reaching this many tokens "
                        "(default: smoke 2,000,000; fineweb all)")
    _evals_prepare_args(q)
    _fineweb_prepare_args(q)
    q.set_defaults(func=cmd_data_prepare)
    q = dsub.add_parser("verify", help="re-hash shards against their manifest")
    q.add_argument("dir", type=Path)
    q.set_defaults(func=cmd_data_verify)
    _add_eval_command(sub)
    _add_session_commands(sub)
    _add_mcp_command(sub)
    _add_leaderboard_commands(sub)
    _add_image_commands(sub)
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
            print(json.dumps({"ok": False, "findings": [f.__dict__ for f in e.findings],
                              "preflight": None}, indent=2))
            return 2
        raise
    if not args.json:
        changed = ", ".join(sorted(prepared.submission.regions)) or "none (template defaults)"
        print(f"OK: {args.submission} passes the static checks (regions set: {changed})",
              flush=True)
    report = None if args.static_only else _preflight(prepared.spliced, task,
                                                      _checked_runner(args))
    ok = report is None or report.ok
    if args.json:
        sub = prepared.submission
        print(json.dumps({"ok": ok, "findings": [], "submission_sha256": sub.sha256,
                          "regions": sorted(sub.regions),
                          "preflight": report.to_dict() if report else None}, indent=2))
    elif report is not None:
        print(report.render(), file=sys.stdout if ok else sys.stderr)
    if report is not None and report.failed and all(c.status == "error" for c in report.failed):
        return 3  # only our side failed: the submission was not judged
    return 0 if ok else 2


def _preflight(spliced: str, task: TaskSpec, runner: Runner) -> PreflightReport:
    """The pre-flight report (harness.checks.preflight) for a spliced, checked template, its
    stage run by `runner` in a temporary folder (a host path: docker mounts it)."""
    import tempfile

    from harness.checks.preflight import run_preflight

    with tempfile.TemporaryDirectory(prefix="harness-preflight-") as tmp:
        return run_preflight(task, spliced, runner=runner, work_dir=Path(tmp))


def cmd_rules(args: argparse.Namespace) -> int:
    from harness.checks.static import RULES

    width = max(map(len, RULES))
    for rule, text in RULES.items():
        print(f"{rule:<{width}}  {text}")
    return 0


def cmd_splice(args: argparse.Namespace) -> int:
    from harness.attempt import prepare
    from harness.runtime.fileio import atomic_write_text
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


def _run_one(submission: Path, args: argparse.Namespace, *, origin: str = "run",
             trusted: bool = False, seed: int = 0) -> tuple[AttemptRecord, Path]:
    """One plain attempt at seed `seed` of the scale: its record and where its result.json
    is."""
    from harness.attempt import data_root, prepare, run_submission
    from harness.record import Origin
    from harness.task import load_task

    task = load_task(args.task)
    scale = task.scale(args.scale).seed_run(seed)
    prepared = prepare(submission, task)
    runner = _runner_from(args) if trusted else _checked_runner(args)
    record, attempt = run_submission(prepared, task, scale, runs_dir=_runs_dir(args),
                                     data=data_root(args.data_dir), runner=runner,
                                     origin=Origin(origin), preflight=True)
    return record, attempt.record_path


def _primary(args: argparse.Namespace) -> str:
    from harness.task import load_task

    return load_task(args.task).primary_metric


def cmd_run(args: argparse.Namespace) -> int:
    from harness.record import worst_exit_code

    seeds = _checked_seeds(args)
    results = []
    for k in range(seeds):
        if seeds > 1:
            print(f"[run] seed {k + 1} of {seeds}", flush=True)
        results.append(_run_one(args.submission, args, seed=k))
        _print_result(*results[-1], _primary(args))
    if seeds > 1:
        print(seeds_summary([r for r, _ in results], _primary(args)))
    return worst_exit_code([r.status for r, _ in results])


def seeds_summary(records: Sequence[AttemptRecord], name: str) -> str:
    """One line over the seeds of one submission: mean ± the 95% interval of the succeeded."""
    from harness.leaderboard.stats import seeds_line

    return seeds_line(name, [r.metrics[name] for r in records
                             if r.status.ranked and name in r.metrics], len(records))


def _print_result(r: AttemptRecord, path: Path, name: str) -> int:
    val = r.metrics.get(name)
    shown = f"{name}={val:.4f}" if val is not None else r.reason
    print(f"{r.status}: {r.name} at scale {r.scale}: {shown}")
    # The first stage that did not succeed: its traceback when frozen code caught one, else
    # the raw stderr.
    failed = next((s for s in r.stages.values() if not s.outcome.ranked), None)
    trace = failed.details.get("traceback") or failed.stderr_tail if failed else ""
    if trace:
        label = "traceback" if failed and failed.details.get("traceback") \
            else "last lines of the stage's stderr"
        print(f"--- {label} ---", file=sys.stderr)
        print(trace, file=sys.stderr)
    print(f"result: {_shown(str(path))}")
    return r.status.exit_code


def _find_attempt(ref: str, runs_dir: Path, home: Path | None) -> Any:
    """An attempt by folder, by id under runs_dir, or by a session's reference in the home's
    ledger; UserError naming where it looked."""
    from harness.errors import UserError
    from harness.ledger import Ledger, resolve_home
    from harness.record import Attempt

    for candidate in (Path(ref), runs_dir / ref):
        if Attempt(candidate).has_record():
            return Attempt(candidate.resolve())
    if (resolve_home(home) / "ledger.sqlite3").is_file():
        with Ledger(home, create=False) as ledger:
            row = ledger.find_attempt(ref)
        if row.attempt_dir and Attempt(Path(row.attempt_dir)).has_record():
            return Attempt(Path(row.attempt_dir))
    raise UserError(f"no attempt {ref!r}", where=f"{ref}, {runs_dir}/, {resolve_home(home)}",
                    fix="pass the attempt's folder, its id with --runs-dir, or a session test "
                        "with --home")


def cmd_resume(args: argparse.Namespace) -> int:
    from harness.attempt import data_root, resume_attempt
    from harness.ledger import resolve_home
    from harness.record import Status
    from harness.runners.config import load_config
    from harness.session import Session
    from harness.task import load_task

    attempt = _find_attempt(args.attempt, _runs_dir(args), args.home)
    origin = attempt.read().origin
    runner = _checked_runner(args)
    retries = load_config(args.config).resume_retries
    if origin.kind == "session":
        home = resolve_home(args.home)
        with Session.open(origin.session_id, home=home, data_dir=args.data_dir,
                          runner=runner) as s:
            report = s.resume_test(attempt.id)
        print(report.message)
        return Status(report.status).exit_code
    task = load_task(args.task)
    record = resume_attempt(attempt, task, data=data_root(args.data_dir), runner=runner,
                            retries=retries)
    return _print_result(record, attempt.record_path, task.primary_metric)


def cmd_baselines(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.task import REPO_ROOT

    root = args.baselines_dir or REPO_ROOT / "baselines"
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(f"no baseline folders in {root}")
    seeds = _checked_seeds(args)
    rows = []
    for d in dirs:
        for k in range(seeds):
            at = f" (seed {k + 1} of {seeds})" if seeds > 1 else ""
            print(f"[baselines] {d.name}: running at scale {args.scale}{at} ...", flush=True)
            # Our own baselines: trusted, run on the configured runner without the note.
            rows.append(_run_one(d, args, origin="baseline", trusted=True, seed=k))
    print(format_table(rows, _primary(args)))
    # The page of exactly these runs (not of everything in the runs dir), next to them.
    from harness.leaderboard import baselines_page
    from harness.record import worst_exit_code

    page = baselines_page([path for _, path in rows],
                          args.leaderboard_dir or _runs_dir(args) / "leaderboard")
    print(f"leaderboard: {_shown(str(page))}")
    return worst_exit_code([r.status for r, _ in rows])


def _shown(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return path


def format_table(rows: Sequence[tuple[AttemptRecord, Path]], name: str) -> str:
    head = ("baseline", "seeds", "status", name, "train s", "result")
    body = []
    for r, path in rows:
        val = r.metrics.get(name)
        first = next(iter(r.stages.values()), None)
        seeds = "/".join(str(v) for v in r.seeds.values()) or "-"
        body.append((r.name, seeds, r.status.value, f"{val:.4f}" if val is not None else "-",
                     f"{first.wall_s:.1f}" if first is not None else "-", _shown(str(path))))
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

    if args.dataset == "evals":
        return cmd_data_prepare_evals(args)
    if args.dataset == "fineweb":
        return cmd_data_prepare_fineweb(args)
    max_tokens = 2_000_000 if args.max_tokens is None else args.max_tokens
    manifest = prepare_smoke(args.out, max_tokens=max_tokens)
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


# --- FineWeb token shards (docs/data.md) -----------------------------------------------


def _fineweb_prepare_args(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("fineweb", "options of `data prepare fineweb` (with --source)")
    g.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: one per CPU; 0: in-process)")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--val-every", type=int, default=None,
                   help="val: one document in N by a seeded sha256 of its text (default 100)")
    v.add_argument("--val-docs", type=int, default=None,
                   help="val: the first N rows of the source instead")
    g.add_argument("--seed", type=int, default=0, help="seed of the --val-every hash")
    g.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per shard (default: %(default)s)")
    g.add_argument("--hf-config", default=None,
                   help="hub id only: the dataset config, e.g. sample-10BT")
    g.add_argument("--hf-split", default="train", help="hub id only (default: %(default)s)")


def cmd_data_prepare_fineweb(args: argparse.Namespace) -> int:
    from harness.data.fineweb import prepare_fineweb, print_log
    from harness.errors import UserError

    if args.source is None:
        raise UserError("`data prepare fineweb` needs --source: a folder of parquet files "
                        "or a hub id (docs/data.md)")
    manifest = prepare_fineweb(
        str(args.source), args.out, max_tokens=args.max_tokens, workers=args.workers,
        val_every=args.val_every, val_docs=args.val_docs, seed=args.seed,
        shard_tokens=args.shard_tokens, hf_config=args.hf_config, hf_split=args.hf_split,
        log=print_log)
    parts = [f"{s} {manifest['tokens'][s]:,} tokens in {manifest['documents'][s]:,} documents"
             for s in manifest["splits"]]
    print(f"OK: {args.out}: " + ", ".join(parts))
    return 0


# --- eval sets and the lm-eval stage (docs/evaluation.md) --------------------------------


def _evals_prepare_args(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("evals", "options of `data prepare evals`")
    g.add_argument("--source", type=Path, default=None,
                   help="local folder (an HF cache or download) holding the six datasets; "
                        "fineweb: a folder of parquet files, or a hub id")
    g.add_argument("--file", action="append", default=[], metavar="TASK=PATH",
                   help="one task's file (jsonl/json/parquet/arrow); repeatable")
    g.add_argument("--smoke", action="store_true",
                   help="small sets from the smoke corpus's held-out documents instead")
    g.add_argument("--corpus", type=Path, default=None,
                   help="with --smoke: the prepared smoke corpus (default: <data-dir>/smoke, "
                        "built when missing)")
    g.add_argument("--docs", type=int, default=64, help="with --smoke: documents per task")


def _add_eval_command(sub: Any) -> None:
    p = sub.add_parser("eval", help="score an attempt's checkpoint with lm-eval (eval.json)")
    p.add_argument("target", type=Path, help="an attempt folder, or a ckpt.pt")
    _task_arg(p)
    p.add_argument("--script", type=Path, default=None,
                   help="the spliced custom_pretrain.py (default: the attempt's)")
    p.add_argument("--evals", type=Path, default=None,
                   help="prepared eval sets (default: <data-dir>/evals)")
    p.add_argument("--smoke", action="store_true", help="use the smoke eval sets")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="root of prepared datasets (default: $HARNESS_DATA or ./data)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <attempt>/lm-eval-manual)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (quick runs)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_eval)


def _parse_files(pairs: Sequence[str]) -> dict[str, Path]:
    from harness.errors import UserError

    files = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--file takes TASK=PATH, not {pair!r}")
        files[name] = Path(path)
    return files


def cmd_data_prepare_evals(args: argparse.Namespace) -> int:
    from harness.attempt import data_root
    from harness.data import evals

    if args.smoke:
        from harness.data.smoke import prepare_smoke

        corpus = args.corpus or data_root(None) / "smoke"
        if args.corpus is None:
            prepare_smoke(corpus)
        manifest = evals.prepare_smoke_evals(args.out, corpus, docs=args.docs)
    else:
        manifest = evals.prepare_from_source(args.out, args.source, _parse_files(args.file))
    counts = ", ".join(f"{k} {v['docs']}" for k, v in sorted(manifest["tasks"].items()))
    print(f"OK: {args.out}: {manifest['kind']} eval sets: {counts} documents")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from harness.attempt import data_root
    from harness.stages import lmeval
    from harness.task import load_task

    task = load_task(args.task)
    root = data_root(args.data_dir)
    evals = args.evals or (lmeval.evals_dir(task.scale("smoke"), root) if args.smoke
                           else root / "evals")
    attempt, _, _ = lmeval.resolve_target(task, args.target, args.script)
    out = args.out or attempt / "lm-eval-manual"
    settings = lmeval.EvalSettings(limit=args.limit, bootstrap_iters=args.bootstrap_iters,
                                   device=args.device)
    got = lmeval.run_manual(task, args.target, evals=evals, out_dir=out, settings=settings,
                            script=args.script)
    for name, value in got.metrics.items():
        print(f"{name:<14} {value:.4f}")
    print(f"{got.status}: {got.reason}; eval.json and logs in {_shown(str(out))}")
    return got.status.exit_code


# --- agent sessions and the ledger (docs/sessions.md) ----------------------------------


def _home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, default=None,
                   help="harness home: ledger.sqlite3 and runs/ (default: $HARNESS_HOME or "
                        "~/.local/share/bitlinear-harness)")


def _session_parser(ssub: Any, name: str, helptext: str, func: Handler,
                    data: bool = False) -> argparse.ArgumentParser:
    q: argparse.ArgumentParser = ssub.add_parser(name, help=helptext)
    q.add_argument("id", help="the session id printed by `harness session start`")
    _home_arg(q)
    if data:
        q.add_argument("--data-dir", type=Path, default=None,
                       help="root of prepared datasets (default: $HARNESS_DATA or <home>/data)")
    q.set_defaults(func=func)
    return q


def _add_session_commands(sub: Any) -> None:
    from harness.ledger import MODES

    p = sub.add_parser("session", help="an agent session: view, edit, undo, test, submit")
    ssub = p.add_subparsers(dest="session_command", required=True, metavar="ACTION")
    q = ssub.add_parser("start", help="start a session and print its id")
    _task_arg(q)
    _home_arg(q)
    q.add_argument("--scale", default=None, help="(default: the task's default scale)")
    q.add_argument("--agent", required=True, help="who works in the session")
    q.add_argument("--mode", default="agent", choices=MODES)
    q.add_argument("--model", default=None, help="the model behind the agent")
    q.add_argument("--budget", type=int, default=None,
                   help="tests allowed (default: the task's test_budget)")
    q.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="skip the (free) pre-flight checks before each training")
    q.set_defaults(func=cmd_session_start)
    q = ssub.add_parser("list", help="list the sessions of a home")
    _home_arg(q)
    q.set_defaults(func=cmd_session_list)
    q = _session_parser(ssub, "view", "print numbered lines of the file", cmd_session_view)
    q.add_argument("--path", default=None, help="file (default: the training script)")
    q.add_argument("--start", type=int, default=None)
    q.add_argument("--end", type=int, default=None)
    q = _session_parser(ssub, "edit", "replace lines START..END", cmd_session_edit)
    q.add_argument("--path", default=None, help="file (default: the training script)")
    q.add_argument("--start", type=int, required=True)
    q.add_argument("--end", type=int, required=True, help="START - 1 inserts before START")
    text = q.add_mutually_exclusive_group(required=True)
    text.add_argument("--content", help="the new lines")
    text.add_argument("--content-file", type=Path,
                      help="read the new lines from a file ('-': stdin)")
    q = _session_parser(ssub, "undo", "revert the last N edits", cmd_session_undo)
    q.add_argument("-n", type=int, default=1)
    q = _session_parser(ssub, "test", "check, then train (charged when training starts)",
                        cmd_session_test, data=True)
    _runner_args(q)
    q = _session_parser(ssub, "submit", "choose test #N as the final answer, then run it at "
                        "the task's other final seeds (outside the budget)", cmd_session_submit,
                        data=True)
    q.add_argument("n", type=int, help="the test number")
    q.add_argument("--no-finals", dest="finals", action="store_false",
                   help="only record the choice; `harness session finals ID` runs the seeds")
    _runner_args(q)
    q = _session_parser(ssub, "finals", "run the seeds the final submission still lacks, and "
                        "show them", cmd_session_finals, data=True)
    q.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="score the final over N seeds, the submitted test included "
                        "(default: the scale's final_seeds)")
    _runner_args(q)
    q = _session_parser(ssub, "status", "budget, tests and submission", cmd_session_status)
    q.add_argument("--json", action="store_true")
    q = ssub.add_parser("tools", help="print the JSON tool schemas")
    q.add_argument("--format", choices=["openai", "anthropic"], default="openai")
    q.set_defaults(func=cmd_session_tools)
    q = ssub.add_parser("serve", help="answer JSON tool calls, one per line")
    q.add_argument("--stdio", action="store_true", required=True, help="over stdin/stdout")
    _home_arg(q)
    q.add_argument("--data-dir", type=Path, default=None)
    q.add_argument("--session", default=None,
                   help="serve only this session: requests may leave out 'session' and "
                        "cannot start new ones (give agents this)")
    q.set_defaults(func=cmd_session_serve)

    p = sub.add_parser("audit", help="a session's history; re-hash every recorded file")
    p.add_argument("target", help="a session id, an attempt id, or SESSION:N")
    _home_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("logs", help="print a test's stage logs")
    p.add_argument("attempt", help="an attempt folder, an attempt id (or unique prefix), or "
                                   "SESSION:N")
    _home_arg(p)
    p.add_argument("--stage", default="pretrain", choices=["preflight", "pretrain", "lm-eval"])
    p.add_argument("--follow", action="store_true",
                   help="keep printing, with the training progress (a bar on a terminal), "
                        "until the test ends")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("recover", help="settle tests whose harness process died")
    _home_arg(p)
    p.set_defaults(func=cmd_recover)
    p = sub.add_parser("cancel", help="stop a running attempt: it ends cancelled, not charged")
    p.add_argument("attempt", help="an attempt folder, an attempt id (or prefix), or SESSION:N")
    _home_arg(p)
    p.set_defaults(func=cmd_cancel)


def _open_session(args: argparse.Namespace) -> Any:
    from harness.session import Session

    runner = _runner_from(args) if hasattr(args, "runner") else None
    return Session.open(args.id, home=args.home, data_dir=getattr(args, "data_dir", None),
                        runner=runner)


def cmd_session_start(args: argparse.Namespace) -> int:
    from harness.session import Session

    with Session.create(agent=args.agent, task=args.task, scale=args.scale, mode=args.mode,
                        model=args.model, budget=args.budget, preflight=args.preflight,
                        home=args.home) as s:
        print(s.id)
    return 0


def cmd_session_list(args: argparse.Namespace) -> int:
    from harness.ledger import Ledger

    with Ledger(args.home, create=False) as ledger:
        for s in ledger.sessions():
            sub = ledger.submission(s.id)
            print(f"{s.id}  {s.task} {s.scale}  agent {s.agent}  {ledger.used(s.id)}/{s.budget} "
                  f"used  {'submitted #' + str(sub.number) if sub else 'open'}")
    return 0


def cmd_session_view(args: argparse.Namespace) -> int:
    with _open_session(args) as s:
        print(s.view(args.path, args.start, args.end))
    return 0


def cmd_session_edit(args: argparse.Namespace) -> int:
    from harness.submission import read_text

    content = args.content
    if args.content_file is not None:
        path = args.content_file
        content = sys.stdin.read() if str(path) == "-" else read_text(path)
    with _open_session(args) as s:
        print(s.replace(args.path, args.start, args.end, content))
    return 0


def cmd_session_undo(args: argparse.Namespace) -> int:
    with _open_session(args) as s:
        print(s.undo(args.n))
    return 0


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a timeout, a scheduler) unwinds like Ctrl-C: the stage is killed and the test
    settled as cancelled, instead of a row left running until `harness recover`."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_session_test(args: argparse.Namespace) -> int:
    _interrupt_on_sigterm()
    with _open_session(args) as s:
        report = s.run_test()
    print(report.message)
    from harness.record import Status

    return 2 if report.free else Status(report.status).exit_code


def cmd_session_submit(args: argparse.Namespace) -> int:
    _interrupt_on_sigterm()
    with _open_session(args) as s:
        print(s.submit(args.n), flush=True)
        if not args.finals:
            return 0
        report = s.run_finals()
    print(report.message)
    return int(report.exit_code)


def cmd_session_finals(args: argparse.Namespace) -> int:
    _interrupt_on_sigterm()
    with _open_session(args) as s:
        report = s.run_finals(args.seeds)
    print(report.message)
    return int(report.exit_code)


def cmd_session_status(args: argparse.Namespace) -> int:
    with _open_session(args) as s:
        print(json.dumps(s.status_data(), indent=2) if args.json else s.status())
    return 0


def cmd_session_tools(args: argparse.Namespace) -> int:
    from harness.tools import tool_schemas

    print(json.dumps(tool_schemas(args.format), indent=2, ensure_ascii=False))
    return 0


def cmd_session_serve(args: argparse.Namespace) -> int:
    import io

    from harness.tools import Server, serve

    _interrupt_on_sigterm()
    # Undecodable bytes become U+FFFD and then a JSON error reply, never a crash.
    inp = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    return serve(inp, sys.stdout, Server(home=args.home, data_dir=args.data_dir,
                                         pinned=args.session))


def cmd_audit(args: argparse.Namespace) -> int:
    from harness.audit import audit
    from harness.ledger import Ledger

    with Ledger(args.home, create=False) as ledger:
        report = audit(ledger, args.target)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.text())
    return 2 if report.tampered else 0


def cmd_logs(args: argparse.Namespace) -> int:
    from harness.audit import follow_attempt, follow_logs, print_logs, stage_log_paths
    from harness.errors import UserError
    from harness.ledger import Ledger
    from harness.record import Attempt

    folder = Attempt(Path(args.attempt))
    if folder.has_record():  # an attempt outside sessions, by its folder
        if args.follow:
            follow_attempt(folder, args.stage, sys.stdout)
        elif not (folder.root / args.stage).is_dir():
            raise UserError(f"the attempt ran no {args.stage} stage", where=str(folder.root))
        else:
            print_logs([folder.root / args.stage / n for n in ("stdout.log", "stderr.log")],
                       sys.stdout)
        return 0
    with Ledger(args.home, create=False) as ledger:
        attempt = ledger.find_attempt(args.attempt)
        if args.follow:
            follow_logs(ledger, attempt, args.stage, sys.stdout)
        else:
            print_logs(stage_log_paths(attempt, args.stage), sys.stdout)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from harness.audit import request_cancel

    print(request_cancel(args.attempt, home=args.home))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from harness.audit import recover
    from harness.ledger import Ledger

    with Ledger(args.home, create=False) as ledger:
        found = recover(ledger)
        problems = ledger.integrity_check()
    for r in found:
        print(r.render())
    settled = sum(r.action == "settled" for r in found)
    print(f"recover: {settled} attempt(s) settled, {len(found) - settled} left alone; ledger "
          f"{'consistent' if not problems else 'has problems: ' + '; '.join(problems)}")
    return 2 if problems else 0


# --- the MCP server (docs/agents.md) ----------------------------------------------------


def _add_mcp_command(sub: Any) -> None:
    p = sub.add_parser("mcp", help="serve an agent session's tools over the Model Context "
                                   "Protocol (stdio, or streamable HTTP with a bearer token)")
    p.add_argument("--http", metavar="[HOST:]PORT", default=None,
                   help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio (host "
                        "default 127.0.0.1; port 0: any free one); every request needs the "
                        "bearer token")
    p.add_argument("--token-file", type=Path, default=None,
                   help="with --http: the bearer token, read from this file (default: a new "
                        "random token, printed once on stderr)")
    p.add_argument("--session", default=None,
                   help="serve only this session: no `start`, no other session (give agents "
                        "this)")
    _home_arg(p)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="root of prepared datasets (default: $HARNESS_DATA or <home>/data)")
    p.add_argument("--task", default=None,
                   help="without --session: the task whose statement the resources serve "
                        "(default: llm-pretrain-bitlinear)")
    p.add_argument("--budget", type=int, default=None,
                   help="tests allowed in each session `start` creates (default: the task's)")
    p.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="sessions `start` creates skip the (free) pre-flight checks")
    p.add_argument("--board", type=Path, default=None,
                   help="the board.json the leaderboard tool shows (default: built from the "
                        "home's ledger)")
    _runner_args(p)
    p.set_defaults(func=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> int:
    from harness.mcp_server import run_mcp
    from harness.tools import Place

    # The runner once as an object (check, in this process) and once as the flags that name
    # it (a test runs in a process of its own: harness.background).
    flags = [(f"--{k}", getattr(args, k)) for k in ("runner", "image", "config")]
    runner_args = tuple(x for k, v in flags if v is not None for x in (k, str(v)))
    place = Place(home=args.home, data_dir=args.data_dir, runner=_runner_from(args),
                  runner_args=runner_args, board=args.board, pinned=args.session,
                  preflight=args.preflight, budget=args.budget)
    return run_mcp(place, http=args.http, token_file=args.token_file, task=args.task)


# --- the leaderboard (docs/leaderboard.md) --------------------------------------------------

BOARD_FILE = Path("leaderboard/board.json")
PAGE_FILE = Path("leaderboard/index.html")


def _add_leaderboard_commands(sub: Any) -> None:
    p = sub.add_parser("leaderboard", help="aggregate final results; render the page; export")
    lsub = p.add_subparsers(dest="leaderboard_command", required=True, metavar="ACTION")
    q = lsub.add_parser("build", help="aggregate every final result into a board file (JSON)")
    q.add_argument("--runs-dir", type=Path, action="append", default=None,
                   help="a folder of attempts, repeatable (default: $HARNESS_RUNS or ./runs, "
                        "when it exists)")
    q.add_argument("--result", type=Path, action="append", default=[],
                   help="one result.json, repeatable")
    _home_arg(q)
    q.add_argument("--no-ledger", action="store_true",
                   help="leave out the agent sessions' final submissions")
    q.add_argument("--task", action="append", default=None,
                   help="only this task, repeatable (default: every task found)")
    q.add_argument("-o", "--output", type=Path, default=BOARD_FILE,
                   help="the board file (default: %(default)s)")
    q.set_defaults(func=cmd_leaderboard_build)
    q = lsub.add_parser("render", help="the board as a self-contained HTML page")
    q.add_argument("--board", type=Path, default=BOARD_FILE, help="(default: %(default)s)")
    q.add_argument("-o", "--output", type=Path, default=PAGE_FILE,
                   help="(default: %(default)s)")
    q.set_defaults(func=cmd_leaderboard_render)
    q = lsub.add_parser("export", help="the board as CSV, Markdown or JSON (MLS-Bench keys)")
    q.add_argument("--format", required=True, choices=["csv", "md", "json"])
    q.add_argument("--board", type=Path, default=BOARD_FILE, help="(default: %(default)s)")
    q.add_argument("-o", "--output", type=Path, default=None, help="(default: stdout)")
    q.set_defaults(func=cmd_leaderboard_export)


def cmd_leaderboard_build(args: argparse.Namespace) -> int:
    import os

    from harness.leaderboard import build_board, default_home, write_board

    if args.runs_dir is not None:
        runs = list(args.runs_dir)
    else:  # the default folder only when it exists: a fresh checkout has none yet
        default = Path(os.environ.get("HARNESS_RUNS", "runs"))
        runs = [default] if default.is_dir() else []
    home = None if args.no_ledger else (args.home or default_home())
    board = build_board(runs, home=home, files=args.result, tasks=args.task)
    write_board(board, args.output)
    rows = sum(len(t.rows) for t in board.tables)
    print(f"OK: {args.output}: {len(board.tables)} table(s), {rows} row(s) from "
          f"{board.attempts} final attempt record(s)")
    for reason, count in board.skipped.items():
        print(f"  not on the board: {count} {reason}")
    for problem in board.problems:
        print(f"  unreadable: {problem.path}: {problem.reason}", file=sys.stderr)
    return 0


def cmd_leaderboard_render(args: argparse.Namespace) -> int:
    from harness.leaderboard import read_board
    from harness.leaderboard.page import write_page

    page = write_page(read_board(args.board), args.output)
    print(f"leaderboard: {_shown(str(page))}")
    return 0


def cmd_leaderboard_export(args: argparse.Namespace) -> int:
    from harness.leaderboard import export, read_board
    from harness.runtime.fileio import atomic_write_text

    text = export(read_board(args.board), args.format)
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.output, text)
        print(f"OK: {args.output}")
    return 0


def _add_image_commands(sub: Any) -> None:
    p = sub.add_parser("image", help="build or check the container image the stages run in")
    isub = p.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    q = isub.add_parser("build", help="build the Docker image (containers/Dockerfile) offline")
    q.add_argument("--base", default=None,
                   help="base image: a CUDA PyTorch image, or a local one (default: the "
                        "Dockerfile's CUDA base)")
    q.add_argument("--tag", default=None, help="the image's tag (default: bitlinear-harness:cpu)")
    q.add_argument("--python", default="python3", help="the base image's Python interpreter")
    q.add_argument("--wheelhouse", type=Path, default=None,
                   help="use these wheels (with their requirements.txt) instead of making them")
    q.set_defaults(func=cmd_image_build)
    q = isub.add_parser("check", help="does an image have what the task needs? (exit 2: no)")
    q.add_argument("image", nargs="?", default=None,
                   help="image tag (default: [runner.docker] image of harness.toml)")
    q.add_argument("--gpu", action="store_true", help="also require CUDA devices and NCCL")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--config", type=Path, default=None,
                   help="runner settings (default: $HARNESS_CONFIG or ./harness.toml)")
    q.set_defaults(func=cmd_image_check)


def cmd_image_build(args: argparse.Namespace) -> int:
    from harness.image import DEFAULT_BASE, build_image
    from harness.runners.config import DockerSettings

    built = build_image(base=args.base or DEFAULT_BASE, tag=args.tag or DockerSettings.image,
                        python=args.python, wheelhouse=args.wheelhouse)
    print(f"built {built.tag} {built.image_id} from {built.base} in {built.seconds:.0f}s "
          f"({built.wheels} wheels; torch from {built.torch})")
    print(f"next: harness image check {built.tag}")
    return 0


def cmd_image_check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from harness.runners.config import load_config
    from harness.runners.docker import check_image

    settings = load_config(args.config).docker
    report = check_image(args.image or settings.image, gpu=args.gpu, settings=settings)
    print(json.dumps(asdict(report), indent=1) if args.json else report.render())
    return 0 if report.ok else 2


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
