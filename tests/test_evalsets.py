"""Eval sets: the schemas lm-eval's tasks expect, offline YAMLs, source discovery, smoke sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.data import evals
from harness.data.evals import TASK_NAMES, TASKS, get_task
from harness.errors import UserError
from tests.conftest import PYTHON, REPO

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` caches what it loads: here, never in the user's home, and offline."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                        tmp_path_factory.getbasetemp() / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small smoke corpus (its held-out documents feed the smoke eval sets)."""
    from harness.data.smoke import prepare_smoke

    path = tmp_path_factory.mktemp("corpus")
    prepare_smoke(path, max_tokens=150_000)
    return path


@pytest.fixture(scope="module")
def smoke_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke-evals")
    evals.prepare_smoke_evals(out, corpus, docs=24)
    return out


def rows_of(directory: Path, task: str) -> list[dict[str, Any]]:
    entry = evals.read_manifest(directory)["tasks"][task]
    return evals.read_rows(directory / entry["file"])


def test_smoke_sets_are_deterministic_and_valid(corpus: Path, smoke_dir: Path,
                                                tmp_path: Path) -> None:
    again = evals.prepare_smoke_evals(tmp_path / "again", corpus, docs=24)
    first = evals.read_manifest(smoke_dir)
    assert {k: v["sha256"] for k, v in first["tasks"].items()} == \
        {k: v["sha256"] for k, v in again["tasks"].items()}
    for task in TASKS:
        rows = rows_of(smoke_dir, task.name)
        assert len(rows) == 24
        evals.validate_rows(task, rows, where=task.name)
    assert evals.verify(smoke_dir) == []


def test_smoke_sets_are_built_from_held_out_documents(corpus: Path, smoke_dir: Path) -> None:
    held_out = evals.val_documents(corpus)
    pages = [r["page"] for r in rows_of(smoke_dir, "wikitext")]
    assert all(page in {d.strip() for d in held_out} for page in pages)
    joined = " ".join(evals.prose(d) for d in held_out)
    for row in rows_of(smoke_dir, "lambada_openai"):
        assert row["text"] in joined  # a prefix of a held-out passage, ending at a word
    for row in rows_of(smoke_dir, "piqa"):
        true = (row["sol1"], row["sol2"])[row["label"]]
        assert f"{row['goal']} {true}" in joined  # the true continuation follows the goal


def test_smoke_prepare_keeps_an_intact_directory(corpus: Path, smoke_dir: Path) -> None:
    manifest = smoke_dir / "manifest.json"
    before = manifest.stat().st_mtime_ns
    evals.prepare_smoke_evals(smoke_dir, corpus, docs=24)
    assert manifest.stat().st_mtime_ns == before
    data = smoke_dir / TASKS[0].rel_file
    data.write_text(data.read_text() + "\n")  # tampered: rebuilt on the next prepare
    assert evals.verify(smoke_dir)
    evals.prepare_smoke_evals(smoke_dir, corpus, docs=24)
    assert evals.verify(smoke_dir) == []


def test_yamls_load_offline_and_keep_lm_evals_definitions(smoke_dir: Path) -> None:
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = TaskManager(include_path=str(smoke_dir / evals.YAML_DIR), include_defaults=False)
    loaded = manager.load([t.harness_task for t in TASKS])["tasks"]
    tasks_dir = evals.lm_eval_tasks_dir()
    assert tasks_dir is not None
    overridden = {"include", "task", "tag", "dataset_path", "dataset_name", "dataset_kwargs",
                  "training_split", "validation_split", "test_split", "num_fewshot"}
    for task in TASKS:
        ours = loaded[task.harness_task]
        assert len(list(ours.eval_docs)) == 24
        # Every field we do not override is lm-eval's own, functions included.
        builtin = load_yaml(tasks_dir / task.yaml)
        mine = load_yaml(smoke_dir / evals.YAML_DIR / f"{task.harness_task}.yaml")
        for key, value in builtin.items():
            if key not in overridden:
                assert mine[key] is value or mine[key] == value, (task.name, key)
    # lm-eval loads a task's helper module under its own name: ours use that very module.
    hellaswag_utils = sys.modules["lm_eval.tasks.hellaswag.utils"]
    wikitext_utils = sys.modules["lm_eval.tasks.wikitext.preprocess_wikitext"]
    assert loaded["harness_hellaswag"].config.process_docs is hellaswag_utils.process_docs
    assert loaded["harness_wikitext"].config.process_results is wikitext_utils.process_results


