"""Agent sessions: the Python API, the CLI and the JSON tools over one ledger.

Fast tests use FakeRunner (tests/session_fakes.py), which writes what the frozen template
would; the two `slow` tests train for real at smoke scale.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.audit import audit, follow_logs
from harness.errors import UserError
from harness.ledger import Ledger, NoTestsLeft
from harness.regions import EditSession
from harness.runners.base import StageRun, StageSpec
from harness.runtime.procs import kill_processes_in, processes_in
from harness.session import LAST_TEST_NOTE, Session
from harness.tools import TOOLS, Server, tool_schemas
from tests.conftest import PYTHON, REPO, TEMPLATE, wait_for
from tests.session_fakes import STDOUT_DECOY, FakeRunner

DATA = Path(__file__).parent / "data"
GOOD = (DATA / "seed001_per_tensor.py").read_text()
IMPORT_OS = "import os\n"
# Raises once training is a few steps in: about 36 BitLinear calls for the first evaluation,
# then 9 per step at smoke scale (2 layers x 4 + lm_head).
CRASH_EARLY = '''
class _Counter:
    calls = 0


def weight_quant(weight):
    scale = weight.abs().mean().clamp(min=1e-5)
    w = weight / scale
    return w + (w.round().clamp(-1, 1) - w).detach(), scale


def activation_quant(x):
    return x, torch.ones((), device=x.device)


class BitLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        _Counter.calls += 1
        if _Counter.calls > 80:
            raise RuntimeError("submission bug: exploded at step 5")
        w_q, s = weight_quant(self.weight)
        return F.linear(x, w_q * s, self.bias)
'''
SES = re.compile(r"ses-(\d{8}-\d{6}-)?[0-9a-f]{6}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def session(home: Path, smoke_data: Path) -> Iterator[Session]:
    # Pre-flight is off here (it trains for real, about 30 s): its own tests switch it on.
    with Session.create(agent="unit", home=home, runner=FakeRunner(), data_dir=smoke_data,
                        preflight=False) as s:
        yield s


def ranges(view: str) -> list[tuple[int, int]]:
    """The editable ranges from a view header: [(first, last), ...]."""
    head = view.splitlines()[0]
    found = re.search(r"editable: ([^|]+) \|", head)
    assert found, head
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)–(\d+)", found[1])]


def cli(*args: str, home: Path, data: Path | None = None, stdin: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    extra = ["--home", str(home)] + (["--data-dir", str(data)] if data else [])
    return subprocess.run([PYTHON, "-m", "harness", *args, *extra], capture_output=True,
                          text=True, cwd=REPO, input=stdin, timeout=timeout)


# --- the Python API with a fake runner ------------------------------------------------------


def test_budget_free_charged_refunded_and_last_test(session: Session) -> None:
    s = session
    (bl, _), _cfg = ranges(s.view())
    s.replace(None, bl, bl, IMPORT_OS)
    free = s.run_test()
    assert free.free and not free.charged and free.status == "failed_submission"
    assert free.message.startswith("[Test #1] (3 tests remaining; call submit(n=N) to choose "
                                   "which test result to submit as final)")
    assert "[NOT CHARGED]" in free.message and f"io {bl}:1 imports os" in free.message
    assert "Undo complete: restored 1 edit(s)" in s.undo()

    s.runner = FakeRunner("raise")
    raised = s.test()
    assert raised.startswith("[Test #2] (2 tests remaining;")
    assert "[FAILED] training raised: RuntimeError: boom at step 5" in raised
    s.runner = FakeRunner("infra")
    infra = s.test()
    assert infra.startswith("[Test #3] (2 tests remaining;")
    assert "[REFUNDED] This test failed on our side (no such image)" in infra
    s.runner = FakeRunner(val_loss=3.75)
    assert s.test().startswith("[Test #4] (1 test remaining;")
    s.runner = FakeRunner(val_loss=3.5)
    last = s.test().splitlines()
    assert last[:3] == ["[Test #5] (0 tests remaining; call submit(n=N) to choose which test "
                        "result to submit as final)", LAST_TEST_NOTE,
                        "Tests you can submit: n=4, n=5."]
    finals = [line for line in last if line.startswith("Final metrics")]
    # One section per stage, as the transcript shows: pretrain first, then lm-eval.
    assert finals[0] == "Final metrics (smoke): val_loss_smoke=3.5000"
    assert finals[1].startswith("Final metrics (smoke): wikitext2_ppl_smoke=50.0000, ")

    with pytest.raises(NoTestsLeft) as refused:
        s.test()
    assert refused.value.what == "No tests remaining (3 of 3 used); call submit(n=N)"
    assert refused.value.fix == "N is the number of a succeeded test: 4, 5"
    with pytest.raises(UserError, match="test #2 cannot be submitted: it ended failed_submission"):
        s.submit(2)
    assert s.submit(5).startswith("Submitted test #5 as your final answer (val_loss_smoke=3.5")

    rows = s.ledger.attempts(s.id)
    assert [(a.number, a.status, a.charged, a.refunded) for a in rows] == [
        (1, "failed_submission", False, False), (2, "failed_submission", True, False),
        (3, "failed_infra", True, True), (4, "succeeded", True, False),
        (5, "succeeded", True, False)]
    report = audit(s.ledger, s.id)
    assert not report.tampered and report.submitted and report.submitted.number == 5


def test_train_metrics_are_rebuilt_from_metrics_jsonl_not_stdout(session: Session) -> None:
    message = session.test()
    assert STDOUT_DECOY not in message
    assert message.splitlines()[1:7] == [
        "### pretrain (smoke)", "Training metrics (last steps):",
        "TRAIN_METRICS: step=0, train_loss=nan, val_loss=5.5000",
        "TRAIN_METRICS: step=10, train_loss=4.9000, val_loss=5.4000",
        "TRAIN_METRICS: step=20, train_loss=4.8000, val_loss=5.3000",
        "TRAIN_METRICS: step=30, train_loss=4.7000, val_loss=5.2000"]


def test_the_edit_history_lives_in_the_ledger(session: Session, home: Path) -> None:
    s = session
    (bl, _), (cfg, _) = ranges(s.view())
    s.replace(None, bl, bl + 2, "# one\n# two\n")
    # Three lines became two: the second region moved up by one.
    out = s.replace("nanoGPT/custom_pretrain.py", cfg - 1, cfg - 1,
                    "CONFIG_OVERRIDES = {'learning_rate': 0.001}\n")
    assert out.startswith(f"OK: Replaced lines {cfg - 1}..{cfg - 1} with 1 line(s)")
    with Session.open(s.id, home=home) as again:
        assert again.view() == s.view()
        again.undo(1)
        with pytest.raises(UserError, match="another process edited this session"):
            s.replace(None, bl, bl, "# stale\n")
        # The refused object reloaded the record: both agree again.
        assert s.view() == again.view()
        again.undo(1)
    with Session.open(s.id, home=home) as third:
        assert third.view() == EditSession(TEMPLATE.read_text()).view()
        with pytest.raises(UserError, match="cannot undo 1 edit"):
            third.undo()


def test_files_an_agent_may_name(session: Session) -> None:
    assert session.view("model.py", 1, 2).startswith("[Read-only file: model.py | total: ")
    with pytest.raises(UserError, match=r"model\.py is read-only"):
        session.replace("model.py", 1, 1, "x\n")
    with pytest.raises(UserError, match=r"no file 'secrets\.txt'"):
        session.view("secrets.txt")
    assert session.ledger.edits(session.id) == []


def test_an_interrupted_test_is_cancelled_and_refunded(session: Session) -> None:
    class Interrupted(FakeRunner):
        def run(self, spec: StageSpec) -> StageRun:
            raise KeyboardInterrupt

    session.runner = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        session.test()
    (a,) = session.ledger.attempts(session.id)
    assert (a.status, a.charged, a.refunded) == ("cancelled", True, True)
    assert a.attempt_dir
    assert json.loads((Path(a.attempt_dir) / "result.json").read_text())["status"] == "cancelled"
    assert not audit(session.ledger, session.id).tampered


def test_a_charge_refused_at_stage_start_runs_nothing(session: Session,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.session as mod

    real = mod.prepare  # type: ignore[attr-defined]

    def prepare_then_spend(*args: Any, **kw: Any) -> Any:
        out = real(*args, **kw)
        # Another writer spends the budget between the checks and the stage start.
        with sqlite3.connect(session.ledger.path) as other:
            other.execute("UPDATE sessions SET budget = 0")
        return out

    monkeypatch.setattr(mod, "prepare", prepare_then_spend)
    with pytest.raises(NoTestsLeft):
        session.test()
    (a,) = session.ledger.attempts(session.id)
    assert (a.status, a.charged) == ("cancelled", False)
    assert a.attempt_dir and not (Path(a.attempt_dir) / "pretrain" / "stdout.log").exists()
    assert session.ledger.integrity_check() == []


def test_tampering_is_detected(session: Session, home: Path) -> None:
    session.test()
    (a,) = session.ledger.attempts(session.id)
    assert a.attempt_dir
    root = Path(a.attempt_dir)
    assert cli("audit", session.id, home=home).returncode == 0
    with (root / "pretrain" / "metrics.jsonl").open("ab") as f:
        f.write(b"x")
    (root / "submission.diff").unlink()
    proc = cli("audit", f"{session.id}:1", home=home)
    assert proc.returncode == 2
    assert re.search(r"TAMPERED test #1 .*: pretrain/metrics.jsonl changed "
                     r"\(recorded [0-9a-f]{12}, now [0-9a-f]{12}\)", proc.stdout)
    assert "submission.diff vanished" in proc.stdout
    (root / "result.json").write_text("{}")
    assert any("result.json changed" in p for p in audit(session.ledger, a.id).entries[0].problems)


def test_logs_print_and_follow_a_finished_test(session: Session, home: Path) -> None:
    session.test()
    proc = cli("logs", f"{session.id}:1", home=home)
    assert proc.returncode == 0 and "fake stage pretrain" in proc.stdout
    assert "pretrain/stderr.log <==" in proc.stdout
    evals = cli("logs", f"{session.id}:1", "--stage", "lm-eval", home=home)
    assert evals.returncode == 0 and "fake stage lm-eval" in evals.stdout
    # A test whose training failed never reached the lm-eval stage.
    session.runner = FakeRunner(outcome="raise")
    session.test()
    missing = cli("logs", f"{session.id}:2", "--stage", "lm-eval", home=home)
    assert missing.returncode == 2 and "ran no lm-eval stage" in missing.stderr

    class Out:
        text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    out = Out()
    follow_logs(session.ledger, session.ledger.attempts(session.id)[0], "pretrain",
                out, poll_s=0.01)  # type: ignore[arg-type]
    assert "fake stage pretrain" in out.text


SLEEPER = """
import sys
from pathlib import Path
from harness.cli import _interrupt_on_sigterm
from harness.session import Session
from tests.session_fakes import FakeRunner

