"""The frozen template itself: configuration, data checks, and the 2-process DDP path."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PYTHON, TEMPLATE, write_shards

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--compile=false", "--dtype=float32"]


def run_template(args: list[str], out: Path, nproc: int = 2,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # torchrun reports any child failure as exit code 1, so single-process cases run
    # the script directly to see its own exit code.
    launcher = ([PYTHON, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [PYTHON])
    cmd = [*launcher, str(TEMPLATE), *TINY, f"--out_dir={out}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_two_processes_train_and_stay_in_sync(periodic_data: Path, tmp_path: Path,
                                                  compiled: bool) -> None:
    # Compiled, the template turns off dynamo's per-bucket graph splitting for DDP (the GPU
    # speed-up of docs/performance.md): the gradients must still be all-reduced.
    out = tmp_path / "out"
    proc = run_template([f"--data_dir={periodic_data}", "--max_iters=12", "--eval_interval=6",
                         "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=2",
                         "--gradient_accumulation_steps=4", f"--compile={compiled}"], out,
                        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == 2
    assert final["tokens"] == 12 * 4 * 4 * 32  # iters x accumulation x micro-batch x block
    sums = final["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 6, 12]
    # The cycle is learnable: a working optimiser step lowers validation loss clearly.
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    assert math.isclose(final["val_loss"], rows[-1]["val_loss"])
    # The checkpoint carries what is needed to rebuild the model.
    import torch

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["iter_num"] == 12
    assert "lm_head.weight" in ckpt["model"]


def test_multi_kernel_is_only_on_with_its_pick_cache_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.11 crashes reading the multi-kernel pick cache when a compiled graph comes from
    # inductor's on-disk cache (a second run or rank on one GPU machine; docs/performance.md).
    # The options are global: monkeypatch puts them back after the call.
    import torch
    from torch._inductor import config as inductor_config

    from harness.runtime.spliced import load_spliced

    monkeypatch.setattr(inductor_config.triton, "multi_kernel", 0)
    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)
    monkeypatch.delenv("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", raising=False)
    load_spliced(TEMPLATE).compiler_settings()
    assert inductor_config.triton.multi_kernel == 1
    assert os.environ["TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"] == "1"
    assert torch._dynamo.config.optimize_ddp is False


def test_unknown_setting_is_refused_in_one_line(periodic_data: Path, tmp_path: Path) -> None:
    proc = run_template([f"--data_dir={periodic_data}", "--max_iter=3"], tmp_path, nproc=1)
    assert proc.returncode == 2
    assert "unknown setting --max_iter" in proc.stderr
    err = json.loads((tmp_path / "error_rank0.json").read_text())
    assert err["kind"] == "config"


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "missing_manifest", "other_tokenizer"])
def test_bad_data_stops_training_with_a_reason(damage: str, tmp_path: Path) -> None:
    data = write_shards(tmp_path / "d", np.arange(5000) % 100, np.arange(2000) % 100)
    if damage == "truncate":
        with (data / "train_000000.bin").open("r+b") as f:
            f.truncate(1000)
        expect = "truncated or replaced"
    elif damage == "corrupt":
        # Same size, one byte flipped: only the hash can tell.
        with (data / "val_000000.bin").open("r+b") as f:
            f.seek(777)
            byte = f.read(1)
            f.seek(777)
            f.write(bytes([byte[0] ^ 0x01]))
        expect = "sha256 differs from the manifest's"
    elif damage == "missing_manifest":
        (data / "manifest.json").unlink()
        expect = "no manifest.json"
    else:
        m = json.loads((data / "manifest.json").read_text())
        m["tokenizer"]["name"] = "llama"
        (data / "manifest.json").write_text(json.dumps(m))
        expect = "does not match this model"
    proc = run_template([f"--data_dir={data}", "--max_iters=2"], tmp_path / "out", nproc=1)
    assert proc.returncode == 2
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "out" / "error_rank0.json").read_text())["kind"] == "data"


def _with_overrides(tmp_path: Path, overrides: str) -> Path:
    from harness.regions import splice

    script = tmp_path / "custom_pretrain.py"
    script.write_text(splice(TEMPLATE.read_text(), {"config_overrides": overrides}))
    return script


def test_config_overrides_beat_the_scale_and_reach_training(periodic_data: Path,
                                                           tmp_path: Path) -> None:
    script = _with_overrides(tmp_path, 'CONFIG_OVERRIDES = {"learning_rate": 0.005, '
                                       '"warmup_iters": 1}')
    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, str(script), *TINY, f"--data_dir={periodic_data}",
                           f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                           "--learning_rate=0.001", "--save_checkpoint=false"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "final.json").read_text())["config"]
    assert config["learning_rate"] == 0.005 and config["warmup_iters"] == 1


def test_frozen_code_refuses_an_override_outside_the_whitelist(periodic_data: Path,
                                                               tmp_path: Path) -> None:
    # The static check refuses this first; the template is the backstop if it is bypassed.
    script = _with_overrides(tmp_path, 'CONFIG_OVERRIDES = {"max_iters": 1}')
    proc = subprocess.run([PYTHON, str(script), *TINY, f"--data_dir={periodic_data}",
                           f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "CONFIG_OVERRIDES may not set 'max_iters'" in proc.stderr
