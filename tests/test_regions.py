"""Editable regions: parsing, splicing, full-file extraction and the agent's edit session.

The property tests check the session against an independent model (plain lists and a
marker scanner written here with string methods), not against the module's own Layout.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness.errors import UserError
from harness.regions import EditSession, extract_from_full_file, splice, unified_diff
from harness.runtime.layout import begin_marker, end_marker, parse_layout, text_to_lines
from harness.task import load_task

TASK = load_task()
TEMPLATE = TASK.template_text()
T_LINES = TEMPLATE.split("\n")[:-1]  # the template ends with "\n"
IDS = ("bitlinear", "config_overrides")
FIX_FULL = ("edit only inside the EDITABLE REGION markers; every other line, the markers "
            "included, must stay exactly as in the template")


def scan(text: str) -> list[tuple[str, int, int]]:
    """(id, BEGIN line, END line) of each marker pair, found without the module's regexes."""
    assert text.endswith("\n")
    found: list[tuple[str, int, int]] = []
    opened: dict[str, int] = {}
    for n, line in enumerate(text.split("\n")[:-1], start=1):
        if line.startswith("# >>> EDITABLE REGION ") and line.endswith(" >>>"):
            opened[line.split()[4]] = n
        elif line.startswith("# <<< EDITABLE REGION ") and line.endswith(" <<<"):
            rid = line.split()[4]
            found.append((rid, opened.pop(rid), n))
    assert not opened
    return found


def frozen_runs(text: str) -> list[str]:
    """The text outside region contents, one string per run, markers included."""
    lines = text.split("\n")[:-1]
    runs, prev = [], 0
    for _, begin, end in scan(text):
        runs.append("\n".join(lines[prev:begin]))
        prev = end - 1
    runs.append("\n".join(lines[prev:]))
    return runs


T_SCAN = scan(TEMPLATE)
T_FROZEN = frozen_runs(TEMPLATE)
(_, B1, E1), (_, B2, E2) = T_SCAN  # marker lines of the two regions in the template


# --- the real template ---------------------------------------------------------------


def test_template_layout_round_trips_byte_for_byte() -> None:
    layout = parse_layout(TEMPLATE)
    assert layout.render() == TEMPLATE
    assert layout.region_ids() == IDS
    assert [len(s) for s in layout.segments] == [B1, B2 - E1 + 1, len(T_LINES) - E2 + 1]
    assert layout.segments[0][-1] == begin_marker("bitlinear")
    assert layout.segments[1][0] == end_marker("bitlinear")
    assert layout.region("config_overrides").lines == ("CONFIG_OVERRIDES = {}",)


def test_template_regions_sit_where_the_task_statement_says() -> None:
    layout = parse_layout(TEMPLATE)
    assert layout.span("bitlinear") == (38, 115) == TASK.region("bitlinear").documented_lines
    assert layout.span("config_overrides") == (168, 168)
    assert layout.spans() == [(B1 + 1, E1 - 1), (B2 + 1, E2 - 1)]


# --- text conventions ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "lines"), [
    ("", ()),
    ("\n", ("",)),
    ("a", ("a",)),
    ("a\n", ("a",)),
    ("a\n\n", ("a", "")),
    ("a\r\nb\rc\r\n", ("a", "b", "c")),
    ("x\u2028y\x0cz\n", ("x\u2028y\x0cz",)),  # only "\n" splits, unlike str.splitlines
])
def test_text_to_lines(text: str, lines: tuple[str, ...]) -> None:
    assert text_to_lines(text) == lines


# --- parse errors ----------------------------------------------------------------------


