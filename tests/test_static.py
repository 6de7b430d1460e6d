"""Static checks: each rule fires, on the right line, on code that breaks it, and stays quiet
on a close legitimate variant. Pure AST: nothing here imports torch or runs a submission.

Cases are snippets appended to BASE, a minimal valid bitlinear region, and spliced into
the real template with a marker scanner written here (not harness.regions), so a finding's
line is checked against the spliced file the way `harness check` reports it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.checks.static import RULES, RegionText, check_spliced
from harness.errors import Finding
from harness.runtime.layout import BEGIN_MARKER, END_MARKER
from harness.task import load_task

TASK = load_task()
TEMPLATE = TASK.template_text()
DATA = Path(__file__).parent / "data"
FIXTURES = sorted(DATA.glob("seed001_*.py"))

BASE = '''\
def weight_quant(weight):
    return weight, 1.0


def activation_quant(x):
    return x, 1.0


class BitLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x):
        return F.linear(x, self.weight)
'''
SNIPPET_AT = (BASE + "\n").count("\n") + 1  # region line of a snippet's first line


def splice(edits: dict[str, str]) -> tuple[str, list[RegionText]]:
    """The template with each edited region's content replaced by its text."""
    lines = TEMPLATE.split("\n")
    out: list[str] = []
    regions: list[RegionText] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        begin = BEGIN_MARKER.match(lines[i])
        i += 1
        if begin:
            end = next(j for j in range(i, len(lines)) if END_MARKER.match(lines[j]))
            text = edits.get(begin["id"], "\n".join(lines[i:end]))
            regions.append(RegionText(begin["id"], text, len(out) + 1))
            out += text.split("\n")
            i = end
    return "\n".join(out), regions


def check(text: str, region: str = "bitlinear") -> tuple[list[Finding], int]:
    """Findings for region text, and the spliced line of the region's first line."""
    spliced, regions = splice({region: text})
    first = next(r.first_line for r in regions if r.id == region)
    return check_spliced(TASK, spliced, regions), first


def found(text: str, region: str = "bitlinear") -> set[tuple[str, int]]:
    """(rule, line within the region) of every finding."""
    findings, first = check(text, region)
    return {(f.rule, f.line - first + 1) for f in findings}


def snippet_found(snippet: str) -> set[tuple[str, int]]:
    """(rule, line within the snippet) of every finding for BASE + snippet."""
    return {(rule, line - SNIPPET_AT + 1) for rule, line in found(f"{BASE}\n{snippet}")}


# --- every rule: offending snippets (rule, code, line within the snippet) -------------------

