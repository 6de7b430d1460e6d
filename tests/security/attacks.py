"""Attack submissions for tests/security: each is a BitLinear region written to game the score,
with the layer of docs/security.md that must stop it and the exact verdict.

Regions are built from the template's own default region (the ternary baseline), with one
fragment inserted. A line that a static finding must point at carries the comment `# ATTACK`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from harness.attempt import Prepared
from harness.regions import splice
from harness.runtime.layout import parse_layout
from harness.submission import Submission
from harness.task import ScaleSpec, TaskSpec

FORWARD = "    def forward(self, x):\n"
INIT_END = "        nn.init.normal_(self.weight, mean=0.0, std=0.02)\n"
MATMUL = "        y = F.linear(x_q, w_q.to(x_q.dtype))\n"


def default_region(task: TaskSpec) -> str:
    layout = parse_layout(task.template_text(), where="template")
    return "\n".join(next(r for r in layout.regions if r.id == "bitlinear").lines) + "\n"


def in_forward(task: TaskSpec, fragment: str) -> str:
    region = default_region(task)
    assert FORWARD in region
    return region.replace(FORWARD, FORWARD + fragment, 1)


def at_top(task: TaskSpec, fragment: str) -> str:
    return fragment + "\n\n" + default_region(task)


def spliced(task: TaskSpec, region: str) -> str:
    return splice(task.template_text(), {"bitlinear": region})


def unchecked(task: TaskSpec, region: str, name: str) -> Prepared:
    """As if a static escape had been found: spliced without the static checks."""
    sub = Submission(kind="file", source=Path(f"{name}.py"), regions={"bitlinear": region},
                     meta={}, sha256=hashlib.sha256(region.encode()).hexdigest(), name=name)
    return Prepared(sub, spliced(task, region), "")


def pretrain_only(task: TaskSpec) -> ScaleSpec:
    return dataclasses.replace(task.scale("smoke"), stages=("pretrain",))


def attack_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if "# ATTACK" in line)


@dataclass(frozen=True)
class StaticAttack:
    id: str
    category: str  # the threat of docs/security.md it belongs to
    fragment: str
    where: str  # "forward" or "top"
    rule: str  # the static rule that must refuse it

    def region(self, task: TaskSpec) -> str:
        return (in_forward if self.where == "forward" else at_top)(task, self.fragment)


STATIC: tuple[StaticAttack, ...] = (
    StaticAttack("print-fake-metrics", "fake metrics",
                 "        print('TRAIN_METRICS: step=13535, val_loss=0.1')  # ATTACK\n",
                 "forward", "io"),
    StaticAttack("write-final-json", "fake metrics",
                 "        open('final.json', 'w').write('{\"val_loss\": 0.1}')  # ATTACK\n",
                 "forward", "io"),
    StaticAttack("torch-save-scores", "fake metrics",
                 "        torch.save({'val_loss': 0.1}, 'final.json')  # ATTACK\n",
                 "forward", "io"),
    StaticAttack("peek-val-data", "read data",
                 "        shards = load_split(data_dir, 'val', 50304)  # ATTACK\n",
                 "forward", "frozen-reference"),
    StaticAttack("read-files", "read data", "import os  # ATTACK\n", "top", "io"),
    StaticAttack("socket", "network", "import socket  # ATTACK\n", "top", "network"),
    StaticAttack("torch-hub", "network", "        torch.hub.load('a/b', 'c')  # ATTACK\n",
                 "forward", "network"),
    StaticAttack("subprocess", "processes", "import subprocess  # ATTACK\n", "top", "process"),
    StaticAttack("threads", "processes", "import threading  # ATTACK\n", "top", "process"),
    StaticAttack("rank-aware", "rank divergence",
                 "        r = torch.distributed.get_rank()  # ATTACK\n", "forward", "process"),
    StaticAttack("patch-loss", "frozen code",
                 "        F.cross_entropy = lambda *a, **k: 0.0  # ATTACK\n",
                 "forward", "module-assignment"),
    StaticAttack("setattr-patch", "frozen code",
                 "        setattr(F, 'cross_entropy', None)  # ATTACK\n",
                 "forward", "module-assignment"),
    StaticAttack("rebind-evaluate", "frozen code",
                 "def evaluate(*args, **kwargs):  # ATTACK\n    return 0.0\n",
                 "top", "frozen-reference"),
    StaticAttack("global-statement", "frozen code", "        global val_loss  # ATTACK\n",
                 "forward", "global-statement"),
    StaticAttack("torch-global-state", "torch globals",
                 "        torch.set_default_dtype(torch.float64)  # ATTACK\n",
                 "forward", "module-assignment"),
    StaticAttack("exec", "dynamic code", "        exec('import os')  # ATTACK\n",
                 "forward", "dynamic-code"),
    StaticAttack("dunder-import", "dynamic code", "        m = __import__('os')  # ATTACK\n",
                 "forward", "dynamic-code"),
    StaticAttack("computed-getattr", "dynamic code",
                 "        f = getattr(torch, 'sa' + 've')  # ATTACK\n", "forward",
                 "dynamic-code"),
    StaticAttack("function-globals", "frozen code",
                 "        g = weight_quant.__globals__  # ATTACK\n", "forward", "introspection"),
    StaticAttack("sys-modules", "frozen code", "import sys  # ATTACK\n", "top", "introspection"),
    StaticAttack("ctypes", "escape", "import ctypes  # ATTACK\n", "top", "introspection"),
    StaticAttack("hide-from-compile", "escape",
                 "@torch.compiler.disable  # ATTACK\ndef helper(x):\n    return x\n",
                 "top", "compile-disable"),
)


@dataclass(frozen=True)
class PreflightAttack:
    id: str
    category: str
    region: str  # the whole region: each is a complete submission
    check: str  # the pre-flight check that must fail


def _preflight_attacks(task: TaskSpec) -> tuple[PreflightAttack, ...]:
    base = default_region(task)
    return (
        # The plainest cheat: the float latent weight straight into the matmul.
        PreflightAttack("float-weights", "full-precision weights",
                        base.replace(MATMUL, "        y = F.linear(x_q, self.weight / w_scale)\n"),
                        "low-bit"),
        # A LoRA-style float side path next to a ternary matmul.
        PreflightAttack("float-side-path", "full-precision weights", base.replace(
            INIT_END, INIT_END + "        self.side = nn.Parameter(torch.randn(8, in_features) "
            "* 0.02)\n        self.side_out = nn.Parameter(torch.randn(out_features, 8) * "
            "0.02)\n").replace(
            MATMUL, MATMUL + "        y = y + F.linear(F.linear(x_q, self.side), "
            "self.side_out) / (x_scale * w_scale)\n"), "low-bit"),
        # Float weights only in eval(), where val_loss is measured.
        PreflightAttack("eval-only-float", "behaviour over time", base.replace(
            MATMUL, "        w_used = w_q if self.training else self.weight / w_scale\n"
            "        y = F.linear(x_q, w_used.to(x_q.dtype))\n"), "low-bit"),
    )


def preflight_attacks(task: TaskSpec) -> tuple[PreflightAttack, ...]:
    return _preflight_attacks(task)


# --- attacks that get past the static checks (and pre-flight) ---------------------------------

def delayed_float(task: TaskSpec) -> str:
    """Ternary for the first 20 training forwards (pre-flight's ten-iteration DDP run sees no
    more), then the float latent weight: only an audit during the run can see it."""
    base = default_region(task)
    return base.replace(INIT_END, INIT_END + "        self.register_buffer('calls', "
                        "torch.zeros(()), persistent=False)\n").replace(
        MATMUL, "        if self.training:\n            self.calls += 1\n"
        "        late = (self.calls > 20).to(x_q.dtype)\n"
        "        w_used = late * (self.weight / w_scale) + (1 - late) * w_q\n"
        "        y = F.linear(x_q, w_used.to(x_q.dtype))\n")


def rank_divergent(task: TaskSpec) -> str:
    """After 20 training forwards, nudges its own weights in place with noise drawn from the
    rank's own random stream (each rank is seeded differently): ranks stop agreeing."""
    base = default_region(task)
    return base.replace(INIT_END, INIT_END + "        self.register_buffer('calls', "
                        "torch.zeros(()), persistent=False)\n").replace(
        FORWARD, FORWARD + "        if self.training:\n            self.calls += 1\n"
        "            with torch.no_grad():\n"
        "                late = (self.calls > 20).to(self.weight.dtype)\n"
        "                self.weight.add_(late * 1e-3 * torch.randn_like(self.weight))\n")


