"""The container's memory verdict: did the stage hit its own memory limit, or did the host run
out?

    python -m harness.runtime.memwatch REPORT.json -- COMMAND ...

Runs COMMAND as a child (signals forwarded), and when it has ended reads the memory cgroup of
the container it runs in, its own, and writes REPORT.json: the limit, the peak usage and
whether the limit was reached when the kernel killed a process. The docker runner reads it
when Docker says the container was OOM-killed:

- the limit was reached (cgroup v1: `oom_kill` > 0 with the peak at the limit; v2: the `oom`
  event, which counts hitting this cgroup's own `memory.max`): the stage outgrew the memory it
  was given, which is the submission's, charged;
- anything else (no report, the peak below the limit): the machine ran out, or a parent
  cgroup did, which is ours, refunded.

Read here, inside, because Docker removes the container's cgroup when it exits: from the host
the counters are gone before the harness could look. Only stdlib, as everything in runtime.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

MEMORY_FILE = "memory.json"
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
# A cgroup v1 peak within this fraction of the limit counts as having reached it: the kernel
# reclaims a few pages before it kills, so the recorded peak can stop just short.
AT_LIMIT = 0.99


def _int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _keyed(path: Path) -> dict[str, int]:
    """A flat keyed cgroup file ("name value" per line) as a dict."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def read_cgroup(v1: Path = V1, v2: Path = V2) -> dict[str, Any]:
    """This process's memory cgroup: limit, peak, OOM kills and whether the limit was hit.
    An empty dict when there is no memory cgroup to read."""
    if (v1 / "memory.limit_in_bytes").exists():
        limit = _int(v1 / "memory.limit_in_bytes")
        peak = _int(v1 / "memory.max_usage_in_bytes")
        kills = _keyed(v1 / "memory.oom_control").get("oom_kill", 0)
        reached = bool(kills and limit and peak is not None and peak >= AT_LIMIT * limit)
        return {"cgroup": "v1", "limit_bytes": limit, "peak_bytes": peak, "oom_kills": kills,
                "limit_reached": reached}
    if (v2 / "memory.events").exists():
        events = _keyed(v2 / "memory.events")
        return {"cgroup": "v2", "limit_bytes": _int(v2 / "memory.max"),
                "peak_bytes": _int(v2 / "memory.peak"), "oom_kills": events.get("oom_kill", 0),
                "limit_reached": events.get("oom", 0) > 0}
    return {}


def _write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m harness.runtime.memwatch REPORT.json -- COMMAND ...",
              file=sys.stderr)
        return 2
    report, command = Path(argv[0]), argv[2:]
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    _write(report, {**read_cgroup(), "exit_code": code})
    # A child killed by a signal: the shell's convention, as docker-init would have reported.
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
