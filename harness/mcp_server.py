"""`harness mcp`: the agent's tools as a Model Context Protocol server (docs/agents.md).

Built on the official Python SDK's low-level server (`mcp.server.Server`, pinned in
pyproject.toml): the tool list is generated from harness.tools' one table (TOOLS, plus
HOME_TOOLS `start`/`attach` when the server is not pinned to a session, where every session
tool then takes a `session` argument), and each call runs the same function the JSON tools
and `serve` run, in a worker thread with its own ledger connection (SQLite connections stay
in the thread that opened them), so one long call never blocks the others.

`test` is the exception: it always runs in a process of its own (harness.background), which
outlives this server and its client, and this server only watches it: with `wait` (the
default) it sends a progress notification whenever the template's progress file moves
(iteration / total, losses) and answers with the report; with `wait: false` it answers as
soon as the test's ledger row exists, and `status`/`logs` poll it.

Results: the text an agent reads is the text the CLI prints. A refusal (the CLI's exit 2) is a
tool error (isError) with exactly the CLI's message; a failure of ours (exit 3) is a tool error
whose text starts with HARNESS_FAULT; `structuredContent` says whose fault it was in words
(`fault`: null, "user", "submission", "harness", "bug" or "stopped") and gives the CLI's exit
code. Bad arguments are answered by a tool error, never by a crash of the server.

Transports: stdio (the default), or streamable HTTP (`--http HOST:PORT`), which requires
`Authorization: Bearer <token>` on every request (the SDK's bearer middleware; a token made
with `secrets` at start and printed once on stderr, or read from --token-file) and binds
127.0.0.1 unless told otherwise (the SDK then also refuses other Host/Origin headers: DNS
rebinding).
"""

from __future__ import annotations

import logging
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from pydantic import AnyHttpUrl

from harness import __version__, background
from harness.errors import EXIT_INFRA, EXIT_USER, HarnessError, UserError
from harness.progress import Progress
from harness.record import Status
from harness.regions import EditSession
from harness.task import DEFAULT_TASK, TaskSpec, load_task
from harness.tools import HOME_TOOLS, TOOLS, Place, Tool, ToolCall, check_arguments, find_tool

SERVER_NAME = "bitlinear-harness"
HARNESS_FAULT = "[harness failure: ours, not the submission's]"
PROGRESS_POLL_S = 1.0
MIN_TOKEN_CHARS = 16
log = logging.getLogger("harness.mcp")

Ctx = ServerRequestContext[Any, Any]


# --- results ---------------------------------------------------------------------------------


def _result(text: str, *, error: bool, **structured: Any) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=error,
                                structured_content=structured or None)


def error_result(e: BaseException) -> types.CallToolResult:
    """A refusal carries the CLI's message as it is; our failures say they are ours."""
    if isinstance(e, UserError):
        return _result(str(e), error=True, fault="user", exit_code=EXIT_USER)
    if isinstance(e, HarnessError):
        return _result(f"{HARNESS_FAULT} {e}", error=True, fault="harness",
                       exit_code=e.exit_code)
    log.exception("a tool call raised: a bug of the harness")
    return _result(f"internal error (a bug of the harness): {type(e).__name__}: {e}",
                   error=True, fault="bug", exit_code=1)


def outcome_result(o: background.Outcome) -> types.CallToolResult:
    """How a background test ended, as `harness session test` would have said it."""
    if o.report is None:
        kind = o.error_kind or "harness"
        text = o.message if kind in ("user", "bug") else f"{HARNESS_FAULT} {o.message}"
        return _result(text, error=True, fault=kind, exit_code=o.exit_code)
    r = o.report
    status = Status(r["status"])
    fault = None if o.exit_code == 0 else "submission" if r["free"] or not status.refundable \
        else "harness" if status.exit_code == EXIT_INFRA else "stopped"
    test = {k: r[k] for k in ("number", "attempt_id", "status", "charged", "refunded", "free")}
    return _result(o.message, error=o.exit_code != 0, fault=fault, exit_code=o.exit_code,
                   test=test)