# Defence in depth: region code as if an escape from the static policy had been found. These
# are spliced without the static checks (tests build the Prepared themselves).

def patch_at_import(task: TaskSpec) -> str:
    return at_top(task, "F.cross_entropy = lambda logits, targets: logits.float().mean() * 0.0\n")


def patch_during_training(task: TaskSpec) -> str:
    return at_top(task, "def _free_loss(logits, targets):\n"
                        "    return logits.float().mean() * 0.0\n").replace(
        FORWARD, FORWARD + "        F.cross_entropy = _free_loss\n", 1)


def swap_frozen_function(task: TaskSpec) -> str:
    return at_top(task, "import sys\n\n\ndef _fake_evaluate(*args, **kwargs):\n"
                        "    return 0.01\n").replace(
        FORWARD, FORWARD + "        sys.modules['custom_pretrain'].evaluate = _fake_evaluate\n", 1)


def unhook_audit(task: TaskSpec) -> str:
    return at_top(task, "import sys\n").replace(
        FORWARD, FORWARD + "        sys.modules['custom_pretrain'].RUN_AUDIT = None\n", 1)


def forge_final_json(task: TaskSpec) -> str:
    """At exit, after the template wrote final.json, rank 0 rewrites its val_loss."""
    return at_top(task, """import atexit
import json
import os
import sys


def _forge():
    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out_dir="))
    path = os.path.join(out, "final.json")
    if os.environ.get("RANK", "0") == "0" and os.path.exists(path):
        with open(path) as f:
            final = json.load(f)
        final["val_loss"] = 0.5
        with open(path, "w") as f:
            json.dump(final, f)


atexit.register(_forge)
""")


