"""A rank that dies at teardown, after the run is complete, is a crash of ours (issue #24).

Seen in CI under load: both ranks trained and final.json was written, then one rank died of
SIGABRT ("terminate called without an active exception") while the process group was torn
down. The run's work was done; judging that by the stage's rules charged the submission for
our teardown. Here a real smoke pretrain stage has rank 1 abort once, on its way out, after
the template has written final.json: the launch is judged ours, the stage is resumed from its
last checkpoint, and the attempt ends as the uninterrupted run would, charged once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.attempt import dataset_dir, run_submission
from harness.record import Status
from harness.runners.local import LocalRunner
from harness.stages.pretrain import teardown_crash
from harness.task import load_task
from tests.security.attacks import at_top, pretrain_only, unchecked

TASK_DIR = Path(__file__).resolve().parents[1] / "tasks" / "llm-pretrain-bitlinear"

# Not a submission that could pass the static policy (it imports atexit and os): it stands in
# for a native crash in torch's own teardown, which no submission controls.
ABORT_ONCE = """import atexit
import os


def _abort_once_at_exit():
    marker = os.path.join(out_dir, "aborted-once")
    if os.environ.get("RANK") == "1" and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()


atexit.register(_abort_once_at_exit)
"""


def _launch(tmp_path: Path, failures: dict[str, int], *, checksums: int = 2) -> Path:
    (tmp_path / "launcher.json").write_text(json.dumps(
        {"failures": {r: {"exitcode": c, "timestamp": 1} for r, c in failures.items()},
         "first": min(failures)}))
    (tmp_path / "final.json").write_text(json.dumps(
        {"val_loss": 7.8, "world_size": 2, "rank_param_checksums": [1.0] * checksums}))
    return tmp_path


def test_a_signal_after_a_complete_final_json_is_a_teardown_crash(tmp_path: Path) -> None:
    why = teardown_crash(_launch(tmp_path, {"1": -6}))
    assert why == ("the run was complete (final.json written) when a process died at teardown "
                   "(rank 1 by SIGABRT): a crash of ours, resumed from the last checkpoint")


@pytest.mark.parametrize(("failures", "checksums"), [
    ({"1": 1}, 2),  # a rank that exited with its own code: the stage's rules judge it
    ({"0": -15, "1": 3}, 2),
    ({"1": -6}, 1),  # final.json without every rank's checksum: the run was not complete
])
def test_no_teardown_crash_without_a_complete_run_and_signals_only(
        tmp_path: Path, failures: dict[str, int], checksums: int) -> None:
    assert teardown_crash(_launch(tmp_path, failures, checksums=checksums)) is None


def test_no_teardown_crash_without_final_json(tmp_path: Path) -> None:
    _launch(tmp_path, {"1": -6})
    (tmp_path / "final.json").unlink()
    assert teardown_crash(tmp_path) is None


@pytest.mark.slow
def test_a_rank_aborting_at_teardown_is_resumed_and_charged_once(tmp_path: Path) -> None:
    task = load_task(TASK_DIR)
    scale = pretrain_only(task)
    data = tmp_path / "data"
    dataset_dir(scale, data)
    events: list[str] = []
    record, attempt = run_submission(
        unchecked(task, at_top(task, ABORT_ONCE), "abort"), task, scale, runs_dir=tmp_path / "runs",
        data=data, runner=LocalRunner(), on_event=lambda kind, _info: events.append(kind))
    assert record.status is Status.SUCCEEDED, record.reason
    first, second = record.stages["pretrain"].segments
    assert first["outcome"] == Status.FAILED_INFRA.value
    # torchrun stops rank 0 with SIGTERM once rank 1 has died: both are named.
    assert "when a process died at teardown (" in first["reason"]
    assert "rank 1 by SIGABRT" in first["reason"]
    # The first launch's final.json was set aside with it; the second wrote its own.
    out = attempt.root / "pretrain"
    assert (out / "segment-1" / "final.json").is_file() and (out / "final.json").is_file()
    assert second["from_iter"] == first["last_iter"] == scale.config["max_iters"]
    assert second["outcome"] == Status.SUCCEEDED.value
    # One charge: one stage_start; the relaunch is a resume.
    assert events.count("stage_start") == 1 and events.count("stage_resume") == 1


def test_the_rank_that_failed_first_names_the_error(tmp_path: Path) -> None:
    # Rank 1 raised; rank 0 then saw its peer's socket close. The reason is rank 1's error,
    # which the launcher's record says failed first, not rank 0's by file order.
    from harness.record import Status as S
    from harness.runners.base import StageRun
    from harness.stages.pretrain import collect

    (tmp_path / "launcher.json").write_text(json.dumps(
        {"failures": {"0": {"exitcode": 1, "timestamp": 2}, "1": {"exitcode": 1, "timestamp": 1}},
         "first": "1"}))
    (tmp_path / "guard_rank0.json").write_text("{}")
    for rank, message in (("0", "RuntimeError: Connection closed by peer"),
                          ("1", "RuntimeError: submission bug: exploded")):
        (tmp_path / f"error_rank{rank}.json").write_text(json.dumps(
            {"kind": "submission", "message": f"Traceback ...\n{message}"}))
    got = collect(StageRun(1, True, False, 1.0, tmp_path / "o", tmp_path / "e"), tmp_path)
    assert (got.status, got.reason) == (S.FAILED_SUBMISSION,
                                        "training raised: RuntimeError: submission bug: exploded")
