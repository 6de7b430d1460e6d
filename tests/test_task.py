"""task.toml and the scales: the numbers the task statement fixes, and strict parsing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.task import TaskSpec, load_task
from tests.conftest import TEMPLATE


def test_task_declares_the_contract(task: TaskSpec) -> None:
    assert task.test_budget == 3 and task.primary_metric == "val_loss"
    assert [r.id for r in task.regions] == ["bitlinear", "config_overrides"]
    assert task.region("bitlinear").documented_lines == (38, 115)
    directions = {m.name: m.direction for m in task.metrics}
    assert directions == {"val_loss": "min", "wikitext2_ppl": "min", "lambada_ppl": "min",
                          "arc_easy": "max", "hellaswag": "max", "piqa": "max",
                          "winogrande": "max"}
    assert task.metric("arc_easy").better(50.0, 46.0)
    assert task.metric("val_loss").better(2.4, 2.7)
    sigs = {i.name: (i.signature, dict(i.methods)) for i in task.interface}
    assert sigs["BitLinear"][1]["__init__"] == "(self, in_features, out_features, bias=True)"


def test_gpt_345m_is_the_task_statements_configuration(task: TaskSpec) -> None:
    scale = task.scale("gpt-345m")
    c = scale.config
    assert (c["n_layer"], c["n_head"], c["n_embd"], c["block_size"]) == (24, 16, 1024, 1024)
    assert (c["max_iters"], c["batch_size"], c["gradient_accumulation_steps"]) == (13535, 64, 8)
    assert scale.nproc_per_node == 2 and scale.device == "cuda" and c["compile"] is True
    tokens = c["max_iters"] * c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
    assert round(tokens / 1e9, 1) == 7.1  # ~7.1B tokens, D = 20 N for ~355M parameters
    assert "--compile=true" in scale.cli_args()


def test_smoke_runs_on_cpu_without_compile(task: TaskSpec) -> None:
    smoke = task.scale("smoke")
    assert smoke.device == "cpu" and smoke.config["compile"] is False
    assert smoke.nproc_per_node == 2 and smoke.dataset == "smoke"


def test_unknown_keys_are_refused_with_the_valid_ones(tmp_path: Path) -> None:
    root = tmp_path / "task"
    shutil.copytree(TEMPLATE.parent, root)
    toml = root / "task.toml"
    toml.write_text(toml.read_text().replace("test_budget = 3", "test_budget = 3\nbudget = 5"))
    with pytest.raises(UserError) as e:
        load_task(root)
    assert "unknown key(s) budget" in str(e.value) and "test_budget" in str(e.value)


def test_an_unknown_scale_lists_the_known_ones(task: TaskSpec) -> None:
    with pytest.raises(UserError) as e:
        task.scale("gpt-1b")
    assert "gpt-124m, gpt-345m, smoke" in str(e.value)


def test_seed_k_of_several_moves_every_seed_by_k(task: TaskSpec) -> None:
    smoke = task.scale("smoke")
    assert smoke.seeds() == {"init": 42, "data": 42}
    third = smoke.seed_run(2)
    assert third.seeds() == {"init": 44, "data": 44} and smoke.seeds()["init"] == 42
    assert "--init_seed=44" in third.cli_args() and "--data_seed=44" in third.cli_args()
    assert smoke.seed_run(0).config == smoke.config
    assert smoke.with_seeds({"data": 7}).seeds() == {"init": 42, "data": 7}


def test_final_seeds_come_from_the_task_unless_the_scale_sets_its_own(task: TaskSpec) -> None:
    assert task.final_seeds == 3
    assert {n: task.finals_at(task.scale(n)) for n in task.scale_names()} == \
        {"gpt-124m": 3, "gpt-345m": 3, "smoke": 1}


@pytest.mark.parametrize("where, value", [("task.toml", 0), ("task.toml", 21),
                                          ("scales/smoke.toml", -2), ("scales/smoke.toml", 99)])
def test_a_final_seed_count_out_of_range_is_refused(tmp_path: Path, where: str,
                                                    value: int) -> None:
    root = tmp_path / "task"
    shutil.copytree(TEMPLATE.parent, root)
    path = root / where
    line = "final_seeds = 3" if where == "task.toml" else "final_seeds = 1"
    assert line in path.read_text()
    path.write_text(path.read_text().replace(line, f"final_seeds = {value}"))
    with pytest.raises(UserError) as e:
        load_task(root).scale("smoke")
    assert f"final_seeds = {value}: a final runs at 1 to 20 seeds" in str(e.value)
    assert str(path) in str(e.value)