FAILING: list[tuple[str, str, int]] = [
    # compile-disable: the evasions the brief lists, and a few more
    ("compile-disable", "@torch.compiler.disable\ndef f(x):\n    return x", 1),
    ("compile-disable", "@torch._dynamo.disable\ndef f(x):\n    return x", 1),
    ("compile-disable", "from torch._dynamo import disable as d", 1),
    ("compile-disable", "import torch._dynamo as d", 1),
    ("compile-disable", "from torch import compiler", 1),
    ("compile-disable", "c = torch.compiler\nc.disable", 1),
    ("compile-disable", 'x = getattr(torch, "compiler")', 1),
    ("compile-disable", 'x = hasattr(torch, "_dynamo")', 1),
    ("compile-disable", "def f(x):\n    torch._dynamo.graph_break()\n    return x", 2),
    ("compile-disable", "@torch.jit.ignore\ndef f(x):\n    return x", 1),
    ("compile-disable", "from torch.jit import unused", 1),
    ("compile-disable", "f = torch.compile(lambda x: x, disable=True)", 1),
    ("compile-disable", 'f = torch.compile(weight_quant, options={"cpp.cxx": "sh"})', 1),
    ("compile-disable", "class M(nn.Module):\n    def __init__(self):\n"
                        "        super().__init__()\n        self.compile()", 4),
    # import-allowlist
    ("import-allowlist", "import numpy", 1),
    ("import-allowlist", "import torch.utils.checkpoint", 1),
    ("import-allowlist", "from torch import _C", 1),
    ("import-allowlist", "from torch import *", 1),
    ("import-allowlist", "from . import helpers", 1),
    ("import-allowlist", "x = torch.cuda.is_available()", 1),
    ("import-allowlist", "x = torch._C._get_tracing_state()", 1),
    ("import-allowlist", "def f():\n    import json", 2),
    ("import-allowlist", "x = torch._assert", 1),
    # io
    ("io", 'x = open("/etc/passwd")', 1),
    ("io", "x = input()", 1),
    ("io", "print(1)", 1),
    ("io", "import pathlib", 1),
    ("io", 'torch.save({}, "ckpt.pt")', 1),
    ("io", "from torch import load", 1),
    ("io", 'x = os.listdir(".")', 1),
    ("io", 'x = torch.ones(2).numpy().tofile("w.bin")', 1),
    ("io", 'torch.os.system("ls")', 1),
    ("io", "def f(x):\n    with torch.autograd.profiler.profile() as p:\n        return x", 2),
    # process
    ("process", "import subprocess", 1),
    ("process", "import threading", 1),
    ("process", 'os.system("ls")', 1),
    ("process", "x = dist.get_rank()", 1),
    ("process", "x = torch.distributed.get_rank()", 1),
    ("process", "import torch.multiprocessing", 1),
    # network
    ("network", "import socket", 1),
    ("network", "import urllib.request", 1),
    ("network", "from http import client", 1),
    ("network", 'm = torch.hub.load("a/b", "c")', 1),
    # dynamic-code
    ("dynamic-code", 'x = eval("1")', 1),
    ("dynamic-code", 'exec("x = 1")', 1),
    ("dynamic-code", 'code = compile("1", "f", "eval")', 1),
    ("dynamic-code", 'm = __import__("os")', 1),
    ("dynamic-code", "import importlib", 1),
    ("dynamic-code", "def f(name):\n    return getattr(torch, name)", 2),
    ("dynamic-code", 'x = getattr(torch, "comp" + "iler")', 1),
    ("dynamic-code", 'setattr(torch.nn.functional, "lin" + "ear", None)', 1),
    ("dynamic-code", "import functools\nx = functools.reduce(getattr, ['nn'], torch)", 2),
    ("dynamic-code", 'T = type("T", (torch.Tensor,), {})', 1),
    ("dynamic-code", "import typing\nh = typing.get_type_hints(weight_quant)", 2),
    ("dynamic-code", "import typing\ng = typing.operator.attrgetter('x')", 2),
    ("dynamic-code", "from functools import singledispatch", 1),
    # introspection
    ("introspection", "g = globals()", 1),
    ("introspection", "d = dir()", 1),
    ("introspection", "import sys", 1),
    ("introspection", "x = sys.argv", 1),
    ("introspection", "import inspect", 1),
    ("introspection", "b = __builtins__", 1),
    ("introspection", "c = BitLinear.__class__", 1),
    ("introspection", "g = weight_quant.__globals__", 1),
    ("introspection", "s = object.__subclasses__()", 1),
    ("introspection", 'g = getattr(weight_quant, "__code__")', 1),
    ("introspection", "def f(gen):\n    return gen.gi_frame.f_back", 2),
    ("introspection", "bases = BitLinear.mro()", 1),
    ("introspection", "s = sys", 1),
    # allowed modules re-export dangerous ones, and numpy arrays carry ctypes
    ("introspection", "import typing\nm = typing.sys.modules", 2),
    ("introspection", "import dataclasses\no = dataclasses.builtins.open", 2),
    ("introspection", "import typing\nc = typing.types.CodeType", 2),
    ("introspection", "lib = torch.ctypes.CDLL(None)", 1),
    ("introspection", "def f(x):\n    return x.numpy().ctypes._ctypes", 2),
    ("import-allowlist", "a = F.np.load", 1),
    ("introspection", '__all__ = ["BitLinear"]', 1),
    ("introspection", "def f(__x__):\n    pass", 1),
    ("introspection", "class __Meta__:\n    pass", 1),
    ("introspection", "import math as __m__", 1),
    ("introspection", "class T(torch.Tensor):\n    def __torch_function__(cls):\n        pass",
     2),
    # module-assignment
    ("module-assignment", "torch.matmul = None", 1),
    ("module-assignment", "F.linear = None", 1),
    ("module-assignment", "torch.nn.functional.linear = None", 1),
    ("module-assignment", "del torch.matmul", 1),
    ("module-assignment", "torch.backends.cuda.matmul.allow_tf32 = False", 1),
    ("module-assignment", "F.__dict__['linear'] = None", 1),
    ("module-assignment", 'setattr(torch, "matmul", None)', 1),
    ("module-assignment", "t = torch", 1),
    ("module-assignment", "f = torch.nn.functional", 1),
    ("module-assignment", "def f(m):\n    return m\n\n\ng = f(F)", 5),
    ("module-assignment", "torch = None", 1),
    ("module-assignment", "import math as torch", 1),
    ("module-assignment", "LayerNorm.forward = None", 1),
    ("module-assignment", "from torch import Tensor\nTensor.item = None", 2),
    ("module-assignment", "T = torch.Tensor\nT.item = None", 2),
    ("module-assignment", "T: type = torch.Tensor\nT.item = None", 2),
    ("module-assignment", "T = (torch.Tensor,)\nT[0].item = None", 2),
    ("module-assignment", "for T in [nn.Module]:\n    T.train = None", 2),
    ("module-assignment", "match {}:\n    case {**os}:\n        pass", 2),
    ("module-assignment", "def f():\n    torch.manual_seed(0)", 2),
    ("module-assignment", "torch.set_default_dtype(torch.float64)", 1),
    ("module-assignment", "torch.nn.modules.module.register_module_forward_hook(None)", 1),
    ("module-assignment", "torch.optim.optimizer.register_optimizer_step_post_hook(None)", 1),
    # frozen-reference
    ("frozen-reference", "x = np.zeros(3)", 1),
    ("frozen-reference", "x = json.dumps({})", 1),
    ("frozen-reference", "x = time.time()", 1),
    ("frozen-reference", "m = GPT", 1),
    ("frozen-reference", "c = configure([])", 1),
    ("frozen-reference", "n = batch_size", 1),
    ("frozen-reference", "k = CONFIG_KEYS", 1),
    ("frozen-reference", 'OVERRIDABLE.add("n_layer")', 1),
    ("frozen-reference", "w = DDP", 1),
    ("frozen-reference", "c = CONFIG_OVERRIDES", 1),
    ("frozen-reference", "x = undefined_name", 1),
    ("frozen-reference", "@dataclass\nclass C:\n    bits: int = 8", 1),
    ("frozen-reference", "def get_lr(it):\n    return 0.0", 1),
    ("frozen-reference", "class LayerNorm(nn.Module):\n    pass", 1),
    # a local elsewhere does not make a frozen name readable here
    ("frozen-reference", "def a(write_json_atomic):\n    pass\n\n\n"
                         "def b():\n    write_json_atomic('final.json', {})", 6),
    # a comprehension's first iterable is evaluated outside the comprehension
    ("frozen-reference", "x = [np for np in np.arange(3)]", 1),
    # class attributes are invisible to the methods of the class
    ("frozen-reference", "class A:\n    np = 1\n\n    def f(self):\n        return np.pi", 5),
    # global-statement
    ("global-statement", "def f():\n    global counter\n    counter = 1", 2),
    ("global-statement", "global learning_rate", 1),
]

