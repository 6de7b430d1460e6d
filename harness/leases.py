"""Device leases: a stage takes exactly the GPUs it needs from this host's free ones.

The local, docker and apptainer runners start stages on the host the harness runs on, so two
tests at once would both see GPUs 0 and 1. Before such a stage launches, `hold` takes
`spec.gpus` slots of the host's pool and the runner shows the stage those alone
(CUDA_VISIBLE_DEVICES, docker's device_ids). Slurm allocates on its own (`--gres`): no lease.

A slot is a lock file, `<dir>/<pool>/<slot>.lock`, held with flock(2) by the harness process
that runs the stage: the kernel drops the lock when that process dies however it dies, so a
crash can never leave a GPU taken. Taking several slots happens under the pool's pick lock,
so two stages never split a pair between them. A stage that finds too few free slots waits in
a queue, first come first served: each waiter holds a lock on its own file in `<pool>/queue/`
(named by its arrival time), only the first live waiter takes slots, and its position is
printed when it changes. A waiter's file whose lock nobody holds is a dead waiter's: removed.

The pool ([runner.leases] in harness.toml): `gpus`, the GPU ids the harness may hand out
(default: CUDA_VISIBLE_DEVICES when set, else what `nvidia-smi` lists); `cpu_slots`, when
above 0, makes CPU stages lease `nproc_per_node` slots of that many too, which bounds how many
CPU trainings share the cores (0: CPU stages take none); `dir`, where the locks live (default
a per-user folder under the system's temp dir, so every home on the host shares one pool).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LEASE_DIR_ENV = "HARNESS_LEASE_DIR"
POLL_S = 0.5


@dataclass(frozen=True)
class Lease:
    """What a stage held: recorded in its segment of result.json."""

    pool: str  # "gpu" | "cpu"
    slots: tuple[str, ...]
    waited_s: float
    acquired_at: float  # time.time()
    released_at: float | None = None
    queue_positions: tuple[int, ...] = ()  # every position it was told while waiting
    # The locked files' descriptors: a stage process that inherits them keeps the slots
    # held until it exits, even when the harness that took them is killed first.
    fds: tuple[int, ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"pool": self.pool, "slots": list(self.slots), "waited_s": round(self.waited_s, 3),
                "acquired_at": self.acquired_at, "released_at": self.released_at,
                "queue_positions": list(self.queue_positions)}


class LeaseError(Exception):
    """The stage needs more slots than the pool has at all: it can never run here (ours)."""


@dataclass
class Pool:
    """One pool of slots on this host (see the module doc)."""

    root: Path
    name: str
    slots: tuple[str, ...]
    poll_s: float = POLL_S

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @contextlib.contextmanager
    def hold(self, n: int, owner: str, *, say: Callable[[str], None] | None = None,
             cancelled: Callable[[], bool] = lambda: False) -> Iterator[Lease]:
        """n slots for the body; waits in the queue for them. LeaseError when the pool has
        fewer than n slots; KeyboardInterrupt and the like leave the queue cleanly. A
        `cancelled()` that turns true while waiting raises LeaseCancelled."""
        if n > len(self.slots):
            raise LeaseError(f"the stage needs {n} {self.name.upper()} slot(s) but this host's "
                             f"pool has {len(self.slots)} ({', '.join(self.slots) or 'none'}); "
                             "see [runner.leases] in harness.toml")
        (self.dir / "queue").mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        ticket, ticket_file = self._join_queue(owner)
        positions: list[int] = []
        files: list[IO[bytes]] = []
        try:
            while True:
                ahead = self._ahead_of(ticket)
                if ahead == 0:
                    files = self._take(n, owner)
                    if files:
                        break
                pos = ahead + 1
                if not positions or positions[-1] != pos:
                    positions.append(pos)
                    if say is not None:
                        say(f"[lease] waiting for {n} {self.name.upper()}(s) of "
                            f"{len(self.slots)}: position {pos} in the queue")
                if cancelled():
                    raise LeaseCancelled("cancelled while waiting for a lease")
                time.sleep(self.poll_s)
        finally:
            _release(ticket_file)
            ticket.unlink(missing_ok=True)
        slots = tuple(Path(f.name).stem for f in files)
        lease = Lease(self.name, slots, time.monotonic() - t0, time.time(),
                      queue_positions=tuple(positions), fds=tuple(f.fileno() for f in files))
        try:
            yield lease
        finally:
            for f in files:
                _release(f)

    def holders(self) -> dict[str, dict[str, Any]]:
        """slot -> what its holder wrote, for the slots held now."""
        out = {}
        for slot in self.slots:
            path = self.dir / f"{slot}.lock"
            if not path.exists():
                continue
            f = _try_lock(path)
            if f is not None:
                _release(f)
                continue
            with contextlib.suppress(OSError, ValueError):
                out[slot] = json.loads(path.read_text() or "{}")
        return out

    # -- internals --

    def _join_queue(self, owner: str) -> tuple[Path, IO[bytes]]:
        # Nanoseconds since the epoch, then the pid: sortable by arrival, unique per process.
        ticket = self.dir / "queue" / f"{time.time_ns():020d}-{os.getpid()}.wait"
        f = _try_lock(ticket, create=True)
        assert f is not None, ticket  # a fresh name: nobody else can hold it
        f.write(json.dumps({"owner": owner, "pid": os.getpid()}).encode())
        f.flush()
        return ticket, f

    def _ahead_of(self, ticket: Path) -> int:
        """Live waiters that came before `ticket`; a dead waiter's file is removed."""
        ahead = 0
        for other in sorted((self.dir / "queue").glob("*.wait")):
            if other.name >= ticket.name:
                break
            f = _try_lock(other)
            if f is None:
                ahead += 1
            else:  # nobody holds it: its waiter is gone
                other.unlink(missing_ok=True)
                _release(f)
        return ahead

    def _take(self, n: int, owner: str) -> list[IO[bytes]]:
        """n free slots, all or none, under the pool's pick lock."""
        pick = _lock(self.dir / ".pick.lock")
        try:
            got: list[IO[bytes]] = []
            for slot in self.slots:
                f = _try_lock(self.dir / f"{slot}.lock", create=True)
                if f is not None:
                    got.append(f)
                    if len(got) == n:
                        break
            if len(got) < n:
                for f in got:
                    _release(f)
                return []
            for f in got:
                f.truncate(0)
                f.write(json.dumps({"owner": owner, "pid": os.getpid(),
                                    "since": time.time()}).encode())
                f.flush()
            return got
        finally:
            _release(pick)


class LeaseCancelled(Exception):
    """`harness cancel` asked the attempt to stop while its stage waited for a lease."""


def _try_lock(path: Path, *, create: bool = False) -> IO[bytes] | None:
    """The file, open and exclusively flock'ed; None when another process holds it."""
    try:
        f = path.open("r+b" if path.exists() or not create else "w+b")
    except FileNotFoundError:
        if not create:
            return None
        f = path.open("w+b")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _lock(path: Path) -> IO[bytes]:
    f = path.open("a+b")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _release(f: IO[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# --- the host's pools --------------------------------------------------------------------


def default_dir() -> Path:
    explicit = os.environ.get(LEASE_DIR_ENV)
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"bitlinear-harness-leases-{os.getuid()}"


def host_gpus(configured: Sequence[str] | None) -> tuple[str, ...]:
    """The GPU ids the harness may hand out: the configured list, else the host's
    CUDA_VISIBLE_DEVICES, else nvidia-smi's indexes (none without nvidia-smi)."""
    if configured is not None:
        return tuple(configured)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return tuple(d.strip() for d in visible.split(",") if d.strip())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def say_on_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
