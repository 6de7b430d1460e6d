"""`harness mcp`, driven by the official MCP SDK's own clients (stdio and streamable HTTP).

Every test starts the real server as a subprocess (`python -m harness mcp ...`) and talks to
it through `mcp.ClientSession`; nothing of the server is replaced. The two `slow` tests train
for real at smoke scale (one test each), one of them after a real pre-flight `check`.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from harness.errors import InfraError
from harness.mcp_server import HARNESS_FAULT, error_result
from harness.record import Status
from harness.task import load_task
from harness.tools import HOME_TOOLS, TOOLS, Server, tool_schemas
from tests.conftest import PYTHON, REPO
from tests.test_session import SES, cli, ranges

NAMES = [t.name for t in TOOLS]
BINARY = (REPO / "baselines" / "binary_sign" / "bitlinear.py").read_text()
INT2 = (REPO / "baselines" / "int2_uniform" / "bitlinear.py").read_text()
MAX_ITERS = int(load_task().scale("smoke").config["max_iters"])
Scenario = Callable[[ClientSession], Awaitable[Any]]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@asynccontextmanager
async def stdio_session(home: Path, *args: str, data: Path | None = None,
                        errlog: Path | None = None) -> AsyncIterator[ClientSession]:
    """A ClientSession on `harness mcp` (stdio), started by the SDK's own stdio client."""
    extra = ["--data-dir", str(data)] if data else []
    params = StdioServerParameters(command=PYTHON, cwd=REPO, args=[
        "-m", "harness", "mcp", "--home", str(home), *extra, *args])
    with (errlog or home.parent / "mcp-server.err").open("w") as err:
        async with stdio_client(params, errlog=err) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield session


def text(result: types.CallToolResult) -> str:
    assert len(result.content) == 1 and isinstance(result.content[0], types.TextContent)
    return result.content[0].text


async def ok(s: ClientSession, tool: str, **arguments: Any) -> str:
    result = await s.call_tool(tool, arguments)
    assert not result.is_error, text(result)
    return text(result)


async def refused(s: ClientSession, tool: str, **arguments: Any) -> str:
    """The text of a call answered with a tool error the user caused (the CLI's exit 2)."""
    result = await s.call_tool(tool, arguments)
    assert result.is_error, text(result)
    assert result.structured_content == {"fault": "user", "exit_code": 2}, text(result)
    return text(result)


def cli_error(*args: str, home: Path) -> str:
    """The message the CLI prints for a refusal (exit 2), without its "error: " prefix."""
    out = cli(*args, home=home)
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stderr.removeprefix("error: ").rstrip("\n")


def audit_rows(sid: str, home: Path) -> dict[str, Any]:
    report = cli("audit", sid, "--json", home=home)
    assert report.returncode == 0, report.stdout + report.stderr
    history: dict[str, Any] = json.loads(report.stdout)
    return history


# --- one table ---------------------------------------------------------------------------------


def test_every_face_lists_the_tools_of_one_table(home: Path) -> None:
    """The MCP lists (pinned and not), the JSON schemas and serve all come from TOOLS: a tool
    one of them gained would be missing from another, and this would fail."""
    for fmt, key in (("openai", lambda t: t["function"]["name"]), ("anthropic",
                                                                    lambda t: t["name"])):
        assert [key(t) for t in tool_schemas(fmt)] == NAMES
    sid = cli("session", "start", "--agent", "tables", "--no-preflight", home=home).stdout.strip()

    async def listed(*args: str) -> list[types.Tool]:
        async with stdio_session(home, *args) as s:
            return (await s.list_tools()).tools

    pinned, unpinned = anyio.run(listed, "--session", sid), anyio.run(listed)
    assert [t.name for t in pinned] == NAMES
    assert [t.input_schema for t in pinned] == [t.parameters() for t in TOOLS]
    assert [t.name for t in unpinned] == [t.name for t in HOME_TOOLS] + NAMES
    assert [t.input_schema for t in unpinned] == \
        [t.parameters(session_arg=True) for t in (*HOME_TOOLS, *TOOLS)]
    assert all(t.input_schema["required"][0] == "session" for t in unpinned[2:] if
               t.name != "leaderboard")
    # serve finds every tool of the table (the arguments are checked after the tool is found)
    # and no other.
    server = Server(home=home, pinned=sid)
    for name in [*NAMES, "rm"]:
        reply = server.handle(json.dumps({"id": 1, "tool": name, "arguments": {"bogus": 1}}))
        expected = "unknown tool 'rm'" if name == "rm" else "unknown argument 'bogus'"
        assert not reply["ok"] and expected in reply["error"], reply


