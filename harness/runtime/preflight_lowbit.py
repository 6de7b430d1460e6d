"""What the matmuls of each BitLinear really see, and how many weight levels that is.

Used by the pre-flight worker (never by the parent: it imports torch). The submission's own
weight_quant is not trusted: a torch function mode intercepts every matmul-like call while
a BitLinear's forward runs and keeps the operand that plays the weight. Two operands are
kept per call:

* any operand shaped like the layer's weight (or its transpose, or with as many elements):
  that is the weight, whatever the code did to it on the way;
* any operand computed from the layer's parameters and not from its input: a float side
  path (a LoRA-style adapter, an extra matrix) is weight too and must be low-bit as well.

Taint tracking (which tensors were computed from the input, which from parameters) follows
every torch call inside the layer, so the activation side of a matmul is never mistaken for
the weight side.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# Names of torch functions and Tensor methods that contract a weight with an activation.
MATMUL_NAMES = frozenset({
    "linear", "bilinear", "matmul", "__matmul__", "__rmatmul__", "__imatmul__", "mm", "bmm",
    "addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "mv", "addmv", "addmv_",
    "dot", "vdot", "inner", "einsum", "tensordot", "chain_matmul", "multi_dot", "vecdot",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "_scaled_mm",
})
MAX_LEVELS = 4
# Two values belong to one level when they differ by less than this fraction of their own
# magnitude: bf16 keeps 8 significant bits (~0.4%), so quantized values that went through
# bf16 or an STE sum stay within it, while even int2 levels sit 50% apart. The tolerance is
# never relative to the group's largest value: one huge outlier would then make every other
# float value "equal". Zero is a level of its own (STE sums give exact zeros).
LEVEL_RTOL = 1e-2
# Groups along in_features for per-group scales. No group may be smaller than the smallest:
# a group of 4 holds at most 4 values, float or not (a rank-4 adapter's rows, say).
GROUP_SIZES = (128, 64, 32)
MIN_GROUP = min(GROUP_SIZES)
# Big operands are analysed on a sample of rows: enough to count levels, and the full-size
# lm_head has 50,304 of them. The rows come from a seed: a fixed one in the pre-flight, a
# secret one in the in-run and checkpoint audits (lowbit_audit.py), so that no submission can
# keep float weights in rows it knows are never looked at.
MAX_ROWS = 256


@dataclass(frozen=True)
class Levels:
    """The coarsest scale granularity under which every group has at most MAX_LEVELS."""

    levels: int  # distinct values per group (the worst group), at `granularity`
    granularity: str  # "per-tensor", "per-row", "per-column", "per-group-64", ... or "none"
    nonfinite: int = 0
    counted_in: str = ""  # where a failure counted its distinct values: "row", "tensor"

    @property
    def ok(self) -> bool:
        return self.granularity != "none"

    @property
    def bits(self) -> float:
        return round(math.log2(self.levels), 2) if self.levels > 1 else 0.0


def _groups(w: torch.Tensor, granularity: str) -> torch.Tensor | None:
    """w (rows, cols) regrouped as (groups, members); None where it does not apply."""
    rows, cols = w.shape
    if granularity == "per-tensor":
        return w.reshape(1, -1)
    if granularity == "per-row":
        return w if cols >= MIN_GROUP else None
    if granularity == "per-column":
        return w.t() if rows >= MIN_GROUP else None
    size = int(granularity.rsplit("-", 1)[1])
    if cols % size or cols == size:  # cols == size is per-row already
        return None
    return w.reshape(rows * (cols // size), size)


def _keys(w: torch.Tensor) -> torch.Tensor:
    """Values mapped so that a fixed difference is a fixed relative difference: sign times
    (offset + log|v|), with zero at 0. The offset keeps every float64 log positive
    (the smallest subnormal is e^-745), so signs never interleave."""
    mag = w.abs()
    logs = torch.where(mag > 0, 1000.0 + mag.clamp_min(1e-320).log(), torch.zeros_like(mag))
    return torch.sign(w) * logs


def _cluster_stats(groups: torch.Tensor) -> tuple[int, bool]:
    """(most levels in a group, whether some level is wider than a rounding error)."""
    ordered = groups.sort(dim=1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered.diff(dim=1) > LEVEL_RTOL
    levels = int(starts.sum(dim=1).max())
    # Single linkage chains a continuum into one "level": measure each level's width too.
    where = torch.arange(ordered.shape[1], device=ordered.device).expand_as(ordered)
    first = torch.where(starts, where, torch.zeros_like(where)).cummax(dim=1).values
    width = ordered - ordered.gather(1, first)
    return levels, bool((width > 2 * LEVEL_RTOL).any())


def _distinct(groups: torch.Tensor) -> int:
    """Distinct values in the worst group, up to float noise: the number a failure quotes."""
    ordered = groups.sort(dim=1).values
    return int((ordered.diff(dim=1) > 1e-6).sum(dim=1).max()) + 1


GRANULARITIES = ("per-tensor", "per-row", "per-column",
                 *(f"per-group-{g}" for g in GROUP_SIZES))


def _fits(keys: torch.Tensor, granularity: str) -> int | None:
    """Levels per group at this granularity when at most MAX_LEVELS, else None."""
    groups = _groups(keys, granularity)
    if groups is None:
        return None
    levels, continuous = _cluster_stats(groups)
    return levels if levels <= MAX_LEVELS and not continuous else None


def count_levels(w: torch.Tensor) -> Levels:
    """Levels of a 2-D (out, in) operand after factoring out the coarsest workable scale."""
    w = w.detach().to(torch.float64)
    finite = torch.isfinite(w)
    nonfinite = int((~finite).sum())
    keys = _keys(torch.where(finite, w, torch.zeros_like(w)))
    # Every row-wise granularity contains the finest one that applies: when it fails and
    # per-column fails too, nothing can pass (this keeps float layers quick to refuse).
    rowwise = [g for g in GRANULARITIES if g != "per-column" and _groups(keys, g) is not None]
    if _fits(keys, rowwise[-1]) is not None or _fits(keys, "per-column") is not None:
        for gran in GRANULARITIES:
            levels = _fits(keys, gran)
            if levels is not None:
                return Levels(levels, gran, nonfinite)
    by_row = _groups(keys, "per-row") is not None
    counted = _distinct(keys if by_row else keys.reshape(1, -1))
    return Levels(counted, "none", nonfinite, "row" if by_row else "tensor")


# --- capture ------------------------------------------------------------------------------


@dataclass
class Operand:
    """One weight-side operand of one matmul-like call inside a BitLinear."""

    func: str
    shape: tuple[int, ...]
    values: torch.Tensor  # 2-D, (out, in) when the orientation is known
    weight_shaped: bool


@dataclass
class LayerCapture:
    matmuls: int = 0
    operands: list[Operand] = field(default_factory=list)


class _Taint:
    """Tensors derived from some source, by identity (ids are checked against weakrefs)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[torch.Tensor]] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: torch.Tensor) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t

    def clear(self) -> None:
        self._refs.clear()


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in a torch call's args, kwargs or result (nested tuples, lists, dicts)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _as_weight(t: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor | None:
    """t as an (out, in) matrix when it is the layer's weight in some layout, else None."""
    squeezed = tuple(s for s in t.shape if s != 1) or (1,)
    if squeezed == (out_f, in_f):
        return t.reshape(out_f, in_f)
    if squeezed == (in_f, out_f):
        return t.reshape(in_f, out_f).t()
    if t.numel() == out_f * in_f:
        return t.reshape(out_f, in_f)
    return None


