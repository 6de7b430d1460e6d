"""The adversarial suite: each attack of tests/security/attacks.py, the layer that stops it and
the exact verdict (docs/security.md has the threat model this follows).

* static attacks: refused before anything runs, free, with the rule and the line;
* pre-flight attacks: refused before an attempt exists, free, with the check;
* run-time attacks: they pass the static checks (and pre-flight where noted), run, and end
  `rule_violation` (charged, invalid, never ranked) by the layer named;
* defence in depth: region code as if a static escape had been found (spliced without the
  static checks), stopped by the run-time layers.

For every attack that runs, the test also observes the four things no attack may achieve: a
ranked leaderboard row, a changed frozen file, a file written outside its output folder, and a
network connection (a listener the attacks are pointed at).
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.attempt import Prepared, prepare, run_submission
from harness.checks.preflight import run_preflight
from harness.errors import CheckFailed, UserError
from harness.leaderboard import build_board
from harness.record import AttemptRecord
from harness.runners.local import LocalRunner
from harness.runtime.fileio import sha256_file
from harness.task import ScaleSpec, TaskSpec, load_task
from tests.security.attacks import (
    STATIC,
    PreflightAttack,
    StaticAttack,
    attack_line,
    delayed_float,
    dump_environment,
    forge_final_json,
    patch_at_import,
    patch_during_training,
    preflight_attacks,
    pretrain_only,
    rank_divergent,
    spliced,
    swap_frozen_function,
    unchecked,
    unhook_audit,
    write_region,
)

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "tasks" / "llm-pretrain-bitlinear"


@pytest.fixture(scope="module")
def task() -> TaskSpec:
    return load_task(TASK_DIR)


def test_the_suite_has_at_least_twenty_distinct_attacks(task: TaskSpec) -> None:
    ids = [a.id for a in STATIC] + [a.id for a in preflight_attacks(task)] + [
        f.__name__ for f in RUNTIME_REGIONS]
    assert len(ids) == len(set(ids)) >= 20
    assert len({a.category for a in STATIC}) >= 8


# --- static: refused for free, rule and line named ---------------------------------------------

@pytest.mark.parametrize("attack", STATIC, ids=[a.id for a in STATIC])
def test_static_policy_refuses(attack: StaticAttack, task: TaskSpec, tmp_path: Path) -> None:
    region = attack.region(task)
    path = write_region(tmp_path / f"{attack.id.replace('-', '_')}.py", region)
    with pytest.raises(CheckFailed) as e:
        prepare(path, task)
    assert e.value.exit_code == 2
    line = attack_line(spliced(task, region))
    assert (attack.rule, line) in {(f.rule, f.line) for f in e.value.findings}, \
        e.value.details
    assert f"{attack.rule} {line}:" in (e.value.details or "")


# --- pre-flight: refused before an attempt exists -------------------------------------------

def _preflight_ids() -> list[str]:
    return [a.id for a in preflight_attacks(load_task(TASK_DIR))]


@pytest.mark.security
@pytest.mark.parametrize("attack_id", _preflight_ids())
def test_preflight_refuses(attack_id: str, task: TaskSpec, tmp_path: Path) -> None:
    attack: PreflightAttack = next(a for a in preflight_attacks(task) if a.id == attack_id)
    prepared = prepare(write_region(tmp_path / "attack.py", attack.region), task)  # static: ok
    runs = tmp_path / "runs"
    with pytest.raises(UserError, match=f"pre-flight failed: .*{attack.check}") as e:
        run_submission(prepared, task, task.scale("smoke"), runs_dir=runs, data=tmp_path,
                    runner=LocalRunner(), preflight=True)
    assert e.value.exit_code == 2
    assert f"FAIL  {attack.check}" in (e.value.details or "")
    assert not runs.exists() or not any(runs.iterdir())  # no attempt: nothing to charge


# --- what every attack that runs is observed for ---------------------------------------------

class Listener:
    """A TCP listener on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


# What the harness itself writes in an attempt folder, outside the stage folders.
HARNESS_FILES = {"result.json", "custom_pretrain.py", "submission.diff", "submission.json",
                 "checks.json", "model.py", "eval_lm.py"}
STAGE_DIRS = {"pretrain", "lm-eval"}


@dataclasses.dataclass
class Observed:
    result: AttemptRecord
    root: Path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.attempt import dataset_dir
    from harness.stages import lmeval

    root = tmp_path_factory.mktemp("data")
    smoke = load_task(TASK_DIR).scale("smoke")
    dataset_dir(smoke, root)
    lmeval.evals_dir(smoke, root)
    return root


