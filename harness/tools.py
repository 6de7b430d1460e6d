"""The agent's tools, defined once; every way of calling them is generated from this table.

`TOOLS` holds each tool an agent has on its session: its name, the description the model
reads, its arguments (JSON Schema) and the function that runs it. From it come
    tool_schemas("openai" | "anthropic")   `harness session tools`
    Server / serve                         `harness session serve --stdio` (below)
    harness.mcp_server                     `harness mcp`, which adds `HOME_TOOLS` (start,
                                           attach) when it is not pinned to one session.
A tool is run by the same `Session` method whichever way it is called.

Server protocol (`harness session serve --stdio`): one JSON object per input line,
    {"id": ..., "session": "<session id>" | {start params}, "tool": "<name>", "arguments": {...}}
and one JSON object per output line,
    {"id": ..., "ok": true, "session": "<id>", "output": "<text>"}  or
    {"id": ..., "ok": false, "error": "<text>"}.
Start params (task, scale, agent, mode, model) create a session; the reply names it. A tool
of the home (leaderboard) needs no session. Bad input of any kind is answered with an error
line; the server never stops on it.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from harness import background
from harness.errors import HarnessError, InfraError, UserError
from harness.ledger import LEDGER_FILE, MODES, resolve_home
from harness.runners.base import Runner
from harness.session import Session

_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
# The session argument every session tool takes on a server that is not pinned to one.
SESSION_ARG = {**_STR, "description": "the session id that `start` (or `attach`) returned"}
MAX_LOG_LINES = 2000
_LOG_TAIL_BYTES = 1 << 20  # read at most the last MiB of a log: full-scale logs are large


@dataclass
class Place:
    """What every call of a server acts on, fixed by its operator: the home and data
    directories, the runner (and the same runner as command-line flags, for a test run in a
    process of its own), the board, the one session it serves, and the switches of the
    sessions it starts. No client can set any of these (see HOME_TOOLS)."""

    home: Path | None = None
    data_dir: Path | None = None
    runner: Runner | None = None
    runner_args: tuple[str, ...] = ()
    board: Path | None = None  # a published board.json; None: built from the home's ledger
    pinned: str | None = None  # serve only this session: no `start`, no other session
    preflight: bool = True
    budget: int | None = None

    def open(self, ref: object) -> Session:
        """The session a call names (the pinned one by default), opened from the ledger."""
        if self.pinned is not None:
            if ref not in (None, self.pinned):
                raise UserError(f"this server serves only session {self.pinned}",
                                fix="leave out 'session', or give that id")
            ref = self.pinned
        if not isinstance(ref, str):
            raise UserError("no session given", fix="pass 'session': an id that `start` "
                            "returned (or `harness session start` printed)")
        return Session.open(ref, home=self.home, runner=self.runner, data_dir=self.data_dir)

    def start(self, params: dict[str, Any]) -> Session:
        """A new session from checked start parameters, with the operator's switches."""
        if self.pinned is not None:
            raise UserError(f"this server serves only session {self.pinned}",
                            fix="leave out 'session', or give that id")
        return Session.create(home=self.home, runner=self.runner, data_dir=self.data_dir,
                              budget=self.budget, preflight=self.preflight, **params)

    @property
    def home_dir(self) -> Path:
        return resolve_home(self.home)


@dataclass
class ToolCall:
    """One call: its checked arguments, where it acts, and its open session (session tools)."""

    place: Place
    args: dict[str, Any]
    session: Session | None = None

    @property
    def s(self) -> Session:
        if self.session is None:  # the dispatcher opens one for every session tool
            raise AssertionError("a session tool was called without a session")
        return self.session


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    properties: dict[str, dict[str, Any]]
    run: Callable[[ToolCall], str]
    required: tuple[str, ...] = ()
    read_only: bool = False  # changes nothing (MCP's readOnlyHint)
    on_session: bool = True  # False: acts on the server's home, not on one session

    def parameters(self, *, session_arg: bool = False) -> dict[str, Any]:
        """The JSON Schema of the arguments; with the `session` argument a server that is
        not pinned to one session needs."""
        props, required = dict(self.properties), list(self.required)
        if session_arg and self.on_session:
            props, required = {"session": SESSION_ARG, **props}, ["session", *required]
        return {"type": "object", "properties": props, "required": required,
                "additionalProperties": False}


# --- what each tool does -----------------------------------------------------------------