def _sample_rows(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float64 copy of at most MAX_ROWS rows, drawn from `seed` (the same rows for every call
    of one capture), on the operand's own device: on a GPU the level count is a few sorts
    there, where on the CPU it cost seconds per audit. The generator is a private CPU one:
    no global random stream moves."""
    w = w.detach()
    if w.shape[0] > MAX_ROWS:
        pick = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))
        w = w.index_select(0, pick[:MAX_ROWS].sort().values.to(w.device))
    return w.to(dtype=torch.float64, copy=True)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(module).__name__}.weight is not a 2-D tensor")
    return int(weight.shape[0]), int(weight.shape[1])


def _is_vector(t: torch.Tensor) -> bool:
    return sum(1 for s in t.shape if s != 1) <= 1


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(-1, t.shape[-1])


class MatmulCapture(TorchFunctionMode):
    """Records weight-side matmul operands per BitLinear, attributed with module hooks."""

    def __init__(self, layers: dict[str, nn.Module], row_seed: int = 0) -> None:
        super().__init__()
        self.layers = layers
        self.row_seed = row_seed
        self.captured: dict[str, LayerCapture] = {name: LayerCapture() for name in layers}
        self._stack: list[str] = []
        self._from_input = _Taint()
        self._from_params = _Taint()
        self._handles: list[Any] = []

    # Module hooks say which BitLinear is running; the innermost one gets the matmuls.
    def attach(self) -> None:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def _enter(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            if not self._stack:
                self._from_input.clear()
                self._from_params.clear()
            self._stack.append(name)
            for t in _tensors(args):
                self._from_input.add(t)
            for p in module.parameters():
                self._from_params.add(p)
        return hook

    def _leave(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
        return hook

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._stack:
            return out
        inputs = _tensors((args, kwargs))
        name = getattr(func, "__name__", "")
        if name in MATMUL_NAMES:
            self._record(self._stack[-1], name, inputs)
        for taint in (self._from_input, self._from_params):
            if any(t in taint for t in inputs):
                for t in _tensors(out):
                    taint.add(t)
        return out

    def _record(self, layer: str, func: str, inputs: list[torch.Tensor]) -> None:
        out_f, in_f = weight_shape(self.layers[layer])
        cap = self.captured[layer]
        cap.matmuls += 1
        for t in inputs:
            from_x, from_params = t in self._from_input, t in self._from_params
            if t.dtype == torch.bool or (from_x and not from_params):
                continue  # the activation side
            # Weight-shaped counts even when it also drew on x: mixing the input into the
            # weight (w + 0 * x.sum()) must not hide it. Otherwise only operands made from
            # parameters alone are weight; constants (a fixed rotation, a buffer) are not.
            as_w = _as_weight(t, out_f, in_f)
            if as_w is None and (from_x or not from_params or _is_vector(t)):
                continue  # vectors are biases and scales, added or broadcast, not contracted
            values = _sample_rows(as_w if as_w is not None else _as_matrix(t), self.row_seed)
            cap.operands.append(Operand(func, tuple(t.shape), values, as_w is not None))


@contextmanager
def capturing(layers: dict[str, nn.Module], row_seed: int = 0) -> Iterator[MatmulCapture]:
    cap = MatmulCapture(layers, row_seed)
    cap.attach()
    try:
        with cap:
            yield cap
    finally:
        cap.detach()


@dataclass(frozen=True)
class Pass:
    """One captured forward: the mode it runs in, what it is called in a verdict, and the call."""

    mode: str  # "train" (with autograd) or "eval" (under no_grad)
    label: str  # "train", or "eval on 3x41 tokens": where a problem was seen
    forward: Callable[[], Any]


def capture_modes(model: nn.Module, layers: dict[str, nn.Module], forward: Callable[[], Any],
                  autocast: AbstractContextManager[Any] | None = None) -> list[LayerVerdict]:
    """Each layer's verdict in train() and eval(), as the template runs them: training with
    autograd, evaluation under no_grad. `forward()` runs the model once; its mode is restored."""
    return capture_passes(model, layers, [Pass("train", "train", forward),
                                          Pass("eval", "eval", forward)], autocast)


def capture_passes(model: nn.Module, layers: dict[str, nn.Module], passes: Sequence[Pass],
                   autocast: AbstractContextManager[Any] | None = None,
                   row_seed: int = 0) -> list[LayerVerdict]:
    """Each layer's verdict in each pass, judged as soon as the pass ends (its operand copies
    are freed before the next one). The model's mode is restored."""
    was_training = model.training
    verdicts: list[LayerVerdict] = []
    try:
        for p in passes:
            model.train(p.mode == "train")
            with capturing(layers, row_seed) as cap, torch.set_grad_enabled(p.mode == "train"), \
                    (autocast if autocast is not None else nullcontext()):
                p.forward()
            verdicts += [judge(name, p.label, c) for name, c in cap.captured.items()]
            del cap
    finally:
        model.train(was_training)
    return verdicts


