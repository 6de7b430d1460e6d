"""Run-time integrity: the torch functions and frozen template code a score depends on are the
ones we shipped, unmodified, when the submission's module has been imported and again before
every scoring.

The static checks refuse every known way for region code to patch a module; this is the layer
behind them, for what they miss. Two things are compared:

* a table of torch (and stdlib) callables the template and the scoring code rely on, taken in
  the stage process *before* the spliced module is imported: each must still be the same object
  with the same code (a swapped `__code__` counts as a change);
* every frozen function and method of the spliced template, as the module holds it at run
  time, against the code compiled from the file's own frozen text: rebinding `evaluate`,
  replacing `GPT.forward` or its `__code__` all show up.

Line numbers are not part of a fingerprint; the bytecode, names and constants are.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FunctionType, ModuleType
from typing import Any

# What the template's training, evaluation and checkpointing, and the eval stage's scoring,
# call. A submission that changes one of these changes how every score is computed.
GUARDED: tuple[str, ...] = (
    "torch.nn.functional.linear", "torch.nn.functional.cross_entropy",
    "torch.nn.functional.layer_norm", "torch.nn.functional.scaled_dot_product_attention",
    "torch.nn.functional.gelu", "torch.nn.functional.dropout", "torch.nn.functional.embedding",
    "torch.nn.functional.log_softmax", "torch.matmul", "torch.Tensor.__matmul__",
    "torch.Tensor.backward", "torch.Tensor.item", "torch.Tensor.float", "torch.Tensor.double",
    "torch.Tensor.sum", "torch.autograd.backward", "torch.nn.Module.__call__",
    "torch.nn.Module._call_impl", "torch.nn.Module.train", "torch.nn.Module.eval",
    "torch.nn.Module.state_dict", "torch.nn.Module.load_state_dict",
    "torch.nn.Module.parameters", "torch.nn.Module.named_parameters",
    "torch.nn.Embedding.forward", "torch.nn.GELU.forward", "torch.nn.Dropout.forward",
    "torch.nn.Linear.forward", "torch.optim.AdamW.step", "torch.optim.Optimizer.zero_grad",
    "torch.nn.utils.clip_grad_norm_", "torch.distributed.all_reduce",
    "torch.distributed.all_gather", "torch.save", "torch.load", "torch.compile",
    "torch.stack", "torch.from_numpy", "torch.multinomial", "torch.randint",
    "torch.manual_seed", "torch.isfinite", "json.dump", "json.dumps", "json.load",
    "os.replace", "os.makedirs", "builtins.open", "builtins.print", "math.isfinite",
    "math.exp",
)


def _digest(code: CodeType, h: Any) -> None:
    """Feed a code object's behaviour (not its line numbers) into the hash `h`."""
    h.update(code.co_code)
    for part in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        h.update(repr(part).encode())
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _digest(const, h)
        else:
            h.update(repr(const).encode())


def fingerprint(code: CodeType) -> str:
    h = hashlib.sha256()
    _digest(code, h)
    return h.hexdigest()


