"""The pretrain stage's launcher: torchrun, plus a record of how each rank ended.

    python -m harness.runtime.launch [torchrun options] \
        -m harness.runtime.guard SPLICED.py --name=value ...

A rank killed with SIGKILL (the out-of-memory killer, an operator) cannot record anything
itself, and the ranks that survive it record collective errors that look like the
submission's. torchrun knows each rank's exit status: when it fails, LAUNCH_FILE in the stage's
output folder lists them, and the stage reads it before the ranks' own error files.
"""

from __future__ import annotations

import sys

from harness.runtime.fileio import atomic_write_json
from harness.runtime.guard import out_dir_of

LAUNCH_FILE = "launcher.json"


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as e:
        failures = {str(rank): {"exitcode": f.exitcode, "timestamp": f.timestamp}
                    for rank, f in e.failures.items()}
        first = min(e.failures.items(), key=lambda kv: kv[1].timestamp)[0]
        atomic_write_json(out_dir_of(argv) / LAUNCH_FILE,
                          {"failures": failures, "first": str(first)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