def _doc(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


@pytest.mark.parametrize(("text", "where", "what"), [
    (_doc("x", begin_marker("a"), begin_marker("b"), end_marker("b"), end_marker("a")),
     "template:3", "BEGIN marker of 'b' inside region 'a' (opened at line 2)"),
    (_doc(begin_marker("a"), end_marker("a"), "y", begin_marker("a"), end_marker("a")),
     "template:4", "region 'a' appears twice (first at line 1)"),
    (_doc("x", end_marker("a")),
     "template:2", "END marker of 'a' without a BEGIN marker before it"),
    (_doc(begin_marker("a"), "x", end_marker("b")),
     "template:3", "END marker of 'b' closes region 'a' (opened at line 1)"),
    (_doc("x", "y", begin_marker("a"), "z"),
     "template:3", "region 'a' is never closed"),
])
def test_parse_errors_name_the_line(text: str, where: str, what: str) -> None:
    with pytest.raises(UserError) as err:
        parse_layout(text)
    assert (err.value.where, err.value.what) == (where, what)


def test_near_miss_marker_is_an_error_not_plain_text() -> None:
    with pytest.raises(UserError) as err:
        parse_layout(_doc("x", "  " + begin_marker("a"), end_marker("a")), where="t.py")
    assert err.value.where == "t.py:2"
    assert err.value.what.startswith("line looks like an EDITABLE REGION marker but is not one")


def test_template_without_regions_is_one_segment() -> None:
    layout = parse_layout("a\nb\n")
    assert layout.segments == (("a", "b"),) and layout.regions == ()


# --- splice ----------------------------------------------------------------------------


def test_splice_replaces_only_the_given_region() -> None:
    out = splice(TEMPLATE, {"config_overrides": "CONFIG_OVERRIDES = {'dropout': 0.1}\r\n"})
    lines = out.split("\n")[:-1]
    assert lines[B2] == "CONFIG_OVERRIDES = {'dropout': 0.1}"
    assert lines[:B2] == T_LINES[:B2] and lines[B2 + 1:] == T_LINES[B2 + 1:]
    assert frozen_runs(out) == T_FROZEN


def test_splice_empty_text_empties_the_region() -> None:
    out = splice(TEMPLATE, {"bitlinear": ""})
    assert scan(out)[0] == ("bitlinear", B1, B1 + 1)
    assert parse_layout(out).span("bitlinear") == (B1 + 1, B1)


def test_splice_refuses_a_forged_marker() -> None:
    text = f"x = 1\n{end_marker('bitlinear')}\nimport os\n{begin_marker('bitlinear')}\n"
    with pytest.raises(UserError) as err:
        splice(TEMPLATE, {"bitlinear": text})
    assert err.value.where == "region 'bitlinear'"
    assert err.value.what == ("line 2 of the new content is an EDITABLE REGION marker: "
                              "'# <<< EDITABLE REGION bitlinear <<<'")


def test_splice_unknown_region_lists_the_valid_ids() -> None:
    with pytest.raises(UserError) as err:
        splice(TEMPLATE, {"bitlinaer": "x"})
    assert err.value.what == "no editable region 'bitlinaer'"
    assert err.value.fix == "valid region ids: bitlinear, config_overrides"


def test_unified_diff() -> None:
    assert unified_diff(TEMPLATE, TEMPLATE) == ""
    diff = unified_diff(TEMPLATE, splice(TEMPLATE, {"config_overrides": "X = 1"}))
    assert diff.startswith("--- template\n+++ submission\n@@ ")
    assert "\n-CONFIG_OVERRIDES = {}\n+X = 1\n" in diff


# --- full edited copies --------------------------------------------------------------


def _edit_line(n: int, new: list[str]) -> str:
    """The template with its line n (1-based) replaced by `new` lines."""
    return "".join(f"{line}\n" for line in T_LINES[:n - 1] + new + T_LINES[n:])


def test_full_file_returns_the_region_texts() -> None:
    spliced = splice(TEMPLATE, {"bitlinear": "a\nb\n"})
    assert extract_from_full_file(TEMPLATE, spliced.replace("\n", "\r\n"), where="f.py") == {
        "bitlinear": "a\nb\n", "config_overrides": "CONFIG_OVERRIDES = {}\n"}
    assert extract_from_full_file(TEMPLATE, spliced[:-1], where="f.py")["bitlinear"] == "a\nb\n"


def test_full_file_with_frozen_text_copied_into_a_region() -> None:
    # A region repeating a long frozen run could mislead difflib; the structural check not.
    # Whole lines, each ending in "\n": the slice may end on blank lines.
    body = "".join(line + "\n" for line in T_LINES[B2:E2 + 20]).replace("EDITABLE REGION",
                                                                         "region")
    spliced = splice(TEMPLATE, {"bitlinear": body})
    assert extract_from_full_file(TEMPLATE, spliced, where="f.py")["bitlinear"] == body


def test_full_file_frozen_edit_lists_only_the_offending_hunks() -> None:
    n_os = T_LINES.index("import os") + 1
    text = _edit_line(n_os, ["import os, sys"])
    text = splice(text, {"bitlinear": "changed = True"})  # a legal edit, not listed
    with pytest.raises(UserError) as err:
        extract_from_full_file(TEMPLATE, text, where="sub/f.py")
    e = err.value
    assert (e.what, e.where, e.fix) == ("1 frozen line(s) changed", "sub/f.py", FIX_FULL)
    assert e.details == f"line {n_os}:\n- import os\n+ import os, sys"


def test_full_file_insert_and_delete_in_frozen_part() -> None:
    text = _edit_line(E2 + 1, [T_LINES[E2], "EXTRA = 1"])  # a line after config's END marker
    text = text.replace("import math\n", "")
    with pytest.raises(UserError) as err:
        extract_from_full_file(TEMPLATE, text, where="f.py")
    n_math = T_LINES.index("import math") + 1
    assert err.value.what == "2 frozen line(s) changed"
    assert err.value.details == (f"line {n_math}:\n- import math\n"
                                 f"after line {E2 + 1}:\n+ EXTRA = 1")


def test_full_file_moved_marker_is_a_frozen_change() -> None:
    # The END marker of bitlinear moved up two lines: the region shrank into frozen text.
    lines = list(T_LINES)
    del lines[E1 - 1]
    lines.insert(E1 - 3, end_marker("bitlinear"))
    with pytest.raises(UserError) as err:
        extract_from_full_file(TEMPLATE, "".join(f"{x}\n" for x in lines), where="f.py")
    assert err.value.what == "1 frozen line(s) changed"
    assert f"- {end_marker('bitlinear')}" in (err.value.details or "")


def test_full_file_forged_marker_inside_a_region() -> None:
    text = _edit_line(B1 + 1, [end_marker("bitlinear"), begin_marker("bitlinear")])
    with pytest.raises(UserError) as err:
        extract_from_full_file(TEMPLATE, text, where="f.py")
    assert err.value.what == f"line {B1 + 1} adds an EDITABLE REGION marker inside a region"


# --- the edit session: the transcript -----------------------------------------------


def _body(n: int) -> str:
    return "".join(f"line_{i} = {i}\n" for i in range(n))


def test_transcript_replace_undo_replace_keeps_the_second_region() -> None:
    s = EditSession(TEMPLATE)
    second = B2 + 1 - 15  # the 78-line region shrinks to 63 lines
    assert second == 153
    assert s.replace(38, 115, _body(63)) == (
        "OK: Replaced lines 38..115 with 63 line(s) in custom_pretrain.py. "
        f"Editable range: 38–100, {second}–{second}.")
    assert scan(s.text()) == [("bitlinear", 37, 101), ("config_overrides", 152, 154)]
    assert s.undo() == ("Undo complete: restored 1 edit(s) in custom_pretrain.py. "
                        "Editable range: 38–115, 168–168.")
    assert s.text() == TEMPLATE
    assert s.replace(38, 115, _body(55)) == (
        "OK: Replaced lines 38..115 with 55 line(s) in custom_pretrain.py. "
        "Editable range: 38–92, 145–145.")
    # The bug being fixed: growing the first region must move, not swallow, the second.
    assert s.replace(38, 92, _body(90)).endswith("Editable range: 38–127, 180–180.")
    assert s.regions()["config_overrides"] == "CONFIG_OVERRIDES = {}\n"
    assert scan(s.text())[1] == ("config_overrides", 179, 181)
    assert frozen_runs(s.text()) == T_FROZEN
    assert s.undo(2).startswith("Undo complete: restored 2 edit(s)")
    assert s.text() == TEMPLATE


def test_view_marks_editable_lines() -> None:
    s = EditSession(TEMPLATE)
    out = s.view(B1, B1 + 1).split("\n")
    assert out == [
        f"[Current file: custom_pretrain.py | editable: 38–115, 168–168 | total: "
        f"{len(T_LINES)} lines]",
        f"  37 | {begin_marker('bitlinear')}",
        f"  38 ▸ {T_LINES[37]}",
    ]
    assert s.view().count("\n") == len(T_LINES)
    assert s.view(168, 169).split("\n")[1:] == [" 168 ▸ CONFIG_OVERRIDES = {}",
                                                f" 169 | {end_marker('config_overrides')}"]


@pytest.mark.parametrize(("start", "end"), [(0, 3), (5, 4), (3, len(T_LINES) + 1)])
def test_view_bounds(start: int, end: int) -> None:
    with pytest.raises(UserError) as err:
        EditSession(TEMPLATE).view(start, end)
    assert err.value.what == f"cannot view lines {start}..{end}"
    assert err.value.fix == f"use 1 <= start <= end <= {len(T_LINES)}"


def test_empty_region_insert_and_range_text() -> None:
    s = EditSession(TEMPLATE)
    assert s.replace(168, 168, "").endswith("Editable range: 38–115, 168–167 (empty).")
    assert s.regions()["config_overrides"] == ""
    assert "[Current file: custom_pretrain.py | editable: 38–115, 168–167 (empty) |" in s.view()
    assert s.replace(168, 167, "A = 1\nB = 2") == (
        "OK: Inserted 2 line(s) at line 168 in custom_pretrain.py. "
        "Editable range: 38–115, 168–169.")
    assert s.replace(38, 37, "\n").endswith("Editable range: 38–116, 169–170.")
    assert s.regions()["bitlinear"].startswith("\n# -- Native")


def _refused(s: EditSession, start: int, end: int, content: str = "x = 1") -> UserError:
    before, depth = s.text(), s.undo_depth()
    with pytest.raises(UserError) as err:
        s.replace(start, end, content)
    assert s.text() == before and s.undo_depth() == depth
    return err.value


def test_replace_straddling_the_begin_marker() -> None:
    e = _refused(EditSession(TEMPLATE), 35, 39)
    assert (e.where, e.what) == ("custom_pretrain.py",
                                 "lines 35..39 are not inside one editable region")
    assert e.fix == "edit within one editable range: 38–115, 168–168 (nothing was changed)"
    assert e.details == "\n".join([
        "3 frozen line(s) in the request:",
        f"  35 | {T_LINES[34]}", f"  36 | {T_LINES[35]}", f"  37 | {T_LINES[36]}"])


def test_replace_refusals() -> None:
    s = EditSession(TEMPLATE)
    s.replace(38, 115, _body(63))
    assert _refused(s, 100, 147).what == "lines 100..147 are not inside one editable region"
    assert _refused(s, 102, 101).what == ("cannot insert at line 102: it is not inside an "
                                          "editable region")
    assert _refused(s, 101, 101).details == f"1 frozen line(s) in the request:\n 101 | " \
                                            f"{end_marker('bitlinear')}"
    n = len(s.text().split("\n")) - 1
    assert _refused(s, 0, 3).what == f"lines 0..3 are outside the file (1..{n})"
    assert _refused(s, 40, 30).what == "end_line 30 is before start_line 40"
    assert _refused(s, 40, 40, "ok\n# <<< EDITABLE REGION bitlinear <<<\n").what == (
        "line 2 of the new content is an EDITABLE REGION marker: "
        "'# <<< EDITABLE REGION bitlinear <<<'")
    assert _refused(s, 40, 40, "\t#>>>  editable region x").what.startswith("line 1 ")


def test_undo_limits() -> None:
    s = EditSession(TEMPLATE)
    with pytest.raises(UserError) as err:
        s.undo()
    assert err.value.what == "cannot undo 1 edit(s): 0 edit(s) can be undone"
    s.replace(168, 168, "X = 1")
    with pytest.raises(UserError) as err:
        s.undo(2)
    assert err.value.fix == "use 1 <= n <= 1"
    assert s.regions()["config_overrides"] == "X = 1\n"


# --- edit logs -----------------------------------------------------------------------


def test_apply_log_replays_ops() -> None:
    s = EditSession(TEMPLATE)
    s.apply_log([
        {"op": "replace", "start_line": 38, "end_line": 115, "content": "A = 1\r\nB = 2\r\n"},
        {"op": "replace", "start_line": 39, "end_line": 39, "content": "B = 3",
         "filename": "custom_pretrain.py"},
        {"op": "replace", "start_line": 92, "end_line": 92, "content": "C = {}"},
        {"op": "undo"},
    ])
    assert s.regions() == {"bitlinear": "A = 1\nB = 3\n", "config_overrides":
                           "CONFIG_OVERRIDES = {}\n"}
    assert s.undo_depth() == 2


@pytest.mark.parametrize(("op", "what"), [
    ({"op": "delete"}, "ops[1]: unknown op 'delete'"),
    ({"op": "replace", "start_line": 38}, "ops[1]: replace op: missing content, end_line"),
    ({"op": "undo", "count": 1}, "ops[1]: undo op: unknown count"),
    ({"op": "replace", "start_line": 38, "end_line": 38, "content": "x", "filename": "model.py"},
     "ops[1]: filename 'model.py' is not 'custom_pretrain.py'"),
    ({"op": "replace", "start_line": "38", "end_line": 38, "content": "x"},
     "ops[1]: 'start_line' must be an integer, not '38'"),
    ({"op": "replace", "start_line": True, "end_line": 38, "content": "x"},
     "ops[1]: 'start_line' must be an integer, not True"),
    ({"op": "replace", "start_line": 1, "end_line": 1, "content": "x"},
     "ops[1]: lines 1..1 are not inside one editable region"),
    ({"op": "undo", "n": 3}, "ops[1]: cannot undo 3 edit(s): 1 edit(s) can be undone"),
    (["replace"], "ops[1]: an op must be an object, not list"),
])
def test_apply_log_errors_name_the_op_and_change_nothing(op: object, what: str) -> None:
    s = EditSession(TEMPLATE)
    good = {"op": "replace", "start_line": 168, "end_line": 168, "content": "X = 1"}
    with pytest.raises(UserError) as err:
        s.apply_log([good, op], where="log.json")
    assert (err.value.where, err.value.what) == ("log.json", what)
    assert s.text() == TEMPLATE and s.undo_depth() == 0


# --- properties ------------------------------------------------------------------------

_FROZEN_SAMPLES = [x for x in T_LINES if "EDITABLE REGION" not in x]
_line = st.one_of(
    st.sampled_from(["", "def f(x):", "    return x", "import os", "# comment", "    ",
                     "class BitLinear(nn.Module):", "CONFIG_OVERRIDES = {}", "x\u2028y"]),
    st.sampled_from(_FROZEN_SAMPLES),  # copies of frozen lines inside a region
    st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)),
            max_size=12).filter(lambda t: "REGION" not in t.upper()),
)