_interrupt_on_sigterm()
with Session.open(sys.argv[1], home=sys.argv[2], data_dir=Path(sys.argv[3]),
                  runner=FakeRunner(sleep_s=60)) as s:
    try:
        s.test()
    except KeyboardInterrupt:
        sys.exit(130)
"""


def test_sigterm_settles_a_running_test_as_cancelled(session: Session, home: Path,
                                                     smoke_data: Path) -> None:
    proc = subprocess.Popen([PYTHON, "-c", SLEEPER, session.id, str(home), str(smoke_data)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [a for a in session.ledger.attempts(session.id) if a.charged],
                 timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130, proc.communicate()[1]
    finally:
        proc.kill()
    (a,) = session.ledger.attempts(session.id)
    assert (a.status, a.charged, a.refunded) == ("cancelled", True, True)
    assert a.refund_reason == "cancelled: KeyboardInterrupt"

WRONG_SHAPE = """
def weight_quant(weight):
    return weight, torch.ones(())


def activation_quant(x):
    return x, torch.ones(())


class BitLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x):
        return x
"""


def test_a_preflight_refusal_is_free(session: Session) -> None:
    session.ledger.conn.execute("UPDATE sessions SET preflight = 1")
    with Session.open(session.id, home=session.ledger.home, runner=FakeRunner(),
                      data_dir=session.data_dir) as s:
        (bl, last), _ = ranges(s.view())
        s.replace(None, bl, last, WRONG_SHAPE)
        report = s.run_test()  # the real pre-flight: its worker stops at the interface check
    assert report.free and report.status == "failed_submission" and not report.charged
    assert "pre-flight failed: interface" in report.message
    assert "FAIL  interface" in report.message and "was not charged" in report.message
    (a,) = session.ledger.attempts(session.id)
    assert json.loads(a.check_report or "")["error"] == "pre-flight failed: interface"


def test_a_passed_preflight_is_recorded_with_the_attempt(session: Session,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.session as mod

    class Passed:
        def to_dict(self) -> dict[str, Any]:
            return {"ok": True, "checks": ["stub"]}

        summary = to_dict

    monkeypatch.setattr(mod, "preflight_or_refuse",
                        lambda prepared, task, runner, **where: Passed())
    session.ledger.conn.execute("UPDATE sessions SET preflight = 1")
    with Session.open(session.id, home=session.ledger.home, runner=FakeRunner(),
                      data_dir=session.data_dir) as s:
        assert s.run_test().status == "succeeded"
    (a,) = session.ledger.attempts(session.id)
    assert json.loads(a.check_report or "")["preflight"] == {"ok": True, "checks": ["stub"]}
    assert a.attempt_dir
    checks = Path(a.attempt_dir) / "checks.json"
    assert json.loads(checks.read_text())["checks"] == ["stub"]
    assert "checks.json" in json.loads((Path(a.attempt_dir) / "result.json").read_text())[
        "artifacts"]
    assert not audit(session.ledger, session.id).tampered


def test_preflight_that_cannot_run_is_ours_and_free(session: Session,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.session as mod
    from harness.errors import InfraError

    seen: list[tuple[str, str | None]] = []

    def broken(prepared: Any, task: Any, runner: Any, **where: Any) -> Any:
        # What `harness recover` would find if the harness died now: the row checking, its
        # runner known (to stop the pre-flight's container or job), its record written.
        (row,) = session.ledger.attempts(session.id)
        seen.append((row.status, row.runner))
        assert json.loads((where["attempt"].root / "result.json").read_text())["status"] \
            == "checking"
        raise InfraError("pre-flight could not run (compile)")

    monkeypatch.setattr(mod, "preflight_or_refuse", broken)
    session.ledger.conn.execute("UPDATE sessions SET preflight = 1")
    with Session.open(session.id, home=session.ledger.home, data_dir=session.data_dir) as s, \
            pytest.raises(InfraError):
        s.test()
    assert seen == [("checking", "local")]
    (a,) = session.ledger.attempts(session.id)
    assert (a.status, a.charged) == ("failed_infra", False)
    # Its record was written before the pre-flight ran, and closed as ours.
    assert a.attempt_dir
    record = json.loads((Path(a.attempt_dir) / "result.json").read_text())
    assert (record["status"], record["runner"]) == ("failed_infra", "local")
    assert "pre-flight could not run" in record["reason"]
    assert not audit(session.ledger, session.id).tampered

# --- the CLI -----------------------------------------------------------------------------


def test_cli_refusals_are_one_clean_line(home: Path) -> None:
    bad_scale = cli("session", "start", "--agent", "a", "--scale", "huge", home=home)
    assert bad_scale.returncode == 2 and "unknown scale 'huge'" in bad_scale.stderr
    assert "Traceback" not in bad_scale.stderr
    nowhere = cli("audit", "ses-nope", home=home)
    assert nowhere.returncode == 2 and f"no ledger in {home}" in nowhere.stderr
    assert not home.exists()  # a mistyped --home is not created by a reading command
    sid = cli("session", "start", "--agent", "a", home=home).stdout.strip()
    unknown = cli("session", "status", "ses-nope", home=home)
    assert unknown.returncode == 2 and "no session 'ses-nope'" in unknown.stderr
    edit = cli("session", "edit", sid, "--start", "1", "--end", "1", "--content", "x", home=home)
    assert edit.returncode == 2 and "lines 1..1 are not inside one editable region" in edit.stderr
    assert cli("session", "submit", sid, "1", home=home).returncode == 2


# --- the JSON tools --------------------------------------------------------------------------


def test_tool_schemas_in_both_formats() -> None:
    names = ["view", "replace", "undo", "check", "test", "status", "logs", "submit", "leaderboard"]
    openai, anthropic = tool_schemas("openai"), tool_schemas("anthropic")
    assert [t["function"]["name"] for t in openai] == names
    assert [t["name"] for t in anthropic] == names
    replace = next(t for t in anthropic if t["name"] == "replace")["input_schema"]
    assert replace["required"] == ["start_line", "end_line", "content"]
    assert replace["additionalProperties"] is False
    assert all(t.description for t in TOOLS)
    proc = subprocess.run([PYTHON, "-m", "harness", "session", "tools", "--format", "openai"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert json.loads(proc.stdout) == openai


@pytest.mark.parametrize("line,error", [
    ("not json", "invalid JSON"),
    ("[1, 2]", "a request must be a JSON object, not list"),
    ('{"id": 1, "tool": "view"}', "missing 'session'"),
    ('{"id": 1, "session": 7, "tool": "view"}', "'session' must be a session id"),
    ('{"id": 1, "session": {"agent": "a", "colour": "red"}, "tool": "view"}',
     "unknown argument 'colour'"),
    ('{"id": 1, "session": {"agent": "a", "budget": 99}, "tool": "view"}',
     "unknown argument 'budget'"),
    ('{"id": 1, "session": {"agent": "a"}, "tool": "rm"}', "unknown tool 'rm'"),
    ('{"id": 1, "session": {"agent": "a"}, "tool": "view", "arguments": [1]}',
     "arguments must be an object"),
    ('{"id": 1, "session": {"agent": "a"}, "tool": "undo", "arguments": {"n": true}}',
     "argument 'n' must be integer"),
    ('{"id": 1, "session": {"agent": "a"}, "tool": "submit", "arguments": {"n": 0}}',
     "argument 'n' must be >= 1"),
    ('{"id": 1, "session": {"agent": "a"}, "tool": "view", "extra": 1}',
     "unknown request key(s) extra"),
])
def test_serve_answers_bad_input_with_an_error(home: Path, line: str, error: str) -> None:
    reply = Server(home=home).handle(line)
    assert reply["ok"] is False and error in reply["error"], reply


def test_serve_survives_garbage_on_stdin(home: Path) -> None:
    proc = subprocess.run([PYTHON, "-m", "harness", "session", "serve", "--stdio", "--home",
                           str(home)], input=b'\xff\xfe{"id":\n\n{"id": 2, "session": '
                          b'{"agent": "a"}, "tool": "status"}\n', capture_output=True,
                          cwd=REPO, timeout=60)
    replies = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert proc.returncode == 0 and [r["ok"] for r in replies] == [False, True]
    assert replies[1]["id"] == 2 and "Tests: 0 of 3 used" in replies[1]["output"]


def test_a_pinned_server_serves_one_session_and_starts_none(session: Session) -> None:
    server = Server(home=session.ledger.home, pinned=session.id)
    ok = server.handle('{"id": 1, "tool": "status"}')
    assert ok["ok"] and ok["session"] == session.id
    for other in ('"ses-other"', '{"agent": "me"}'):
        reply = server.handle(f'{{"id": 2, "session": {other}, "tool": "status"}}')
        assert not reply["ok"] and f"serves only session {session.id}" in reply["error"]

def _ops() -> list[tuple[str, dict[str, Any]]]:
    (bl, _), (cfg, _) = EditSession(TEMPLATE.read_text()).editable_ranges()
    return [
        ("view", {"start": bl - 2, "end": bl + 2}),
        ("replace", {"start_line": bl, "end_line": bl, "content": IMPORT_OS}),
        ("replace", {"start_line": cfg, "end_line": cfg,
                     "content": "CONFIG_OVERRIDES = {'learning_rate': 0.001}\n"}),
        ("undo", {"n": 1}),
        ("test", {}),
        ("submit", {"n": 1}),
        ("replace", {"start_line": 1, "end_line": 1, "content": "x\n"}),
        ("status", {}),
    ]


def _python_api(s: Session, tool: str, a: dict[str, Any]) -> str:
    calls: dict[str, Callable[[], str]] = {
        "view": lambda: s.view(None, a["start"], a["end"]),
        "replace": lambda: s.replace(None, a["start_line"], a["end_line"], a["content"]),
        "undo": lambda: s.undo(a["n"]), "test": s.test, "submit": lambda: s.submit(a["n"]),
        "status": s.status}
    try:
        return "ok: " + calls[tool]()
    except UserError as e:
        return "error: " + str(e)


def ledger_rows(home: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row, less what differs between two runs (ids, times, pids, paths)."""
    queries = {
        "sessions": "SELECT task, task_version, scale, agent, mode, model, budget, "
                    "template_sha256, preflight FROM sessions",
        "edits": "SELECT seq, op, start_line, end_line, content, n FROM edits ORDER BY seq",
        "attempts": "SELECT number, status, charged, refunded, refund_reason, reason, "
                    "spliced_sha256, region_diff, check_report, runner, gpu_seconds, "
                    "started_at IS NULL, finished_at IS NULL, result_sha256 IS NULL "
                    "FROM attempts ORDER BY number",
        "results": "SELECT a.number, r.metric, r.value FROM results r JOIN attempts a "
                   "ON a.id = r.attempt_id",
        "submissions": "SELECT a.number FROM submissions s JOIN attempts a ON a.id = "
                       "s.attempt_id",
    }
    with sqlite3.connect(home / "ledger.sqlite3") as conn:
        return {k: conn.execute(q).fetchall() for k, q in queries.items()}


