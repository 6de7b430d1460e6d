"""The in-process pre-flight checks, run by the worker on the imported spliced template.

Every check builds what it needs from the template's own code (GPT, GPTConfig, BitLinear)
with a fixed seed, so checks are independent and repeatable. A check returns a Verdict;
an exception escaping it is classified by the worker (the submission's, ours, or memory).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from harness.runtime.preflight import PRODUCT_ERROR_BOUND, TINY_BATCH, TINY_MODEL, TINY_TOKENS
from harness.runtime.preflight_lowbit import LayerVerdict, capture_modes, summarise

MODULE_NAME = "preflight_submission"
_MEMORY_MARKERS = ("can't allocate memory", "not enough memory", "bad_alloc",
                   "Cannot allocate memory", "out of memory")
# The layer the interface check builds: out != in, so no orientation is ambiguous.
IN_F, OUT_F = 32, 48
# What weight_quant and activation_quant are given: N(0, 0.02) like the template's init,
# and unit-scale activations.
W_SHAPE, X_SHAPE = (96, 64), (2, 24, 64)
# Tokens of the input to each full-size layer: no dimension of any layer.
FULL_TOKENS = 16
# Loss of the compiled model against eager: aot_eager runs the same kernels, so only
# reassociation-level differences are expected.
COMPILE_RTOL = 1e-4
ONE_PATH_RTOL, ONE_PATH_ATOL = 1e-4, 1e-5


def is_memory_error(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(m in str(exc) for m in _MEMORY_MARKERS)


def describe(exc: BaseException, spliced: Path) -> tuple[str, bool]:
    """One line for an exception, with the spliced file's line when it passed through it;
    and whether it did (then the submission raised it, not the harness)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(spliced)]
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0][:240]}" if message else type(exc).__name__
    if frames:
        text += f" (line {frames[-1].lineno} of the spliced file)"
    return text, bool(frames)