# --- resources: what the task is ------------------------------------------------------------


def statement_text(task: TaskSpec) -> str:
    """The task statement, as the task's own files declare it (task.toml, the template's
    regions, the static-check rules, docs/template.md when the checkout has it)."""
    from harness.checks.static import RULES
    from harness.task import REPO_ROOT

    layout = EditSession(task.template_text(), filename=task.template).layout
    spans = dict(zip((r.id for r in layout.regions), layout.spans(), strict=True))
    primary = task.metric(task.primary_metric)
    out = [f"# {task.title}", "",
           f"Task `{task.name}` {task.version}. Edit only the editable regions of "
           f"`{task.template}` (every other byte is frozen), test within a budget of "
           f"{task.test_budget} tests, then submit one succeeded test. Scored by "
           f"{primary.label} ({'lower' if primary.direction == 'min' else 'higher'} is "
           "better). Generated from the task's files: task.toml is the contract.", "",
           "## What you can modify", ""]
    for r in task.regions:
        first, last = spans[r.id]
        refs = ", ".join(r.may_reference) or "none"
        out.append(f"- region `{r.id}` of `{r.file}`, lines {first}–{last} of the template: "
                   f"{r.description} (names of the frozen code it may use: {refs}; as a "
                   f"submission file: `{r.submission_file}`)")
    out += ["", "## The interface the spliced file must define", ""]
    for item in task.interface:
        shape = item.signature or ", ".join(f"{m}{sig}" for m, sig in item.methods)
        out.append(f"- {item.kind} `{item.name}`: `{shape}`; {item.returns}")
    out += ["", "## Hyperparameters CONFIG_OVERRIDES may set", "",
            "| name | type | min | max |", "|---|---|---|---|",
            *[f"| {b.name} | {b.type} | {b.min:g} | {b.max:g} |" for b in task.overrides],
            "", "## Metrics", "",
            *[f"- {m.name} ({m.label}, {m.direction}; stage {m.stage})" for m in task.metrics],
            "", f"Scales: {', '.join(task.scale_names())} (default {task.default_scale}).",
            "", "## Static-check rules", "", *[f"- `{k}`: {v}" for k, v in RULES.items()]]
    guide = REPO_ROOT / "docs" / "template.md"
    if guide.is_file():
        out += ["", "## The frozen template (docs/template.md)", "",
                guide.read_text(encoding="utf-8")]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class TaskResource:
    name: str
    description: str
    mime_type: str
    read: Callable[[TaskSpec], str]


def _file(name: str) -> Callable[[TaskSpec], str]:
    return lambda task: (task.root / name).read_text(encoding="utf-8")


def task_resources(task: TaskSpec) -> dict[str, TaskResource]:
    """By URI: the statement, the template, the region contract, the read-only files."""
    base = f"harness://tasks/{task.name}"
    found = {
        f"{base}/statement": TaskResource("statement", f"The task statement of {task.name}",
                                          "text/markdown", statement_text),
        f"{base}/template": TaskResource("template", f"{task.template}: the frozen training "
                                         "script, its editable regions at their defaults",
                                         "text/x-python", lambda t: t.template_text()),
        f"{base}/contract": TaskResource("contract", "task.toml: the regions, the interface "
                                         "they must define, the override bounds, the metrics",
                                         "application/toml", _file("task.toml")),
    }
    for name in task.frozen_files:
        if name != task.template:
            found[f"{base}/files/{name}"] = TaskResource(
                name, f"{name}: read-only code of the task", "text/x-python", _file(name))
    return found


# --- the server ------------------------------------------------------------------------------


