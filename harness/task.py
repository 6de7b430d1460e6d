"""task.toml and scales/*.toml -> frozen dataclasses, and `harness validate-task`."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO_ROOT / "tasks"
DEFAULT_TASK = "llm-pretrain-bitlinear"

@dataclass(frozen=True)
class RegionSpec:
    id: str
    file: str
    submission_file: str
    kind: str  # "python" (module-level code) or "config" (CONFIG_OVERRIDES literal)
    description: str
    may_reference: tuple[str, ...]
    documented_lines: tuple[int, int] | None = None


@dataclass(frozen=True)
class InterfaceItem:
    name: str
    kind: str  # "function" | "class"
    signature: str | None = None  # for functions, e.g. "(weight)"
    methods: tuple[tuple[str, str], ...] = ()  # for classes: (method, signature)
    returns: str = ""


@dataclass(frozen=True)
class OverrideBound:
    name: str
    type: str  # "int" | "float"
    min: float
    max: float


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: str  # "min" | "max"
    stage: str  # the stage it belongs to: where its curve is and where the report shows it
    label: str
    # The stage whose frozen code computes the official value; when it differs from `stage`,
    # `stage`'s own number must agree with it (harness/attempt.py, cross_check).
    scored_by: str = ""
    # Where its stage reads it; for an lm-eval metric, "lm-eval task/metric" (stages/lmeval.py).
    source: str = ""

    @property
    def scorer(self) -> str:
        return self.scored_by or self.stage

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "min" else a > b


# The template's seeds, frozen for submissions and set by every scale: the weights'
# initialisation (and dropout), and the order of the training batches.
SEED_KEYS = {"init": "init_seed", "data": "data_seed"}
# Most seeds one command may run (`--seeds`): each is a whole attempt.
MAX_SEEDS = 20


@dataclass(frozen=True)
class ScaleSpec:
    name: str
    description: str
    device: str
    nproc_per_node: int
    dataset: str
    stages: tuple[str, ...]
    timeout_s: int
    config: dict[str, Any] = field(hash=False, compare=False)
    path: Path = field(hash=False, compare=False, default=Path())
    # No progress (the template's progress file unchanged) for this long: the stage is
    # stopped as a failure of ours and resumed. 0: no stall watchdog.
    stall_timeout_s: int = 0
    # Seeds a session's final submission is run at (the test itself is the first); None:
    # the task's `final_seeds`.
    final_seeds: int | None = None
    # The template's own measured peak memory of one stage at this scale, in GiB (host RAM,
    # all its processes; docs/security.md names the measurement). 0: not measured, and then
    # no out-of-memory kill is charged (harness/runners/memory.py).
    peak_memory_gb: float = 0.0

    def cli_args(self) -> list[str]:
        """The scale's config as the template's --name=value arguments."""
        return [f"--{k}={_format_value(v)}" for k, v in self.config.items()]

    def seeds(self) -> dict[str, int]:
        """The run's seeds, by kind ("init", "data"), as the scale sets them."""
        return {kind: int(self.config[key]) for kind, key in SEED_KEYS.items()
                if key in self.config}

    def with_seeds(self, seeds: Mapping[str, int]) -> ScaleSpec:
        """The same scale with these seeds (kinds of SEED_KEYS) in place of its own."""
        return replace(self, config={**self.config,
                                     **{SEED_KEYS[k]: int(v) for k, v in seeds.items()}})

    def seed_run(self, k: int) -> ScaleSpec:
        """The scale at seed k of several (0: the scale itself): every seed moved by k."""
        return self.with_seeds({kind: v + k for kind, v in self.seeds().items()})


