"""The session API as JSON tools: schemas for OpenAI and Anthropic, and a stdio server.

Server protocol (`harness session serve --stdio`): one JSON object per input line,
    {"id": ..., "session": "<session id>" | {start params}, "tool": "<name>", "arguments": {...}}
and one JSON object per output line,
    {"id": ..., "ok": true, "session": "<id>", "output": "<text>"}  or
    {"id": ..., "ok": false, "error": "<text>"}.
Start params (task, scale, agent, mode, model) create a session; the reply names it.
Bad input of any kind is answered with an error line; the server never stops on it.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from harness.errors import HarnessError, UserError
from harness.ledger import MODES
from harness.runners.base import Runner
from harness.session import Session

_INT = {"type": "integer"}
_STR = {"type": "string"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    properties: dict[str, dict[str, Any]]
    required: tuple[str, ...] = ()

    def parameters(self) -> dict[str, Any]:
        return {"type": "object", "properties": self.properties,
                "required": list(self.required), "additionalProperties": False}


TOOLS: tuple[Tool, ...] = (
    Tool("view", "Show numbered lines of the training script. Lines marked '▸' are editable; "
         "lines marked '|' are frozen. The header gives the editable ranges and the total. "
         "A read-only file of the task (e.g. model.py) can be viewed too.",
         {"path": {**_STR, "description": "file to view (default: the training script)"},
          "start": {**_INT, "minimum": 1, "description": "first line (default 1)"},
          "end": {**_INT, "minimum": 1, "description": "last line (default: the last)"}}),
    Tool("replace", "Replace lines start_line..end_line (1-based, inclusive, numbers of the "
         "CURRENT file) with content. The lines must lie inside one editable range; use "
         "end_line = start_line - 1 to insert before start_line. Free.",
         {"path": {**_STR, "description": "file to edit (default: the training script)"},
          "start_line": {**_INT, "minimum": 1}, "end_line": {**_INT, "minimum": 0},
          "content": {**_STR, "description": "the new lines"}},
         ("start_line", "end_line", "content")),
    Tool("undo", "Revert the last n successful replaces. Free.",
         {"n": {**_INT, "minimum": 1, "description": "how many edits to revert (default 1)"}}),
    Tool("test", "Check, then train the current file at the session's scale and report the "
         "metrics. Static-check refusals are free; a test that starts training uses one test "
         "of the budget (refunded if our infrastructure fails).", {}),
    Tool("submit", "Choose test #n, a succeeded test of this session, as the final answer. "
         "Once only; the session is then closed.",
         {"n": {**_INT, "minimum": 1, "description": "the test number, as in [Test #n]"}},
         ("n",)),
    Tool("status", "The budget used and left, every test so far, and the submission.", {}),
)
TOOLS_BY_NAME = {t.name: t for t in TOOLS}
FORMATS = ("openai", "anthropic")
# No budget and no pre-flight switch: those are the operator's (CLI or Python), not a
# client's, or an agent could start itself a session with a larger budget.
START_PARAMS = Tool("start", "", {"task": _STR, "scale": _STR, "agent": _STR,
                                  "mode": {**_STR, "enum": list(MODES)}, "model": _STR},
                    ("agent",))


def tool_schemas(fmt: str) -> list[dict[str, Any]]:
    if fmt == "openai":
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters()}} for t in TOOLS]
    if fmt == "anthropic":
        return [{"name": t.name, "description": t.description, "input_schema": t.parameters()}
                for t in TOOLS]
    raise UserError(f"unknown tool format {fmt!r}", fix=f"use one of: {', '.join(FORMATS)}")


# --- arguments -------------------------------------------------------------------------


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if schema["type"] == "integer":
        # bool is an int in Python, never in JSON Schema.
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def check_arguments(tool: Tool, arguments: Any) -> dict[str, Any]:
    """Arguments checked against the tool's schema; a UserError naming the first problem."""
    where = f"tool {tool.name}"
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise UserError(f"arguments must be an object, not {type(arguments).__name__}",
                        where=where)
    valid = ", ".join(tool.properties) or "none"
    for key in arguments:
        if key not in tool.properties:
            raise UserError(f"unknown argument {key!r}", where=where, fix=f"arguments: {valid}")
    for key in tool.required:
        if key not in arguments:
            raise UserError(f"missing argument {key!r}", where=where, fix=f"arguments: {valid}")
    for key, value in arguments.items():
        schema = tool.properties[key]
        if not _type_ok(value, schema):
            raise UserError(f"argument {key!r} must be {schema['type']}, not {value!r}",
                            where=where)
        if "minimum" in schema and value < schema["minimum"]:
            raise UserError(f"argument {key!r} must be >= {schema['minimum']}, not {value}",
                            where=where)
        if "enum" in schema and value not in schema["enum"]:
            raise UserError(f"argument {key!r} must be one of {', '.join(schema['enum'])}",
                            where=where)
    return dict(arguments)


def call_tool(session: Session, name: Any, arguments: Any) -> str:
    """Run one tool on a session; the text an agent reads."""
    tool = TOOLS_BY_NAME.get(name) if isinstance(name, str) else None
    if tool is None:
        raise UserError(f"unknown tool {name!r}", fix=f"tools: {', '.join(TOOLS_BY_NAME)}")
    a = check_arguments(tool, arguments)
    calls: dict[str, Callable[[], str]] = {
        "view": lambda: session.view(a.get("path"), a.get("start"), a.get("end")),
        "replace": lambda: session.replace(a.get("path"), a["start_line"], a["end_line"],
                                           a["content"]),
        "undo": lambda: session.undo(a.get("n", 1)),
        "test": session.test,
        "submit": lambda: session.submit(a["n"]),
        "status": session.status,
    }
    return calls[tool.name]()


# --- the stdio server ---------------------------------------------------------------------


@dataclass
class Server:
    home: Path | None = None
    data_dir: Path | None = None
    runner: Runner | None = None
    pinned: str | None = None  # serve only this session (an agent's server): no starts

    def open(self, ref: Any) -> Session:
        if self.pinned is not None:
            if ref not in (None, self.pinned):
                raise UserError(f"this server serves only session {self.pinned}",
                                fix="leave out 'session', or give that id")
            ref = self.pinned
        if isinstance(ref, str):
            return Session.open(ref, home=self.home, runner=self.runner, data_dir=self.data_dir)
        if isinstance(ref, dict):
            params = check_arguments(START_PARAMS, ref)
            return Session.create(home=self.home, runner=self.runner, data_dir=self.data_dir,
                                  **params)
        raise UserError("'session' must be a session id or an object of start parameters",
                        fix=f"start parameters: {', '.join(START_PARAMS.properties)}")

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
            if "session" not in request and self.pinned is None:
                raise UserError("missing 'session'", fix="give a session id, or start "
                                "parameters such as {\"agent\": \"me\"}")
            with self.open(request.get("session")) as session:
                output = call_tool(session, request.get("tool"), request.get("arguments"))
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