def _resolve(dotted: str) -> Any:
    """The object a dotted name refers to now: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _code_of(obj: Any) -> CodeType | None:
    code = getattr(obj, "__code__", None)
    return code if isinstance(code, CodeType) else None


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    code: str | None  # fingerprint of a Python function's code, None for builtins


class TorchTable:
    """The guarded callables as they were when the table was taken."""

    def __init__(self, names: Iterable[str] = GUARDED) -> None:
        self.entries: list[Entry] = []
        for name in names:
            obj = _resolve(name)
            code = _code_of(obj)
            self.entries.append(Entry(name, obj, fingerprint(code) if code else None))

    def changes(self) -> list[str]:
        """One line per guarded callable that is no longer what it was."""
        out = []
        for e in self.entries:
            try:
                now = _resolve(e.name)
            except (ImportError, AttributeError):
                out.append(f"{e.name} was removed")
                continue
            if now is not e.obj:
                # torch wraps some of its own functions lazily (an optimizer class's step on
                # first use, dynamo's wrappers on import): through such wrappers is the same.
                if _unwrap(now) is not e.obj and _unwrap(now) is not _unwrap(e.obj):
                    out.append(f"{e.name} was replaced")
                continue
            code = _code_of(now)
            if e.code is not None and (code is None or fingerprint(code) != e.code):
                out.append(f"{e.name} had its code replaced")
        return out


# --- the frozen template ------------------------------------------------------------------------

def _region_lines(source: str) -> set[int]:
    """Line numbers (1-based) inside editable regions, markers included."""
    from harness.runtime.layout import parse_layout

    layout = parse_layout(source, where="spliced file")
    lines: set[int] = set()
    for region in layout.regions:
        first, last = layout.span(region.id)
        lines.update(range(first - 1, last + 2))
    return lines


def _first_line(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    return min([node.lineno, *(d.lineno for d in node.decorator_list)])


def _code_consts(code: CodeType) -> Iterator[CodeType]:
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield const


@functools.cache  # verify() runs at every evaluation; the file never changes in a run
def frozen_code(source: str, filename: str) -> dict[str, str]:
    """'name' or 'Class.method' -> fingerprint, for every frozen top-level def and method."""
    tree = ast.parse(source)
    region = _region_lines(source)
    module = compile(source, filename, "exec")
    by_line = {(c.co_name, c.co_firstlineno): c for c in _code_consts(module)}
    out: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.lineno in region:
            continue
        if isinstance(node, ast.FunctionDef):
            out[node.name] = fingerprint(by_line[(node.name, _first_line(node))])
            continue
        body = by_line[(node.name, _first_line(node))]
        methods = {(c.co_name, c.co_firstlineno): c for c in _code_consts(body)}
        for item in node.body:
            if isinstance(item, ast.FunctionDef):
                out[f"{node.name}.{item.name}"] = fingerprint(
                    methods[(item.name, _first_line(item))])
    return out


@functools.cache
def _torch_dir() -> str:
    import torch

    return str(Path(torch.__file__).parent)


def _unwrap(fn: Any) -> Any:
    """Through torch's own decorators (torch.no_grad() keeps __wrapped__): the function itself.
    A wrapper whose code is not torch's is returned as it is, so it fails the comparison."""
    torch_dir = _torch_dir()
    for _ in range(10):
        inner, code = getattr(fn, "__wrapped__", None), _code_of(fn)
        if inner is None or code is None or not code.co_filename.startswith(torch_dir):
            return fn
        fn = inner
    return fn


def _runtime_object(module: ModuleType, qualname: str) -> Any:
    cls_name, _, method = qualname.partition(".")
    obj = module.__dict__.get(cls_name)
    if method:
        obj = vars(obj).get(method) if isinstance(obj, type) else None
    return obj


@functools.cache
def frozen_imports(source: str) -> dict[str, str]:
    """Name bound by a frozen top-level import -> the dotted object it binds."""
    region = _region_lines(source)
    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        if node.lineno in region:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    out[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    out[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def frozen_changes(module: ModuleType, source: str) -> list[str]:
    """One line per frozen function, method or import of the module that is not the file's."""
    out = []
    for name, dotted in frozen_imports(source).items():
        if name == "annotations":
            continue  # from __future__ import annotations binds a feature flag
        try:
            expected = _resolve(dotted)
        except (ImportError, AttributeError):
            expected = importlib.import_module(dotted)
        if module.__dict__.get(name) is not expected:
            out.append(f"frozen import {name} ({dotted}) was rebound")
    filename = getattr(module, "__file__", None) or "<spliced>"
    for qualname, expected in frozen_code(source, filename).items():
        obj = _unwrap(_runtime_object(module, qualname))
        if not isinstance(obj, FunctionType):
            out.append(f"frozen {qualname} is gone or is no function")
        elif fingerprint(obj.__code__) != expected:
            out.append(f"frozen {qualname} does not run the template's code")
    return out


class IntegrityError(Exception):
    """Frozen or torch code changed under the run: a rule violation, never a score."""


def verify(module: ModuleType, source: str, table: TorchTable, *, when: str) -> None:
    problems = table.changes() + frozen_changes(module, source)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise IntegrityError(f"integrity check {when}: {'; '.join(problems[:3])}{more}")


def source_of(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8")