@dataclass(frozen=True)
class TaskSpec:
    name: str
    version: str
    title: str
    root: Path
    template: str
    frozen_files: tuple[str, ...]
    primary_metric: str
    test_budget: int
    stages: tuple[str, ...]
    default_scale: str
    regions: tuple[RegionSpec, ...]
    interface: tuple[InterfaceItem, ...]
    overrides: tuple[OverrideBound, ...]
    metrics: tuple[MetricSpec, ...]
    # Where pretrain's frozen code leaves the final checkpoint (relative to the attempt
    # folder), and the frozen script that scores it in the lm-eval stage.
    checkpoint: str = "pretrain/ckpt.pt"
    eval_script: str = "eval_lm.py"
    # Seeds of a session's final (the submitted test, then re-runs at its seeds + 1, + 2...),
    # unless the scale sets its own.
    final_seeds: int = 1

    def finals_at(self, scale: ScaleSpec) -> int:
        """How many seeds a final submission at `scale` is scored over."""
        return self.final_seeds if scale.final_seeds is None else scale.final_seeds

    @property
    def template_path(self) -> Path:
        return self.root / self.template

    def template_text(self) -> str:
        return self.template_path.read_text(encoding="utf-8")

    def region(self, region_id: str) -> RegionSpec:
        for r in self.regions:
            if r.id == region_id:
                return r
        raise UserError(f"no editable region {region_id!r}",
                        fix=f"use one of: {', '.join(r.id for r in self.regions)}")

    def metric(self, name: str) -> MetricSpec:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def scale_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "scales").glob("*.toml"))

    def scale(self, name: str) -> ScaleSpec:
        path = self.root / "scales" / f"{name}.toml"
        if not path.is_file():
            raise UserError(f"unknown scale {name!r} for task {self.name}",
                            fix=f"use one of: {', '.join(self.scale_names())}")
        return _parse_scale(path, _read_toml(path))


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"invalid TOML: {e}", where=str(path)) from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", where=str(path)) from None


