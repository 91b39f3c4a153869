"""Typed values: plain readers (ValueError) and Params getters (HeroScriptError with position)."""

from __future__ import annotations

import pytest

from herovm.heroscript import (
    HeroScriptError,
    Params,
    parse,
    parse_bool,
    parse_duration,
    parse_int,
    parse_list,
    parse_percentage,
    parse_size,
)


@pytest.mark.parametrize("text", ["true", "TRUE", "yes", "Y", "y", "1"])
def test_bool_true(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["false", "No", "n", "0", "FALSE"])
def test_bool_false(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["", "maybe", "2"])
def test_bool_bad(text):
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool(text)


def test_int():
    assert parse_int("42") == 42
    assert parse_int("-7") == -7
    for bad in ["", "1.5", "+3", "1e3", "0x10", "12a"]:
        with pytest.raises(ValueError, match="not an integer"):
            parse_int(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512 * 1024**2),
        ("1GB", 1024**3),
        ("1gib", 1024**3),
        ("2G", 2 * 1024**3),
        ("1.5GB", 1610612736),
        ("0.5k", 512),
        ("1.0001KB", 1024),  # fractions are rounded down to whole bytes
        ("3TiB", 3 * 1024**4),
        ("1 TB", 1024**4),
        ("10kb", 10240),
        ("7M", 7 * 1024**2),
    ],
)
def test_size(text, expected):
    assert parse_size(text) == expected


def test_bare_number_is_not_a_size():
    with pytest.raises(ValueError) as info:
        parse_size("1024")
    assert str(info.value) == "'1024' is not a size; give a unit, e.g. 512MB"


@pytest.mark.parametrize("bad", ["", "GB", "1XB", "1X", "-1GB", "1.2.3GB"])
def test_bad_size(bad):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("500ms", 0.5)],
)
def test_duration(text, expected):
    assert parse_duration(text) == expected


def test_bare_number_is_not_a_duration():
    with pytest.raises(ValueError) as info:
        parse_duration("30")
    assert str(info.value) == "'30' is not a duration; give a unit, e.g. 30s"


@pytest.mark.parametrize("bad", ["", "5x", "m5", "1h 30m", "h"])
def test_bad_duration(bad):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(bad)


def test_percentage():
    assert parse_percentage("75%") == 0.75
    assert parse_percentage("12.5%") == 0.125
    with pytest.raises(ValueError, match="percent sign"):
        parse_percentage("75")


def test_list():
    assert parse_list("git, curl") == ["git", "curl"]
    assert parse_list(" a ,, b ,") == ["a", "b"]
    assert parse_list("[a,b]") == ["a", "b"]
    assert parse_list("['8.8.8.8', \"8.8.4.4\"]") == ["8.8.8.8", "8.8.4.4"]
    assert parse_list("['a, b', c]") == ["a, b", "c"]
    assert parse_list("") == []


def test_messages_are_one_line():
    for fn in (parse_bool, parse_int, parse_size, parse_duration, parse_percentage):
        with pytest.raises(ValueError) as info:
            fn("zz\n")
        assert "\n" not in str(info.value).replace("\\n", "")


# --- Params getters ----------------------------------------------------------------------------------


def action(text: str):
    return parse(text, path="x.hero")[0]


def test_typed_getters():
    a = action("!!vm.create name:a memory:1GB cpus:2 fast:yes t:5m dns:'a, b' load:50% empty:\n")
    ps = a.params
    assert ps.get_str("name") == "a"
    assert ps.get_size("memory") == 1024**3
    assert ps.get_int("cpus") == 2
    assert ps.get_bool("fast") is True
    assert ps.get_duration("t") == 300.0
    assert ps.get_list("dns") == ["a", "b"]
    assert ps.get_percentage("load") == 0.5
    assert ps.get_bool("empty", default=True) is True  # empty means the default
    assert ps.get_int("missing", default=3) == 3
    assert ps.get("missing") is None
    assert ps["name"] == "a" and "name" in ps and "nope" not in ps
    assert ps.keys()[:2] == ["name", "memory"]


def test_bad_value_points_at_parameter():
    a = action("!!vm.create name:a\n    memory:1X\n")
    with pytest.raises(HeroScriptError) as info:
        a.params.get_size("memory")
    e = info.value
    assert (e.file, e.line, e.col) == ("x.hero", 2, 5)
    assert str(e) == "x.hero:2:5: memory: '1X' is not a size; give a unit, e.g. 512MB"


def test_missing_parameter_points_at_action():
    a = action("\n  !!vm.create name:a\n")
    with pytest.raises(HeroScriptError) as info:
        a.params.get_size("memory")
    e = info.value
    assert (e.line, e.col) == (2, 3)
    assert "missing parameter 'memory'" in e.message


def test_empty_bool_without_default_is_an_error():
    a = action("!!a.b flag:\n")
    with pytest.raises(HeroScriptError, match="flag"):
        a.params.get_bool("flag")


def test_params_built_by_hand():
    ps = Params({"a": "1", "b": "x"})
    assert ps.items() == [("a", "1"), ("b", "x")]
    assert ps == Params([("a", "1"), ("b", "x")])
    assert ps != Params([("b", "x"), ("a", "1")])