@pytest.fixture()
def observe(task: TaskSpec, data_root: Path, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Observed]]:
    listener = Listener()
    monkeypatch.setenv("ATTACK_HOSTS", listener.address)
    # Secrets in the harness's own environment: no stage may see them.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak")
    watched = {"task": TASK_DIR, "data": data_root}
    before = {k: _digests(v) for k, v in watched.items()}

    def run(prepared: Prepared, scale: ScaleSpec) -> Observed:
        runs = tmp_path / "runs"
        result, paths = run_submission(prepared, task, scale, runs_dir=runs, data=data_root,
                                    runner=LocalRunner())
        root = paths.root
        # 1. no ranked row
        board = build_board([runs])
        assert not [r for t in board.tables for r in t.rows if r.ranked]
        # 2. frozen files unchanged, here and in the attempt
        assert {k: _digests(v) for k, v in watched.items()} == before
        for name in task.frozen_files:
            if name != task.template:
                assert (root / name).read_bytes() == (TASK_DIR / name).read_bytes()
        assert (root / "custom_pretrain.py").read_text() == prepared.spliced
        # 3. nothing written outside the output folders
        top = {p.name for p in root.iterdir()}
        assert top - STAGE_DIRS <= HARNESS_FILES, top
        # 4. no network connection
        assert listener.accepted == 0
        return Observed(result, root)

    yield run
    listener.close()


def _checked(task: TaskSpec, region: str, tmp_path: Path) -> Prepared:
    """Through the static checks, as any submission."""
    return prepare(write_region(tmp_path / "attack.py", region), task)


# --- run time: past the static checks --------------------------------------------------------

@pytest.mark.security
def test_float_weights_after_preflight_are_caught_by_the_in_run_audit(
        task: TaskSpec, tmp_path: Path, observe: Callable[..., Observed]) -> None:
    prepared = _checked(task, delayed_float(task), tmp_path)
    # Pre-flight alone cannot see it: its short DDP run ends before the switch.
    assert run_preflight(task, prepared.spliced, runner=LocalRunner(),
                         work_dir=tmp_path / "work").ok
    seen = observe(prepared, pretrain_only(task))
    assert seen.result.status == "rule_violation"
    assert seen.result.reason.startswith("rule violation (low-bit, rank ")
    assert "low-bit audit at step 20: " in seen.result.reason
    assert "distinct values" in seen.result.reason
    assert seen.result.metrics == {}


@pytest.mark.security
def test_ranks_that_diverge_are_caught_at_the_end(task: TaskSpec, tmp_path: Path,
                                                  observe: Callable[..., Observed]) -> None:
    seen = observe(_checked(task, rank_divergent(task), tmp_path), pretrain_only(task))
    assert seen.result.status == "rule_violation"
    assert seen.result.reason.startswith("rule violation (ranks): ranks ended with different "
                                         "parameters")


# --- defence in depth: a static escape assumed ------------------------------------------------

@pytest.mark.security
@pytest.mark.parametrize("make,reason", [
    (patch_at_import, "rule violation (integrity, rank 0): integrity check after importing the "
                      "submission: torch.nn.functional.cross_entropy was replaced"),
    (patch_during_training, "rule violation (integrity, rank 0): integrity check before the "
                            "evaluation at step 10: torch.nn.functional.cross_entropy was "
                            "replaced"),
    (swap_frozen_function, "rule violation (integrity, rank 0): integrity check before the "
                           "evaluation at step 10: frozen evaluate does not run the "
                           "template's code"),
    (unhook_audit, "rule violation (audit-skipped, rank 0): the template's RUN_AUDIT hook was "
                   "replaced during the run"),
], ids=lambda v: v.__name__ if callable(v) else "")
def test_tampering_with_frozen_or_torch_code_is_a_rule_violation(
        make: Callable[[TaskSpec], str], reason: str, task: TaskSpec,
        observe: Callable[..., Observed]) -> None:
    seen = observe(unchecked(task, make(task), make.__name__), pretrain_only(task))
    assert seen.result.status == "rule_violation"
    # Every rank runs the same check; which one reports first (and so is named) is up to the
    # scheduler, and torchrun stops the others. The rule and the message are what must hold.
    assert re.sub(r"rank \d+\)", "rank 0)", seen.result.reason, count=1) == reason


@pytest.mark.security
def test_a_forged_training_score_fails_the_cross_check(task: TaskSpec,
                                                       observe: Callable[..., Observed]) -> None:
    seen = observe(unchecked(task, forge_final_json(task), "forge"), task.scale("smoke"))
    assert seen.result.status == "rule_violation"
    assert seen.result.reason.startswith("rule violation (cross-check): val_loss from pretrain "
                                         "(0.5) disagrees with lm-eval's recomputation")
    assert seen.result.metrics == {}