@dataclass
class McpHarness:
    """The MCP face of the tools: what the SDK's handlers call."""

    place: Place
    task: TaskSpec  # the resources: the pinned session's task, else the server's --task

    @property
    def tools(self) -> tuple[Tool, ...]:
        return TOOLS if self.place.pinned else (*HOME_TOOLS, *TOOLS)

    def mcp_tool(self, t: Tool) -> types.Tool:
        return types.Tool(name=t.name, description=t.description,
                          input_schema=t.parameters(session_arg=self.place.pinned is None),
                          annotations=types.ToolAnnotations(read_only_hint=t.read_only,
                                                            open_world_hint=False))

    async def list_tools(self, ctx: Ctx, params: types.PaginatedRequestParams | None
                         ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[self.mcp_tool(t) for t in self.tools])

    async def call_tool(self, ctx: Ctx, params: types.CallToolRequestParams
                        ) -> types.CallToolResult:
        try:
            tool = find_tool(params.name, self.tools)
            args = check_arguments(tool, params.arguments,
                                   session_arg=self.place.pinned is None)
            if tool.name == "test":
                return await self.test(ctx, args)
            text = await anyio.to_thread.run_sync(self.run_tool, tool, args)
            return _result(text, error=False)
        except Exception as e:
            return error_result(e)

    def run_tool(self, tool: Tool, args: dict[str, Any]) -> str:
        """One tool, in a worker thread: the session is opened (and closed) here."""
        if not tool.on_session:
            return tool.run(ToolCall(self.place, args))
        with self.place.open(args.pop("session", None)) as s:
            return tool.run(ToolCall(self.place, args, s))

    def _home_of(self, ref: str | None) -> tuple[str, Path]:
        with self.place.open(ref) as s:  # refuses an unknown session before anything starts
            return s.id, s.ledger.home

    async def test(self, ctx: Ctx, args: dict[str, Any]) -> types.CallToolResult:
        sid, home = await anyio.to_thread.run_sync(self._home_of, args.get("session"))
        bg = background.start(sid, home=home, data_dir=self.place.data_dir,
                              runner_args=self.place.runner_args)
        row = await anyio.to_thread.run_sync(background.wait_started, bg)
        if row is None:  # refused before it had a row (no test left, one already running)
            return outcome_result(bg.outcome())
        if not args.get("wait", True):
            return _result(background.started_message(row), error=False, fault=None,
                           exit_code=0, test={"number": row.number, "attempt_id": row.id,
                                              "status": row.status, "background": True})
        await ctx.session.report_progress(0, None, f"test #{row.number}: checks, then training")
        last = 0
        while not bg.finished():
            now: Progress | None = await anyio.to_thread.run_sync(bg.progress)
            if now is not None and now.iter > last:  # progress must grow, says the spec
                last = now.iter
                await ctx.session.report_progress(now.iter, now.total,
                                                  f"test #{row.number}: {now.line()}")
            await anyio.sleep(PROGRESS_POLL_S)
        return outcome_result(await anyio.to_thread.run_sync(bg.outcome))

    async def list_resources(self, ctx: Ctx, params: types.PaginatedRequestParams | None
                             ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[
            types.Resource(uri=uri, name=r.name, description=r.description,
                           mime_type=r.mime_type)
            for uri, r in task_resources(self.task).items()])

    async def read_resource(self, ctx: Ctx, params: types.ReadResourceRequestParams
                            ) -> types.ReadResourceResult:
        found = task_resources(self.task).get(params.uri)
        if found is None:
            raise MCPError(code=INVALID_PARAMS, message=f"no resource {params.uri!r}; "
                           f"resources: {', '.join(task_resources(self.task))}")
        text = await anyio.to_thread.run_sync(found.read, self.task)
        return types.ReadResourceResult(contents=[types.TextResourceContents(
            uri=params.uri, mime_type=found.mime_type, text=text)])

    def server(self) -> Server[Any]:
        scope = f"session {self.place.pinned} only" if self.place.pinned else \
            "start a session with `start`, or attach to one"
        return Server(SERVER_NAME, version=__version__, title="BitLinear benchmark harness",
                      instructions=f"Tools of an agent session on the task {self.task.name} "
                      f"({scope}). Read the resource `statement` first; `view` the script, "
                      "`replace` its editable lines, `check` for free, `test` within the "
                      "budget, `submit` one succeeded test.",
                      on_list_tools=self.list_tools, on_call_tool=self.call_tool,
                      on_list_resources=self.list_resources,
                      on_read_resource=self.read_resource)


