"""GPT-2 pretraining with a native low-bit linear layer (BitLinear).

One file in the spirit of nanoGPT: configuration as plain globals (any of them can be
set with --name=value), a GPT-2 whose every linear layer is a BitLinear, DDP under
torchrun, cosine learning rate with warmup. Only the text between the EDITABLE
REGION markers belongs to a submission; every other line is frozen.
"""

import ast
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)

# >>> EDITABLE REGION bitlinear >>>
# -- Native Low-Bit Linear (BitLinear) Module ---------------------------------
# Default: BitNet b1.58-style ternary weights with one absmean scale per tensor,
# and 8-bit activations with one absmax scale per token. Gradients reach the latent
# float weights through a straight-through estimator (STE); scales are constants.


def weight_quant(weight):
    """Ternary weights {-1, 0, +1} with a per-tensor absmean scale.

    Returns (quantized_weight, scale): quantized_weight holds only -1, 0 and +1
    in the forward pass, and quantized_weight * scale approximates weight.
    """
    scale = weight.detach().abs().mean().clamp(min=1e-5)
    w = weight / scale
    w_q = w.round().clamp(-1, 1)
    # STE: the forward value is w_q, the backward pass sees the identity.
    w_q = w + (w_q - w).detach()
    return w_q, scale


def activation_quant(x):
    """8-bit activations in [-128, 127] with a per-token absmax scale.

    Returns (quantized_x, scale): quantized_x holds integers in the forward pass,
    and quantized_x * scale approximates x.
    """
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127.0
    x_s = x / scale
    x_q = x_s.round().clamp(-128, 127)
    x_q = x_s + (x_q - x_s).detach()
    return x_q, scale


class BitLinear(nn.Module):
    """A drop-in replacement for nn.Linear that computes with low-bit weights.

    The float latent weight lives in self.weight (an nn.Parameter of shape
    (out_features, in_features)) and is only used to derive the quantized
    weight; the matmul itself always sees the quantized operands.
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x):
        w_q, w_scale = weight_quant(self.weight)
        x_q, x_scale = activation_quant(x)
        # Integer-valued operands in the matmul; both scales applied after it.
        y = F.linear(x_q, w_q.to(x_q.dtype))
        y = y * (x_scale * w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


# The contract, checked before any budget is spent (`harness check`):
#   * weight_quant(weight) -> (quantized_weight, scale), product ~= weight;
#   * activation_quant(x) -> (quantized_x, scale), product ~= x;
#   * BitLinear(in_features, out_features, bias=True) keeps self.weight as an
#     nn.Parameter of shape (out_features, in_features) and maps (..., in) to
#     (..., out) with at most 4 distinct weight levels per scale group;
#   * one code path for train() and eval(); compatible with torch.compile
#     (fullgraph, no graph breaks, no compiler.disable); imports: torch, math,
#     functools, typing, dataclasses. Helpers may be added above this comment.
# <<< EDITABLE REGION bitlinear <<<


# -----------------------------------------------------------------------------
# Configuration: plain globals. The scale passes --name=value for any of them;
# a submission may then change the whitelisted ones through CONFIG_OVERRIDES.
out_dir = "out"
data_dir = "data"
eval_interval = 1000  # iterations between validation passes
log_interval = 10
eval_iters = 20  # validation batches per rank in each pass (fixed windows)
save_checkpoint = True
init_seed = 42  # the weights' initialisation and dropout (plus the rank)
data_seed = 42  # the order of the training batches (plus the rank)
# model
n_layer = 24
n_head = 16
n_embd = 1024
block_size = 1024
vocab_size = 50304  # GPT-2's 50257 padded up for efficient matmuls
dropout = 0.0
bias = False
# optimisation
batch_size = 64  # micro-batch per process
gradient_accumulation_steps = 8  # in total, split over the processes
max_iters = 13535
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 700
lr_decay_iters = 0  # 0: decay over max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# system
device = "auto"  # auto: cuda when present, else cpu
dtype = "auto"  # auto: bfloat16 on cuda, float32 on cpu
compile = True
backend = "auto"  # auto: nccl on cuda, gloo on cpu
# checkpoints, resume and the divergence watchdog
checkpoint_interval = 0  # iterations between resume checkpoints (always one at the end); 0: end only
max_train_loss = 0.0  # a train loss above this (or not finite) ends the run as diverged; 0: finite only
resume_from = ""  # set by the harness: the resume checkpoint to continue from
resume_sha256 = ""  # ...and its sha256, checked before the file is loaded

CONFIG_KEYS = [k for k, v in list(globals().items())
               if not k.startswith("_") and isinstance(v, (bool, int, float, str))]
# What CONFIG_OVERRIDES may change; task.toml gives the bounds, this is the backstop.
OVERRIDABLE = {"learning_rate", "min_lr", "warmup_iters", "weight_decay", "beta1",
               "beta2", "grad_clip", "dropout"}

# >>> EDITABLE REGION config_overrides >>>
CONFIG_OVERRIDES = {}
# <<< EDITABLE REGION config_overrides <<<

# Set by the harness's stage launcher (harness/runtime/guard.py), which imports this file,
# checks it and calls run(): called on every rank at every iteration with the uncompiled
# model, this rank's next batch and whether an evaluation follows. It audits before each
# evaluation and at a few steps between them that it draws in secret (elsewhere it returns at
# once), and raises to end the run when frozen or torch code was changed or a matmul saw a
# full-precision weight. An audit leaves the run as it was (random streams included). None
# when the file is run directly.
RUN_AUDIT = None


class ConfigError(Exception):
    """A bad --name=value or CONFIG_OVERRIDES entry: one line, exit code 2."""


class ResumeError(Exception):
    """The resume checkpoint cannot be trusted or does not fit this run: one line, exit 2."""


class Diverged(Exception):
    """The train loss left the bounds the scale sets: the submission's doing, exit code 4."""


