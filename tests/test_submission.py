"""Loading submissions: the four forms, meta.toml, limits, and a form-independent sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.regions import splice
from harness.submission import MAX_FILE_BYTES, load_submission
from harness.task import load_task

TASK = load_task()
TEMPLATE = TASK.template_text()
BITLINEAR = "def weight_quant(weight):\n    return weight, 1.0\n"
CONFIG = "CONFIG_OVERRIDES = {'learning_rate': 1e-3}\n"


def _sha(regions: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(regions, sort_keys=True).encode()).hexdigest()


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def _error(path: Path) -> UserError:
    with pytest.raises(UserError) as err:
        load_submission(path, TASK)
    return err.value


# --- directories ---------------------------------------------------------------------


def test_directory_with_both_regions_and_meta(tmp_path: Path) -> None:
    d = tmp_path / "ternary-v2"
    _write(d / "bitlinear.py", BITLINEAR.replace("\n", "\r\n"))
    _write(d / "config_overrides.py", CONFIG)
    _write(d / "meta.toml", '[submission]\nagent = "codex"\nmode = "agent"\nname = "t2"\n')
    _write(d / "NOTES.md", "ignored: not a .py file\n")
    sub = load_submission(d, TASK)
    assert sub.kind == "directory" and sub.source == d
    assert sub.regions == {"bitlinear": BITLINEAR, "config_overrides": CONFIG}
    assert sub.meta == {"agent": "codex", "mode": "agent", "name": "t2"}
    assert sub.name == "t2"
    assert sub.sha256 == _sha({"bitlinear": BITLINEAR, "config_overrides": CONFIG})


def test_directory_missing_file_keeps_the_default(tmp_path: Path) -> None:
    d = tmp_path / "only-config"
    _write(d / "config_overrides.py", CONFIG.rstrip("\n"))  # no final newline: same text
    sub = load_submission(str(d), TASK)
    assert sub.regions == {"config_overrides": CONFIG}
    assert sub.meta == {} and sub.name == "only-config"


def test_region_equal_to_the_default_is_dropped(tmp_path: Path) -> None:
    d = tmp_path / "baseline"
    _write(d / "config_overrides.py", "CONFIG_OVERRIDES = {}")
    _write(d / "meta.toml", '[submission]\nmode = "baseline"\n')
    sub = load_submission(d, TASK)
    assert sub.regions == {} and sub.sha256 == _sha({})


def test_unknown_py_file_lists_the_expected_names(tmp_path: Path) -> None:
    d = tmp_path / "s"
    _write(d / "bitlinear.py", BITLINEAR)
    _write(d / "helpers.py", "x = 1\n")
    _write(d / "Quant.py", "x = 1\n")
    e = _error(d)
    assert (e.what, e.where) == ("unexpected file(s) Quant.py, helpers.py", str(d))
    assert e.fix == ("a submission directory holds only: bitlinear.py, config_overrides.py, "
                     "meta.toml")


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    e = _error(tmp_path / "empty")
    assert e.what == "no region file and no meta.toml"


def test_region_file_with_markers_in_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "s"
    _write(d / "bitlinear.py", TEMPLATE)
    e = _error(d)
    assert (e.what, e.where) == ("contains EDITABLE REGION marker lines", str(d / "bitlinear.py"))
    assert "pass that .py file itself" in (e.fix or "")


@pytest.mark.parametrize(("meta", "what"), [
    ('[submission]\nauthor = "me"\n', "unknown key(s) author in [submission]"),
    ('[submission]\nmode = "tuned"\n', "mode must be one of vanilla, agent, baseline, not 'tuned'"),
    ("[submission]\nname = 3\n", "name must be string(s)"),
    ('[meta]\nname = "x"\n', "unknown table(s) meta"),
    ('submission = "x"\n', "'submission' must be a table"),
])
def test_bad_meta(tmp_path: Path, meta: str, what: str) -> None:
    d = tmp_path / "s"
    _write(d / "bitlinear.py", BITLINEAR)
    _write(d / "meta.toml", meta)
    e = _error(d)
    assert (e.what, e.where) == (what, str(d / "meta.toml"))


def test_meta_invalid_toml(tmp_path: Path) -> None:
    d = tmp_path / "s"
    _write(d / "meta.toml", "[submission\n")
    assert _error(d).what.startswith("invalid TOML: ")


# --- single files ----------------------------------------------------------------------


def test_single_py_is_the_bitlinear_region(tmp_path: Path) -> None:
    sub = load_submission(_write(tmp_path / "my_quant.py", BITLINEAR), TASK)
    assert (sub.kind, sub.name, sub.regions) == ("region-file", "my_quant",
                                                 {"bitlinear": BITLINEAR})


def test_single_py_named_after_a_region_file(tmp_path: Path) -> None:
    sub = load_submission(_write(tmp_path / "config_overrides.py", CONFIG), TASK)
    assert sub.regions == {"config_overrides": CONFIG}


def test_full_file(tmp_path: Path) -> None:
    text = splice(TEMPLATE, {"bitlinear": BITLINEAR})
    sub = load_submission(_write(tmp_path / "custom_pretrain.py", text), TASK)
    assert (sub.kind, sub.regions) == ("full-file", {"bitlinear": BITLINEAR})


def test_full_file_with_a_frozen_change(tmp_path: Path) -> None:
    path = _write(tmp_path / "full.py",
                  TEMPLATE.replace("\nlog_interval = 10\n", "\nlog_interval = 7\n"))
    n = TEMPLATE.split("\n").index("log_interval = 10") + 1
    e = _error(path)
    assert (e.what, e.where) == ("1 frozen line(s) changed", str(path))
    assert e.details == f"line {n}:\n- log_interval = 10\n+ log_interval = 7"


def test_edit_log_list_and_object(tmp_path: Path) -> None:
    ops = [{"op": "replace", "start_line": 38, "end_line": 115, "content": BITLINEAR},
           {"op": "replace", "start_line": 40, "end_line": 39, "content": "# more\n"},
           {"op": "undo"}]
    a = load_submission(_write(tmp_path / "a.json", json.dumps(ops)), TASK)
    b = load_submission(_write(tmp_path / "b.json", json.dumps({"ops": ops})), TASK)
    assert a.kind == b.kind == "edit-log"
    assert a.regions == b.regions == {"bitlinear": BITLINEAR}
    assert a.sha256 == b.sha256


@pytest.mark.parametrize(("text", "what"), [
    ("[{]", "invalid JSON: Expecting property name enclosed in double quotes at line 1 column 3"),
    ('{"ops": [], "x": 1}', "an edit log object has exactly one key 'ops', not 'ops', 'x'"),
    ('"replace"', "an edit log is a list of ops, not str"),
    ('[{"op": "replace", "start_line": 1, "end_line": 1, "content": ""}]',
     "ops[0]: lines 1..1 are not inside one editable region"),
])
def test_bad_edit_log(tmp_path: Path, text: str, what: str) -> None:
    path = _write(tmp_path / "log.json", text)
    e = _error(path)
    assert (e.what, e.where) == (what, str(path))


def test_every_form_gives_the_same_regions_and_sha(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    _write(d / "bitlinear.py", BITLINEAR)
    ops = [{"op": "replace", "start_line": 38, "end_line": 115, "content": BITLINEAR}]
    subs = [
        load_submission(d, TASK),
        load_submission(_write(tmp_path / "r.py", BITLINEAR.rstrip("\n")), TASK),
        load_submission(_write(tmp_path / "f.py", splice(TEMPLATE, {"bitlinear": BITLINEAR})),
                        TASK),
        load_submission(_write(tmp_path / "e.json", json.dumps(ops)), TASK),
    ]
    assert [s.kind for s in subs] == ["directory", "region-file", "full-file", "edit-log"]
    assert {s.sha256 for s in subs} == {_sha({"bitlinear": BITLINEAR})}


# --- limits and encodings ------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    e = _error(tmp_path / "nope")
    assert (e.what, e.where) == ("no such file or directory", str(tmp_path / "nope"))


def test_unsupported_suffix(tmp_path: Path) -> None:
    assert _error(_write(tmp_path / "s.txt", "x")).what == \
        "unsupported submission file type '.txt'"


def test_file_too_large(tmp_path: Path) -> None:
    ok = _write(tmp_path / "ok.py", "#" * (MAX_FILE_BYTES - 1) + "\n")
    assert load_submission(ok, TASK).regions["bitlinear"].startswith("###")
    e = _error(_write(tmp_path / "big.py", "#" * MAX_FILE_BYTES + "\n"))
    assert e.what == "file is 262145 bytes; the limit is 262144 (256 KiB)"


def test_nul_byte(tmp_path: Path) -> None:
    e = _error(_write(tmp_path / "n.py", b"x = 1\ny = '\x00'\n"))
    assert e.what == "contains a NUL byte at byte offset 11"


def test_not_utf8(tmp_path: Path) -> None:
    e = _error(_write(tmp_path / "l.py", "x = 1\n# caf\u00e9\n".encode("latin-1")))
    assert e.what == "not valid UTF-8: byte 0xe9 at byte offset 11 (line 2)"
    assert e.fix == "save the file as UTF-8"


def test_bom_and_crlf_are_normalised(tmp_path: Path) -> None:
    sub = load_submission(_write(tmp_path / "b.py", "\ufeffA = 1\r\nB = '\u00e9'\r"), TASK)
    assert sub.regions == {"bitlinear": "A = 1\nB = '\u00e9'\n"}


def test_region_line_limit(tmp_path: Path) -> None:
    assert load_submission(_write(tmp_path / "ok.py", "pass\n" * 2000), TASK).regions
    path = _write(tmp_path / "long.py", "pass\n" * 2001)
    e = _error(path)
    assert (e.what, e.where) == ("region 'bitlinear' has 2001 lines; the limit is 2000",
                                 str(path))


def test_directory_given_as_dot_is_named_after_the_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "sub-a" / "bitlinear.py", BITLINEAR)
    monkeypatch.chdir(tmp_path / "sub-a")
    assert load_submission(".", TASK).name == "sub-a"


# --- links and special files (docs/security.md) --------------------------------------


def test_a_region_file_linking_elsewhere_is_refused_unread(tmp_path: Path) -> None:
    secret = _write(tmp_path / "secret.txt", "def weight_quant(weight):\n    return 0\n")
    d = tmp_path / "sub"
    d.mkdir()
    (d / "bitlinear.py").symlink_to(secret)
    err = _error(d)
    assert "links or special files in the submission folder: bitlinear.py (a symbolic link)" \
        in str(err)
    assert err.where == str(d) and "copy the contents in" in str(err)
    # The single-file form too: never followed, whatever it points at.
    link = tmp_path / "link.py"
    link.symlink_to(secret)
    assert "is a symbolic link" in str(_error(link))


def test_any_link_or_fifo_in_the_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    d = tmp_path / "sub"
    _write(d / "bitlinear.py", BITLINEAR)
    (d / "NOTES.md").symlink_to("/etc/passwd")
    assert "NOTES.md (a symbolic link)" in str(_error(d))
    (d / "NOTES.md").unlink()
    os.mkfifo(d / "meta.toml")  # opening it for reading would block forever
    assert "meta.toml (a FIFO)" in str(_error(d))
    (d / "meta.toml").unlink()
    (d / "config_overrides.py").mkdir()
    assert "is not a regular file (a directory)" in str(_error(d))


def test_a_session_edit_from_a_linked_file_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    home = tmp_path / "home"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harness", *args, "--home", str(home)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)

    sid = cli("session", "start", "--agent", "x").stdout.strip()
    link = tmp_path / "region.py"
    link.symlink_to("/etc/passwd")
    got = cli("session", "edit", sid, "--start", "38", "--end", "115", "--content-file",
              str(link))
    assert got.returncode == 2 and "is a symbolic link" in got.stderr, got.stderr
    assert "root:" not in got.stdout + got.stderr