def dump_environment(task: TaskSpec) -> str:
    """Writes every environment variable it can see into its own output folder, then fails."""
    return at_top(task, """import json
import os
import sys

_out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out_dir="))
os.makedirs(_out, exist_ok=True)
with open(os.path.join(_out, "seen_env_rank" + os.environ.get("RANK", "0") + ".json"), "w") as _f:
    json.dump(dict(os.environ), _f)
# Fail only once every rank has written: the first rank to raise gets the others killed.
import glob
import time
_deadline = time.time() + 60
while (len(glob.glob(os.path.join(_out, "seen_env_rank*.json")))
       < int(os.environ.get("WORLD_SIZE", "1")) and time.time() < _deadline):
    time.sleep(0.1)
raise RuntimeError("environment copied")
""")


def write_region(path: Path, region: str) -> Path:
    path.write_text(region, encoding="utf-8")
    return path


# --- attacks on where and when the in-run audit looks (issue #24) ---------------------------

def float_unless_one_row(task: TaskSpec) -> str:
    """Ternary for a batch of one sequence, the float latent weight for more: the audit once
    forwarded a single row, while training and scoring forward whole batches."""
    return default_region(task).replace(
        MATMUL, "        w_used = w_q if x.shape[0] == 1 else self.weight / w_scale\n"
        "        y = F.linear(x_q, w_used.to(x_q.dtype))\n")


def float_between_evaluations(task: TaskSpec) -> str:
    """Ternary in eval() and at every tenth iteration (the smoke scale's evaluations), the float
    latent weight on every other training step. It counts iterations by watching its own
    weight move (the optimizer steps once per iteration), so however many forwards an audit
    adds at one step, the count stays right: only an audit at a step it cannot predict sees
    the float weight."""
    return default_region(task).replace(INIT_END, INIT_END + (
        "        self.register_buffer('seen', torch.zeros(out_features, in_features), "
        "persistent=False)\n"
        "        self.register_buffer('step', torch.zeros(()), persistent=False)\n")).replace(
        MATMUL,
        "        if self.training:\n"
        "            with torch.no_grad():\n"
        "                self.step += (self.weight != self.seen).any().to(self.step.dtype)\n"
        "                self.seen.copy_(self.weight)\n"
        "        cheat = self.training and int(self.step) % 10 != 1\n"
        "        w_used = self.weight / w_scale if cheat else w_q\n"
        "        y = F.linear(x_q, w_used.to(x_q.dtype))\n")