# --- verdicts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerVerdict:
    layer: str
    mode: str
    levels: Levels | None  # the worst operand; None when no matmul saw the weight
    matmuls: int
    problem: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "matmuls": self.matmuls}
        if self.levels is not None:
            out.update(levels=self.levels.levels, granularity=self.levels.granularity,
                       bits=self.levels.bits)
        if self.problem:
            out["problem"] = self.problem
        return out


def judge(layer: str, mode: str, cap: LayerCapture) -> LayerVerdict:
    """The worst weight-side operand of a layer, with a one-line problem when it fails."""
    if not any(op.weight_shaped for op in cap.operands):
        return LayerVerdict(layer, mode, None, cap.matmuls,
                            f"no matmul saw this layer's weight ({cap.matmuls} matmul call(s) "
                            "in its forward, none with a weight-shaped operand)")
    worst: tuple[Operand, Levels] | None = None
    for op in cap.operands:
        lv = count_levels(op.values)
        if worst is None or _worse(lv, worst[1]):
            worst = (op, lv)
    assert worst is not None
    op, lv = worst
    if lv.ok:
        return LayerVerdict(layer, mode, lv, cap.matmuls)
    what = "its weight" if op.weight_shaped else f"a parameter-derived operand {list(op.shape)}"
    where = "per output row" if lv.counted_in == "row" else "in the whole operand"
    return LayerVerdict(layer, mode, lv, cap.matmuls,
                        f"{op.func}() received {what} with {lv.levels} distinct values {where} "
                        f"(at most {MAX_LEVELS} levels per tensor, row, column or group of "
                        f"{'/'.join(map(str, sorted(GROUP_SIZES)))} are allowed)")


def _worse(a: Levels, b: Levels) -> bool:
    if a.ok != b.ok:
        return not a.ok
    return a.levels > b.levels


def summarise(verdicts: Iterable[LayerVerdict]) -> str:
    """'3 levels (1.58 bits), per-tensor' over all passing layers, worst first."""
    found = [v.levels for v in verdicts if v.levels is not None and v.levels.ok]
    if not found:
        return "no layers"
    levels = max(lv.levels for lv in found)
    grans = sorted({lv.granularity for lv in found})
    bits = round(math.log2(levels), 2) if levels > 1 else 0.0
    unit = "bit" if bits == 1 else "bits"
    return f"at most {levels} levels ({bits:g} {unit}), scales {', '.join(grans)}"