@pytest.mark.security
def test_secrets_never_reach_a_stage(task: TaskSpec, observe: Callable[..., Observed]) -> None:
    import json

    seen = observe(unchecked(task, dump_environment(task), "env"), pretrain_only(task))
    # It crashed on purpose: the submission's failure, charged.
    assert seen.result.status == "failed_submission"
    dumps = sorted((seen.root / "pretrain").glob("seen_env_rank*.json"))
    assert len(dumps) == 2
    for dump in dumps:
        env = json.loads(dump.read_text())
        assert "PATH" in env  # the dump worked
        assert not {"AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "ATTACK_HOSTS"} & set(env)


RUNTIME_REGIONS = (delayed_float, rank_divergent, patch_at_import, patch_during_training,
                   swap_frozen_function, unhook_audit, forge_final_json, dump_environment)


# --- where and when the in-run audit looks (issue #24) --------------------------------------
# Appended to this file, hence the imports here.

from harness.record import Status  # noqa: E402
from tests.security.attacks import (  # noqa: E402
    float_between_evaluations,
    float_unless_one_row,
)


@pytest.mark.security
def test_float_weights_on_batches_of_several_rows_are_caught_by_the_in_run_audit(
        task: TaskSpec, tmp_path: Path, observe: Callable[..., Observed]) -> None:
    seen = observe(_checked(task, float_unless_one_row(task), tmp_path), pretrain_only(task))
    # The audit's train() forward takes several random rows of the batch: the first one sees it.
    assert seen.result.status == Status.RULE_VIOLATION, seen.result.reason
    assert seen.result.reason.startswith("rule violation (low-bit, rank ")
    assert "low-bit audit at step 0: " in seen.result.reason
    assert "distinct values" in seen.result.reason
    assert seen.result.metrics == {}


@pytest.mark.security
def test_float_weights_between_evaluations_are_caught_by_a_spot_audit(
        task: TaskSpec, tmp_path: Path, observe: Callable[..., Observed]) -> None:
    seen = observe(_checked(task, float_between_evaluations(task), tmp_path),
                   pretrain_only(task))
    assert seen.result.status == Status.RULE_VIOLATION, seen.result.reason
    found = re.search(r"low-bit audit at step (\d+) \(spot\): ", seen.result.reason)
    assert found, seen.result.reason
    # A step between evaluations (every 10 at smoke), drawn where the submission cannot see.
    assert int(found[1]) % 10 != 0
    assert seen.result.metrics == {}


RUNTIME_REGIONS = (*RUNTIME_REGIONS, float_unless_one_row, float_between_evaluations)


def test_spot_audits_fall_between_evaluations_a_resumed_launch_doing_its_share() -> None:
    import random

    from harness.runtime.guard import SPOT_AUDITS, spot_steps

    rng = random.Random(0)  # the guard draws from random.SystemRandom; any Random will do here
    for _ in range(200):
        steps = spot_steps(rng, 0, 13535, 1000)
        assert len(steps) == SPOT_AUDITS == len(set(steps))
        assert all(0 < s < 13535 and s % 1000 for s in steps)
    assert len(spot_steps(rng, 9000, 13535, 1000)) == 2  # a third of the run left: ceil(1.0)
    assert all(s >= 9000 for s in spot_steps(rng, 9000, 13535, 1000))
    assert len(spot_steps(rng, 0, 2, 1)) == 0  # every step an evaluation: nothing between


def test_an_audit_leaves_no_trace_and_varies_its_shapes(task: TaskSpec, tmp_path: Path) -> None:
    """What a spot audit at a secret step must not do: move torch's random stream (dropout in
    train() draws from it) or a submission's buffers and counters, which would make the run
    depend on which steps were audited and a resumed run differ from an uninterrupted one."""
    import random

    import torch

    from harness.runtime.lowbit_audit import audit, draw_plan
    from harness.runtime.spliced import load_spliced
    from tests.security.attacks import FORWARD

    # Buffers the forward moves (float_between_evaluations's), and a plain counter.
    region = float_between_evaluations(task).replace(
        FORWARD, FORWARD + "        self.count = self.count + 1\n", 1)
    script = tmp_path / "custom_pretrain.py"
    script.write_text(spliced(task, region))
    module = load_spliced(script, "custom_pretrain_no_trace")
    model = module.GPT(module.GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2,
                                        n_embd=32, dropout=0.1))
    for m in model.modules():
        if isinstance(m, module.BitLinear):
            m.count = 7
    idx = torch.randint(0, 256, (4, 32))
    rng_state = torch.get_rng_state()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    shapes = set()
    secret = random.SystemRandom()
    for _ in range(5):
        record = audit(model, module.BitLinear, idx, None, where="step 3",
                       plan=draw_plan(secret, 4, 32))
        assert record.problems == []  # its first train() call of a step is ternary
        train, sub, whole = record.passes
        assert train["mode"] == "train" and 2 <= train["rows"] <= 4
        assert (whole["rows"], whole["start"], whole["tokens"]) == (4, 0, 32)
        shapes.add((train["rows"], train["tokens"], sub["rows"], sub["tokens"]))
    assert len(shapes) > 1
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    assert {m.count for m in model.modules() if isinstance(m, module.BitLinear)} == {7}
