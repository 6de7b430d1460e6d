"""Wall time of the pre-flight checks on each baseline (the target: under 90 s each on a
2-core CPU machine).

For every folder in baselines/: splice it, run the real pre-flight (worker process and the
torchrun DDP run) and print each check's duration, the sum of the checks and the wall time
of the whole call (process start-up and torch import included).

    python bench/preflight_time.py
    python bench/preflight_time.py --baselines ternary_158bit --json bench-preflight.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.checks.preflight import run_preflight  # noqa: E402
from harness.regions import splice  # noqa: E402
from harness.runners.local import LocalRunner  # noqa: E402
from harness.runtime.preflight import CHECK_IDS  # noqa: E402
from harness.submission import load_submission  # noqa: E402
from harness.task import load_task  # noqa: E402


def time_one(name: str) -> dict[str, Any]:
    task = load_task()
    sub = load_submission(REPO / "baselines" / name, task)
    spliced = splice(task.template_text(), sub.regions)
    with tempfile.TemporaryDirectory(prefix="preflight-bench-") as tmp:
        t0 = time.monotonic()
        report = run_preflight(task, spliced, runner=LocalRunner(), work_dir=Path(tmp))
        wall = time.monotonic() - t0
    return {"baseline": name, "ok": report.ok, "wall_s": round(wall, 2),
            "checks_s": report.duration_s,
            "per_check": {c.id: round(c.duration_s, 2) for c in report.checks},
            "failed": [c.render() for c in report.failed]}


def table(rows: list[dict[str, Any]]) -> str:
    head = ["baseline", *CHECK_IDS, "sum", "wall", "ok"]
    body = [[r["baseline"], *(f"{r['per_check'].get(c, float('nan')):.1f}" for c in CHECK_IDS),
             f"{r['checks_s']:.1f}", f"{r['wall_s']:.1f}", "yes" if r["ok"] else "NO"]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    lines = ["  ".join(f"{x:>{w}}" for x, w in zip(row, widths, strict=False))
             for row in [head, *body]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baselines", default="",
                        help="comma-separated names (default: every folder in baselines/)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    names = ([n for n in args.baselines.split(",") if n] or
             sorted(p.name for p in (REPO / "baselines").iterdir() if p.is_dir()))
    print(f"pre-flight timing on {os.cpu_count()} CPU core(s); seconds per check", flush=True)
    rows = []
    for name in names:
        rows.append(time_one(name))
        for line in rows[-1]["failed"]:
            print(f"  {name}: {line}", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
