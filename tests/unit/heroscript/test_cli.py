"""`herovm script check|parse|fmt` through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from herovm.cli_script import app, make_app
from herovm.heroscript import Param, Registry

runner = CliRunner()


def test_check_clean_file(tmp_path):
    f = tmp_path / "ok.hero"
    f.write_text("!!vm.create name:a\n")
    r = runner.invoke(app, ["check", str(f)])
    assert r.exit_code == 0, r.output
    assert r.output == ""


def test_check_syntax_error_and_warning(tmp_path):
    bad = tmp_path / "bad.hero"
    bad.write_text("!!vm.create name:a\nmemory:1GB\n")
    warn = tmp_path / "warn.hero"
    warn.write_text("!!vm.create name:a name:b\n")
    r = runner.invoke(app, ["check", str(bad), str(warn)])
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0] == f"{bad}:2:1: error: parameter lines must be indented by 2 spaces"
    assert lines[1].startswith("  hint: ")
    assert lines[2].startswith(f"{warn}:1:13: warning: vm.create: parameter 'name' is given again")


def test_check_warning_only_exits_zero(tmp_path):
    f = tmp_path / "w.hero"
    f.write_text("!!a.b x:1 x:2\n")
    r = runner.invoke(app, ["check", str(f)])
    assert r.exit_code == 0
    assert "warning:" in r.output


def test_check_with_registry(tmp_path):
    reg = Registry()
    reg.add("vm.create", lambda call: None, params=[Param("name", required=True)])
    f = tmp_path / "r.hero"
    f.write_text("!!vm.creat name:a\n")
    r = runner.invoke(make_app(lambda: reg), ["check", str(f)])
    assert r.exit_code == 1
    assert f"{f}:1:1: error: unknown action 'vm.creat'\n  hint: did you mean vm.create?" in r.output


def test_check_stdin():
    r = runner.invoke(app, ["check", "-"], input="!!a.b.c\n")
    assert r.exit_code == 1
    assert r.output.startswith("<stdin>:1:3: error: ")


def test_check_missing_file(tmp_path):
    r = runner.invoke(app, ["check", str(tmp_path / "nope.hero")])
    assert r.exit_code == 1
    assert "cannot read" in r.output


def test_parse_json_stdin():
    r = runner.invoke(app, ["parse", "-", "--json"], input="// c\n!!pkg.install git x:'a b'\n")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data == [
        {
            "kind": "sal",
            "actor": "pkg",
            "name": "install",
            "params": {"x": "a b"},
            "args": ["git"],
            "comments": ["c"],
            "file": "<stdin>",
            "line": 2,
        }
    ]


def test_parse_readable(tmp_path):
    f = tmp_path / "p.hero"
    f.write_text("!!vm.create name:a\n")
    r = runner.invoke(app, ["parse", str(f)])
    assert r.exit_code == 0
    assert "!!vm.create" in r.output and "name = 'a'" in r.output


def test_parse_error_exit_code():
    r = runner.invoke(app, ["parse", "-"], input="!!!!!x\n")
    assert r.exit_code == 1


def test_fmt_rewrites_and_check(tmp_path):
    f = tmp_path / "f.hero"
    f.write_text("!!vm.create   name:a\n   memory:1GB\n")
    r = runner.invoke(app, ["fmt", "--check", str(f)])
    assert r.exit_code == 1
    assert f"{f} would be reformatted" in r.output
    assert f.read_text() == "!!vm.create   name:a\n   memory:1GB\n"
    r = runner.invoke(app, ["fmt", str(f)])
    assert r.exit_code == 0
    assert f.read_text() == "!!vm.create name:a memory:1GB\n"
    r = runner.invoke(app, ["fmt", "--check", str(f)])
    assert r.exit_code == 0


def test_fmt_keeps_includes_and_variables(tmp_path):
    f = tmp_path / "i.hero"
    f.write_text("!!play.include path:missing.hero\n!!a.b x:${X}\n")
    r = runner.invoke(app, ["fmt", "--check", str(f)])
    assert r.exit_code == 0, r.output


def test_fmt_refuses_to_drop_text(tmp_path):
    f = tmp_path / "doc.md"
    original = "# Title\n\n!!a.b x:1\n"
    f.write_text(original)
    r = runner.invoke(app, ["fmt", str(f)])
    assert r.exit_code == 2
    assert "fmt would drop" in r.output
    assert f.read_text() == original


def test_fmt_stdin_to_stdout():
    r = runner.invoke(app, ["fmt", "-"], input="!!a.b    x:1\n")
    assert r.exit_code == 0
    assert r.output == "!!a.b x:1\n"
