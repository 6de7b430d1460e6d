"""`harness validate-task`: a task folder must agree with its own template."""

from __future__ import annotations

import ast
from pathlib import Path

from harness.attempt import STAGES
from harness.errors import UserError
from harness.task import TaskSpec, load_task


def template_config(template: str) -> tuple[set[str], set[str]]:
    """(config globals, OVERRIDABLE names) as the template's own source declares them.

    Config globals are the module-level simple assignments of bool/int/float/str
    constants, which is exactly what the template's CONFIG_KEYS collects at run time.
    """
    tree = ast.parse(template)
    keys: set[str] = set()
    overridable: set[str] = set()
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name == "OVERRIDABLE":
            overridable = set(ast.literal_eval(node.value))
        elif (isinstance(node.value, ast.Constant) and not name.startswith("_")
              and isinstance(node.value.value, (bool, int, float, str))):
            keys.add(name)
    return keys, overridable


def _check_regions(task: TaskSpec, template: str) -> list[str]:
    from harness.runtime.layout import parse_layout

    problems = []
    layout = parse_layout(template, where=str(task.template_path))
    declared = [r.id for r in task.regions]
    if list(layout.region_ids()) != declared:
        problems.append(f"template regions {list(layout.region_ids())} differ from task.toml "
                        f"regions {declared} (same ids, same order)")
        return problems
    for r in task.regions:
        if r.documented_lines and layout.span(r.id) != r.documented_lines:
            problems.append(f"region {r.id} spans lines {layout.span(r.id)}, task.toml documents "
                            f"{r.documented_lines}")
    return problems


def _check_scales(task: TaskSpec, keys: set[str]) -> list[str]:
    problems = []
    for name in task.scale_names():
        try:
            scale = task.scale(name)
        except UserError as e:
            problems.append(str(e))
            continue
        unknown = sorted(set(scale.config) - keys)
        if unknown:
            problems.append(f"scale {name}: config keys {unknown} are not template globals")
        bad = [s for s in scale.stages if s not in STAGES]
        if bad:
            problems.append(f"scale {name}: unknown stages {bad}")
    if task.default_scale not in task.scale_names():
        problems.append(f"default_scale {task.default_scale!r} has no scales/*.toml")
    return problems


def validate_task(task_ref: str | Path) -> tuple[list[str], TaskSpec]:
    task = load_task(task_ref)
    problems: list[str] = []
    for name in task.frozen_files:
        if not (task.root / name).is_file():
            problems.append(f"frozen file {name} is missing")
    if not task.template_path.is_file():
        return [*problems, f"template {task.template} is missing"], task
    template = task.template_text()
    problems += _check_regions(task, template)
    keys, overridable = template_config(template)
    problems += _check_scales(task, keys)
    missing = sorted({o.name for o in task.overrides} - overridable)
    if missing:
        problems.append(f"config_overrides {missing} are not in the template's OVERRIDABLE")
    if task.primary_metric not in {m.name for m in task.metrics}:
        problems.append(f"primary_metric {task.primary_metric!r} is not a declared metric")
    problems += [f"unknown stage {s!r}" for s in task.stages if s not in STAGES]
    problems += [p for s in task.stages if s in STAGES for p in STAGES[s].check(task)]
    if not problems:
        from harness.attempt import region_texts
        from harness.checks.static import check_spliced

        findings = check_spliced(task, template, region_texts(template))
        problems += [f"the template's own regions fail a static check: {f.render()}"
                     for f in findings]
    return problems, task