# --- every rule: legitimate close variants that must pass cleanly ----------------------------

PASSING: list[tuple[str, str]] = [
    ("compile-disable", "@torch.no_grad()\ndef f(x):\n    return x"),
    ("compile-disable", "def f(x, compiled=False):\n    return x if compiled else -x"),
    ("compile-disable", "class Q(torch.autograd.Function):\n    @staticmethod\n"
                        "    def forward(ctx, x):\n        return x.round()\n\n"
                        "    @staticmethod\n    def backward(ctx, g):\n        return g"),
    ("import-allowlist", "import math\nimport functools\nimport typing\nimport dataclasses"),
    ("import-allowlist", "import torch.nn.functional as F2\nfrom torch.autograd import Function"),
    ("import-allowlist", "from typing import Optional\nfrom functools import partial"),
    ("import-allowlist", "from torch import nn, Tensor\nimport torch.nn.init"),
    ("io", "def f(self, input):\n    return input"),
    ("io", "def f(ctx, w):\n    ctx.save_for_backward(w)\n    return ctx.saved_tensors"),
    ("io", "def f(self):\n    return self.load_state_dict"),
    ("io", "def f(x):\n    return x.detach().cpu().numpy().shape"),
    ("process", "def f(a, b):\n    dist = (a - b).abs()\n    return dist.sum()"),
    ("process", "def f(x, time):\n    return x * time"),
    ("network", "import torch.nn.init as init\nx = init.normal_"),
    ("dynamic-code", 'def f(m):\n    return getattr(m, "bias", None), hasattr(m, "weight")'),
    ("dynamic-code", "def f(x):\n    return type(x)"),
    ("dynamic-code", 'def f(self):\n    setattr(self, "scale", 1.0)'),
    ("dynamic-code", "def f(x, compile=False):\n    return compile"),
    ("introspection", "class A(nn.Module):\n    def __init__(self):\n"
                      "        super().__init__()\n        nn.Module.__init__(self)"),
    ("introspection", "def f(frame):\n    return frame.f_lasti"),
    ("module-assignment", "def f(self, w):\n    self.weight.data = w\n    self.cache = {}"),
    ("module-assignment", "CACHE = {}\n\n\ndef f(k, v):\n    CACHE[k] = v"),
    ("module-assignment", "Parameter = nn.Parameter\nfloat32 = torch.float32"),
    ("module-assignment", "def f(x):\n    y = torch.zeros(3)\n    y[0] = x\n    return y"),
    ("module-assignment", "import torch\nimport torch.nn as nn\nfrom torch import nn"),
    ("frozen-reference", "x = LayerNorm(4, bias=True)\ny = math.sqrt(2.0)"),
    ("frozen-reference", "from dataclasses import dataclass\n\n\n@dataclass\nclass C:\n"
                         "    bits: int = 8"),
    ("frozen-reference", "def f(batch_size, bias=True):\n    return batch_size, bias"),
    ("frozen-reference", "def f():\n    np = 1\n    return np"),
    ("frozen-reference", "x = [np for np in range(3)]"),
    ("frozen-reference", "def f():\n    [(np := 1) for _ in range(3)]\n    return np"),
    ("frozen-reference", "x = lambda np: np.pi"),
    ("frozen-reference", "def f(x):\n    return x[..., :2], {'k': x}['k']"),
    ("global-statement", "def f():\n    n = 0\n\n    def g():\n        nonlocal n\n"
                         "        n += 1\n    return g"),
]