@dataclass
class Verdict:
    status: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    module: ModuleType
    spliced: Path
    full_shapes: list[tuple[int, int]]

    @classmethod
    def load(cls, spliced: Path, full_shapes: list[tuple[int, int]]) -> Context:
        """Import the spliced file: its module-level code runs, main() does not."""
        spec = importlib.util.spec_from_file_location(MODULE_NAME, spliced)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {spliced}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module  # @dataclass looks its module up while it runs
        spec.loader.exec_module(module)
        return cls(module, spliced, full_shapes)

    @property
    def bitlinear(self) -> Any:
        return self.module.BitLinear

    def gpt(self) -> nn.Module:
        torch.manual_seed(0)
        model: nn.Module = self.module.GPT(self.module.GPTConfig(**TINY_MODEL))
        return model

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        vocab = int(TINY_MODEL["vocab_size"])
        tokens = torch.randint(0, vocab, (TINY_BATCH, TINY_TOKENS + 1), generator=g)
        return tokens[:, :-1], tokens[:, 1:]

    def bitlinears(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in model.named_modules() if isinstance(m, self.bitlinear)}

    def attempt(self, label: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        """fn()'s value, or a one-line problem naming what was attempted."""
        try:
            return fn(), None
        except Exception as exc:
            if is_memory_error(exc):
                raise
            return None, f"{label} raised {describe(exc, self.spliced)[0]}"


# --- interface ----------------------------------------------------------------------------


def _pair(name: str, parts: tuple[str, str], got: Any, like: torch.Tensor) -> str | None:
    """Why `got` is not a (quantized, scale) pair for an input like `like`, or None."""
    pair = f"({parts[0]}, {parts[1]}) tuple"
    if isinstance(got, torch.Tensor):
        return f"{name} returns a Tensor, not a {pair}"
    if not isinstance(got, (tuple, list)):
        return f"{name} returns {type(got).__name__}, not a {pair}"
    if len(got) != 2:
        return f"{name} returns a {type(got).__name__} of {len(got)}, not a {pair}"
    q, s = got
    if not isinstance(q, torch.Tensor):
        return f"{name}'s {parts[0]} is {type(q).__name__}, not a Tensor"
    if tuple(q.shape) != tuple(like.shape):
        return (f"{name}'s {parts[0]} has shape {list(q.shape)} for an input of shape "
                f"{list(like.shape)}")
    if not isinstance(s, (torch.Tensor, int, float)):
        return f"{name}'s {parts[1]} is {type(s).__name__}, not a Tensor or a number"
    return None


def _product(q: torch.Tensor, s: Any, kind: str) -> torch.Tensor | None:
    """q * s with the scale laid out as the quantizer meant it, or None if it cannot be."""
    q = q.detach().to(torch.float64)
    st = (s.detach() if isinstance(s, torch.Tensor) else torch.tensor(s)).to(torch.float64)
    if st.numel() == 1:
        return q * st.reshape(())
    if kind == "weight":
        rows, cols = q.shape
        # A 1-D scale of length out is per output channel, as the transcript's (out,) one.
        if st.numel() == rows:
            return q * st.reshape(rows, 1)
        if st.numel() == cols:
            return q * st.reshape(1, cols)
        if st.dim() == 2 and st.shape[0] == rows and cols % st.shape[1] == 0:
            return q * st.repeat_interleave(cols // st.shape[1], dim=1)
    elif st.numel() == q.numel() // q.shape[-1]:
        return q * st.reshape(*q.shape[:-1], 1)  # one scale per token
    try:
        p = q * st
    except RuntimeError:
        return None
    return p if p.shape == q.shape else None


def _errors(p: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(raw error, error after the best per-row scalar fit, the global fit factor)."""
    rows = p.numel() // p.shape[-1]
    p2 = p.reshape(rows, -1)
    r2 = ref.detach().to(torch.float64).reshape(rows, -1)
    norm = r2.norm().clamp_min(1e-30)
    raw = float((p2 - r2).norm() / norm)
    pp = (p2 * p2).sum(dim=1, keepdim=True)
    c = torch.where(pp > 0, (p2 * r2).sum(dim=1, keepdim=True) / pp.clamp_min(1e-300), 0.0)
    fitted = float((c * p2 - r2).norm() / norm)
    total = float((p2 * p2).sum())
    factor = float((p2 * r2).sum()) / total if total > 0 else 0.0
    return raw, fitted, factor


def _judge_product(name: str, parts: tuple[str, str], q: torch.Tensor, s: Any,
                   ref: torch.Tensor, kind: str, out: dict[str, Any]) -> tuple[str | None,
                                                                               str | None]:
    """(problem, warning) for one quantizer's product; its errors go into out."""
    p = _product(q, s, kind)
    if p is None:
        shape = list(s.shape) if isinstance(s, torch.Tensor) else []
        return None, (f"{name}'s {parts[1]} of shape {shape} cannot be combined with "
                      f"{parts[0]} of shape {list(q.shape)}; the product was not checked")
    raw, fitted, factor = _errors(p, ref)
    out[name] = {"error": round(raw, 4), "scale_invariant_error": round(fitted, 4)}
    product = f"{parts[0]} * {parts[1]}"
    if not (math.isfinite(raw) and math.isfinite(fitted)):
        return f"{name}: {product} is not finite", None
    if fitted > PRODUCT_ERROR_BOUND:
        return (f"{name}: {product} does not approximate its input (relative error "
                f"{fitted:.2f} even after the best per-row scale, bound "
                f"{PRODUCT_ERROR_BOUND})"), None
    if raw <= PRODUCT_ERROR_BOUND:
        return None, None
    times = f"about {1 / factor:.3g} times its input" if factor else "zero"
    alone, _, _ = _errors(q.detach().to(torch.float64), ref)
    if alone <= PRODUCT_ERROR_BOUND:
        return None, (f"{name}: {product} is {times} while {parts[0]} alone approximates "
                      f"the input (error {alone:.2f}): the scale seems applied twice")
    return None, (f"{name}: {product} is {times} (error {raw:.2f}; {fitted:.2f} after a "
                  "per-row fit): check how the scale is applied")


def _check_quantizers(ctx: Context, problems: list[str], warnings: list[str],
                      details: dict[str, Any]) -> None:
    torch.manual_seed(2)
    w = (torch.randn(*W_SHAPE) * 0.02).requires_grad_()
    x = torch.randn(*X_SHAPE)
    for name, parts, arg, kind in (
            ("weight_quant", ("quantized_weight", "scale"), w, "weight"),
            ("activation_quant", ("quantized_x", "scale"), x, "activation")):
        got, problem = ctx.attempt(f"{name}({list(arg.shape)})",
                                   functools.partial(getattr(ctx.module, name), arg))
        problem = problem or _pair(name, parts, got, arg)
        if problem:
            problems.append(problem)
            continue
        problem, warning = _judge_product(name, parts, got[0], got[1], arg, kind, details)
        problems += [problem] if problem else []
        warnings += [warning] if warning else []


def _check_layer(ctx: Context, bias: bool, problems: list[str]) -> None:
    label = f"BitLinear({IN_F}, {OUT_F}, bias={bias})"
    layer, problem = ctx.attempt(label, lambda: ctx.bitlinear(IN_F, OUT_F, bias=bias))
    if problem:
        problems.append(problem)
        return
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter):
        problems.append(f"{label}.weight is {type(weight).__name__}, not an nn.Parameter")
    elif tuple(weight.shape) != (OUT_F, IN_F):
        problems.append(f"{label}.weight has shape {list(weight.shape)}, expected "
                        f"[{OUT_F}, {IN_F}] (out_features, in_features)")
    for lead in ((5,), (2, 5), (2, 3, 5)):
        shape = (*lead, IN_F)
        y, problem = ctx.attempt(f"{label} on an input of shape {list(shape)}",
                                 functools.partial(layer, torch.randn(*shape)))
        if problem is None and not (isinstance(y, torch.Tensor)
                                    and tuple(y.shape) == (*lead, OUT_F)):
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            problem = (f"{label} maps an input of shape {list(shape)} to {got}, "
                       f"expected {[*lead, OUT_F]}")
        if problem:
            problems.append(problem)
            return


def _autocast_warning(ctx: Context) -> str | None:
    """The GPU run uses bf16 autocast: try it on CPU (a warning: CPU kernels differ)."""
    def run() -> None:
        layer = ctx.bitlinear(IN_F, OUT_F, bias=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(torch.randn(2, 5, IN_F))
        y.float().sum().backward()

    _, problem = ctx.attempt("forward and backward under torch.autocast(bfloat16) on CPU", run)
    return problem


def check_interface(ctx: Context) -> Verdict:
    problems: list[str] = []
    warnings: list[str] = []
    errors: dict[str, Any] = {}
    # The quantizers first: a wrong return type is the root cause of most layer failures.
    _check_quantizers(ctx, problems, warnings, errors)
    for bias in (True, False):
        _check_layer(ctx, bias, problems)
    if not problems:
        warning = _autocast_warning(ctx)
        warnings += [warning] if warning else []
    details = {"product_errors": errors, "problems": problems, "warnings": warnings}
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        return Verdict("fail", problems[0] + more, details)
    if warnings:
        return Verdict("warn", "; ".join(warnings), details)
    shown = ", ".join(f"{k} {v['scale_invariant_error']:.2f}" for k, v in errors.items())
    return Verdict("pass", f"shapes ok; product errors (scale-invariant): {shown}", details)


# --- low-bit ------------------------------------------------------------------------------


def _capture_gpt(ctx: Context) -> list[LayerVerdict]:
    model = ctx.gpt()
    layers = ctx.bitlinears(model)
    idx, tgt = ctx.batch()
    return capture_modes(model, layers, lambda: model(idx, tgt))


def _capture_full_size(ctx: Context) -> list[LayerVerdict]:
    verdicts = []
    for out_f, in_f in ctx.full_shapes:
        torch.manual_seed(3)
        layer = ctx.bitlinear(in_f, out_f, bias=False)
        name = f"BitLinear({in_f}, {out_f})"
        x = torch.randn(1, FULL_TOKENS, in_f)
        verdicts += capture_modes(layer, {name: layer}, functools.partial(layer, x))
        del layer
    return verdicts


def check_low_bit(ctx: Context) -> Verdict:
    tiny = _capture_gpt(ctx)
    full = _capture_full_size(ctx)
    verdicts = tiny + full
    layers: dict[str, dict[str, Any]] = {}
    for v in verdicts:
        layers.setdefault(v.layer, {})[v.mode] = v.summary()
    details = {"layers": layers, "summary": summarise(verdicts)}
    bad = [v for v in verdicts if v.problem]
    if bad:
        more = f" (and {len(bad) - 1} more layer/mode(s))" if len(bad) > 1 else ""
        v = bad[0]
        return Verdict("fail", f"{v.layer} in {v.mode}(): {v.problem}{more}", details)
    n_tiny = len({v.layer for v in tiny})
    n_full = len({v.layer for v in full})
    return Verdict("pass", f"{n_tiny} layers in train() and eval() + {n_full} full-size: "
                   f"{summarise(verdicts)}", details)


# --- one-path -----------------------------------------------------------------------------


def check_one_path(ctx: Context) -> Verdict:
    model = ctx.gpt()
    idx, _ = ctx.batch()
    model.train()
    # The same random stream for both passes: stochastic rounding is one path too.
    torch.manual_seed(4)
    y_train = model(idx)[0].detach()
    model.eval()
    torch.manual_seed(4)
    with torch.no_grad():
        y_eval = model(idx)[0]
    # NaN in the same places is the same output here; numerics and gradients judge NaN.
    same = torch.allclose(y_train, y_eval, rtol=ONE_PATH_RTOL, atol=ONE_PATH_ATOL,
                          equal_nan=True)
    diff = (y_train - y_eval).abs().nan_to_num(0.0)
    worst = float(diff.max()) if diff.numel() else 0.0
    details = {"max_abs_diff": worst, "max_abs_output": float(y_train.abs().nan_to_num(0).max())}
    if same:
        return Verdict("pass", f"train() and eval() outputs agree (max |diff| {worst:.2g})",
                       details)
    return Verdict("fail", f"train() and eval() give different outputs for the same input "
                   f"(max |diff| {worst:.3g}): the forward must take one path in both modes",
                   details)


# --- gradients ----------------------------------------------------------------------------


def _grad_problem(name: str, p: torch.Tensor) -> str | None:
    if p.grad is None:
        return f"{name} has no gradient"
    if not bool(torch.isfinite(p.grad).all()):
        return f"{name} has a non-finite gradient"
    if not bool((p.grad != 0).any()):
        return f"{name} has an all-zero gradient"
    return None


def check_gradients(ctx: Context) -> Verdict:
    model = ctx.gpt()
    idx, tgt = ctx.batch()
    model.train()
    _, loss = model(idx, tgt)
    loss.backward()
    problems, frozen, checked = [], [], 0
    for lname, layer in ctx.bitlinears(model).items():
        for pname, p in layer.named_parameters():
            full = f"{lname}.{pname}" if lname else pname
            if not p.requires_grad:
                frozen.append(full)  # a constant by choice: the optimizer skips it too
                continue
            checked += 1
            problem = _grad_problem(full, p)
            problems += [problem] if problem else []
    details = {"loss": float(loss), "checked": checked, "frozen": frozen, "problems": problems}
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Verdict("fail", f"{problems[0]} after one backward (loss {float(loss):.4g})"
                       f"{more}", details)
    note = f"; frozen (requires_grad=False): {', '.join(frozen)}" if frozen else ""
    return Verdict("pass", f"{checked} BitLinear parameters have finite, non-zero gradients"
                   f"{note}", details)


# --- compile ------------------------------------------------------------------------------


def _graph_breaks(ctx: Context, model: nn.Module, idx: torch.Tensor,
                  tgt: torch.Tensor) -> tuple[int, list[str]]:
    """Graph breaks as torch._dynamo.explain counts them, with the spliced file's lines."""
    import torch._dynamo

    torch._dynamo.reset()
    out = torch._dynamo.explain(model)(idx, tgt)
    reasons = []
    for r in out.break_reasons:
        lines = [f.lineno for f in r.user_stack if f.filename == str(ctx.spliced)]
        where = f" (line {lines[-1]} of the spliced file)" if lines else ""
        reasons.append(f"{str(r.reason).strip().splitlines()[0][:200]}{where}")
    return int(out.graph_break_count), reasons


def check_compile(ctx: Context) -> Verdict:
    """torch._dynamo.explain, then torch.compile(fullgraph=True) with the aot_eager backend.

    Dynamo's fullgraph tracing and AOTAutograd's joint forward/backward graph are what
    catch graph breaks and untraceable code; aot_eager then runs that graph with eager
    kernels, which is seconds on a CPU where inductor's code generation would take a
    minute. The GPU codegen is exercised on the device."""
    import torch._dynamo

    model = ctx.gpt()
    idx, tgt = ctx.batch()
    model.train()
    eager = float(model(idx, tgt)[1].detach())
    details: dict[str, Any] = {"eager_loss": eager}
    torch._dynamo.reset()
    try:
        _, loss = torch.compile(model, fullgraph=True, backend="aot_eager")(idx, tgt)
        loss.backward()
    except Exception as exc:
        if is_memory_error(exc):
            raise
        details["error"] = describe(exc, ctx.spliced)[0]
    # Counted after the compiled run, when dynamo is warm (about a second); fullgraph has
    # already refused any break, explain says how many there are and where.
    try:
        count, reasons = _graph_breaks(ctx, model, idx, tgt)
    except Exception as exc:
        if is_memory_error(exc):
            raise
        count, reasons = 0, []  # explain failed too: the compile error above says why
        details.setdefault("error", describe(exc, ctx.spliced)[0])
    finally:
        torch._dynamo.reset()
    details.update(graph_breaks=count, break_reasons=reasons)
    if count:
        return Verdict("fail", f"{count} graph break(s) under torch.compile: {reasons[0]}; "
                       "the model must compile as one graph", details)
    if "error" in details:
        return Verdict("fail", f"torch.compile(fullgraph=True) raised {details['error']}",
                       details)
    got = details["compiled_loss"] = float(loss.detach())
    if not (math.isclose(got, eager, rel_tol=COMPILE_RTOL, abs_tol=COMPILE_RTOL)
            or (math.isnan(got) and math.isnan(eager))):
        return Verdict("fail", f"compiled loss {got:.6g} differs from eager loss {eager:.6g}",
                       details)
    return Verdict("pass", f"0 graph breaks; compiled forward and backward, loss {got:.4f} "
                   "as in eager", details)


CHECKS: dict[str, Callable[[Context], Verdict]] = {
    "interface": check_interface,
    "low-bit": check_low_bit,
    "one-path": check_one_path,
    "gradients": check_gradients,
    "compile": check_compile,
}
