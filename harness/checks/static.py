"""Static checks of a spliced submission, on its AST alone: nothing is imported or run.

Submissions are adversarial. Where it is practical the checks are allowlists (what may be
imported, which outside names a region may read); elsewhere they deny known escapes by
name (torch.compiler, __globals__, os.system, ...). Names are resolved with Python's own
scoping rules, so a parameter called `input` is fine while a bare `input()` is not, and a
local that merely shares a frozen name cannot unlock that name elsewhere. Every finding
is placed on a line of the spliced file.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from harness.errors import Finding
from harness.task import InterfaceItem, OverrideBound, TaskSpec

RULES: dict[str, str] = {
    "syntax": "The spliced file, and each region on its own, must parse as Python.",
    "required-name": (
        "The python region must define each interface name exactly once at top level "
        "(weight_quant and activation_quant as functions, BitLinear as a class with "
        "__init__ and forward)."
    ),
    "signature": (
        "Interface functions and methods must be plain defs whose leading positional "
        "parameters match the declared names and defaults, with defaults on any extras."
    ),
    "compile-disable": (
        "Region code may not call torch.compile itself nor reach torch.compiler, torch._dynamo, "
        "torch._inductor or their escapes (disable, allow_in_graph, graph_break, set_stance, "
        "torch.jit.ignore/unused)."
    ),
    "import-allowlist": (
        "Region code may import only torch, math, functools, typing, dataclasses and "
        "__future__, and may not reach torch's private or system submodules at all."
    ),
    "io": "Region code may not touch files or the console (open, input, print, os, pathlib, "
          "pickle, torch.save/load, ...).",
    "process": "Region code may not start processes or threads or talk to other ranks "
               "(subprocess, threading, os.system, torch.distributed, ...).",
    "network": "Region code may not use the network (socket, http, urllib, asyncio, "
               "torch.hub, ...).",
    "dynamic-code": (
        "Region code may not build code or attribute names at run time (eval, exec, compile, "
        "__import__, importlib, three-argument type, getattr with a computed name, ...)."
    ),
    "introspection": (
        "Region code may not inspect the interpreter (globals, vars, dir, sys, inspect, "
        "frames, mro, any dunder name or attribute other than __init__)."
    ),
    "module-assignment": (
        "Region code may not change modules or frozen objects: no assigning, deleting or "
        "setattr on their attributes, no global torch state setters, no rebinding a module "
        "name and no module used as a plain value."
    ),
    "frozen-reference": (
        "Region code may use only names it defines, safe builtins and its region's "
        "may_reference names, and may not rebind any other name of the frozen script."
    ),
    "global-statement": "Region code may not use global statements.",
    "config-overrides": (
        "The config region must be exactly CONFIG_OVERRIDES = {literal dict} with "
        "whitelisted keys whose values have the declared type and lie within bounds."
    ),
}


@dataclass(frozen=True)
class RegionText:
    id: str
    text: str  # region content, lines joined with "\n"
    first_line: int  # 1-based line of the region's first content line in the spliced file


# --- what is allowed and what is denied ---------------------------------------------------

# Deeper ASTs are refused: the checker recurses, and no honest quantizer nests this deep.
_MAX_DEPTH = 100

_ALLOWED_IMPORTS = ("torch.nn", "torch.autograd", "torch.amp", "torch.linalg", "torch.special",
                    "torch.fft", "math", "functools", "typing", "dataclasses", "__future__")
_ALLOWED_NAMES = "torch, math, functools, typing and dataclasses"


def _each(rule: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, rule)


# Module (or dotted prefix) -> rule, for imports and for attribute chains rooted at a module.
_MODULE_RULES: dict[str, str] = {
    **_each("compile-disable", "torch._dynamo", "torch.compiler", "torch._inductor"),
    **_each("process", "subprocess", "multiprocessing", "threading", "_thread", "concurrent",
            "signal", "pty", "atexit", "platform", "resource", "pydoc",
            "torch.multiprocessing", "torch.distributed"),
    **_each("network", "socket", "ssl", "http", "urllib", "urllib3", "ftplib", "smtplib",
            "poplib", "imaplib", "telnetlib", "socketserver", "xmlrpc", "webbrowser",
            "requests", "httpx", "aiohttp", "asyncio", "select", "selectors", "torch.hub"),
    **_each("io", "os", "posix", "nt", "io", "pathlib", "shutil", "tempfile", "glob", "pickle",
            "shelve", "sqlite3", "mmap", "fileinput", "dbm", "zipfile", "tarfile", "gzip",
            "bz2", "lzma", "posixpath", "ntpath", "genericpath", "codecs", "tokenize", "fcntl",
            "termios", "copyreg", "warnings", "logging", "torch.serialization", "torch.package",
            "torch.autograd.profiler", "torch.autograd.profiler_legacy",
            "torch.autograd.profiler_util"),
    **_each("introspection", "sys", "inspect", "gc", "ctypes", "_ctypes", "builtins", "types",
            "traceback", "dis", "pdb", "bdb", "faulthandler", "tracemalloc", "linecache",
            "weakref", "site"),
    **_each("dynamic-code", "importlib", "runpy", "pkgutil", "zipimport", "code", "codeop",
            "marshal", "operator", "unittest"),
    # System and internal parts of torch: no quantizer needs them, several run native code.
    **_each("import-allowlist", "torch._C", "torch.utils", "torch.library", "torch.ops",
            "torch.cuda", "torch.jit", "torch.fx", "torch.onnx", "torch.export",
            "torch.profiler", "torch.testing", "torch.classes", "torch.overrides",
            "torch.backends", "torch.mps", "torch.xpu", "torch.mtia", "torch.accelerator",
            "torch.cpp", "torch.monitor"),
}

# Builtins that are escapes in themselves (getattr & co. are fine with a constant name).
_BUILTIN_RULES: dict[str, str] = {
    **_each("io", "open", "input", "print"),
    **_each("dynamic-code", "eval", "exec", "compile", "__import__", "__build_class__",
            "getattr", "setattr", "delattr", "hasattr", "type"),
    **_each("introspection", "globals", "locals", "vars", "dir", "breakpoint", "help", "exit",
            "quit", "copyright", "credits", "license"),
}
_ATTR_BUILTINS = ("getattr", "hasattr", "setattr", "delattr")
# How those builtins may be used, for the message when they are used otherwise.
_BUILTIN_SUBJECTS = {
    **{name: f'{name} other than as {name}(obj, "name", ...)' for name in _ATTR_BUILTINS},
    "type": "type other than as type(obj)",
}

_SAFE_BUILTINS = frozenset({
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "classmethod", "complex", "dict", "divmod", "enumerate", "filter", "float", "format",
    "frozenset", "hash", "hex", "id", "int", "isinstance", "issubclass", "iter", "len",
    "list", "map", "max", "min", "next", "object", "oct", "ord", "pow", "property", "range",
    "repr", "reversed", "round", "set", "slice", "sorted", "staticmethod", "str", "sum",
    "super", "tuple", "zip", "NotImplemented", "Ellipsis", "ArithmeticError",
    "AssertionError", "AttributeError", "BaseException", "Exception", "FloatingPointError",
    "IndexError", "KeyError", "LookupError", "NotImplementedError", "OverflowError",
    "RuntimeError", "StopIteration", "TypeError", "ValueError", "ZeroDivisionError",
    "Warning", "UserWarning", "DeprecationWarning", "RuntimeWarning",
})

# Attribute names denied on any object, whatever it is bound to.
_FRAME_ATTRS = frozenset({"f_back", "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame",
                          "tb_next", "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame",
                          "ag_code", "_getframe", "mro"})
# A nested torch.compile (or Module.compile) takes backend and inductor options, some of
# which name programs to run; the frozen script compiles the model itself.
_COMPILE_ATTRS = frozenset({"compiler", "_dynamo", "disable", "_inductor", "allow_in_graph",
                            "graph_break", "set_stance", "compile"})
_JIT_ESCAPES = frozenset({"ignore", "unused"})
_IO_ATTRS = frozenset({"tofile", "dump", "from_file", "load_library", "export_chrome_trace",
                       "export_stacks", "export_memory_timeline"})
# Modules that allowed modules re-export as attributes (torch.os, typing.sys,
# dataclasses.builtins, F.np, ...) or that objects carry (ndarray.ctypes).
_MODULE_ATTRS = frozenset({"os", "sys", "ctypes", "_ctypes", "importlib", "inspect", "builtins",
                           "glob", "threading", "_thread", "platform", "operator", "np",
                           "warnings", "weakref", "types", "subprocess", "socket", "pickle",
                           "shutil", "pathlib", "gc", "cpp"})
# typing and functools.singledispatch evaluate string annotations; make_dataclass builds a
# class from a namespace dict.
_DYNAMIC_ATTRS = frozenset({"get_type_hints", "ForwardRef", "evaluate_forward_ref",
                            "make_dataclass", "singledispatch", "singledispatchmethod"})
# Denied only on attribute chains that start at a module.
_MODULE_IO_ATTRS = frozenset({"save", "load"})
_PROCESS_ATTR = re.compile(r"system|popen|fork|forkpty|kill|killpg|abort|_exit|startfile"
                           r"|(posix_)?spawn\w*|exec\w*")
# Setters of global torch state, and register_* functions of modules, which install hooks
# on every module or optimizer (torch.optim.optimizer.register_optimizer_step_post_hook).
_GLOBAL_STATE_ATTR = re.compile(r"set_\w+|manual_seed|seed|use_deterministic_algorithms"
                                r"|register_\w+")

_WHY = {
    "compile-disable": "escapes or steers torch.compile",
    "import-allowlist": "is not on the allowlist",
    "io": "can touch files or the console",
    "process": "can start processes or threads or talk to other ranks",
    "network": "can reach the network",
    "dynamic-code": "builds code or attribute names at run time",
    "introspection": "inspects or hooks into the interpreter",
}
_FIX = {
    "compile-disable": "remove it, since the model must compile as one graph",
    "import-allowlist": f"use only {_ALLOWED_NAMES} (public, non-system parts of torch)",
    "io": "remove it",
    "process": "remove it",
    "network": "remove it",
    "dynamic-code": "write the code or the attribute name out literally",
    "introspection": "use public, non-dunder APIs instead",
}

_Hit = tuple[str, str]  # (rule, subject), e.g. ("io", "torch.save")


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__") and name != "__init__"


def _attr_rule(attrs: Sequence[str]) -> _Hit | None:
    """Attribute names denied on any object, e.g. x.__class__ or torch.jit.ignore."""
    for i, attr in enumerate(attrs):
        if _is_dunder(attr) or attr in _FRAME_ATTRS:
            return "introspection", f"attribute {attr}"
        if attr in _COMPILE_ATTRS or (attr in _JIT_ESCAPES and i and attrs[i - 1] == "jit"):
            return "compile-disable", f"attribute {attr}"
        if attr in _MODULE_ATTRS:
            return _MODULE_RULES.get(attr, "import-allowlist"), f"attribute {attr} (a module)"
        if attr in _IO_ATTRS:
            return "io", f"attribute {attr}"
        if attr in _DYNAMIC_ATTRS:
            return "dynamic-code", f"attribute {attr}"
    return None


def _path_rule(path: str) -> _Hit | None:
    """Rules for a dotted path that starts at a module, e.g. os.system or torch.hub.load."""
    parts = path.split(".")
    if parts[0] in ("os", "posix", "nt") and len(parts) > 1 and _PROCESS_ATTR.fullmatch(parts[1]):
        return "process", ".".join(parts[:2])
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in _MODULE_RULES:
            return _MODULE_RULES[prefix], prefix
    tail = parts[1:]
    if any(p in _MODULE_IO_ATTRS for p in tail):
        return "io", path
    if any(p.startswith("_") and not p.startswith("__") for p in tail):
        return "import-allowlist", f"{path} (private)"
    if parts[0] == "torch" and any(_GLOBAL_STATE_ATTR.fullmatch(p) for p in tail):
        return "module-assignment", f"{path} (global torch state or hooks)"
    return None


def _import_allowed(module: str) -> bool:
    return module == "torch" or any(module == m or module.startswith(f"{m}.")
                                    for m in _ALLOWED_IMPORTS)


# --- scopes -------------------------------------------------------------------------------

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_SCOPE_OPENERS = (*_FUNCTIONS, ast.ClassDef, *_COMPREHENSIONS)
_Function = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
_Comprehension = ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp


@dataclass
class _Scope:
    kind: str  # "module" | "class" | "function" (lambdas and comprehensions included)
    bound: set[str] = field(default_factory=set)
    imports: dict[str, str] = field(default_factory=dict)  # name -> dotted path imported
    derived: set[str] = field(default_factory=set)  # names bound to a module attribute


def _params(args: ast.arguments) -> list[ast.arg]:
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]


def _outer_parts(node: ast.AST) -> list[ast.AST]:
    """The parts of a scope-opening node that run in the enclosing scope."""
    if isinstance(node, _FUNCTIONS):
        a = node.args
        parts: list[ast.AST] = [*a.defaults, *(d for d in a.kw_defaults if d is not None)]
        if not isinstance(node, ast.Lambda):
            parts += node.decorator_list
            parts += [p.annotation for p in _params(a) if p.annotation is not None]
            parts += [node.returns] if node.returns is not None else []
        return parts
    if isinstance(node, ast.ClassDef):
        return [*node.decorator_list, *node.bases, *node.keywords]
    if isinstance(node, _COMPREHENSIONS):
        return [node.generators[0].iter]  # the first iterable is evaluated outside
    return list(ast.iter_child_nodes(node))


def _inner_parts(node: ast.AST) -> list[ast.AST]:
    """The parts of a scope-opening node (or a module) that run in its own scope."""
    if isinstance(node, ast.Lambda):
        return [node.body]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
        return list(node.body)
    if isinstance(node, _COMPREHENSIONS):
        parts: list[ast.AST] = ([node.key, node.value] if isinstance(node, ast.DictComp)
                                else [node.elt])
        for i, gen in enumerate(node.generators):
            parts += [gen.target, *gen.ifs] + ([gen.iter] if i else [])
        return parts
    return []


def _own_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node evaluated in node's own scope, nested scope openers included."""
    stack = _inner_parts(node)
    while stack:
        child = stack.pop()
        yield child
        stack.extend(_outer_parts(child) if isinstance(child, _SCOPE_OPENERS)
                     else ast.iter_child_nodes(child))


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def _from_path(node: ast.ImportFrom, name: str) -> str:
    base = "." * node.level + (node.module or "")
    return f"{base}.{name}" if node.module else f"{base}{name}"