@pytest.mark.parametrize(("rule", "snippet", "line"), FAILING)
def test_rule_fires_on_its_line(rule: str, snippet: str, line: int) -> None:
    assert (rule, line) in snippet_found(snippet)


@pytest.mark.parametrize(("rule", "snippet"), PASSING)
def test_legitimate_variant_is_clean(rule: str, snippet: str) -> None:
    assert snippet_found(snippet) == set()


def test_every_rule_has_failing_and_passing_cases() -> None:
    whole_region = {c[0] for c in WHOLE_FAILING} | {c[0] for c in CONFIG_FAILING}
    whole_passing = {c[0] for c in WHOLE_PASSING} | {"config-overrides"}
    assert {c[0] for c in FAILING} | whole_region == set(RULES)
    assert {c[0] for c in PASSING} | whole_passing == set(RULES)


def test_every_rule_has_a_one_sentence_description() -> None:
    for rule, text in RULES.items():
        assert text.endswith(".") and text.count(". ") == 0, rule


# --- whole-region cases: syntax, required-name, signature ----------------------------------

WHOLE_FAILING: list[tuple[str, str, int]] = [
    ("syntax", BASE + "def f(:\n    pass\n", SNIPPET_AT - 1),
    ("syntax", BASE + "x = (\n", SNIPPET_AT - 1),
    # Parses alone, but a __future__ import must open the file.
    ("syntax", "from __future__ import annotations\n" + BASE, 1),
    ("syntax", BASE + "x = " + "+".join(["1"] * 300) + "\n", SNIPPET_AT - 1),
    ("required-name", BASE.replace("def activation_quant", "def act_quant"), 1),
    ("required-name", BASE.replace("def forward", "def fwd"), 9),
    ("required-name", BASE.replace("class BitLinear", "class BitLinear2"), 1),
    ("required-name", BASE + "weight_quant = activation_quant\n", SNIPPET_AT - 1),
    ("required-name", BASE.replace("def weight_quant(weight):\n    return weight, 1.0",
                                   "if True:\n    def weight_quant(weight):\n"
                                   "        return weight, 1.0"), 2),
    ("required-name", BASE.replace("class BitLinear(nn.Module):",
                                   "BitLinear = nn.Linear\n\n\nclass Other(nn.Module):"), 9),
    ("required-name", BASE + "    forward = None\n", SNIPPET_AT - 1),
    ("signature", BASE.replace("weight_quant(weight)", "weight_quant(w)"), 1),
    ("signature", BASE.replace("def activation_quant(x)", "async def activation_quant(x)"), 5),
    ("signature", BASE.replace("bias=True)", "bias=False)"), 10),
    ("signature", BASE.replace("bias=True)", "bias=1)"), 10),
    ("signature", BASE.replace("weight_quant(weight)", "weight_quant(weight, bits)"), 1),
    ("signature", BASE.replace("bias=True)", "bias=True, *, dtype)"), 10),
    ("signature", BASE.replace("forward(self, x)", "forward(x, self)"), 14),
    ("signature", BASE.replace("forward(self, x)", "forward(self)"), 14),
    ("signature", BASE.replace("weight_quant(weight)", "weight_quant(weight, /)"), 1),
]

