"""Pre-flight: submissions that cannot train are stopped on CPU, with the check and a reason.

Real pre-flight runs (worker process, torchrun) are the slow tests; each adversarial fixture
runs only the checks it is about, so the file stays within a few minutes. The unit tests at
the end pin the level counting and the judging of the DDP run's files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.attempt import Prepared, region_texts, run_submission
from harness.checks.preflight import run_preflight
from harness.checks.static import check_spliced
from harness.errors import UserError
from harness.regions import splice
from harness.runners.base import StageRun, StageSpec
from harness.runners.local import LocalRunner
from harness.runtime.preflight import (
    CHECK_IDS,
    MAX_VAL_LOSS_RISE,
    REPORT_FILE,
    CheckResult,
    PreflightReport,
    exception_line,
    judge_ddp,
    judge_numerics,
)
from harness.runtime.procs import ProcessRun
from harness.submission import Submission, load_submission
from harness.task import ScaleSpec, TaskSpec
from tests.conftest import PYTHON, REPO

DATA = Path(__file__).parent / "data"
FIXTURES = DATA / "preflight"
BASELINES = ("binary_sign", "int2_uniform", "ternary_158bit")
Run = Callable[..., PreflightReport]


def spliced_region(task: TaskSpec, path: Path) -> str:
    return splice(task.template_text(), {"bitlinear": path.read_text()})


@pytest.fixture(scope="module")
def preflight(task: TaskSpec, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """run_preflight on a region file (or a submission folder), in a fresh work dir."""
    def run(path: Path, checks: Sequence[str] = CHECK_IDS, **kw: Any) -> PreflightReport:
        text = (spliced_region(task, path) if path.is_file() else
                splice(task.template_text(), load_submission(path, task).regions))
        work = tmp_path_factory.mktemp(f"pf-{path.stem}")
        return run_preflight(task, text, runner=LocalRunner(), work_dir=work, checks=checks,
                             **kw)
    return run


def check(report: PreflightReport, check_id: str) -> CheckResult:
    found = report.get(check_id)
    assert found is not None, report.render()
    return found


def only_failures(report: PreflightReport, *ids: str) -> None:
    assert not report.ok
    assert {c.id for c in report.failed} == set(ids), report.render()


# --- the fixtures exercise pre-flight, not the static rules -------------------------------


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.py")))
def test_fixture_passes_the_static_checks(task: TaskSpec, fixture: str) -> None:
    text = spliced_region(task, FIXTURES / fixture)
    assert check_spliced(task, text, region_texts(text)) == []


# --- what must pass -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_reports(preflight: Run) -> dict[str, PreflightReport]:
    return {name: preflight(REPO / "baselines" / name) for name in BASELINES}


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_baselines_pass_every_check(baseline_reports: dict[str, PreflightReport],
                                    name: str) -> None:
    report = baseline_reports[name]
    assert report.ok, report.render()
    assert [c.id for c in report.checks] == list(CHECK_IDS)
    assert all(c.status == "pass" for c in report.checks), report.render()
    bits = {"binary_sign": "2 levels (1 bit)", "int2_uniform": "4 levels (2 bits)",
            "ternary_158bit": "3 levels (1.58 bits)"}
    assert bits[name] in check(report, "low-bit").reason
    assert "per-tensor" in check(report, "low-bit").reason
    assert check(report, "ddp").details["world_size"] == 2
    json.dumps(report.to_dict())  # machine-readable as it is


@pytest.mark.slow
def test_transcript_per_channel_passes_with_a_double_scale_warning(preflight: Run) -> None:
    report = preflight(DATA / "seed001_per_channel.py", checks=("interface", "low-bit"))
    assert report.ok, report.render()
    interface = check(report, "interface")
    assert interface.status == "warn"
    assert "the scale seems applied twice" in interface.reason
    assert "per-row" in check(report, "low-bit").reason  # w_q * scale per output channel


@pytest.mark.slow
def test_transcript_autograd_function_passes_and_compiles(preflight: Run) -> None:
    report = preflight(DATA / "seed001_autograd.py",
                       checks=("interface", "low-bit", "gradients", "compile"))
    assert report.ok, report.render()
    assert check(report, "interface").status == "warn"  # the same double scale


@pytest.mark.slow
def test_transcript_per_tensor_passes_cleanly(preflight: Run) -> None:
    report = preflight(DATA / "seed001_per_tensor.py",
                       checks=("interface", "low-bit", "one-path", "gradients"))
    assert report.ok and all(c.status == "pass" for c in report.checks), report.render()


# --- what must fail, and with which check -------------------------------------------------


@pytest.mark.slow
def test_blog_activation_quant_returning_a_tensor_fails_interface(preflight: Run) -> None:
    report = preflight(FIXTURES / "seed002_blog.py")
    only_failures(report, "interface")
    reason = check(report, "interface").reason
    assert reason.startswith("activation_quant returns a Tensor, not a (quantized_x, scale) "
                             "tuple"), reason
    assert report.skipped == list(CHECK_IDS[1:])  # everything else would only repeat it


@pytest.mark.slow
def test_float_weight_fed_to_the_matmul_fails_low_bit(preflight: Run) -> None:
    report = preflight(FIXTURES / "float_matmul.py", checks=("interface", "low-bit"))
    # weight_quant itself is fine: only the matmul shows the cheat.
    assert check(report, "interface").status == "pass"
    only_failures(report, "low-bit")
    reason = check(report, "low-bit").reason
    assert reason.startswith("transformer.h.0.attn.c_attn in train(): linear() received its "
                             "weight with 64 distinct values per output row"), reason


@pytest.mark.slow
def test_float_weights_in_eval_only_fail_low_bit_and_one_path(preflight: Run) -> None:
    report = preflight(FIXTURES / "train_only_quant.py", checks=("low-bit", "one-path"))
    only_failures(report, "low-bit", "one-path")
    assert check(report, "low-bit").reason.startswith("transformer.h.0.attn.c_attn in eval()")
    assert "one path in both modes" in check(report, "one-path").reason
    train = check(report, "low-bit").details["layers"]["transformer.h.0.attn.c_attn"]["train"]
    assert train["levels"] == 1 + 2 and train["granularity"] == "per-tensor"


@pytest.mark.slow
def test_a_float_adapter_beside_the_low_bit_matmul_fails_low_bit(preflight: Run) -> None:
    report = preflight(FIXTURES / "float_adapter.py", checks=("low-bit",))
    only_failures(report, "low-bit")
    assert "received a parameter-derived operand [192, 4]" in check(report, "low-bit").reason


@pytest.mark.slow
def test_a_layer_without_a_matmul_fails_low_bit(preflight: Run) -> None:
    report = preflight(FIXTURES / "no_matmul.py", checks=("low-bit",))
    only_failures(report, "low-bit")
    assert "no matmul saw this layer's weight" in check(report, "low-bit").reason


@pytest.mark.slow
def test_nan_fails_gradients_and_numerics(preflight: Run) -> None:
    report = preflight(FIXTURES / "nan_output.py", checks=("gradients", "ddp", "numerics"))
    only_failures(report, "gradients", "numerics")
    assert "has a non-finite gradient" in check(report, "gradients").reason
    assert check(report, "numerics").reason == "val_loss is nan at step 0"


@pytest.mark.slow
def test_item_in_forward_fails_compile_with_the_line(preflight: Run, task: TaskSpec) -> None:
    report = preflight(FIXTURES / "item_in_forward.py", checks=("compile",))
    only_failures(report, "compile")
    reason = check(report, "compile").reason
    text = spliced_region(task, FIXTURES / "item_in_forward.py").splitlines()
    line = 1 + next(i for i, t in enumerate(text) if "w_scale.item()" in t)
    assert "graph break(s) under torch.compile" in reason and "item()" in reason, reason
    assert f"(line {line} of the spliced file)" in reason
    assert check(report, "compile").details["graph_breaks"] >= 1


@pytest.mark.slow
def test_a_scale_without_gradient_fails_gradients_and_ddp(preflight: Run) -> None:
    report = preflight(FIXTURES / "dead_scale.py", checks=("gradients", "ddp"))
    only_failures(report, "gradients", "ddp")
    assert check(report, "gradients").reason.startswith(
        "transformer.h.0.attn.c_attn.gain has no gradient after one backward")
    ddp = check(report, "ddp")
    assert ddp.reason.startswith("error_rank0: RuntimeError: Expected to have finished "
                                 "reduction"), ddp.reason
    assert "Traceback" in ddp.details["traceback"]
    assert "run twice" not in ddp.reason  # a rank said why: never tried again


def _flaky_launch(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[list[str]]:
    """torchrun fails `failures` times without a word from any rank, then runs for real."""
    from harness.runtime import preflight as pf

    calls: list[list[str]] = []
    real = pf.run_process

    def launch(argv: list[str], **kw: Any) -> ProcessRun:
        calls.append(argv)
        if len(calls) <= failures:
            kw["log"].write_text("simulated: the launcher lost a rank at teardown\n")
            return ProcessRun(1, False, 0.5, kw["log"])
        return real(argv, **kw)

    monkeypatch.setattr(pf, "run_process", launch)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("failures", [1, 2])
def test_a_torchrun_failure_no_rank_explains_is_tried_once_more(
        task: TaskSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
    import time

    from harness.runtime import preflight as pf

    calls = _flaky_launch(monkeypatch, failures)
    script = tmp_path / task.template
    script.write_text(splice(task.template_text(),
                             load_submission(REPO / "baselines" / "int2_uniform", task).regions))
    ddp = pf._run_ddp(script, tmp_path, time.monotonic() + 300, 8192)[0]
    assert len(calls) == 2
    # Twice without a word from any rank: ours (exit 3), never the submission's refusal.
    assert ddp.status == ("pass" if failures == 1 else "error"), ddp.reason
    assert ddp.reason.endswith("(run twice: the first try's torchrun exited with code 1 "
                               "without an error record)")
    assert "simulated" in ddp.details["first_try_log_tail"]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_hang_is_stopped_and_blamed_on_the_running_check(preflight: Run,
                                                           tmp_path: Path) -> None:
    report = preflight(FIXTURES / "hang.py", timeout_s=20)
    only_failures(report, "interface")
    assert "pre-flight time limit ran out" in check(report, "interface").reason
    assert report.skipped == list(CHECK_IDS[1:])
    assert _processes_mentioning("pf-hang") == []  # the whole process tree is gone


@pytest.mark.slow
def test_a_hang_in_the_ddp_ranks_is_stopped_with_every_rank(preflight: Run) -> None:
    report = preflight(FIXTURES / "hang_in_ddp.py", checks=("ddp", "numerics"), timeout_s=20)
    only_failures(report, "ddp")
    assert "pre-flight time limit ran out" in check(report, "ddp").reason
    assert report.skipped == ["numerics"]
    # torchrun starts its ranks in sessions of their own: they must be gone too.
    assert _processes_mentioning("pf-hang_in_ddp") == []


@pytest.mark.slow
def test_unbounded_allocation_hits_the_memory_limit(preflight: Run) -> None:
    report = preflight(FIXTURES / "memory_bomb.py", memory_mb=3072)
    only_failures(report, "interface")
    reason = check(report, "interface").reason
    assert reason.startswith("memory limit of 3072 MiB reached: allocating 1.00 GiB failed"), \
        reason


# --- integration: `harness check` and `harness run` ---------------------------------------


@pytest.mark.slow
def test_check_command_prints_the_report_and_exits_2(tmp_path: Path) -> None:
    import subprocess

    sub = str(FIXTURES / "seed002_blog.py")
    proc = subprocess.run([PYTHON, "-m", "harness", "check", sub], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "passes the static checks" in proc.stdout
    assert "FAIL  interface" in proc.stderr and "returns a Tensor" in proc.stderr
    proc = subprocess.run([PYTHON, "-m", "harness", "check", sub, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    out = json.loads(proc.stdout)
    assert proc.returncode == 2 and out["ok"] is False and out["findings"] == []
    assert out["preflight"]["checks"][0]["id"] == "interface"
    assert out["preflight"]["checks"][0]["status"] == "fail"


def _tiny_scale(task: TaskSpec, tmp_path: Path) -> tuple[Path, ScaleSpec]:
    # The real smoke corpus takes a while to build; only its manifest's presence matters.
    data = tmp_path / "data"
    (data / "tiny").mkdir(parents=True)
    (data / "tiny" / "manifest.json").write_text("{}")
    # Pretrain only: these tests are about the pre-flight step, not the eval stage.
    return data, dataclasses.replace(task.scale("smoke"), dataset="tiny", stages=("pretrain",))


class FakePretrain:
    """Pretrain replaced by its files (training is tested elsewhere); the pre-flight stage
    runs for real, through the local runner."""

    name = "fake"

    def run(self, spec: StageSpec) -> StageRun:
        if spec.name == "preflight":
            return LocalRunner().run(spec)
        out = spec.log_dir
        (out / "final.json").write_text(json.dumps({"val_loss": 3.0,
                                                    "rank_param_checksums": [7.0, 7.0]}))
        for log in ("stdout.log", "stderr.log"):
            (out / log).write_text("")
        return StageRun(0, True, False, 0.1, out / "stdout.log", out / "stderr.log")


def _prepared(task: TaskSpec, region: Path) -> Prepared:
    sub = Submission(kind="file", source=region, regions={"bitlinear": region.read_text()},
                     meta={}, sha256="0" * 64, name=region.stem)
    return Prepared(sub, spliced_region(task, region), "")


@pytest.mark.slow
def test_run_refuses_before_the_attempt_exists(task: TaskSpec, tmp_path: Path) -> None:
    data, scale = _tiny_scale(task, tmp_path)
    runs = tmp_path / "runs"
    with pytest.raises(UserError) as e:
        run_submission(_prepared(task, FIXTURES / "seed002_blog.py"), task, scale,
                    runs_dir=runs, data=data, runner=FakePretrain(), preflight=True)
    assert e.value.exit_code == 2
    assert "pre-flight failed: interface" in str(e.value)
    assert "FAIL  interface" in (e.value.details or "")
    assert not runs.exists() or not any(runs.iterdir())  # nothing to charge


def test_run_records_the_report_in_the_attempt(task: TaskSpec, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.checks.preflight as pf

    canned = PreflightReport([CheckResult(c, "pass", 0.1, "ok", {"n": 1}) for c in CHECK_IDS])
    monkeypatch.setattr(pf, "run_preflight", lambda *a, **k: canned)
    data, scale = _tiny_scale(task, tmp_path)
    result, paths = run_submission(_prepared(task, DATA / "seed001_per_tensor.py"), task,
                                scale, runs_dir=tmp_path / "runs", data=data,
                                runner=FakePretrain(), preflight=True)
    assert result.status == "succeeded"
    assert json.loads(paths.checks.read_text()) == canned.to_dict()
    record = json.loads(paths.record_path.read_text())
    assert record["preflight"]["ok"] is True
    assert [c["id"] for c in record["preflight"]["checks"]] == list(CHECK_IDS)
    assert "details" not in record["preflight"]["checks"][0]  # those stay in checks.json
    assert "checks.json" in record["artifacts"]


# --- units: level counting, judging the DDP run's files, the report -----------------------


def test_levels_are_counted_after_factoring_scales() -> None:
    import torch

    from harness.runtime.preflight_lowbit import count_levels

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    s = w.abs().mean()
    row = w.abs().mean(dim=1, keepdim=True)
    groups = w.reshape(64, 4, 32).abs().mean(dim=-1, keepdim=True)
    ternary = (w / s).round().clamp(-1, 1)
    cases = {
        "per-tensor ternary": ((ternary * s), 3, "per-tensor"),
        "per-tensor int2": ((w / s).round().clamp(-2, 1) * s, 4, "per-tensor"),
        "binary": (torch.sign(w), 2, "per-tensor"),
        "per-row": ((w / row).round().clamp(-1, 1) * row, 3, "per-row"),
        "per-group-32": (((w.reshape(64, 4, 32) / groups).round().clamp(-1, 1) * groups)
                         .reshape(64, 128), 3, "per-group-32"),
        "bf16 rounding": ((ternary * s).bfloat16().float(), 3, "per-tensor"),
        "STE sum": (w + (ternary * s - w).detach(), 3, "per-tensor"),
    }
    for name, (matrix, levels, granularity) in cases.items():
        got = count_levels(matrix)
        assert (got.levels, got.granularity) == (levels, granularity), name


def test_float_weights_fail_even_behind_an_outlier() -> None:
    import torch

    from harness.runtime.preflight_lowbit import count_levels

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    assert not count_levels(w).ok
    # A tolerance relative to each group's largest value would call all of these "equal".
    hidden = w * 1e-3
    hidden[:, 0] = 1e3
    assert not count_levels(hidden).ok
    five = torch.randint(-2, 3, (64, 128), generator=torch.Generator().manual_seed(1)).float()
    assert count_levels(five).levels == 5 and not count_levels(five).ok


def _write_run(out: Path, vals: Sequence[float], sums: Sequence[float] = (1.0, 1.0)) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 5 * i, "train_loss": v if i else None, "val_loss": v}
            for i, v in enumerate(vals)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "final.json").write_text(json.dumps({"world_size": 2,
                                                "rank_param_checksums": list(sums)}))


def _ok_run(tmp_path: Path) -> ProcessRun:
    return ProcessRun(0, False, 1.0, tmp_path / "log")


def test_numerics_refuses_divergence_and_accepts_no_progress(tmp_path: Path) -> None:
    ok = CheckResult("ddp", "pass", 1.0, "")
    _write_run(tmp_path / "flat", [6.2, 6.2, 6.2])
    assert judge_numerics(tmp_path / "flat", ok).status == "pass"
    _write_run(tmp_path / "up", [6.2, 6.5, 6.2 + MAX_VAL_LOSS_RISE + 0.1])
    got = judge_numerics(tmp_path / "up", ok)
    assert got.status == "fail" and "training diverges" in got.reason
    _write_run(tmp_path / "inf", [6.2, math.inf, 6.0])
    assert judge_numerics(tmp_path / "inf", ok).reason == "train_loss is inf at step 5"


def test_ddp_refuses_ranks_that_drifted_apart(tmp_path: Path) -> None:
    _write_run(tmp_path, [6.2, 5.0], sums=(1.0, 1.5))
    got = judge_ddp(_ok_run(tmp_path), tmp_path)
    assert got.status == "fail" and "ranks ended with different parameters" in got.reason


def test_the_exception_line_of_a_recorded_traceback() -> None:
    message = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in forward\n"
               "    y = f(x)\nRuntimeError: Expected to have finished reduction. This error "
               "indicates unused parameters.\nParameter indices which did not receive grad "
               "for rank 0: 3 5\n")
    assert exception_line(message) == ("RuntimeError: Expected to have finished reduction. "
                                       "This error indicates unused parameters.")
    assert exception_line("Traceback ...\nSystemExit: 0\n") == "SystemExit: 0"


def test_report_renders_one_line_per_check_and_is_ok_with_warnings() -> None:
    report = PreflightReport([CheckResult("interface", "warn", 0.42, "scale applied twice"),
                              CheckResult("low-bit", "pass", 3.0, "3 levels")])
    assert report.ok
    assert report.render().splitlines()[0] == "WARN  interface   0.4s  scale applied twice"
    failed = PreflightReport([CheckResult("interface", "fail", 1.0, "no")], skipped=["ddp"])
    assert not failed.ok and "not run: ddp" in failed.render()
    assert failed.to_dict()["skipped"] == ["ddp"]
    assert PreflightReport().ok is False  # nothing ran: nothing cleared


def test_the_worker_limits_memory_before_torch_and_torch_still_imports() -> None:
    import subprocess

    code = ("import resource, sys\nfrom harness.runtime.preflight_worker import limit_memory\n"
            "limit_memory(4096)\nimport torch\ntorch.ones(10).sum()\n"
            "print(resource.getrlimit(resource.RLIMIT_DATA)[0] >> 20)\n")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4096"


# --- the pre-flight stage: how it is built and how its end is read --------------------------


class _Canned:
    """A runner that records the stage and ends it as told, writing `report` if given."""

    def __init__(self, name: str = "fake", *, started: bool = True, infra: str | None = None,
                 report: str | None = None, returncode: int = 0) -> None:
        self.name, self.started, self.infra = name, started, infra
        self.report, self.returncode = report, returncode
        self.specs: list[StageSpec] = []

    def run(self, spec: StageSpec) -> StageRun:
        self.specs.append(spec)
        out, err = spec.log_dir / "stdout.log", spec.log_dir / "stderr.log"
        out.write_text("")
        err.write_text("Traceback ...\nOSError: no space left\n")
        if self.report is not None:
            (spec.cwd / REPORT_FILE).write_text(self.report)
        return StageRun(self.returncode if self.started else None, self.started, False, 0.5,
                        out, err, error=None if self.started else "image missing",
                        infra=self.infra, info={"container_id": "abc123"})


def test_the_preflight_is_one_cpu_stage_in_its_own_folder(task: TaskSpec,
                                                           tmp_path: Path) -> None:
    canned = PreflightReport([CheckResult(c, "pass", 0.1, "ok") for c in CHECK_IDS])
    runner = _Canned("docker", report=json.dumps(canned.to_dict()))
    text = spliced_region(task, DATA / "seed001_per_tensor.py")
    report = run_preflight(task, text, runner=runner, work_dir=tmp_path / "pf",
                           timeout_s=100, memory_mb=2048)
    (spec,) = runner.specs
    work = (tmp_path / "pf").resolve()
    assert spec.name == "preflight" and spec.gpus == 0
    assert spec.cwd == work and spec.log_dir == work
    assert [(m.source, m.target, m.writable) for m in spec.mounts] == [(work, str(work), True)]
    assert spec.argv[1:3] == ("-m", "harness.runtime.preflight")
    assert f"--spliced={work / task.template}" in spec.argv and "--memory-mb=2048" in spec.argv
    assert spec.timeout_s > 100  # the orchestrator's own deadline comes first
    assert "PYTHONPATH" not in spec.env and "OMP_NUM_THREADS" in spec.env  # an image's own
    assert (work / task.template).read_text() == text  # written before the launch
    assert report.ok and [c.id for c in report.checks] == list(CHECK_IDS)
    assert report.runner == {"name": "docker", "container_id": "abc123"}
    assert report.to_dict()["runner"]["container_id"] == "abc123"


@pytest.mark.parametrize(("runner", "says"), [
    (_Canned(started=False), "did not start: image missing"),
    (_Canned(infra="killed by the out-of-memory killer"), "stopped by killed by the out-of"),
    (_Canned(returncode=1), "left no readable report (exit code 1"),
    (_Canned(report="{not json"), "left no readable report"),
    (_Canned(report=json.dumps({"checks": [{"id": "rm -rf", "status": "pass",
                                            "duration_s": 0, "reason": ""}]})),
     "left no readable report"),
], ids=["not-started", "infra", "no-report", "torn-report", "unknown-check"])
def test_a_preflight_stage_that_failed_around_the_checks_is_ours(
        task: TaskSpec, tmp_path: Path, runner: _Canned, says: str) -> None:
    text = spliced_region(task, DATA / "seed001_per_tensor.py")
    report = run_preflight(task, text, runner=runner, work_dir=tmp_path / "pf",
                           checks=("interface", "ddp"))
    assert not report.ok
    assert [(c.id, c.status) for c in report.checks] == [("interface", "error")], report.render()
    assert says in report.checks[0].reason
    assert report.skipped == ["ddp"]
    assert all(c.status == "error" for c in report.failed)  # exit 3, nothing charged


def test_a_stale_report_in_a_reused_folder_is_never_read(task: TaskSpec, tmp_path: Path) -> None:
    work = tmp_path / "pf"
    work.mkdir()
    old = PreflightReport([CheckResult("interface", "pass", 0.1, "ok")])
    (work / REPORT_FILE).write_text(json.dumps(old.to_dict()))
    report = run_preflight(task, spliced_region(task, DATA / "seed001_per_tensor.py"),
                           runner=_Canned(returncode=1), work_dir=work, checks=("interface",))
    assert report.checks[0].status == "error"