def test_serve_stdio_and_the_python_api_write_the_same_rows(tmp_path: Path) -> None:
    via_api, via_serve = tmp_path / "api", tmp_path / "serve"
    with Session.create(agent="eq", home=via_api) as s:
        api_out = [_python_api(s, tool, a) for tool, a in _ops()]

    server = subprocess.Popen([PYTHON, "-m", "harness", "session", "serve", "--stdio",
                               "--home", str(via_serve)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert server.stdin and server.stdout
    ref: Any = {"agent": "eq"}
    serve_out = []
    for i, (tool, a) in enumerate(_ops()):
        server.stdin.write(json.dumps({"id": i, "session": ref, "tool": tool,
                                       "arguments": a}) + "\n")
        server.stdin.flush()
        reply = json.loads(server.stdout.readline())
        assert reply["id"] == i
        ref = reply.get("session", ref)
        serve_out.append(("ok: " + reply["output"]) if reply["ok"] else "error: " +
                         reply["error"])
    server.stdin.close()
    assert server.wait(timeout=30) == 0

    def norm(text: str, home: Path) -> str:
        return SES.sub("SES", text.replace(str(home), "HOME"))

    assert [norm(x, via_api) for x in api_out] == [norm(x, via_serve) for x in serve_out]
    assert ledger_rows(via_api) == ledger_rows(via_serve)
    assert [r[1] for r in ledger_rows(via_api)["attempts"]] == ["failed_submission"]


WORKER = """
import sys, time
from pathlib import Path
from harness.session import Session
from tests.session_fakes import FakeRunner

home, data, go, base = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
with Session.create(agent=f"worker{base}", home=home, data_dir=data, budget=4,
                    preflight=False) as s:
    print(s.id, flush=True)
    for k in range(4):
        import re
        first = int(re.findall(r"(\\d+)–(\\d+)", s.view().splitlines()[0])[1][0])
        s.replace(None, first, first, f"CONFIG_OVERRIDES = {{'learning_rate': {base + k}e-4}}\\n")
        s.runner = FakeRunner(val_loss=base + k / 10, sleep_s=0.2)
        report = s.run_test()
        assert report.status == "succeeded", report.message
    print(s.submit(4), flush=True)
"""


def test_two_sessions_testing_at_once_keep_their_records_apart(home: Path,
                                                               smoke_data: Path) -> None:
    go = home.parent / "go"
    workers = [subprocess.Popen([PYTHON, "-c", WORKER, str(home), str(smoke_data), str(go),
                                 str(base)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for base in (1.0, 2.0)]
    go.touch()
    outs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]
    with Ledger(home) as led:
        assert led.integrity_check() == []
        for base, (out, _) in zip((1.0, 2.0), outs, strict=True):
            sid = out.split()[0]
            attempts = led.attempts(sid)
            assert [(a.number, a.status, a.charged) for a in attempts] == [
                (n, "succeeded", True) for n in (1, 2, 3, 4)]
            assert [led.results(a.id)["val_loss"] for a in attempts] == [
                pytest.approx(base + k / 10) for k in range(4)]
            assert [e.seq for e in led.edits(sid)] == [0, 1, 2, 3]
            for k, a in enumerate(attempts):
                assert a.attempt_dir
                result = json.loads((Path(a.attempt_dir) / "result.json").read_text())
                assert f"/sessions/{sid}/tests/{k + 1}" in result["submission"]["source"]
                spliced = (Path(a.attempt_dir) / "custom_pretrain.py").read_text()
                assert f"'learning_rate': {base + k}e-4" in spliced
            assert not audit(led, sid).tampered
        rows = [led.attempts(s.id) for s in led.sessions()]
        assert len({a.attempt_dir for r in rows for a in r}) == 8
        # The two really ran at once: some test of one overlapped a test of the other.
        assert any(a.started_at and b.started_at and a.finished_at and b.finished_at
                   and a.started_at < b.finished_at and b.started_at < a.finished_at
                   for a in rows[0] for b in rows[1])


# --- real training at smoke scale -------------------------------------------------------------


def _charged_and_started(home: Path, sid: str) -> str | None:
    with Ledger(home) as led:
        rows = led.attempts(sid)
    if rows and rows[0].charged and rows[0].attempt_dir:
        log = Path(rows[0].attempt_dir) / "pretrain" / "stdout.log"
        return rows[0].attempt_dir if log.exists() else None
    return None


@pytest.mark.slow
@pytest.mark.parametrize("command", ["recover", "cancel"])
def test_a_killed_harness_is_recovered_as_a_refunded_infra_failure(home: Path, smoke_data: Path,
                                                                   command: str) -> None:
    # `harness cancel` of a test whose harness died: nothing would ever read the cancel
    # marker, so cancel settles it as recover does.
    sid = cli("session", "start", "--agent", "victim", "--no-preflight",
              home=home).stdout.strip()
    proc = subprocess.Popen([PYTHON, "-m", "harness", "session", "test", sid, "--home",
                             str(home), "--data-dir", str(smoke_data)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    attempt_dir: str | None = None
    try:
        attempt_dir = wait_for(lambda: _charged_and_started(home, sid), timeout=120)
        wait_for(lambda: processes_in(Path(attempt_dir)), timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # The stage runs in its own process group: it outlives the harness.
        assert processes_in(Path(attempt_dir))
        out = cli(*((command,) if command == "recover" else (command, f"{sid}:1")), home=home)
        assert out.returncode == 0, out.stderr
        assert re.search(r"settled: test #1 .*: failed_infra, refunded; killed \d+ orphaned",
                         out.stdout), out.stdout
        if command == "cancel":
            assert out.stdout.startswith("its harness had died, so nothing would see the "
                                         "request: settled: ")
        with Ledger(home) as led:
            (a,) = led.attempts(sid)
            assert (a.status, a.charged, a.refunded) == ("failed_infra", True, True)
            assert led.used(sid) == 0 and led.integrity_check() == []
        assert processes_in(Path(attempt_dir)) == []
        assert json.loads((Path(attempt_dir) / "result.json").read_text())["status"] == \
            "failed_infra"
        assert cli("audit", sid, home=home).returncode == 0
        assert "0 attempt(s) settled" in cli("recover", home=home).stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        if attempt_dir:
            kill_processes_in(Path(attempt_dir))


def _edit(sid: str, home: Path, content: str, region: int = 0) -> subprocess.CompletedProcess[str]:
    view = cli("session", "view", sid, "--start", "1", "--end", "1", home=home).stdout
    first, last = ranges(view)[region]
    return cli("session", "edit", sid, "--start", str(first), "--end", str(last),
               "--content-file", "-", home=home, stdin=content)


@pytest.mark.slow
def test_a_scripted_agent_session_at_smoke_scale(home: Path, smoke_data: Path) -> None:
    # Budget 2, so that two charged tests and one free one end with a refused fourth.
    # No pre-flight: it would catch the crash for free and cost ~30 s a test (its own tests
    # are below); the free test here is the static checks' refusal of `import os`.
    sid = cli("session", "start", "--agent", "scripted", "--model", "none", "--budget", "2",
              "--no-preflight", home=home).stdout.strip()
    assert _edit(sid, home, IMPORT_OS + GOOD).returncode == 0

    def test() -> subprocess.CompletedProcess[str]:
        return cli("session", "test", sid, home=home, data=smoke_data)

    free = test()
    assert free.returncode == 2 and "[Test #1] (2 tests remaining;" in free.stdout
    assert "[NOT CHARGED]" in free.stdout
    assert cli("session", "undo", sid, home=home).returncode == 0
    assert _edit(sid, home, CRASH_EARLY).returncode == 0
    crashed = test()
    assert crashed.returncode == 4, crashed.stdout + crashed.stderr
    assert "[Test #2] (1 test remaining;" in crashed.stdout
    assert "[FAILED] training raised: RuntimeError: submission bug: exploded at step 5" \
        in crashed.stdout
    assert _edit(sid, home, GOOD).returncode == 0
    good = test()
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    assert lines[:3] == ["[Test #3] (0 tests remaining; call submit(n=N) to choose which test "
                         "result to submit as final)", LAST_TEST_NOTE,
                         "Tests you can submit: n=3."]
    final = re.search(r"^Final metrics \(smoke\): val_loss_smoke=(\d+\.\d{4})$", good.stdout,
                      re.MULTILINE)
    assert final, good.stdout
    refused = test()
    assert refused.returncode == 2
    assert "No tests remaining (2 of 2 used); call submit(n=N)" in refused.stderr
    assert cli("session", "submit", sid, "2", home=home).returncode == 2
    assert cli("session", "submit", sid, "3", home=home).returncode == 0

    report = cli("audit", sid, "--json", home=home)
    assert report.returncode == 0, report.stdout
    history = json.loads(report.stdout)
    assert [(a["number"], a["status"], a["charged"], a["refunded"])
            for a in history["attempts"]] == [(1, "failed_submission", False, False),
                                              (2, "failed_submission", True, False),
                                              (3, "succeeded", True, False)]
    assert history["submitted"] == 3 and history["used"] == 2
    good_row = history["attempts"][2]
    assert f"{good_row['metrics']['val_loss']:.4f}" == final[1]
    assert any(c.startswith("io ") for c in history["attempts"][0]["checks"])
    assert "exploded at step 5" in history["attempts"][1]["reason"]
    text = cli("audit", sid, home=home).stdout
    assert f"val_loss={final[1]}" in text and "Integrity: OK" in text

    with (Path(good_row["attempt_dir"]) / "pretrain" / "metrics.jsonl").open("ab") as f:
        f.write(b"\n")
    tampered = cli("audit", sid, home=home)
    assert tampered.returncode == 2
    assert "TAMPERED test #3" in tampered.stdout
    assert "pretrain/metrics.jsonl changed" in tampered.stdout