WHOLE_PASSING: list[tuple[str, str]] = [
    ("syntax", BASE),
    ("required-name", BASE + "\n\ndef helper(x):\n    return x\n"),
    ("signature", BASE.replace("bias=True)", "bias=True, dtype=None, *args, eps=1e-5, **kw)")
     .replace("weight_quant(weight)", "weight_quant(weight: torch.Tensor) -> tuple")),
]


@pytest.mark.parametrize(("rule", "text", "line"), WHOLE_FAILING)
def test_whole_region_rule_fires_on_its_line(rule: str, text: str, line: int) -> None:
    assert (rule, line) in found(text)


@pytest.mark.parametrize(("rule", "text"), WHOLE_PASSING)
def test_whole_region_variant_is_clean(rule: str, text: str) -> None:
    assert found(text) == set()


def test_a_syntax_error_hides_every_other_finding() -> None:
    assert found("import os\nprint(1)\nx = (\n") == {("syntax", 3)}


def test_a_region_that_only_fails_in_place_is_reported_in_the_file() -> None:
    findings, first = check("from __future__ import annotations\n" + BASE)
    assert [(f.rule, f.line) for f in findings] == [("syntax", first)]


def test_findings_are_sorted_and_carry_one_sentence() -> None:
    findings, _ = check(BASE + "\nimport os\nx = eval('1')\nprint(1)\n")
    assert findings == sorted(findings, key=lambda f: (f.line, f.col, f.rule))
    assert [f.rule for f in findings] == ["io", "dynamic-code", "io"]
    for f in findings:
        assert f.col >= 1 and "; " in f.message and "\n" not in f.message


def test_import_message_names_the_module_and_the_allowlist() -> None:
    findings, _ = check(BASE + "\nimport numpy\n")
    assert [f.message for f in findings] == [
        "imports numpy, which is not on the allowlist; use only torch, math, functools, "
        "typing and dataclasses (public, non-system parts of torch)"]


# --- config_overrides -----------------------------------------------------------------------

CONFIG_FAILING: list[tuple[str, str, int]] = [
    ("config-overrides", 'CONFIG_OVERRIDES = {\n    "n_layer": 2,\n}', 2),
    ("config-overrides", 'CONFIG_OVERRIDES = {"warmup_iters": True}', 1),
    ("config-overrides", 'CONFIG_OVERRIDES = {"warmup_iters": 100.0}', 1),
    ("config-overrides", 'CONFIG_OVERRIDES = {"learning_rate": 1.0}', 1),
    ("config-overrides", 'CONFIG_OVERRIDES = {"dropout": -0.1}', 1),
    ("config-overrides", 'CONFIG_OVERRIDES = {"learning_rate": "3e-4"}', 1),
    ("config-overrides", 'CONFIG_OVERRIDES = {"learning_rate": 1e-3 * 2}', 1),
    ("config-overrides", 'CONFIG_OVERRIDES = {"beta1": 0.9, "beta1": 0.95}', 1),
    ("config-overrides", "CONFIG_OVERRIDES = {**{}}", 1),
    ("config-overrides", "CONFIG_OVERRIDES = dict(beta1=0.9)", 1),
    ("config-overrides", "CONFIG_OVERRIDES: dict = {}", 1),
    ("config-overrides", "CONFIG_OVERRIDES = {}\nlearning_rate = 1.0", 2),
    ("config-overrides", "# nothing", 1),
    ("config-overrides", 'CONFIG_OVERRIDES = {"grad_clip": 1e999}', 1),
]

