"""The eval-set format, as the lm-eval stage reads it: which six tasks, how a prepared
directory is laid out (`<task>/<split>.jsonl`, `tasks/harness_<task>.yaml`, `manifest.json`),
how it is verified against its manifest, and the lm-eval task YAMLs written on the machine
that scores. Building the sets (from source files or the smoke corpus) is host work, in
harness.data.evals.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.runtime.fileio import atomic_write_bytes, sha256_file

FORMAT = "harness-evalsets/1"
MANIFEST_NAME = "manifest.json"
YAML_DIR = "tasks"
TASK_PREFIX = "harness_"
# Our tasks carry their own tag: inheriting lm-eval's (e.g. `lambada`, `ai2_arc`) would
# replace those built-in tags in a TaskManager that indexes both directories.
TAG = "harness_evals"
_FIX_PREPARE = "prepare the eval sets again (`harness data prepare evals`)"


@dataclass(frozen=True)
class EvalTask:
    """One lm-eval task as we lay it out: which split it scores and what a document holds."""

    name: str  # lm-eval's task name
    yaml: str  # its definition, relative to lm_eval/tasks
    split: str  # the split lm-eval scores (test_split, else validation_split)
    fields: tuple[tuple[str, str], ...]  # required fields: (name, kind)
    hf_dataset: str
    hf_config: str | None
    full_docs: int  # documents in the full split
    path_pattern: str  # regex on a source file's lowercased path naming this dataset
    split_pattern: str  # regex on the same path naming the scored split
    exclude_pattern: str = r"(?!)"  # regex that rules a path out

    @property
    def harness_task(self) -> str:
        return TASK_PREFIX + self.name

    @property
    def rel_file(self) -> str:
        return f"{self.name}/{self.split}.jsonl"


_SPLIT_TEST = r"(^|[/_.-])test([/_.-]|$)"
_SPLIT_VAL = r"(^|[/_.-])(validation|valid|val|dev)([/_.-]|$)"

TASKS: tuple[EvalTask, ...] = (
    EvalTask("wikitext", "wikitext/wikitext.yaml", "test", (("page", "str"),),
             "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", 62,
             r"wikitext-2-raw-v1", _SPLIT_TEST),
    EvalTask("lambada_openai", "lambada/lambada_openai.yaml", "test", (("text", "str"),),
             "EleutherAI/lambada_openai", "default", 5153,
             r"lambada_openai|lambada-openai|lambada_test(_en)?\.jsonl$", _SPLIT_TEST,
             # The multilingual translations live beside the English set.
             r"(^|[/_.-])(de|es|fr|it)([/_.-]|$)"),
    EvalTask("arc_easy", "arc/arc_easy.yaml", "test",
             (("id", "str"), ("question", "str"), ("choices", "choices"),
              ("answerKey", "str")),
             "allenai/ai2_arc", "ARC-Easy", 2376, r"arc[-_]easy", _SPLIT_TEST),
    EvalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation",
             (("activity_label", "str"), ("ctx_a", "str"), ("ctx_b", "str"), ("ctx", "str"),
              ("endings", "str_list"), ("label", "label")),
             "Rowan/hellaswag", None, 10042, r"hellaswag", _SPLIT_VAL),
    EvalTask("piqa", "piqa/piqa.yaml", "validation",
             (("goal", "str"), ("sol1", "str"), ("sol2", "str"), ("label", "int")),
             "baber/piqa", None, 1838, r"piqa", _SPLIT_VAL),
    EvalTask("winogrande", "winogrande/default.yaml", "validation",
             (("sentence", "str"), ("option1", "str"), ("option2", "str"), ("answer", "str")),
             "allenai/winogrande", "winogrande_xl", 1267, r"winogrande", _SPLIT_VAL,
             r"winogrande_(xs|s|m|l|debiased)([/_.-]|$)"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)


# --- reading a prepared directory -------------------------------------------------------------

def read_manifest(evals_dir: Path) -> dict[str, Any]:
    """The manifest of a prepared eval-set directory, its structure checked."""
    path = Path(evals_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("no manifest.json: not a prepared eval-set directory",
                        where=str(evals_dir), fix=_FIX_PREPARE) from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the manifest: {e}", where=str(path),
                        fix=_FIX_PREPARE) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"not a {FORMAT} manifest", where=str(path), fix=_FIX_PREPARE)
    tasks = manifest.get("tasks")
    if not isinstance(tasks, dict) or sorted(tasks) != sorted(TASK_NAMES):
        raise UserError(f"the manifest must list exactly the tasks {', '.join(TASK_NAMES)}",
                        where=str(path), fix=_FIX_PREPARE)
    return manifest


def verify(evals_dir: Path) -> list[str]:
    """Re-hash every eval file against the manifest; the problems found (empty: all good)."""
    manifest = read_manifest(evals_dir)
    problems = []
    for name, entry in sorted(manifest["tasks"].items()):
        path = Path(evals_dir) / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 differs from the manifest ({name})")
    return problems


def manifest_sha256(evals_dir: Path) -> str:
    return sha256_file(Path(evals_dir) / MANIFEST_NAME)


def lm_eval_tasks_dir() -> Path | None:
    """lm-eval's installed task definitions, found without importing lm_eval (slow)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    return path if path.is_dir() else None


def task_yaml(task: EvalTask, data_file: Path, lm_eval_tasks: Path) -> dict[str, Any]:
    """Our task: lm-eval's definition, reading `data_file` as the only (scored) split."""
    return {
        "include": str(lm_eval_tasks / task.yaml),
        "task": task.harness_task,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data_file)}},
        "training_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
        # Few-shot examples would come from a training split these sets do not carry.
        "num_fewshot": 0,
    }


def write_task_yamls(evals_dir: Path, yaml_dir: Path,
                     manifest: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write one YAML per task into `yaml_dir` (JSON is YAML); returns task -> path."""
    tasks_dir = lm_eval_tasks_dir()
    if tasks_dir is None:
        raise UserError("lm-eval is not installed", fix="pip install 'lm-eval==0.4.13'")
    evals_dir = Path(evals_dir).resolve()
    manifest = manifest or read_manifest(evals_dir)
    written = {}
    for task in TASKS:
        entry = manifest["tasks"][task.name]
        config = task_yaml(task, evals_dir / entry["file"], tasks_dir)
        path = Path(yaml_dir) / f"{task.harness_task}.yaml"
        atomic_write_bytes(path, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        written[task.name] = path
    return written