def _test(c: ToolCall) -> str:
    """Wait (default): run the test here and report it. wait=false: start it in a process of
    its own (harness.background) and return once its ledger row exists."""
    if c.args.get("wait", True):
        return c.s.test()
    bg = background.start(c.s.id, home=c.s.ledger.home, data_dir=c.place.data_dir,
                          runner_args=c.place.runner_args)
    row = background.wait_started(bg)
    if row is None:  # refused before it had a row: no test left, another one running...
        raise_outcome(bg.outcome())
    return background.started_message(row)


def raise_outcome(outcome: background.Outcome) -> NoReturn:
    """A background test's outcome without a report, raised as the error it was."""
    if outcome.error_kind == "user":
        raise UserError(outcome.message)
    raise InfraError(outcome.message)


def _tail(path: Path, lines: int) -> tuple[list[str], int | None]:
    """The last `lines` lines of a log, and its line count when the whole file was read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - _LOG_TAIL_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    every = text.splitlines()
    return every[-lines:], (len(every) if size <= _LOG_TAIL_BYTES else None)


def logs_text(s: Session, n: int, stage: str = "pretrain", lines: int = 40) -> str:
    """Test #n of the session: its state, progress while it runs, the tail of the stage's
    logs; for a test the checks refused, their findings."""
    from harness.audit import AuditEntry
    from harness.progress import attempt_progress

    a = s.ledger.find_attempt(f"{s.id}:{n}")
    charge = "refunded" if a.refunded else "charged" if a.charged else "not charged"
    out = [f"Test #{a.number} ({a.id}): {a.status}, {charge}"
           + (f"; {a.reason}" if a.reason else "")]
    now = attempt_progress(a.attempt_dir) if a.in_progress and a.attempt_dir else None
    if now is not None:
        out.append(f"  {now.line()}")
    found = AuditEntry(a, {}, [], 0).findings()
    out += [f"  check: {f}" for f in found if not a.state.ranked]
    stage_dir = Path(a.attempt_dir) / stage if a.attempt_dir else None
    if stage_dir is None or not stage_dir.is_dir():
        out.append(f"No {stage} logs: the stage has not started" +
                   (" (the test ended before it)." if not a.in_progress else " yet."))
        return "\n".join(out)
    for name in ("stdout.log", "stderr.log"):
        path = stage_dir / name
        if not path.is_file():
            out.append(f"==> {stage}/{name} (missing) <==")
            continue
        tail, total = _tail(path, lines)
        of = f"last {len(tail)} of {total} lines" if total is not None else \
            f"last {len(tail)} lines"
        out += [f"==> {stage}/{name} ({of}) <==", *tail]
    return "\n".join(out)


def leaderboard_text(place: Place, fmt: str = "md") -> str:
    """The board of the server's home (its sessions' final submissions), or the published
    board the operator named, in an export format."""
    from harness.leaderboard import aggregate, collect, export, read_board

    if place.board is not None:
        return export(read_board(place.board), fmt)
    home = place.home_dir
    if not (home / LEDGER_FILE).is_file():
        return f"The board is empty: no session has been started in {home} yet."
    collected = collect(home=home)
    if not collected.records:
        return "The board is empty: no session of this home has submitted a final answer yet."
    return export(aggregate(collected), fmt)


def _start(c: ToolCall) -> str:
    with c.place.start(c.args) as s:
        return (f"Started session {s.id}. Pass session={s.id!r} to every other tool.\n"
                f"{s.status()}")


def _attach(c: ToolCall) -> str:
    with c.place.open(c.args["session"]) as s:
        return (f"Attached to session {s.id}. Pass session={s.id!r} to every other tool.\n"
                f"{s.status()}")


# --- the table ---------------------------------------------------------------------------

TOOLS: tuple[Tool, ...] = (
    Tool("view", "Show numbered lines of the training script. Lines marked '▸' are editable; "
         "lines marked '|' are frozen. The header gives the editable ranges and the total. "
         "A read-only file of the task (e.g. model.py) can be viewed too.",
         {"path": {**_STR, "description": "file to view (default: the training script)"},
          "start": {**_INT, "minimum": 1, "description": "first line (default 1)"},
          "end": {**_INT, "minimum": 1, "description": "last line (default: the last)"}},
         lambda c: c.s.view(c.args.get("path"), c.args.get("start"), c.args.get("end")),
         read_only=True),
    Tool("replace", "Replace lines start_line..end_line (1-based, inclusive, numbers of the "
         "CURRENT file) with content. The lines must lie inside one editable range; use "
         "end_line = start_line - 1 to insert before start_line. Free.",
         {"path": {**_STR, "description": "file to edit (default: the training script)"},
          "start_line": {**_INT, "minimum": 1}, "end_line": {**_INT, "minimum": 0},
          "content": {**_STR, "description": "the new lines"}},
         lambda c: c.s.replace(c.args.get("path"), c.args["start_line"], c.args["end_line"],
                               c.args["content"]),
         ("start_line", "end_line", "content")),
    Tool("undo", "Revert the last n successful replaces. Free.",
         {"n": {**_INT, "minimum": 1, "description": "how many edits to revert (default 1)"}},
         lambda c: c.s.undo(c.args.get("n", 1))),
    Tool("check", "Run the checks a test starts with on the current file, without testing: "
         "static checks, then the CPU pre-flight (interface, low-bit weights, one code path, "
         "gradients, torch.compile, a short 2-process run; about a minute). Free: nothing is "
         "recorded and no test is used.",
         {"static_only": {**_BOOL, "description": "only the static checks (seconds)"}},
         lambda c: c.s.check(c.args.get("static_only", False)), read_only=True),
    Tool("test", "Check, then train the current file at the session's scale and report the "
         "metrics. Static-check refusals are free; a test that starts training uses one test "
         "of the budget (refunded if our infrastructure fails). Training takes minutes to "
         "hours: with wait=false the test starts in the background and this returns at once; "
         "poll `status` and `logs`.",
         {"wait": {**_BOOL, "description": "wait for the result (default true); false: "
                   "return once the test has started"}},
         _test),
    Tool("status", "The budget used and left, every test so far (with the progress of a "
         "running one), and the submission.", {}, lambda c: c.s.status(), read_only=True),
    Tool("logs", "Test #n's state and progress, and the last lines of its training (or "
         "evaluation) logs; for a test the checks refused, their findings.",
         {"n": {**_INT, "minimum": 1, "description": "the test number, as in [Test #n]"},
          "stage": {**_STR, "enum": ["pretrain", "lm-eval"],
                    "description": "which stage's logs (default pretrain)"},
          "lines": {**_INT, "minimum": 1, "maximum": MAX_LOG_LINES,
                    "description": "how many last lines of each log (default 40)"}},
         lambda c: logs_text(c.s, c.args["n"], c.args.get("stage", "pretrain"),
                             c.args.get("lines", 40)),
         ("n",), read_only=True),
    Tool("submit", "Choose test #n, a succeeded test of this session, as the final answer. "
         "Once only; the session is then closed.",
         {"n": {**_INT, "minimum": 1, "description": "the test number, as in [Test #n]"}},
         lambda c: c.s.submit(c.args["n"]), ("n",)),
    Tool("leaderboard", "The leaderboard: every final submission ranked by the task's primary "
         "metric, with the baselines when the operator published them.",
         {"format": {**_STR, "enum": ["md", "csv", "json"],
                     "description": "export format (default md)"}},
         lambda c: leaderboard_text(c.place, c.args.get("format", "md")),
         read_only=True, on_session=False),
)
# A server's own tools for choosing its session; an MCP server pinned to one session (what
# an agent should be given) has neither. `start` has no budget and no pre-flight switch:
# those are the operator's (CLI or Python, `harness mcp --budget/--no-preflight`), or an
# agent could start itself a session with a larger budget.
HOME_TOOLS: tuple[Tool, ...] = (
    Tool("start", "Start a new session of a task and return its id, which every other tool "
         "then takes as its `session` argument.",
         {"agent": {**_STR, "description": "who works in the session"},
          "task": {**_STR, "description": "task name (default llm-pretrain-bitlinear)"},
          "scale": {**_STR, "description": "scale (default: the task's, smoke)"},
          "mode": {**_STR, "enum": list(MODES)},
          "model": {**_STR, "description": "the model behind the agent"}},
         _start, ("agent",), on_session=False),
    Tool("attach", "Attach to an existing session by its id and show its status.",
         {"session": SESSION_ARG}, _attach, ("session",), read_only=True, on_session=False),
)
TOOLS_BY_NAME = {t.name: t for t in TOOLS}
START_PARAMS = HOME_TOOLS[0]
FORMATS = ("openai", "anthropic")


def tool_schemas(fmt: str) -> list[dict[str, Any]]:
    if fmt == "openai":
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters()}} for t in TOOLS]
    if fmt == "anthropic":
        return [{"name": t.name, "description": t.description, "input_schema": t.parameters()}
                for t in TOOLS]
    raise UserError(f"unknown tool format {fmt!r}", fix=f"use one of: {', '.join(FORMATS)}")


# --- arguments -------------------------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    # bool is an int in Python, never in JSON Schema.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
}


def check_arguments(tool: Tool, arguments: Any, *, session_arg: bool = False) -> dict[str, Any]:
    """Arguments checked against the tool's schema; a UserError naming the first problem."""
    where = f"tool {tool.name}"
    schema = tool.parameters(session_arg=session_arg)
    props: dict[str, dict[str, Any]] = schema["properties"]
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise UserError(f"arguments must be an object, not {type(arguments).__name__}",
                        where=where)
    valid = ", ".join(props) or "none"
    for key in arguments:
        if key not in props:
            raise UserError(f"unknown argument {key!r}", where=where, fix=f"arguments: {valid}")
    for key in schema["required"]:
        if key not in arguments:
            raise UserError(f"missing argument {key!r}", where=where, fix=f"arguments: {valid}")
    for key, value in arguments.items():
        rule = props[key]
        if not _TYPES[rule["type"]](value):
            raise UserError(f"argument {key!r} must be {rule['type']}, not {value!r}",
                            where=where)
        if "minimum" in rule and value < rule["minimum"]:
            raise UserError(f"argument {key!r} must be >= {rule['minimum']}, not {value}",
                            where=where)
        if "maximum" in rule and value > rule["maximum"]:
            raise UserError(f"argument {key!r} must be <= {rule['maximum']}, not {value}",
                            where=where)
        if "enum" in rule and value not in rule["enum"]:
            raise UserError(f"argument {key!r} must be one of {', '.join(rule['enum'])}",
                            where=where)
    return dict(arguments)