CONFIG_PASSING = [
    "CONFIG_OVERRIDES = {}",
    "# tuned on the smoke scale\nCONFIG_OVERRIDES = {\n    \"learning_rate\": 1e-3,  # higher\n"
    "    \"warmup_iters\": 100,\n    \"beta1\": 1 - 0.5 if False else 0.9,\n}",
    'CONFIG_OVERRIDES = {"beta2": 0.99, "weight_decay": 0, "min_lr": 0.0, "dropout": 0.5}',
]


@pytest.mark.parametrize(("rule", "text", "line"), CONFIG_FAILING)
def test_config_rule_fires_on_its_line(rule: str, text: str, line: int) -> None:
    assert (rule, line) in found(text, "config_overrides")


@pytest.mark.parametrize("text", [CONFIG_PASSING[0], CONFIG_PASSING[2]])
def test_config_variant_is_clean(text: str) -> None:
    assert found(text, "config_overrides") == set()


def test_config_expression_values_are_refused_but_comments_are_fine() -> None:
    assert found(CONFIG_PASSING[1], "config_overrides") == {("config-overrides", 5)}
    fine = CONFIG_PASSING[1].replace("1 - 0.5 if False else 0.9", "0.9")
    assert found(fine, "config_overrides") == set()


def test_unknown_override_lists_the_allowed_keys() -> None:
    findings, _ = check('CONFIG_OVERRIDES = {"n_layer": 2}', "config_overrides")
    (f,) = findings
    assert "'n_layer'" in f.message
    assert all(b.name in f.message for b in TASK.overrides)


def test_config_code_is_also_held_to_the_python_rules() -> None:
    assert found("import os\nCONFIG_OVERRIDES = {}", "config_overrides") == {
        ("io", 1), ("config-overrides", 2)}


# --- the template, the fixtures, robustness -------------------------------------------------


def test_unmodified_template_is_clean() -> None:
    spliced, regions = splice({})
    assert spliced == TEMPLATE
    assert check_spliced(TASK, spliced, regions) == []


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_seed001_fixtures_are_clean(path: Path) -> None:
    assert found(path.read_text(encoding="utf-8")) == set()


def test_there_are_three_fixtures() -> None:
    assert [p.stem for p in FIXTURES] == [
        "seed001_autograd", "seed001_per_channel", "seed001_per_tensor"]


@pytest.mark.parametrize("text", [
    "x = " + "-" * 5000 + "1",
    "x = " + "(" * 300 + ")" * 300,
    "x = 1\0",
    "\tdef f(): pass",
    "x = [" + "[" * 150 + "]" * 151,
])
def test_hostile_text_gives_a_syntax_finding_not_a_crash(text: str) -> None:
    assert {rule for rule, _ in found(text)} == {"syntax"}


def test_region_lines_that_do_not_match_the_file_degrade_without_crashing() -> None:
    spliced, regions = splice({})
    config = next(r for r in regions if r.id == "config_overrides")
    # Blanking the wrong line breaks a frozen statement; the check falls back to a full parse.
    shifted = [r if r is not config else RegionText(r.id, r.text, r.first_line - 3)
               for r in regions]
    assert all(f.rule in RULES for f in check_spliced(TASK, spliced, shifted))


def test_warnings_about_submitted_source_are_not_raised() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert found(BASE + '\nPATTERN = "\\d"\nX = 1if 1 else 2\n') == set()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([*"abx_ ()[]:.=\n\"'#@+-*/,019", "os", "torch", "getattr",
                                 "__class__", "def ", "lambda ", "import ", "global ", "for ",
                                 " in ", "    "]), max_size=40).map("".join))
def test_any_text_yields_findings_never_an_exception(text: str) -> None:
    findings, _ = check(BASE + text)
    assert all(isinstance(f, Finding) and f.rule in RULES for f in findings)