def test_serve_starts_a_background_test_through_the_same_worker(home: Path) -> None:
    """`serve`'s `test` with wait=false uses MCP's worker; its refusal comes back as the CLI's."""
    sid = cli("session", "start", "--agent", "serve-bg", "--budget", "0", home=home).stdout.strip()
    reply = Server(home=home, pinned=sid).handle(json.dumps(
        {"id": 1, "tool": "test", "arguments": {"wait": False}}))
    assert not reply["ok"] and reply["error"] == cli_error("session", "test", sid, home=home)
    (log,) = (home / "sessions" / sid / "background").glob("*.log")
    (outcome,) = (home / "sessions" / sid / "background").glob("*.json")
    assert json.loads(outcome.read_text())["error_kind"] == "user", log.read_text()


# --- errors --------------------------------------------------------------------------------------


def test_bad_calls_get_clear_errors_and_the_server_keeps_serving(home: Path) -> None:
    async def scenario(s: ClientSession) -> str:
        assert "no ledger in" in await refused(s, "view", session="ses-nope")
        assert "unknown argument 'budget'" in await refused(s, "start", agent="a", budget=99)
        assert "missing argument 'agent'" in await refused(s, "start")
        sid = SES.search(await ok(s, "start", agent="bad-calls"))[0]  # type: ignore[index]
        assert "argument 'start' must be integer, not 'x'" in \
            await refused(s, "view", session=sid, start="x")
        assert "argument 'n' must be integer, not True" in \
            await refused(s, "undo", session=sid, n=True)
        assert "argument 'start' must be >= 1, not 0" in \
            await refused(s, "view", session=sid, start=0)
        assert "missing argument 'session'" in await refused(s, "status")
        assert "missing argument 'n'" in await refused(s, "submit", session=sid)
        assert "unknown tool 'rm'" in await refused(s, "rm", session=sid)
        assert "no session 'ses-nope'" in await refused(s, "view", session="ses-nope")
        assert "has no test #1" in await refused(s, "logs", session=sid, n=1)
        # The same words as the command line, exactly.
        assert await refused(s, "view", session=sid, start=9999) == \
            cli_error("session", "view", sid, "--start", "9999", home=home)
        assert await refused(s, "replace", session=sid, start_line=1, end_line=1,
                             content="x\n") == \
            cli_error("session", "edit", sid, "--start", "1", "--end", "1", "--content", "x\n",
                      home=home)
        # The test runs in a worker process: its refusal (budget 0) comes back the same.
        assert await refused(s, "test", session=sid) == \
            cli_error("session", "test", sid, home=home)
        with pytest.raises(MCPError, match="no resource 'harness://nope'"):
            await s.read_resource("harness://nope")
        assert "Tests: 0 of 0 used" in await ok(s, "status", session=sid)  # still serving
        return sid

    async def run() -> str:
        async with stdio_session(home, "--budget", "0", "--no-preflight") as s:
            return await scenario(s)

    sid = anyio.run(run)
    assert audit_rows(sid, home)["attempts"] == []  # nothing was recorded, nothing charged


def test_whose_fault_an_error_is_is_said() -> None:
    ours = error_result(InfraError("the image is missing"))
    assert ours.is_error and text(ours) == f"{HARNESS_FAULT} the image is missing"
    assert ours.structured_content == {"fault": "harness", "exit_code": 3}
    bug = error_result(KeyError("x"))
    assert text(bug) == "internal error (a bug of the harness): KeyError: 'x'"
    assert bug.structured_content == {"fault": "bug", "exit_code": 1}


# --- whole sessions at smoke scale -------------------------------------------------------------


@pytest.mark.slow
def test_a_whole_session_over_stdio_at_smoke_scale(home: Path, smoke_data: Path) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def scenario(s: ClientSession) -> str:
        resources = {r.name: r.uri for r in (await s.list_resources()).resources}
        assert {"statement", "template", "contract", "model.py"} <= set(resources)
        statement = (await s.read_resource(resources["statement"])).contents[0]
        assert isinstance(statement, types.TextResourceContents)
        assert "region `bitlinear` of `custom_pretrain.py`, lines 38–115" in statement.text
        sid = SES.search(await ok(s, "start", agent="mcp-stdio"))[0]  # type: ignore[index]
        (first, last), _ = ranges(await ok(s, "view", session=sid, start=1, end=1))
        assert "OK: Replaced lines" in await ok(s, "replace", session=sid, start_line=first,
                                                end_line=last, content=BINARY)
        checked = await ok(s, "check", session=sid)  # the real pre-flight, free
        assert "pre-flight passed" in checked and "no test was used" in checked
        tested = await s.call_tool("test", {"session": sid}, progress_callback=on_progress)
        report = text(tested)
        assert not tested.is_error, report
        assert tested.structured_content is not None
        assert tested.structured_content["test"]["status"] == Status.SUCCEEDED.value
        assert report.startswith("[Test #1] (2 tests remaining;")
        assert re.search(r"^Final metrics \(smoke\): val_loss_smoke=\d+\.\d{4}$", report, re.M)
        assert "Test #1" in await ok(s, "logs", session=sid, n=1, lines=3)
        assert "Submitted test #1" in await ok(s, "submit", session=sid, n=1)
        assert "| mcp-stdio" in await ok(s, "leaderboard")
        return sid

    async def run() -> str:
        async with stdio_session(home, "--no-preflight", data=smoke_data) as s:
            return await scenario(s)

    sid = anyio.run(run)
    # Progress came while training ran: iterations out of the scale's, growing, with losses.
    training = [(done, message) for done, total, message in progress if total == MAX_ITERS]
    assert training and training[-1][0] == MAX_ITERS, progress
    assert [d for d, _ in training] == sorted({d for d, _ in training})
    assert all(m and "val" in m for _, m in training[1:])
    history = audit_rows(sid, home)
    assert [(a["number"], a["status"], a["charged"], a["refunded"])
            for a in history["attempts"]] == [(1, Status.SUCCEEDED.value, True, False)]
    assert history["used"] == 1 and history["submitted"] == 1 and not history["tampered"]


