"""The pretrain stage's launcher: torchrun, plus a record of how each rank ended.

    python -m harness.launch [torchrun options] -m harness.guard SPLICED.py --name=value ...

A rank killed with SIGKILL (the out-of-memory killer, an operator) cannot record anything
itself, and the ranks that survive it record collective errors that look like the
submission's. torchrun knows each rank's exit status: when it fails, LAUNCH_FILE in the stage's
output folder lists them, and the stage reads it before the ranks' own error files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

LAUNCH_FILE = "launcher.json"


def _out_dir(argv: list[str]) -> Path:
    for arg in argv:
        if arg.startswith("--out_dir="):
            return Path(arg.split("=", 1)[1])
    return Path("out")


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as e:
        failures = {str(rank): {"exitcode": f.exitcode, "timestamp": f.timestamp}
                    for rank, f in e.failures.items()}
        first = min(e.failures.items(), key=lambda kv: kv[1].timestamp)[0]
        out = _out_dir(argv)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{LAUNCH_FILE}.tmp"
        tmp.write_text(json.dumps({"failures": failures, "first": str(first)}, indent=2) + "\n",
                       encoding="utf-8")
        os.replace(tmp, out / LAUNCH_FILE)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
