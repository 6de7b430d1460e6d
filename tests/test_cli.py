"""The command line as a user meets it: exit codes, one-line errors, no heavy imports."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, TEMPLATE

DATA = Path(__file__).parent / "data"


def harness(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_help_imports_nothing_heavy() -> None:
    # The speed of --help comes from deferring torch/numpy; assert the cause, not a time.
    code = ("import sys\nfrom harness.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'tiktoken') if m in sys.modules)\n"
            "print('HEAVY=' + ','.join(heavy))\n")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert "usage: harness" in proc.stdout
    assert "HEAVY=\n" in proc.stdout


@pytest.mark.parametrize("fixture", ["seed001_per_channel.py", "seed001_per_tensor.py",
                                     "seed001_autograd.py"])
def test_transcript_bitlinears_pass_the_static_checks(fixture: str) -> None:
    proc = harness("check", str(DATA / fixture), "--static-only")
    assert proc.returncode == 0, proc.stderr
    assert "passes the static checks (regions set: bitlinear)" in proc.stdout


@pytest.mark.parametrize("baseline", ["binary_sign", "ternary_158bit", "int2_uniform"])
def test_baselines_pass_the_static_checks(baseline: str) -> None:
    proc = harness("check", f"baselines/{baseline}", "--json", "--static-only")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    # ternary_158bit is the template default, so it sets no region at all.
    assert report["regions"] == ([] if baseline == "ternary_158bit" else ["bitlinear"])


def test_a_changed_frozen_line_is_refused_with_its_diff(tmp_path: Path) -> None:
    text = TEMPLATE.read_text().replace("grad_clip = 1.0\n", "grad_clip = 0.0\n")
    sub = tmp_path / "custom_pretrain.py"
    sub.write_text(text)
    proc = harness("check", str(sub))
    assert proc.returncode == 2
    assert "1 frozen line(s) changed" in proc.stderr
    assert "- grad_clip = 1.0" in proc.stderr and "+ grad_clip = 0.0" in proc.stderr
    line = TEMPLATE.read_text().splitlines().index("grad_clip = 1.0") + 1
    assert f"line {line}:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compiler_disable_is_refused_naming_rule_and_line(tmp_path: Path) -> None:
    region = (DATA / "seed001_per_tensor.py").read_text()
    lines = region.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("def weight_quant"))
    lines.insert(at, "@torch.compiler.disable")
    sub = tmp_path / "bitlinear.py"
    sub.write_text("\n".join(lines) + "\n")
    proc = harness("check", str(sub))
    assert proc.returncode == 2
    assert f"compile-disable {38 + at}:" in proc.stderr
    assert "Traceback" not in proc.stderr
    as_json = harness("check", str(sub), "--json")
    findings = json.loads(as_json.stdout)["findings"]
    assert as_json.returncode == 2
    assert {(f["rule"], f["line"]) for f in findings} >= {("compile-disable", 38 + at)}


def test_validate_task_accepts_ours_and_names_a_broken_one(tmp_path: Path) -> None:
    ok = harness("validate-task")
    assert ok.returncode == 0, ok.stderr
    assert "2 regions, 3 scales" in ok.stdout
    broken = tmp_path / "task"
    shutil.copytree(TEMPLATE.parent, broken)
    toml = (broken / "task.toml").read_text().replace("documented_lines = [38, 115]",
                                                      "documented_lines = [38, 120]")
    (broken / "task.toml").write_text(toml)
    bad = harness("validate-task", str(broken))
    assert bad.returncode == 2
    assert "region bitlinear spans lines (38, 115), task.toml documents (38, 120)" in bad.stderr


def test_validate_task_catches_a_scale_key_the_template_lacks(tmp_path: Path) -> None:
    broken = tmp_path / "task"
    shutil.copytree(TEMPLATE.parent, broken)
    scale = broken / "scales" / "smoke.toml"
    scale.write_text(scale.read_text().replace("n_layer = 2", "n_layers = 2"))
    bad = harness("validate-task", str(broken))
    assert bad.returncode == 2
    assert "scale smoke: config keys ['n_layers'] are not template globals" in bad.stderr


def test_a_metric_source_lm_eval_cannot_score_is_refused_before_any_run(tmp_path: Path) -> None:
    broken = tmp_path / "task"
    shutil.copytree(TEMPLATE.parent, broken)
    toml = (broken / "task.toml").read_text()
    (broken / "task.toml").write_text(toml.replace('source = "piqa/acc"', 'source = "mmlu/acc"'))
    bad = harness("validate-task", str(broken))
    assert bad.returncode == 2
    assert "metric piqa: source 'mmlu/acc' is not an lm-eval 'task/metric'" in bad.stderr
    runs = tmp_path / "runs"
    run = harness("run", "baselines/binary_sign", "--task", str(broken), "--runs-dir", str(runs))
    assert run.returncode == 2 and "metric piqa: source 'mmlu/acc'" in run.stderr
    assert not runs.exists() or not any(runs.iterdir())  # refused before an attempt existed


@pytest.mark.parametrize("args,expect", [
    (["run", "baselines/binary_sign", "--scale", "huge"], "unknown scale 'huge'"),
    (["check", "no/such/submission"], "no/such/submission"),
    (["run", "baselines/binary_sign", "--scale", "gpt-345m", "--data-dir", "/nonexistent"],
     "no prepared dataset 'fineweb10B'"),
])
def test_bad_input_gets_one_message_and_exit_2(args: list[str], expect: str,
                                               tmp_path: Path) -> None:
    proc = harness(*args, "--runs-dir", str(tmp_path / "runs")) if args[0] == "run" else \
        harness(*args)
    assert proc.returncode == 2
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    # A refusal before training leaves no half-made attempt behind.
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