def leaves(error: BaseException) -> list[BaseException]:
    """The errors inside the SDK's task groups' exception groups."""
    inner = getattr(error, "exceptions", None)
    return [leaf for e in inner for leaf in leaves(e)] if isinstance(inner, tuple) else [error]


async def failure(call: Awaitable[Any]) -> list[BaseException]:
    try:
        await call
    except Exception as e:
        return leaves(e)
    raise AssertionError("the call succeeded")


class HttpServer:
    """`harness mcp --http 127.0.0.1:0` in a subprocess; its URL and token from its stderr."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([PYTHON, "-m", "harness", "mcp", "--http", "127.0.0.1:0",
                                      *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 60
        while not (self.url and self.token):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.lines
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def _find(self, pattern: str) -> str | None:
        found = [m[1] for line in self.lines if (m := re.search(pattern, line))]
        return found[0] if found else None

    @property
    def url(self) -> str | None:
        return self._find(r"streamable HTTP on (http://\S+/mcp)")

    @property
    def token(self) -> str | None:
        return self._find(r"bearer token \(printed once\): (\S+)")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def http_session(url: str, headers: dict[str, str], scenario: Scenario) -> Any:
    async with httpx2.AsyncClient(headers=headers) as http, \
            streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write) as s:
        await s.initialize()
        return await scenario(s)


@pytest.mark.slow
def test_http_needs_the_bearer_token_and_serves_one_session(home: Path,
                                                            smoke_data: Path) -> None:
    sid = cli("session", "start", "--agent", "mcp-http", "--no-preflight", home=home).stdout.strip()
    other = cli("session", "start", "--agent", "other", home=home).stdout.strip()
    server = HttpServer("--session", sid, "--home", str(home), "--data-dir", str(smoke_data))
    try:
        assert server.url and server.url.startswith("http://127.0.0.1:") and server.token
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}}
        accept = {"Accept": "application/json, text/event-stream"}
        for auth in ({}, {"Authorization": "Bearer wrong-token-0123456789abcdef"},
                     {"Authorization": server.token}):  # the right token, without "Bearer "
            got = httpx2.post(server.url, json=hello, headers={**accept, **auth})
            assert got.status_code == 401, got.text
        # Even with the token, a page of another site cannot reach it (DNS rebinding).
        bearer = {"Authorization": f"Bearer {server.token}"}
        for other_site, status in (({"Host": "evil.example"}, 421),
                                   ({"Origin": "http://evil.example"}, 403)):
            got = httpx2.post(server.url, json=hello, headers={**accept, **bearer, **other_site})
            assert got.status_code == status, got.text
        failed = anyio.run(failure, http_session(server.url, {}, lambda s: s.list_tools()))
        assert any(isinstance(e, MCPError) for e in failed), failed

        async def scenario(s: ClientSession) -> None:
            tools = (await s.list_tools()).tools
            assert [t.name for t in tools] == NAMES  # pinned: no start, no attach
            assert "unknown argument 'session'" in await refused(s, "status", session=other)
            (first, last), _ = ranges(await ok(s, "view", start=1, end=1))
            await ok(s, "replace", start_line=first, end_line=last, content=INT2)
            assert "Pre-flight: not run" in await ok(s, "check", static_only=True)
            started = await s.call_tool("test", {"wait": False})
            assert not started.is_error and "started in the background" in text(started)
            deadline = time.monotonic() + 400
            while "#1 succeeded" not in (status := await ok(s, "status")):
                assert time.monotonic() < deadline and "#1 failed" not in status, status
                await anyio.sleep(2)
            assert "Submitted test #1" in await ok(s, "submit", n=1)

        anyio.run(http_session, server.url, bearer, scenario)
    finally:
        server.stop()
    history = audit_rows(sid, home)
    assert [(a["number"], a["status"], a["charged"]) for a in history["attempts"]] == \
        [(1, Status.SUCCEEDED.value, True)]
    assert history["submitted"] == 1 and not history["tampered"]
    assert audit_rows(other, home)["attempts"] == []  # the pinned server never touched it