def _bindings(node: ast.AST) -> list[tuple[str, str | None]]:
    """Names that node binds in its scope, each with the dotted path it imports, if any."""
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        return [(node.id, None)]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [(node.name, None)]
    if isinstance(node, ast.Import):  # `import a.b` binds a; `import a.b as c` binds c
        return [(a.asname, a.name) if a.asname else (_top(a.name), _top(a.name))
                for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [(a.asname or a.name, _from_path(node, a.name)) for a in node.names
                if a.name != "*"]
    if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
        return [(node.name, None)]
    if isinstance(node, ast.MatchMapping) and node.rest:
        return [(node.rest, None)]
    return []


def _module_rooted(value: ast.AST | None, module_names: frozenset[str]) -> bool:
    """Whether value is, or holds in a literal container, an uncalled attribute chain of a
    module: torch.Tensor, (torch.Tensor,) or `a if c else nn.Module`."""
    if isinstance(value, (ast.Tuple, ast.List, ast.Set)):
        return any(_module_rooted(v, module_names) for v in value.elts)
    if isinstance(value, ast.Dict):
        return any(_module_rooted(v, module_names) for v in value.values)
    if isinstance(value, (ast.IfExp, ast.BoolOp, ast.Starred, ast.NamedExpr)):
        return any(_module_rooted(v, module_names) for v in ast.iter_child_nodes(value))
    while isinstance(value, (ast.Attribute, ast.Subscript)):
        value = value.value
    return isinstance(value, ast.Name) and value.id in module_names


def _targets(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]


def _derived_targets(node: ast.AST, module_names: frozenset[str]) -> list[str]:
    """Names bound to a module attribute, as in T = torch.Tensor or for T in (torch.Tensor,)."""
    if isinstance(node, ast.Assign) and _module_rooted(node.value, module_names):
        return [name for t in node.targets for name in _targets(t)]
    if isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and _module_rooted(node.value,
                                                                           module_names):
        return _targets(node.target)
    if isinstance(node, (ast.For, ast.AsyncFor)) and _module_rooted(node.iter, module_names):
        return _targets(node.target)
    return []


def _walrus_targets(comp: ast.AST) -> set[str]:
    """Walrus targets inside a comprehension: Python binds them in the enclosing scope."""
    found: set[str] = set()
    stack = list(ast.iter_child_nodes(comp))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
        if not isinstance(node, (*_FUNCTIONS, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return found


def _scope_of(node: ast.AST, kind: str, module_names: frozenset[str]) -> _Scope:
    scope = _Scope(kind)
    if isinstance(node, _FUNCTIONS):
        scope.bound.update(a.arg for a in _params(node.args))
    declared: set[str] = set()
    for child in _own_nodes(node):
        for name, path in _bindings(child):
            scope.bound.add(name)
            if path is not None:
                scope.imports[name] = path
        scope.derived.update(_derived_targets(child, module_names))
        if isinstance(child, (ast.Global, ast.Nonlocal)):
            declared.update(child.names)
        if isinstance(child, _COMPREHENSIONS):
            scope.bound.update(_walrus_targets(child))
    scope.bound -= declared
    return scope


# --- the region checker -------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What a region's checker knows about the rest of the spliced file."""

    may_reference: frozenset[str]
    others: frozenset[str]  # top-level names of the frozen part and of the other regions
    frozen_imports: dict[str, str]  # frozen name -> dotted path it imports
    known_modules: frozenset[str]  # dotted paths known to be modules
    module_names: frozenset[str]  # every name bound by an import anywhere in the file


@dataclass(frozen=True)
class _Ref:
    """How one name resolves at one place."""

    local: bool  # bound in an enclosing function scope: static, so exact
    own: bool  # bound by the region (function, class or module scope)
    path: str | None  # the dotted path, when an import binds it
    derived: bool  # bound to an attribute of a module (T = torch.Tensor)


def _pos(node: ast.AST) -> tuple[int, int]:
    return int(getattr(node, "lineno", 1)), int(getattr(node, "col_offset", 0)) + 1


def _show(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 60 else f"{text[:57]}..."


class _Checker(ast.NodeVisitor):
    """Walks one region with a stack of scopes and records findings."""

    def __init__(self, ctx: _Context, tree: ast.Module) -> None:
        self.ctx = ctx
        self.tree = tree
        self.findings: list[Finding] = []
        self.scopes = [_scope_of(tree, "module", ctx.module_names)]
        self.reimported: set[str] = set()  # frozen names the region imports again, unchanged
        allowed = ", ".join(sorted(ctx.may_reference))
        self.frozen_fix = ("region code may use only its own names, safe builtins"
                           + (f" and {allowed}" if allowed else ""))

    def run(self) -> list[Finding]:
        self._check_rebinding()
        for stmt in self.tree.body:
            self.visit(stmt)
        return self.findings

    # findings

    def _raw(self, node: ast.AST, rule: str, message: str) -> None:
        line, col = _pos(node)
        self.findings.append(Finding(rule, line, col, message))

    def _add(self, node: ast.AST, hit: _Hit, verb: str = "uses") -> None:
        rule, subject = hit
        if rule == "frozen-reference":
            self._raw(node, rule, f"{verb} {subject}; {self.frozen_fix}")
        elif rule == "module-assignment":
            self._raw(node, rule, f"{verb} {subject}, which the frozen script shares; keep "
                                  "changes on your own objects (self, locals, region names)")
        else:
            self._raw(node, rule, f"{verb} {subject}, which {_WHY[rule]}; {_FIX[rule]}")

    # name resolution

    def _lookup(self, name: str) -> _Ref:
        innermost = len(self.scopes) - 1
        for i in range(innermost, -1, -1):
            scope = self.scopes[i]
            # Class bodies are invisible to the functions nested in them.
            if (scope.kind == "class" and i != innermost) or name not in scope.bound:
                continue
            path = scope.imports.get(name)
            if scope.kind != "function":  # module and class scopes fall back to globals
                path = path or self.ctx.frozen_imports.get(name)
            return _Ref(scope.kind == "function", True, path, name in scope.derived)
        return _Ref(False, False, self.ctx.frozen_imports.get(name), False)

    def _is_builtin(self, name: str) -> bool:
        ref = self._lookup(name)
        return not ref.local and not ref.own

    def _name_hit(self, name: str, ref: _Ref) -> _Hit | None:
        if not ref.local and name in _BUILTIN_RULES:
            return _BUILTIN_RULES[name], _BUILTIN_SUBJECTS.get(name, name)
        if _is_dunder(name):
            return "introspection", name
        if ref.local or name in self.ctx.may_reference:
            return None
        if name in self.ctx.others and not (ref.own and name in self.reimported):
            path = self.ctx.frozen_imports.get(name)
            hit = _path_rule(path) if path else None
            if hit and hit[0] != "import-allowlist":
                return hit[0], name
            return "frozen-reference", f"{name}, a name defined outside this region"
        if ref.own or name in _SAFE_BUILTINS:
            return None
        return "frozen-reference", f"{name}, which is not defined in this region"

    def _name_use(self, node: ast.Name, ref: _Ref) -> bool:
        hit = self._name_hit(node.id, ref)
        if hit:
            self._add(node, hit)
        return hit is not None

    def _module_value(self, node: ast.AST, path: str | None) -> None:
        if path is not None and path in self.ctx.known_modules:
            self._raw(node, "module-assignment",
                      f"uses module {_show(node)} as a value, which lets other code change it; "
                      f"use it only as {_show(node)}.attribute")

    # top-level rebinding of frozen names

    def _check_rebinding(self) -> None:
        changed: set[str] = set()
        for child in _own_nodes(self.tree):
            for name, path in _bindings(child):
                frozen_path = self.ctx.frozen_imports.get(name)
                if name not in self.ctx.others:
                    continue
                if path is not None and path == frozen_path:
                    self.reimported.add(name)  # `import torch` again is harmless
                    continue
                changed.add(name)
                kind = "module name" if frozen_path else "name"
                rule = "module-assignment" if frozen_path else "frozen-reference"
                self._raw(child, rule, f"rebinds {name}, a {kind} of the frozen script, for "
                                       "the whole file; choose another name")
        self.reimported -= changed

    # names and attribute chains

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            if _is_dunder(node.id):
                self._add(node, ("introspection", node.id), verb="binds")
            return
        ref = self._lookup(node.id)
        if not self._name_use(node, ref):
            self._module_value(node, ref.path)

    def _const_attr(self, node: ast.AST, names: Sequence[str]) -> str | None:
        """The attribute name of getattr(x, "name")-style calls, else None."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in names and len(node.args) >= 2 and not node.keywords):
            return None
        name = node.args[1]
        if any(isinstance(a, ast.Starred) for a in node.args) or not (
                isinstance(name, ast.Constant) and isinstance(name.value, str)):
            return None
        return name.value if self._is_builtin(node.func.id) else None

    def _unwrap(self, node: ast.AST, through_items: bool
                ) -> tuple[ast.AST, list[str], list[ast.AST]]:
        """(root, attribute names, other expressions) of a.b.c, getattr(a, "b"), a[i].b."""
        attrs: list[str] = []
        extras: list[ast.AST] = []
        while True:
            if isinstance(node, ast.Attribute):
                attrs.append(node.attr)
                node = node.value
            elif through_items and isinstance(node, ast.Subscript):
                extras.append(node.slice)
                node = node.value
            elif isinstance(node, ast.Call) and (
                    name := self._const_attr(node, ("getattr", "hasattr"))):
                attrs.append(name)
                extras += node.args[2:]
                node = node.args[0]
            else:
                break
        attrs.reverse()
        return node, attrs, extras

    def _visit_root(self, root: ast.AST) -> _Ref | None:
        """Checks the root of a chain; a module there is fine, unlike a module as a value."""
        if isinstance(root, ast.Name):
            ref = self._lookup(root.id)
            self._name_use(root, ref)
            return ref
        self.visit(root)
        return None

    def _chain(self, node: ast.AST) -> None:
        root, attrs, extras = self._unwrap(node, through_items=False)
        for extra in extras:
            self.visit(extra)
        ref = self._lookup(root.id) if isinstance(root, ast.Name) else None
        path = ".".join([ref.path, *attrs]) if ref and ref.path else None
        hit = _attr_rule(attrs) or (_path_rule(path) if path else None)
        if hit:
            self._add(node, hit)
            if not isinstance(root, ast.Name):
                self.visit(root)
            return
        self._visit_root(root)
        self._module_value(node, path)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            self._chain(node)
        else:
            self._store(node, _show(node), *self._unwrap(node, through_items=True))

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, ast.Load):
            self.generic_visit(node)
        else:
            self._store(node, _show(node), *self._unwrap(node, through_items=True))

    def _store(self, node: ast.AST, shown: str, root: ast.AST, attrs: list[str],
               extras: list[ast.AST]) -> None:
        """An assignment to, or deletion of, an attribute or item rooted at root."""
        for extra in extras:
            self.visit(extra)
        hit = _attr_rule(attrs)
        if hit:
            self._add(node, hit, verb="assigns")
        ref = self._visit_root(root)
        if isinstance(root, ast.Name) and ref and self._protected(root.id, ref):
            self._add(node, ("module-assignment", f"{shown}, part of {root.id}"),
                      verb="assigns to or deletes")

    def _protected(self, name: str, ref: _Ref) -> bool:
        """Whether name is a module, a module attribute, or an object of the frozen part."""
        if ref.path is not None or ref.derived:
            return True
        return not ref.local and (name in self.ctx.others or name in self.ctx.may_reference)

    # calls

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) and self._is_builtin(func.id) else ""
        if self._const_attr(node, ("getattr", "hasattr")):
            self._chain(node)
        elif attr := self._const_attr(node, ("setattr", "delattr")):
            root, attrs, extras = self._unwrap(node.args[0], through_items=True)
            shown = f"{_show(node.args[0])}.{attr}"
            self._store(node, shown, root, [*attrs, attr], [*extras, *node.args[2:]])
        elif name in _ATTR_BUILTINS:
            self._add(node, ("dynamic-code", f"{name} with a computed attribute name"))
            for arg in [*node.args, *node.keywords]:
                if isinstance(arg, ast.Name):  # the object, not a module used as a value
                    self._visit_root(arg)
                else:
                    self.visit(arg)
        elif name == "type" and len(node.args) == 1 and not node.keywords:
            self.visit(node.args[0])  # type(x) only asks; three arguments make a class
        else:
            for kw in node.keywords:
                if kw.arg == "disable":
                    self._add(kw, ("compile-disable", "the keyword disable="), verb="passes")
            self.generic_visit(node)

    # scopes

    def _enter(self, node: ast.AST, kind: str) -> None:
        for part in _outer_parts(node):
            self.visit(part)
        self.scopes.append(_scope_of(node, kind, self.ctx.module_names))
        for part in _inner_parts(node):
            self.visit(part)
        self.scopes.pop()

    def _function(self, node: _Function) -> None:
        if not isinstance(node, ast.Lambda) and _is_dunder(node.name):
            self._add(node, ("introspection", node.name), verb="defines")
        for param in _params(node.args):
            if _is_dunder(param.arg):
                self._add(param, ("introspection", param.arg), verb="binds")
        self._enter(node, "function")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if _is_dunder(node.name):
            self._add(node, ("introspection", node.name), verb="defines")
        self._enter(node, "class")

    def _comprehension(self, node: _Comprehension) -> None:
        self._enter(node, "function")

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    # statements

    def visit_Global(self, node: ast.Global) -> None:
        self._raw(node, "global-statement",
                  f"declares {', '.join(node.names)} global, which lets a function rebind "
                  "names of the whole file; return values instead")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._import(node, alias, alias.name, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if node.level or alias.name == "*":
                what = "a relative import" if node.level else f"a star import from {node.module}"
                self._add(node, ("import-allowlist", what), verb="uses")
                continue
            module = node.module or ""
            self._import(node, alias, module, f"{module}.{alias.name}")

    def _import(self, node: ast.stmt, alias: ast.alias, module: str, path: str) -> None:
        if alias.asname and _is_dunder(alias.asname):
            self._add(node, ("introspection", alias.asname), verb="binds")
        hit = _attr_rule(path.split(".")[1:]) or _path_rule(path)
        if hit is None and not _import_allowed(module):
            hit = ("import-allowlist", module)
        if hit:  # name the imported path rather than the offending part of it
            self._add(node, (hit[0], path if hit[1].startswith("attribute") else hit[1]),
                      verb="imports")


# --- interface ----------------------------------------------------------------------------

_Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
_FunctionDef = ast.FunctionDef | ast.AsyncFunctionDef


def _sites(scope_node: ast.AST) -> dict[str, list[ast.AST]]:
    """Every binding of each name in scope_node's own scope, in source order."""
    sites: dict[str, list[ast.AST]] = {}
    for child in _own_nodes(scope_node):
        for name, _ in _bindings(child):
            sites.setdefault(name, []).append(child)
    for found in sites.values():
        found.sort(key=_pos)
    return sites


def _one_def(name: str, sites: list[ast.AST], body: list[ast.stmt], kind: str,
             anchor: ast.AST | tuple[int, int]) -> tuple[_Def | None, list[Finding]]:
    """The single top-level def/class that binds name, or the finding that says why not."""
    line, col = anchor if isinstance(anchor, tuple) else _pos(anchor)
    want = "class" if kind == "class" else "def"
    if not sites:
        return None, [Finding("required-name", line, col,
                              f"{name} is not defined; add a top-level {want} {name}")]
    if len(sites) > 1:
        line, col = _pos(sites[1])
        return None, [Finding("required-name", line, col,
                              f"binds {name} more than once; define it exactly once, as a {want}")]
    node = sites[0]
    types = (ast.ClassDef,) if kind == "class" else (ast.FunctionDef, ast.AsyncFunctionDef)
    if not isinstance(node, types) or not any(node is stmt for stmt in body):
        line, col = _pos(node)
        return None, [Finding("required-name", line, col,
                              f"binds {name} other than by a top-level {want}; define it "
                              f"with {want} {name} directly in its scope")]
    return node, []


def _defaults(params: list[ast.arg], defaults: list[ast.expr]) -> list[ast.expr | None]:
    return [None] * (len(params) - len(defaults)) + list(defaults)


def _dump(node: ast.expr | None) -> str:
    return "" if node is None else ast.dump(node)


def _signature_problem(qual: str, fn: _FunctionDef, declared: str) -> str | None:
    """What is wrong with fn's parameters against the declared "(a, b=1)", or None."""
    if isinstance(fn, ast.AsyncFunctionDef):
        return f"{qual} is an async def; make it a plain def {qual}{declared}"
    want_fn = ast.parse(f"def _f{declared}:\n    pass").body[0]
    assert isinstance(want_fn, ast.FunctionDef)
    want, have = want_fn.args, fn.args
    want_pos, have_pos = [*want.posonlyargs, *want.args], [*have.posonlyargs, *have.args]
    if [a.arg for a in have_pos[:len(want_pos)]] != [a.arg for a in want_pos]:
        return (f"{qual} takes ({ast.unparse(have)}) where the interface declares {declared}; "
                "start the parameters with exactly the declared ones")
    if have.posonlyargs:
        return (f"{qual} makes {have.posonlyargs[0].arg} positional-only, but the frozen "
                "script may pass it by keyword; remove the /")
    return _default_problem(qual, declared, want, have)


def _default_problem(qual: str, declared: str, want: ast.arguments, have: ast.arguments
                     ) -> str | None:
    """Declared parameters keep their exact defaults; every extra one has a default."""
    want_d, have_d = _defaults(want.args, want.defaults), _defaults(have.args, have.defaults)
    for param, w, h in zip(want.args, want_d, have_d, strict=False):
        if _dump(w) != _dump(h):  # ast.dump tells True from 1, unlike ==
            given = "no default" if h is None else f"the default {ast.unparse(h)}"
            return (f"{qual} gives {param.arg} {given} where the interface declares "
                    f"{declared}; use the declared default")
    extras = list(zip(have.args, have_d, strict=True))[len(want.args):]
    extras += list(zip(have.kwonlyargs, have.kw_defaults, strict=True))
    for param, default in extras:
        if default is None:
            return (f"{qual} adds parameter {param.arg} without a default; give it a "
                    "default or remove it")
    return None


def _check_signature(qual: str, fn: _FunctionDef, declared: str | None) -> list[Finding]:
    problem = _signature_problem(qual, fn, declared) if declared else None
    if problem is None:
        return []
    line, col = _pos(fn)
    return [Finding("signature", line, col, problem)]


def _check_item(item: InterfaceItem, module: ast.Module, anchor: tuple[int, int]
                ) -> list[Finding]:
    node, found = _one_def(item.name, _sites(module).get(item.name, []), module.body,
                           item.kind, anchor)
    if node is None:
        return found
    if not isinstance(node, ast.ClassDef):
        return _check_signature(item.name, node, item.signature)
    method_sites = _sites(node)
    for method, declared in item.methods:
        qual = f"{item.name}.{method}"
        fn, problems = _one_def(qual, method_sites.get(method, []), node.body, "function", node)
        if fn is not None and not isinstance(fn, ast.ClassDef):
            problems = _check_signature(qual, fn, declared)
        found += problems
    return found


def _check_interface(task: TaskSpec, trees: list[tuple[RegionText, ast.Module]]
                     ) -> list[Finding]:
    python = [(r, t) for r, t in trees if task.region(r.id).kind == "python"]
    if not python:
        return []
    # With several python regions the interface may live in any of them.
    module = ast.Module(body=[s for _, t in python for s in t.body], type_ignores=[])
    anchor = (python[0][0].first_line, 1)
    return [f for item in task.interface for f in _check_item(item, module, anchor)]


# --- config overrides ---------------------------------------------------------------------


def _config_finding(node: ast.AST, message: str) -> Finding:
    line, col = _pos(node)
    return Finding("config-overrides", line, col, message)


def _overrides_dict(tree: ast.Module, region: RegionText) -> ast.Dict | Finding:
    body = tree.body
    if len(body) != 1:
        where: ast.AST | None = body[1] if body else None
        message = ("the config region must hold exactly one statement, "
                   "CONFIG_OVERRIDES = {...}; remove the others" if where else
                   "the config region is empty; write CONFIG_OVERRIDES = {} at least")
        line, col = _pos(where) if where else (region.first_line, 1)
        return Finding("config-overrides", line, col, message)
    stmt = body[0]
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id == "CONFIG_OVERRIDES" and isinstance(stmt.value, ast.Dict)):
        return _config_finding(stmt, "the config region must be a plain assignment "
                                     "CONFIG_OVERRIDES = {...} of a dict literal; rewrite it so")
    return stmt.value


def _literal(node: ast.expr) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _check_value(bound: OverrideBound, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be {'an int' if bound.type == 'int' else 'a number'}"
    if bound.type == "int" and not isinstance(value, int):
        return "must be an int, not a float"
    if not bound.min <= value <= bound.max:
        return f"must lie within [{bound.min:g}, {bound.max:g}]"
    return None


def _check_entry(bounds: dict[str, OverrideBound], key: ast.expr | None, value: ast.expr,
                 seen: set[object]) -> str | None:
    if key is None:
        return "CONFIG_OVERRIDES may not unpack other dicts; write each key out"
    ok_k, k = _literal(key)
    ok_v, v = _literal(value)
    if not (ok_k and ok_v):
        return "CONFIG_OVERRIDES keys and values must be plain literals; write the number out"
    if not isinstance(k, str) or k not in bounds:
        return (f"CONFIG_OVERRIDES sets {k!r}, which may not be overridden; allowed keys: "
                f"{', '.join(sorted(bounds))}")
    if k in seen:
        return f"CONFIG_OVERRIDES sets {k!r} twice; keep one entry"
    seen.add(k)
    problem = _check_value(bounds[k], v)
    return f"CONFIG_OVERRIDES[{k!r}] = {v!r} {problem}; change the value" if problem else None


def _check_config(task: TaskSpec, tree: ast.Module, region: RegionText) -> list[Finding]:
    found = _overrides_dict(tree, region)
    if isinstance(found, Finding):
        return [found]
    bounds = {b.name: b for b in task.overrides}
    seen: set[object] = set()
    findings = []
    for key, value in zip(found.keys, found.values, strict=True):
        problem = _check_entry(bounds, key, value, seen)
        if problem:
            findings.append(_config_finding(key or value, problem))
    return findings


# --- parsing and the entry point ----------------------------------------------------------


def _too_deep(tree: ast.AST) -> ast.AST | None:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return node
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences warnings about submitted source (invalid escapes and the like): they are not
    findings, and under -W error they would turn into exceptions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _syntax_finding(e: Exception, first_line: int, what: str) -> Finding:
    if isinstance(e, SyntaxError):
        return Finding("syntax", (e.lineno or 1) + first_line - 1, e.offset or 1,
                       f"{what} does not parse ({e.msg}); fix the syntax here")
    return Finding("syntax", first_line, 1,
                   f"{what} cannot be parsed ({type(e).__name__}); simplify it")


def _parse_region(region: RegionText) -> ast.Module | Finding:
    """The region parsed on its own, with line numbers of the spliced file."""
    what = f"region {region.id}"
    try:
        with _quiet():
            tree = ast.parse(region.text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return _syntax_finding(e, region.first_line, what)
    ast.increment_lineno(tree, region.first_line - 1)
    deep = _too_deep(tree)
    if deep is not None:
        line, col = _pos(deep)
        return Finding("syntax", line, col, f"{what} nests deeper than {_MAX_DEPTH} levels; "
                                            "split the expression into smaller statements")
    return tree


def _compile_error(spliced: str) -> Finding | None:
    """Compiling (never running) also catches what parsing lets through, such as a
    __future__ import that no longer opens the file."""
    try:
        with _quiet():
            compile(spliced, "<spliced>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return _syntax_finding(e, 1, "the spliced file")
    return None


def _parse_all(spliced: str, regions: list[RegionText]
               ) -> list[tuple[RegionText, ast.Module]] | list[Finding]:
    trees: list[tuple[RegionText, ast.Module]] = []
    errors: list[Finding] = []
    for region in regions:
        tree = _parse_region(region)
        if isinstance(tree, Finding):
            errors.append(tree)
        else:
            trees.append((region, tree))
    if errors:  # a region's own error points closer to the cause than the file's
        return errors
    whole = _compile_error(spliced)
    return [whole] if whole else trees


@dataclass(frozen=True)
class _Frozen:
    """What the frozen part of the file binds at top level, and the modules it imports."""

    bound: frozenset[str]
    imports: dict[str, str]
    import_paths: frozenset[str]


def _import_paths(nodes: Iterable[ast.AST]) -> set[str]:
    """Every module named by an import statement, with its parent packages."""
    paths: set[str] = set()
    for node in nodes:
        for alias in node.names if isinstance(node, ast.Import) else ():
            parts = alias.name.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return paths


def _facts(module: ast.Module) -> _Frozen:
    scope = _scope_of(module, "module", frozenset())
    return _Frozen(frozenset(scope.bound), scope.imports, frozenset(_import_paths(module.body)))


@functools.lru_cache(maxsize=16)
def _frozen_facts(frozen_text: str) -> _Frozen | None:
    """Facts about the frozen part, cached: it is the same for every submission."""
    try:
        return _facts(ast.parse(frozen_text))
    except SyntaxError:  # a region that is a whole indented block cannot be blanked out
        return None


def _frozen(spliced: str, regions: list[RegionText]) -> _Frozen:
    """Facts about the spliced file outside every region."""
    lines = spliced.split("\n")
    spans = [(r.first_line, r.first_line + len(r.text.split("\n")) - 1) for r in regions]
    for first, last in spans:
        lines[first - 1:last] = [""] * (last - first + 1)  # blank, keeping line numbers
    facts = _frozen_facts("\n".join(lines))
    if facts is not None:
        return facts
    whole = ast.parse(spliced)  # slower: the statements that start outside every region
    body = [s for s in whole.body if not any(a <= s.lineno <= b for a, b in spans)]
    return _facts(ast.Module(body=body, type_ignores=[]))


def _context(task: TaskSpec, trees: list[tuple[RegionText, ast.Module]], region: RegionText,
             frozen: _Frozen) -> _Context:
    others = set(frozen.bound)
    module_names = set(frozen.imports)
    for other, tree in trees:
        scope = _scope_of(tree, "module", frozenset())
        module_names.update(scope.imports)
        if other is not region:
            others |= scope.bound
    known = {"torch", "torch.nn.functional", "torch.nn.init", *_ALLOWED_IMPORTS,
             *_MODULE_RULES, *frozen.import_paths,
             *(p for _, tree in trees for p in _import_paths(ast.walk(tree)))}
    return _Context(frozenset(task.region(region.id).may_reference), frozenset(others),
                    dict(frozen.imports), frozenset(known), frozenset(module_names))


def _check_region(ctx: _Context, tree: ast.Module) -> list[Finding]:
    try:
        return _Checker(ctx, tree).run()
    except RecursionError:  # _too_deep should prevent it; never let a submission crash us
        line, col = _pos(tree.body[0]) if tree.body else (1, 1)
        return [Finding("syntax", line, col, "the region nests too deeply to check; "
                                             "split it into smaller statements")]


def check_spliced(task: TaskSpec, spliced: str, regions: list[RegionText]) -> list[Finding]:
    """All findings, sorted by (line, col, rule). Empty list == clean."""
    parsed = _parse_all(spliced, regions)
    trees = [t for t in parsed if isinstance(t, tuple)]
    findings = [f for f in parsed if isinstance(f, Finding)]
    if not findings:
        frozen = _frozen(spliced, regions)
        for region, tree in trees:
            findings += _check_region(_context(task, trees, region, frozen), tree)
            if task.region(region.id).kind == "config":
                findings += _check_config(task, tree, region)
        findings += _check_interface(task, trees)
    return sorted(set(findings), key=lambda f: (f.line, f.col, f.rule, f.message))
