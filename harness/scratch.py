"""A stage's scratch folder: its compiler caches and temp files, inside its own writable
folder, so that no attempt loads code another compiled (inductor, triton) or reads another's
temp files, and two at once never collide. Removed when the stage ends, never hashed into the
record (record.SCRATCH is excluded from the manifest)."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.record import SCRATCH


def scratch_env(stage_dir: Path) -> dict[str, str]:
    """The environment that sends a stage's caches and temp files under stage_dir/SCRATCH
    (make_scratch creates the folders: a TMPDIR that does not exist is silently replaced by
    /tmp)."""
    root = stage_dir / SCRATCH
    return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
            "TRITON_CACHE_DIR": str(root / "triton"), "TMPDIR": str(root / "tmp")}


def make_scratch(stage_dir: Path) -> None:
    for d in scratch_env(stage_dir).values():
        Path(d).mkdir(parents=True, exist_ok=True)


def remove_scratch(stage_dir: Path) -> None:
    # A link planted in its place is removed, never followed (rmtree refuses a link root).
    target = stage_dir / SCRATCH
    if target.is_symlink():
        target.unlink(missing_ok=True)
    else:
        shutil.rmtree(target, ignore_errors=True)