def find_tool(name: Any, tools: tuple[Tool, ...] = TOOLS) -> Tool:
    found = next((t for t in tools if t.name == name), None) if isinstance(name, str) else None
    if found is None:
        raise UserError(f"unknown tool {name!r}", fix=f"tools: {', '.join(t.name for t in tools)}")
    return found


def call_tool(session: Session | None, name: Any, arguments: Any,
              place: Place | None = None) -> str:
    """Run one of TOOLS (on `session`, for a session tool); the text an agent reads."""
    tool = find_tool(name)
    call = ToolCall(place or Place(home=session.ledger.home if session else None),
                    check_arguments(tool, arguments), session)
    return tool.run(call)


# --- the stdio server ---------------------------------------------------------------------


@dataclass
class Server:
    home: Path | None = None
    data_dir: Path | None = None
    runner: Runner | None = None
    pinned: str | None = None  # serve only this session (an agent's server): no starts
    place: Place = field(init=False)

    def __post_init__(self) -> None:
        self.place = Place(home=self.home, data_dir=self.data_dir, runner=self.runner,
                           pinned=self.pinned)

    def open(self, ref: Any) -> Session:
        if self.pinned is None and isinstance(ref, dict):
            return self.place.start(check_arguments(START_PARAMS, ref))
        if self.pinned is None and not isinstance(ref, str):
            raise UserError("'session' must be a session id or an object of start parameters",
                            fix=f"start parameters: {', '.join(START_PARAMS.properties)}")
        return self.place.open(ref)  # pinned: only its id (or none) gets through

    def handle(self, line: str) -> dict[str, Any]:
        """One request line -> one reply object; never raises for bad input."""
        rid: Any = None
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise UserError(f"a request must be a JSON object, not {type(request).__name__}")
            rid = request.get("id")
            unknown = sorted(set(request) - {"id", "session", "tool", "arguments"})
            if unknown:
                raise UserError(f"unknown request key(s) {', '.join(unknown)}",
                                fix="keys: id, session, tool, arguments")
            tool = find_tool(request.get("tool"))
            if not tool.on_session:
                return {"id": rid, "ok": True,
                        "output": call_tool(None, tool.name, request.get("arguments"),
                                            self.place)}
            if "session" not in request and self.pinned is None:
                raise UserError("missing 'session'", fix="give a session id, or start "
                                "parameters such as {\"agent\": \"me\"}")
            with self.open(request.get("session")) as session:
                output = call_tool(session, tool.name, request.get("arguments"), self.place)
                return {"id": rid, "ok": True, "session": session.id, "output": output}
        except json.JSONDecodeError as e:
            return {"id": None, "ok": False, "error": f"invalid JSON: {e.msg} at column {e.colno}"}
        except HarnessError as e:
            return {"id": rid, "ok": False, "error": str(e)}
        except Exception as e:  # a bug of ours: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            return {"id": rid, "ok": False,
                    "error": f"internal error (a bug of the harness): {type(e).__name__}: {e}"}


def serve(inp: TextIO, out: TextIO, server: Server) -> int:
    """Answer requests line by line until end of input."""
    for line in inp:
        if not line.strip():
            continue
        reply = server.handle(line)
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0