def test_schema_rules_reject_bad_rows() -> None:
    arc = get_task("arc_easy")
    good = {"id": "x", "question": "q", "answerKey": "B",
            "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    assert evals.row_problem(arc, good) is None
    assert "answerKey" in str(evals.row_problem(arc, {**good, "answerKey": "C"}))
    assert "misses field 'id'" in str(evals.row_problem(arc, {k: v for k, v in good.items()
                                                              if k != "id"}))
    bad_choices = {**good, "choices": {"text": ["a"], "label": ["A", "B"]}}
    assert "different lengths" in str(evals.row_problem(arc, bad_choices))
    piqa = get_task("piqa")
    assert "not an integer" in str(evals.row_problem(
        piqa, {"goal": "g", "sol1": "a", "sol2": "b", "label": "0"}))
    wino = get_task("winogrande")
    assert "blank" in str(evals.row_problem(
        wino, {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}))
    hella = get_task("hellaswag")
    row = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "ctx": "b c",
           "endings": ["x", "y"], "label": "2"}
    assert "does not index" in str(evals.row_problem(hella, row))
    with pytest.raises(UserError, match="1 of 2 rows"):
        evals.validate_rows(piqa, [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}, {}],
                            where="test")


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows in the format the path's suffix names, as HF caches and downloads hold them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".arrow":  # a `datasets` cache: the IPC stream format
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# Where the six datasets sit in a Hugging Face hub cache, a `datasets` cache or a download.
LAYOUT = {
    "wikitext": "hub/datasets--EleutherAI--wikitext_document_level/snapshots/a1/"
                "wikitext-2-raw-v1/wikitext-test.parquet",
    "lambada_openai": "download/lambada_openai/data/lambada_test.jsonl",
    "arc_easy": "datasets/allenai___ai2_arc/ARC-Easy/0.0.0/f00/ai2_arc-test.arrow",
    "hellaswag": "hub/datasets--Rowan--hellaswag/snapshots/b2/data/"
                 "validation-00000-of-00001.parquet",
    "piqa": "hub/datasets--baber--piqa/snapshots/c3/data/validation-00000-of-00001.parquet",
    "winogrande": "hub/datasets--allenai--winogrande/snapshots/d4/winogrande_xl/"
                  "validation-00000-of-00001.parquet",
}


@pytest.fixture()
def source(smoke_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "source"
    for name, rel in LAYOUT.items():
        _write(root / rel, rows_of(smoke_dir, name))
    # Decoys that must not be picked: other splits, configs and languages.
    _write(root / "download/lambada_openai/data/lambada_test_de.jsonl",
           rows_of(smoke_dir, "lambada_openai")[:3])
    _write(root / "hub/datasets--allenai--winogrande/snapshots/d4/winogrande_xs/"
                  "validation-00000-of-00001.parquet", rows_of(smoke_dir, "winogrande")[:3])
    _write(root / "datasets/allenai___ai2_arc/ARC-Challenge/0.0.0/f00/ai2_arc-test.arrow",
           rows_of(smoke_dir, "arc_easy")[:3])
    _write(root / "hub/datasets--Rowan--hellaswag/snapshots/b2/data/"
                  "train-00000-of-00001.parquet", rows_of(smoke_dir, "hellaswag")[:3])
    return root


def test_prepare_from_source_finds_each_dataset(source: Path, smoke_dir: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "evals"
    manifest = evals.prepare_from_source(out, source)
    assert manifest["kind"] == "source"
    for name, rel in LAYOUT.items():
        entry = manifest["tasks"][name]
        assert entry["source_file"] == str((source / rel).resolve())
        assert entry["docs"] == 24
        assert rows_of(out, name) == rows_of(smoke_dir, name)
    assert evals.verify(out) == []
    assert (out / evals.YAML_DIR / "harness_piqa.yaml").is_file()


def test_prepare_from_source_refuses_ambiguity_and_gaps(source: Path, smoke_dir: Path,
                                                        tmp_path: Path) -> None:
    other = source / "hub/datasets--baber--piqa/snapshots/zz/data/validation.jsonl"
    _write(other, rows_of(smoke_dir, "piqa")[:5])
    with pytest.raises(UserError, match="2 different candidate files for piqa"):
        evals.prepare_from_source(tmp_path / "a", source)
    # An explicit file settles it.
    manifest = evals.prepare_from_source(tmp_path / "b", source, {"piqa": other})
    assert manifest["tasks"]["piqa"]["docs"] == 5
    (source / LAYOUT["hellaswag"]).unlink()
    with pytest.raises(UserError, match="Rowan/hellaswag"):
        evals.prepare_from_source(tmp_path / "c", source, {"piqa": other})
    with pytest.raises(UserError, match="unknown eval task"):
        evals.prepare_from_source(tmp_path / "d", source, {"mmlu": other})


def test_a_wrong_schema_is_not_a_candidate(source: Path, tmp_path: Path) -> None:
    # Salesforce/wikitext (one line per row, field `text`) is not the document-level set.
    path = source / LAYOUT["wikitext"]
    _write(path, [{"text": " = Valkyria = \n"}])
    with pytest.raises(UserError, match="wikitext_document_level"):
        evals.prepare_from_source(tmp_path / "out", source)


def test_cli_prepares_smoke_and_source_sets(corpus: Path, source: Path,
                                            tmp_path: Path) -> None:
    env = {**os.environ, "HARNESS_DATA": str(tmp_path / "data")}
    for extra in (["--smoke", "--corpus", str(corpus), "--docs", "8"], ["--source", str(source)]):
        out = tmp_path / extra[0].strip("-")
        proc = subprocess.run([PYTHON, "-m", "harness", "data", "prepare", "evals",
                               "--out", str(out), *extra], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "OK:" in proc.stdout
        assert sorted(evals.read_manifest(out)["tasks"]) == sorted(TASK_NAMES)
    proc = subprocess.run([PYTHON, "-m", "harness", "data", "prepare", "evals", "--out",
                           str(tmp_path / "x"), "--source", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