class _Reader:
    """Typed access to one TOML table that names the file and key in every error."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise UserError(f"missing key {key!r}", where=self.where,
                                fix=f"add {key} = ... to the table")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            raise UserError(f"{key!r} has the wrong type ({type(value).__name__})",
                            where=self.where)
        return value

    def reject_unknown(self, known: set[str]) -> None:
        unknown = sorted(set(self.data) - known)
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(unknown)}", where=self.where,
                            fix=f"valid keys: {', '.join(sorted(known))}")


def _parse_scale(path: Path, data: dict[str, Any]) -> ScaleSpec:
    top = _Reader(data, str(path))
    top.reject_unknown({"scale", "config"})
    s = _Reader(top.get("scale", dict), f"{path} [scale]")
    s.reject_unknown({"name", "description", "device", "nproc_per_node", "dataset", "stages",
                      "timeout_s", "stall_timeout_s", "final_seeds", "peak_memory_gb"})
    name = s.get("name", str)
    if name != path.stem:
        raise UserError(f"scale name {name!r} differs from the file name {path.stem!r}",
                        where=str(path))
    device = s.get("device", str)
    if device not in ("cpu", "cuda"):
        raise UserError(f"device must be 'cpu' or 'cuda', not {device!r}", where=str(path))
    config = top.get("config", dict)
    for k, v in config.items():
        if not isinstance(v, (bool, int, float, str)):
            raise UserError(f"config value {k!r} must be a number, bool or string",
                            where=f"{path} [config]")
    return ScaleSpec(
        name=name, description=s.get("description", str), device=device,
        nproc_per_node=s.get("nproc_per_node", int), dataset=s.get("dataset", str),
        stages=tuple(s.get("stages", list)), timeout_s=s.get("timeout_s", int),
        config=dict(config), path=path, stall_timeout_s=s.get("stall_timeout_s", int, 0),
        final_seeds=_seed_count(s, None), peak_memory_gb=_peak_memory(s),
    )


def _peak_memory(r: _Reader) -> float:
    peak = float(r.get("peak_memory_gb", (int, float), 0.0))
    if not math.isfinite(peak) or peak < 0:
        raise UserError(f"peak_memory_gb = {peak}: a measured peak is a positive number of GiB",
                        where=r.where, fix="set it from a measurement, or leave it out (0: not "
                                           "measured, no out-of-memory kill is charged)")
    return peak


def _seed_count(r: _Reader, default: int | None) -> int | None:
    """`final_seeds` of a table: 1..MAX_SEEDS, each seed being a whole attempt."""
    n: int | None = r.get("final_seeds", int, default)
    if n is not None and not 1 <= n <= MAX_SEEDS:
        raise UserError(f"final_seeds = {n}: a final runs at 1 to {MAX_SEEDS} seeds",
                        where=r.where, fix="set final_seeds to 1 (the submitted test alone) "
                                           f"up to {MAX_SEEDS}")
    return n


def resolve_task_dir(task: str | Path) -> Path:
    """A task name under tasks/, or a path to a task folder."""
    p = Path(task)
    if (p / "task.toml").is_file():
        return p.resolve()
    named = TASKS_DIR / str(task)
    if (named / "task.toml").is_file():
        return named
    raise UserError(f"no task.toml in {task!r} and no task of that name",
                    fix=f"use a folder with a task.toml, or a name under {TASKS_DIR}")


def load_task(task: str | Path = DEFAULT_TASK) -> TaskSpec:
    root = resolve_task_dir(task)
    path = root / "task.toml"
    data = _read_toml(path)
    where = str(path)
    top = _Reader(data, where)
    top.reject_unknown({"task", "regions", "interface", "config_overrides", "metrics"})
    t = _Reader(top.get("task", dict), f"{where} [task]")
    t.reject_unknown({"name", "version", "title", "template", "frozen_files", "read_only_context",
                      "primary_metric", "test_budget", "stages", "default_scale", "checkpoint",
                      "eval_script", "final_seeds"})

    regions = []
    for i, raw in enumerate(top.get("regions", list)):
        r = _Reader(raw, f"{where} [[regions]] #{i + 1}")
        r.reject_unknown({"id", "file", "submission_file", "documented_lines", "kind",
                          "description", "may_reference"})
        doc = r.get("documented_lines", list, None)
        kind = r.get("kind", str)
        if kind not in ("python", "config"):
            raise UserError(f"region kind must be 'python' or 'config', not {kind!r}",
                            where=r.where)
        regions.append(RegionSpec(
            id=r.get("id", str), file=r.get("file", str),
            submission_file=r.get("submission_file", str), kind=kind,
            description=r.get("description", str, ""),
            may_reference=tuple(r.get("may_reference", list, [])),
            documented_lines=(int(doc[0]), int(doc[1])) if doc else None,
        ))

    interface = []
    for name, raw in top.get("interface", dict).items():
        it = _Reader(raw, f"{where} [interface.{name}]")
        it.reject_unknown({"kind", "signature", "methods", "returns"})
        methods = it.get("methods", dict, {})
        interface.append(InterfaceItem(
            name=name, kind=it.get("kind", str), signature=it.get("signature", str, None),
            methods=tuple((m, str(sig)) for m, sig in methods.items()),
            returns=it.get("returns", str, ""),
        ))

    overrides = []
    for name, raw in top.get("config_overrides", dict, {}).items():
        o = _Reader(raw, f"{where} [config_overrides.{name}]")
        o.reject_unknown({"type", "min", "max"})
        typ = o.get("type", str)
        if typ not in ("int", "float"):
            raise UserError(f"type must be 'int' or 'float', not {typ!r}", where=o.where)
        overrides.append(OverrideBound(name=name, type=typ, min=float(o.get("min", (int, float))),
                                       max=float(o.get("max", (int, float)))))

    metrics = []
    for name, raw in top.get("metrics", dict).items():
        m = _Reader(raw, f"{where} [metrics.{name}]")
        m.reject_unknown({"direction", "stage", "label", "scored_by", "source"})
        direction = m.get("direction", str)
        if direction not in ("min", "max"):
            raise UserError(f"direction must be 'min' or 'max', not {direction!r}", where=m.where)
        metrics.append(MetricSpec(name=name, direction=direction, stage=m.get("stage", str),
                                  label=m.get("label", str, name),
                                  scored_by=m.get("scored_by", str, ""),
                                  source=m.get("source", str, "")))

    return TaskSpec(
        name=t.get("name", str), version=t.get("version", str), title=t.get("title", str, ""),
        root=root, template=t.get("template", str),
        frozen_files=tuple(t.get("frozen_files", list)),
        primary_metric=t.get("primary_metric", str), test_budget=t.get("test_budget", int),
        stages=tuple(t.get("stages", list)), default_scale=t.get("default_scale", str),
        regions=tuple(regions), interface=tuple(interface), overrides=tuple(overrides),
        metrics=tuple(metrics), checkpoint=t.get("checkpoint", str, "pretrain/ckpt.pt"),
        eval_script=t.get("eval_script", str, "eval_lm.py"),
        final_seeds=_seed_count(t, 1) or 1,
    )