# --- transports ------------------------------------------------------------------------------


class _BearerToken:
    """The SDK's TokenVerifier for one shared secret, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if secrets.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="harness-mcp-client", scopes=[])
        return None


def parse_http(spec: str) -> tuple[str, int]:
    """`[HOST:]PORT` (IPv6 as `[::1]:PORT`); the host defaults to 127.0.0.1."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "", spec
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--http {spec!r}: expected [HOST:]PORT",
                        fix="e.g. --http 8765 (on 127.0.0.1) or --http 127.0.0.1:8765; port 0 "
                            "picks a free one")
    return host, int(port)


def read_token(path: Path | None) -> tuple[str, bool]:
    """The bearer token and whether it was made here (then it is printed once)."""
    if path is None:
        return secrets.token_urlsafe(32), True
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UserError(f"cannot read the token file: {e.strerror}", where=str(path)) from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UserError(f"the token must be one word of at least {MIN_TOKEN_CHARS} characters",
                        where=str(path), fix="python -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))' > FILE")
    return token, False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}",
                        fix="pick another port (0: any free one)") from None
    return sock


def serve_http(server: Server[Any], spec: str, token_file: Path | None, label: str) -> int:
    import uvicorn

    host, port = parse_http(spec)
    token, made = read_token(token_file)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    # No OAuth server: the issuer is only a required field of the SDK's settings, and with no
    # auth_server_provider no OAuth route is served; the verifier alone decides.
    app = server.streamable_http_app(
        host=host, token_verifier=_BearerToken(token),
        auth=AuthSettings(issuer_url=AnyHttpUrl(f"http://{shown}:{bound}"),
                          resource_server_url=None))
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"harness mcp: listening on {host}, beyond this machine: the bearer token is "
              "the only lock (use TLS in front of it on an untrusted network)", file=sys.stderr)
    print(f"harness mcp: streamable HTTP on http://{shown}:{bound}/mcp ({label})",
          file=sys.stderr)
    print(f"harness mcp: bearer token (printed once): {token}" if made else
          f"harness mcp: bearer token from {token_file}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    anyio.run(uvicorn.Server(config).serve, [sock])
    return 0


def serve_stdio(server: Server[Any]) -> int:
    async def run() -> None:
        # The SDK points fd 1 at stderr while it serves: a stray print cannot corrupt the wire.
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(run)
    return 0


def run_mcp(place: Place, *, http: str | None = None, token_file: Path | None = None,
            task: str | None = None) -> int:
    """`harness mcp`: check what the operator named, then serve until the client goes."""
    if place.pinned is not None:
        if task is not None:
            raise UserError("--task and --session both name the task",
                            fix="leave out --task: the session's task is served")
        if place.budget is not None or not place.preflight:
            raise UserError("--budget and --no-preflight set the sessions `start` creates, and "
                            "a server pinned to one session starts none",
                            fix="give them to `harness session start` instead")
        with place.open(None) as s:  # an unknown session is refused now, not at a call
            spec, label = s.task, f"session {s.id} only"
    else:
        spec, label = load_task(task or DEFAULT_TASK), f"any session of {place.home_dir}"
    server = McpHarness(place, spec).server()
    if http is None:
        if token_file is not None:
            raise UserError("--token-file is for --http", fix="stdio needs no token")
        return serve_stdio(server)
    return serve_http(server, http, token_file, label)
