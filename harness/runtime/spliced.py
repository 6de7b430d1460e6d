"""Importing an attempt's spliced custom_pretrain.py as a module: its region code runs at
import, `main()` does not (the module is not __main__)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_spliced(script: Path, name: str | None = None) -> ModuleType:
    script = Path(script).resolve()
    name = name or "harness_spliced_" + hashlib.sha256(str(script).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, script)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their class's module up in sys.modules while decorating GPTConfig.
    sys.modules[name] = module
    # No __pycache__ beside the script: the attempt folder is not the stage's to write.
    keep, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.dont_write_bytecode = keep
    return module
