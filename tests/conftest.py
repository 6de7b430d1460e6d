"""Shared fixtures: the real task, and small token datasets written in the shard format."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.task import TaskSpec, load_task

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "tasks" / "llm-pretrain-bitlinear" / "custom_pretrain.py"
PYTHON = sys.executable


@pytest.fixture(scope="session")
def task() -> TaskSpec:
    return load_task()


def write_shards(root: Path, train: np.ndarray, val: np.ndarray) -> Path:
    """A data directory in the template's format, without the tokenizer (tests only)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, arr in (("train", train), ("val", val)):
        name = f"{split}_000000.bin"
        arr.astype(np.uint16).tofile(root / name)
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        splits[split] = [{"file": name, "tokens": int(arr.size), "sha256": digest}]
    manifest = {"format": "harness-token-shards/1",
                "tokenizer": {"name": "gpt2", "dtype": "uint16", "vocab_size": 50257,
                              "eot": 50256},
                "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the smoke corpus, built once per run: a stage reads <root>/smoke, and
    no test writes to it."""
    from harness.data.smoke import prepare_smoke

    root = tmp_path_factory.mktemp("data")
    prepare_smoke(root / "smoke")
    return root


@pytest.fixture(scope="session")
def periodic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable stream (a repeating 50-token cycle): loss must fall when training works."""
    cycle = np.arange(1000, 1050)
    return write_shards(tmp_path_factory.mktemp("periodic"), np.tile(cycle, 2000),
                        np.tile(cycle, 200))


def wait_for(what: Callable[[], Any], timeout: float, step: float = 0.1,
             message: str | None = None) -> Any:
    """Poll `what` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(message or f"timed out after {timeout}s")