@st.composite
def _content(draw: st.DrawFn) -> tuple[str, list[str]]:
    """(content text, the lines it must become), in the varied spellings a client may use."""
    lines = draw(st.lists(_line, max_size=6))
    text = "\n".join(lines)
    # A final "\n" is optional unless the last line is empty (then it carries the line).
    if lines and (lines[-1] == "" or draw(st.booleans())):
        text += "\n"
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return text, lines


def _check_invariants(s: EditSession, model: list[list[str]]) -> None:
    text = s.text()
    assert frozen_runs(text) == T_FROZEN  # (a) frozen parts byte-identical
    found = scan(text)
    assert [rid for rid, _, _ in found] == list(IDS)  # (b) both regions still there
    assert [list(r.lines) for r in parse_layout(text).regions] == model
    texts = ["".join(f"{x}\n" for x in m) for m in model]
    assert s.regions() == dict(zip(IDS, texts, strict=True))
    assert s.editable_ranges() == [(b + 1, e - 1) for _, b, e in found]  # (c)


def _frozen_request(draw: st.DrawFn, s: EditSession) -> tuple[int, int]:
    """A (start, end) that touches a frozen line, or inserts outside every region."""
    total = len(text_to_lines(s.text()))
    spans = s.editable_ranges()
    editable = {n for a, b in spans for n in range(a, b + 1)}
    if draw(st.booleans()):
        f = draw(st.sampled_from([n for n in range(1, total + 1) if n not in editable]))
        return draw(st.integers(1, f)), draw(st.integers(f, total))
    inside = {n for a, b in spans for n in range(a, b + 2)}
    p = draw(st.sampled_from([n for n in range(1, total + 2) if n not in inside]))
    return p, p - 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_edit_sequences_keep_regions_and_frozen_text(data: st.DataObject) -> None:
    s = EditSession(TEMPLATE)
    model = [list(r.lines) for r in parse_layout(TEMPLATE).regions]
    snapshots: list[list[list[str]]] = []
    for _ in range(data.draw(st.integers(1, 12))):
        kind = data.draw(st.sampled_from(["replace", "replace", "undo", "refused"]))
        if kind == "replace":
            k = data.draw(st.integers(0, 1))
            first = s.editable_ranges()[k][0]
            start = data.draw(st.integers(first, first + len(model[k])))
            end = data.draw(st.integers(start - 1, first + len(model[k]) - 1))
            text, lines = data.draw(_content())
            msg = s.replace(start, end, text)
            snapshots.append([list(m) for m in model])
            model[k][start - first:end - first + 1] = lines
            assert msg.endswith(f"Editable range: {s.ranges_text()}.")
        elif kind == "undo" and snapshots:
            n = data.draw(st.integers(1, len(snapshots)))
            s.undo(n)
            model = snapshots[-n]
            del snapshots[-n:]
        elif kind == "refused":
            start, end = _frozen_request(data.draw, s)
            before = s.text()
            with pytest.raises(UserError):
                s.replace(start, end, data.draw(_content())[0])
            assert s.text() == before
        _check_invariants(s, model)
    # The session's regions survive both ways to and from a full file.
    assert extract_from_full_file(TEMPLATE, s.text(), where="f") == s.regions()
    assert splice(TEMPLATE, s.regions()) == s.text()
    assert s.undo_depth() == len(snapshots)
    if snapshots:
        s.undo(len(snapshots))
    assert s.text() == TEMPLATE  # (d)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_frozen_change_in_a_full_file_is_refused(data: st.DataObject) -> None:
    layout = parse_layout(TEMPLATE)
    editable = {n for a, b in layout.spans() for n in range(a, b + 1)}
    frozen = [n for n in range(1, len(T_LINES) + 1) if n not in editable]
    lines = list(text_to_lines(splice(TEMPLATE, {"bitlinear": data.draw(_content())[0]})))
    n = data.draw(st.sampled_from(frozen))
    # Lines from bitlinear's END marker on moved by the region's change in size.
    i = n - 1 + (len(lines) - len(T_LINES) if n >= E1 else 0)
    how = data.draw(st.sampled_from(["edit", "delete", "insert"]))
    if how == "edit":
        new = data.draw(_line)
        assume(new != lines[i])
        lines[i] = new
    elif how == "delete":
        del lines[i]
    else:
        lines.insert(i + 1, data.draw(_line))
        assume(n not in (B1, B2))  # after a BEGIN marker is inside the region: legal
    with pytest.raises(UserError) as err:
        extract_from_full_file(TEMPLATE, "".join(f"{x}\n" for x in lines), where="f")
    assert err.value.what.endswith("frozen line(s) changed")