def _coerce(key, raw, default):
    if isinstance(default, bool):
        if raw in ("True", "true", "1"):
            return True
        if raw in ("False", "false", "0"):
            return False
        raise ConfigError(f"--{key} takes true or false, not {raw!r}")
    if isinstance(default, (int, float)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--{key} takes a number, not {raw!r}") from None
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"--{key} takes an integer, not {raw!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"--{key} takes a number, not {raw!r}")
        return type(default)(value)
    return raw


def configure(argv):
    """Apply --name=value arguments, then CONFIG_OVERRIDES, to the globals."""
    g = globals()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --name=value, got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown setting --{key}; known: {', '.join(sorted(CONFIG_KEYS))}")
        g[key] = _coerce(key, raw, g[key])
    if not isinstance(CONFIG_OVERRIDES, dict):
        raise ConfigError("CONFIG_OVERRIDES must be a dict")
    for key, value in CONFIG_OVERRIDES.items():
        if key not in OVERRIDABLE:
            raise ConfigError(f"CONFIG_OVERRIDES may not set {key!r}; allowed: {sorted(OVERRIDABLE)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"CONFIG_OVERRIDES[{key!r}] must be a number")
        g[key] = type(g[key])(value)
    return {k: g[k] for k in CONFIG_KEYS}


# -----------------------------------------------------------------------------
# The model: GPT-2 with every linear layer a BitLinear.

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = BitLinear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = BitLinear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = BitLinear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = BitLinear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = BitLinear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the embedding reads the latent weight, the head quantizes it.
        self.transformer.wte.weight = self.lm_head.weight
        # The same initialisation for every submission: N(0, 0.02) for embeddings and
        # BitLinear weights, residual projections scaled down by depth (GPT-2).
        for name, module in self.named_modules():
            if isinstance(module, (BitLinear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj") else 0.02
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    torch.nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.config.block_size, f"sequence of {t} > block_size {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


# -----------------------------------------------------------------------------
# Data: uint16 token shards described by a manifest.json (harness data prepare).

MANIFEST_FORMAT = "harness-token-shards/1"


class DataError(Exception):
    """The data directory cannot be trained on: one line, exit code 2."""


def shard_sha256(file):
    # Every byte is re-hashed before training: a flipped bit keeps the size but would
    # silently train on other tokens. About 10 s for the 14 GB of the full corpus.
    import hashlib  # here, not at the top: the BitLinear region's line numbers are documented

    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def load_split(root, split, model_vocab):
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        raise DataError(f"no manifest.json in {root}: prepare the data with `harness data prepare`")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    tok = manifest.get("tokenizer", {})
    if tok.get("name") != "gpt2" or tok.get("dtype") != "uint16" or tok.get("vocab_size", 1 << 30) > model_vocab:
        raise DataError(f"{path}: tokenizer {tok.get('name')!r} (vocab {tok.get('vocab_size')}) "
                        f"does not match this model (gpt2, vocab <= {model_vocab}, uint16)")
    shards = []
    for entry in manifest.get("splits", {}).get(split, []):
        file = os.path.join(root, entry["file"])
        size = os.path.getsize(file) if os.path.exists(file) else -1
        if size != 2 * entry["tokens"]:
            raise DataError(f"{file}: {size} bytes on disk, manifest says {entry['tokens']} tokens "
                            f"({2 * entry['tokens']} bytes); the shard is truncated or replaced")
        if shard_sha256(file) != entry.get("sha256"):
            raise DataError(f"{file}: sha256 differs from the manifest's; the shard is corrupted "
                            f"or replaced (re-run `harness data prepare`, check with `harness data verify`)")
        shards.append(np.memmap(file, dtype=np.uint16, mode="r"))
    if not shards:
        raise DataError(f"{path}: no {split!r} shards")
    return shards


def get_batch(shards, weights, gen, device):
    """Random windows for training: a shard by token count, then random offsets."""
    which = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
    xs, ys = [], []
    for s in which.tolist():
        data = shards[s]
        i = int(torch.randint(len(data) - block_size - 1, (1,), generator=gen))
        chunk = torch.from_numpy(data[i:i + block_size + 1].astype(np.int64))
        xs.append(chunk[:-1])
        ys.append(chunk[1:])
    x, y = torch.stack(xs), torch.stack(ys)
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def val_windows(shards, n_windows):
    """Fixed, evenly spaced validation windows: the same tokens for every submission."""
    lengths = [len(s) - block_size - 1 for s in shards]
    total = sum(lengths)
    out = []
    for j in range(n_windows):
        p = (j * total) // n_windows
        for s, n in enumerate(lengths):
            if p < n:
                out.append((s, p))
                break
            p -= n
    return out


@torch.no_grad()
def evaluate(model, shards, windows, device, ctx):
    """Mean cross-entropy over this rank's share of the fixed windows, reduced over ranks."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for k in range(0, len(windows), batch_size):
        rows = [torch.from_numpy(shards[s][p:p + block_size + 1].astype(np.int64))
                for s, p in windows[k:k + batch_size]]
        batch = torch.stack(rows).to(device)
        with ctx:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        total[0] += loss.double() * len(rows)
        total[1] += len(rows)
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def get_lr(it):
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Resume checkpoints: everything the loop needs to go on as if never stopped. Rank 0 writes
# one file holding the model, the optimizer and every rank's RNG states and next batch;
# RESUME_INDEX names it with its sha256, and is replaced only after the file is on disk.

RESUME_INDEX = "resume.json"
# Not part of the run's identity: where the run writes does not change what it computes.
RESUME_KEYS = ("resume_from", "resume_sha256", "out_dir")


def rank_state(gen, x, y, device_type):
    """This rank's random state and its next batch, in types torch.load(weights_only) reads."""
    import random  # here, not at the top: the BitLinear region's line numbers are documented

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
            "data": gen.get_state(), "x": x.cpu(), "y": y.cpu()}


def restore_rank_state(state, gen, device_type, dev):
    import random

    torch.set_rng_state(state["torch"])
    if device_type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    gen.set_state(state["data"])
    return state["x"].to(dev), state["y"].to(dev)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_resume(state, it):
    """Write the checkpoint of iteration `it` durably, then point RESUME_INDEX at it, then drop
    the one before: a crash at any point leaves an index naming a whole file."""
    name = f"resume-{it:07d}.pt"
    path, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    index = os.path.join(out_dir, RESUME_INDEX)
    previous = None
    if os.path.exists(index):
        with open(index) as f:
            previous = json.load(f).get("file")
    write_json_atomic(index, {"file": name, "iter": it, "sha256": shard_sha256(path),
                              "bytes": os.path.getsize(path)})
    fsync_dir(out_dir)
    if previous and previous != name and os.path.exists(os.path.join(out_dir, previous)):
        os.remove(os.path.join(out_dir, previous))


def load_resume(config, world):
    """The checkpoint named by --resume_from, after its sha256 and its fit to this run are
    checked; a foreign, truncated or edited file is refused, never half-loaded."""
    if not os.path.isfile(resume_from):
        raise ResumeError(f"{resume_from}: no such resume checkpoint")
    if shard_sha256(resume_from) != resume_sha256:
        raise ResumeError(f"{resume_from}: sha256 differs from the one recorded when it was "
                          f"written; the checkpoint is corrupted or replaced")
    try:
        state = torch.load(resume_from, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"{resume_from}: not a checkpoint this template wrote ({e})") from None
    mine = {k: v for k, v in config.items() if k not in RESUME_KEYS}
    if not isinstance(state, dict) or state.get("config") != mine:
        raise ResumeError(f"{resume_from}: written by a run with other settings")
    # The guard expects audits from the iteration the file's name gives (harness.runtime.guard).
    if os.path.basename(resume_from) != f"resume-{state.get('iter', -1):07d}.pt":
        raise ResumeError(f"{resume_from}: its name does not match the iteration it holds "
                          f"({state.get('iter')})")
    if len(state.get("ranks", ())) != world:
        raise ResumeError(f"{resume_from}: written by {len(state.get('ranks', ()))} "
                          f"process(es), this run has {world}")
    return state


def trim_log(path, before):
    """Keep the rows of a jsonl log from before iteration `before`: a resumed run writes the
    rest again, so the curve stays continuous and has no step twice."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                break  # a torn last line from the killed run
            if row.get("step", before) < before:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def check_loss(it, loss):
    if not math.isfinite(loss) or (max_train_loss and loss > max_train_loss):
        raise Diverged(f"diverged at step {it} (loss {loss:.4g})")


# -----------------------------------------------------------------------------

def compiler_settings():
    """Inductor and dynamo options for the training compile; measured in docs/performance.md."""
    from torch._inductor import config as inductor_config  # here: region lines are fixed

    # One graph, not one per DDP bucket: dynamo's split cost the ternary default 5% of its
    # step on 2 x H200, more than overlapping the all-reduce with the backward pass saved.
    torch._dynamo.config.optimize_ddp = False
    # Per-token scales reduce over the MLP's 4,096-wide rows, too wide for inductor's default
    # single-pass (persistent) reduction. With multi_kernel it also builds that kernel and
    # keeps whichever is faster at the first call: the ternary default's step went from
    # 329 to 321 ms on one H200. GPU (Triton) kernels only.
    inductor_config.triton.multi_kernel = 1
    # Its on-disk record of that choice crashes torch 2.11 when a compiled graph comes from
    # inductor's cache (a second run, or a second rank, on the same machine): choose anew in
    # every process instead, at the cost of one timing per kernel.
    os.environ["TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"] = "1"


def main(argv):
    config = configure(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend=backend if backend != "auto" else
                                ("nccl" if dev.startswith("cuda") else "gloo"))
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
    else:
        rank, world = 0, 1
    master = rank == 0
    if gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps} "
                          f"is not divisible by the {world} processes")
    accum = gradient_accumulation_steps // world
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    device_type = "cuda" if dev.startswith("cuda") else "cpu"
    dt = dtype if dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    ctx = (nullcontext() if dt == "float32" else
           torch.autocast(device_type=device_type, dtype={"bfloat16": torch.bfloat16,
                                                          "float16": torch.float16}[dt]))
    torch.manual_seed(init_seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if master:
        os.makedirs(out_dir, exist_ok=True)

    train_shards = load_split(data_dir, "train", vocab_size)
    val_shards = load_split(data_dir, "val", vocab_size)
    weights = torch.tensor([float(len(s)) for s in train_shards])
    gen = torch.Generator().manual_seed(data_seed + rank)
    windows = val_windows(val_shards, eval_iters * batch_size * world)[rank::world]

    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      bias=bias, vocab_size=vocab_size, dropout=dropout)
    model = GPT(GPTConfig(**model_args)).to(dev)
    optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type)
    resumed = load_resume(config, world) if resume_from else None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
    raw_model = model
    if compile:
        compiler_settings()
        model = torch.compile(model)
    if ddp and world > 1:
        # One process needs no gradient all-reduce: DDP would only copy gradients into buckets.
        model = DDP(model, device_ids=[int(dev.split(":")[1])] if device_type == "cuda" else None)
    if master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters; {world} process(es); "
              f"{tokens_per_iter:,} tokens per iteration; device {dev}, dtype {dt}")

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    # Train loss and wall time at every log interval: the training curve and step timing.
    train_log_path = os.path.join(out_dir, "train_log.jsonl")
    x, y = get_batch(train_shards, weights, gen, dev)
    start_it, elapsed_before = 0, 0.0
    train_loss = torch.zeros((), device=dev)
    if resumed is not None:
        start_it, elapsed_before = resumed["iter"], resumed["elapsed_s"]
        x, y = restore_rank_state(resumed["ranks"][rank], gen, device_type, dev)
        train_loss = torch.tensor(resumed["train_loss"], device=dev)
        if master:
            trim_log(metrics_path, start_it)
            trim_log(train_log_path, start_it)
            print(f"resumed at iteration {start_it} from {resume_from}", flush=True)
        del resumed
    mode = "a" if start_it else "w"
    metrics_file = open(metrics_path, mode) if master else None
    train_log = open(train_log_path, mode) if master else None
    progress = {"max_iters": max_iters, "iter": start_it, "train_loss": None, "val_loss": None,
                "tokens_per_s": None, "checkpoint_iter": start_it or None,
                "resumed_from": start_it or None}
    t_start = time.time() - elapsed_before  # the training time of earlier segments counts
    t_mark, it_mark = time.time(), start_it
    val_loss = float("nan")
    checkpoint_s = []
    for it in range(start_it, max_iters + 1):
        last = it == max_iters
        evaluating = it % eval_interval == 0 or last
        if it > start_it and (last or (checkpoint_interval and it % checkpoint_interval == 0)):
            # Before the evaluation: a resumed run redoes it, and its audit.
            t0 = time.time()
            state = rank_state(gen, x, y, device_type)
            states = [None] * world if ddp else [state]
            if ddp:
                dist.all_gather_object(states, state)
            if master:
                save_resume({"iter": it, "model": raw_model.state_dict(),
                             "optimizer": optimizer.state_dict(), "ranks": states,
                             "train_loss": train_loss.item(), "elapsed_s": time.time() - t_start,
                             "config": {k: v for k, v in config.items() if k not in RESUME_KEYS}},
                            it)
            checkpoint_s.append(time.time() - t0)
            progress["checkpoint_iter"] = it
        if RUN_AUDIT is not None:
            RUN_AUDIT(raw_model, x, y, ctx, it, evaluating)
        if evaluating:
            val_loss = evaluate(model, val_shards, windows, dev, ctx)
            if master:
                tl = train_loss.item() if it else float("nan")
                print(f"TRAIN_METRICS: step={it}, train_loss={tl:.4f}, val_loss={val_loss:.4f}",
                      flush=True)
                row = {"step": it, "train_loss": tl if it else None, "val_loss": val_loss,
                       "lr": get_lr(it), "tokens": it * tokens_per_iter,
                       "elapsed_s": time.time() - t_start}
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                progress.update(iter=it, val_loss=val_loss, elapsed_s=time.time() - t_start)
                write_json_atomic(os.path.join(out_dir, "progress.json"), progress)
        if last:
            break
        lr = get_lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(accum):
            if ddp and world > 1:
                # Only the last micro-step all-reduces gradients.
                model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                _, loss = model(x, y)
                loss = loss / accum
            x, y = get_batch(train_shards, weights, gen, dev)
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % log_interval == 0:
            train_loss = loss.detach() * accum
            # Every rank looks at its own loss: a diverging run stops within one interval.
            tl = train_loss.item()
            check_loss(it, tl)
            if master:
                now = time.time()
                elapsed = now - t_start
                print(f"iter {it}: loss {tl:.4f}, lr {lr:.2e}, {elapsed:.1f}s", flush=True)
                train_log.write(json.dumps({"step": it, "train_loss": tl, "lr": lr,
                                            "elapsed_s": elapsed}) + "\n")
                train_log.flush()
                if it > it_mark:
                    progress["tokens_per_s"] = (it - it_mark) * tokens_per_iter / (now - t_mark)
                t_mark, it_mark = now, it
                progress.update(iter=it + 1, train_loss=tl, elapsed_s=elapsed)
                write_json_atomic(os.path.join(out_dir, "progress.json"), progress)
    train_time = time.time() - t_start
    # One checksum of all weights per rank: DDP must leave every rank with the same model.
    checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum()
    checksums = [torch.zeros_like(checksum) for _ in range(world)] if ddp else [checksum]
    if ddp:
        dist.all_gather(checksums, checksum)

    if master:
        metrics_file.close()
        train_log.close()
        if save_checkpoint:
            ckpt = {"model": raw_model.state_dict(), "model_args": model_args,
                    "iter_num": max_iters, "config": config, "val_loss": val_loss,
                    "world_size": world}
            torch.save(ckpt, os.path.join(out_dir, "ckpt.pt.tmp"))
            os.replace(os.path.join(out_dir, "ckpt.pt.tmp"), os.path.join(out_dir, "ckpt.pt"))
        write_json_atomic(os.path.join(out_dir, "final.json"), {
            "val_loss": val_loss, "iters": max_iters, "tokens": max_iters * tokens_per_iter,
            "train_time_s": train_time,
            "tokens_per_s": max_iters * tokens_per_iter / max(train_time, 1e-9),
            "world_size": world, "device": dev, "dtype": dt, "compile": compile,
            "resumed_from": start_it or None, "checkpoint_s": checkpoint_s,
            "num_params": raw_model.num_params(), "config": config,
            "rank_param_checksums": [c.item() for c in checksums],
            "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30
                               if device_type == "cuda" else None),
        })
    if ddp:
        # Together: a rank that tears gloo down while another still writes can abort at exit.
        dist.barrier()
        dist.destroy_process_group()


def record_error(kind, message):
    """Frozen code records why a process stopped, so the harness never reads stdout for it."""
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, f"error_rank{os.environ.get('RANK', '0')}.json"),
                      {"kind": kind, "message": message})


def run(argv):
    """The command line: main(), with the failures that are ours told from the submission's."""
    try:
        main(argv)
    except (ConfigError, DataError, ResumeError) as e:
        # A bad scale, data directory or resume checkpoint is ours: the submission never ran.
        print(f"error: {e}", file=sys.stderr)
        record_error({ConfigError: "config", DataError: "data", ResumeError: "resume"}[type(e)],
                     str(e))
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        record_error("diverged", str(e))
        sys.exit(4)
    except BaseException as e:
        # Anything else escaped the training loop, SystemExit included: the submission's.
        import traceback

        record_error("exception", "".join(traceback.format_exception(e))[-4000:])
        raise


if __name__ == "__main__":
    run(sys.argv[1:])
