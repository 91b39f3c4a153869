"""Registry, validate (everything checked before anything runs) and run (file order)."""

from __future__ import annotations

import pytest

from herovm.heroscript import (
    ActionFailed,
    ActionResult,
    HeroScriptError,
    Param,
    Registry,
    parse,
    run,
    validate,
)


def make_registry(log: list | None = None) -> Registry:
    reg = Registry()
    log = log if log is not None else []

    @reg.action(
        "file.write",
        help="Write a file.",
        example="!!file.write path:/etc/motd content:'hi'",
        params=[
            Param("path", "str", required=True, help="absolute path"),
            Param("content", "str", default=""),
            Param("mode", "str", default="0644"),
            Param("append", "bool", default=False),
        ],
    )
    def file_write(call):
        log.append(("file.write", dict(call.values), call.context))
        return call.values["path"]

    @reg.action("pkg.install", params=[Param("update", "bool", default=False)], args=True)
    def pkg_install(call):
        log.append(("pkg.install", call.args))

    @reg.action(
        "vm.create",
        params=[
            Param("name", required=True),
            Param("memory", "size", default="1GB"),
            Param("cpus", "int", default=1),
            Param("timeout", "duration", default="5m"),
            Param("dns", "list", default=[]),
            Param("load", "percentage", default="50%"),
        ],
    )
    def vm_create(call):
        log.append(("vm.create", dict(call.values)))

    @reg.action("cmd.fail", params=[Param("code", "int", default=1)])
    def cmd_fail(call):
        log.append(("cmd.fail",))
        raise ActionFailed("command failed", exit_code=call.values["code"], output="boom")

    @reg.action("cmd.crash")
    def cmd_crash(call):
        log.append(("cmd.crash",))
        raise RuntimeError("handler bug")

    return reg


def test_registry_lookup_and_specs():
    reg = make_registry()
    assert reg.get("file.write").help == "Write a file."
    assert reg.get("nope.nope") is None
    assert [s.fullname for s in reg.specs()] == sorted(s.fullname for s in reg.specs())
    assert reg.get("vm.create").param("memory").default == 1024**3  # text defaults are typed
    with pytest.raises(ValueError):
        reg.add("file.write", lambda call: None)
    with pytest.raises(ValueError):
        Param("x", "float")
    merged = reg.merge(Registry())
    assert "file.write" in merged and len(merged) == len(reg)


def test_valid_playbook_has_no_problems():
    pb = parse("!!file.write path:/a content:hi\n!!pkg.install git curl\n!!vm.create name:x memory:2GB\n")
    assert validate(pb, make_registry()) == []


def test_validate_collects_every_problem_with_positions():
    text = (
        "!!file.writ path:/a\n"  # 1 unknown action
        "!!file.write content:x mdoe:0600\n"  # 2 missing path, unknown mdoe
        "!!vm.create name:a memory:1X cpus:two\n"  # 3 ill-typed memory, cpus
        "!!file.write path:/b git\n"  # 4 bare argument
        "!!pkg.install git update:1 update:0\n"  # 5 repeated key (warning)
    )
    probs = validate(parse(text, path="p.hero"), make_registry())
    got = [(p.line, p.col, p.severity) for p in probs]
    assert got == [
        (1, 1, "error"),
        (2, 1, "error"),
        (2, 24, "error"),
        (3, 20, "error"),
        (3, 30, "error"),
        (4, 22, "error"),
        (5, 19, "warning"),
    ]
    by_line = {(p.line, p.col): p for p in probs}
    assert by_line[(1, 1)].message == "unknown action 'file.writ'"
    assert by_line[(1, 1)].hint == "did you mean file.write?"
    assert "missing parameter 'path'" in by_line[(2, 1)].message
    assert by_line[(2, 24)].hint == "did you mean mode?"
    assert str(by_line[(3, 20)]) == "p.hero:3:20: memory: '1X' is not a size; give a unit, e.g. 512MB"
    assert "not an integer" in by_line[(3, 30)].message
    assert "bare arguments" in by_line[(4, 22)].message
    assert str(by_line[(5, 19)]).startswith(
        "p.hero:5:19: warning: pkg.install: parameter 'update' is given again"
    )


def test_run_in_file_order_with_typed_values_and_context():
    log: list = []
    reg = make_registry(log)
    pb = parse("!!pkg.install git\n!!file.write path:/a append:yes\n!!vm.create name:v dns:'a, b'\n")
    started = []
    ended: list[ActionResult] = []
    results = run(
        pb, reg, context="ctx", on_start=lambda a, i: started.append((a.fullname, i)), on_end=ended.append
    )
    assert [r.ok for r in results] == [True, True, True]
    assert started == [("pkg.install", 0), ("file.write", 1), ("vm.create", 2)]
    assert ended == results
    assert log[0] == ("pkg.install", ["git"])
    assert log[1] == ("file.write", {"path": "/a", "content": "", "mode": "0644", "append": True}, "ctx")
    assert log[2][1] == {
        "name": "v",
        "memory": 1024**3,
        "cpus": 1,
        "timeout": 300.0,
        "dns": ["a", "b"],
        "load": 0.5,
    }
    assert results[1].value == "/a"
    assert results[0].seconds >= 0


def test_run_validates_everything_first_and_runs_nothing_on_error():
    log: list = []
    pb = parse("!!pkg.install git\n!!file.write\n!!nope.nope\n", path="b.hero")
    with pytest.raises(HeroScriptError) as info:
        run(pb, make_registry(log), on_start=lambda a, i: log.append("started"))
    assert log == []
    e = info.value
    assert [(p.line, p.col) for p in e.problems] == [(2, 1), (3, 1)]
    assert str(e).count("b.hero:") == 2
    assert (e.line, e.col) == (2, 1)


def test_warnings_do_not_stop_run():
    results = run(parse("!!pkg.install git update:1 update:0\n"), make_registry())
    assert results[0].ok


def test_run_stops_at_first_failure():
    log: list = []
    pb = parse("!!cmd.fail code:3\n!!pkg.install git\n")
    results = run(pb, make_registry(log))
    assert len(results) == 1
    r = results[0]
    assert (r.ok, r.error, r.exit_code, r.output, r.index) == (False, "command failed", 3, "boom", 0)
    assert log == [("cmd.fail",)]


def test_run_keep_going_and_other_exceptions_are_failures():
    log: list = []
    pb = parse("!!cmd.crash\n!!pkg.install git\n")
    results = run(pb, make_registry(log), keep_going=True)
    assert [r.ok for r in results] == [False, True]
    assert results[0].error == "handler bug"
    assert results[0].exit_code is None


def test_check_hook_rejects_before_running():
    reg = Registry()

    def check(call):
        if call.values["a"] > call.values["b"]:
            raise ValueError("a must not exceed b")

    reg.add("x.y", lambda call: None, params=[Param("a", "int"), Param("b", "int")], check=check)
    probs = validate(parse("!!x.y a:3 b:2\n"), reg)
    assert [(p.line, p.col, p.message) for p in probs] == [(1, 1, "x.y: a must not exceed b")]


def test_heroscript_error_for_many_problems_lists_all():
    e = HeroScriptError.from_problems(validate(parse("!!a.b\n!!c.d\n"), Registry()))
    assert len(e.problems) == 2
    assert str(e).splitlines()[0] == "<string>:1:1: unknown action 'a.b'"
    assert "<string>:2:1: unknown action 'c.d'" in str(e)


def test_a_variable_inside_a_list_item_is_part_of_that_item() -> None:
    """A list is split as written, then variables go into its items: a comma in a value adds no item there;
    a variable that is a whole item stands for the items it holds."""
    reg = Registry()
    got: list = []
    reg.add("cmd.run", lambda call: got.append(call.values["env"]), params=[Param("env", "list", default=[])])
    text = "!!cmd.run env:'A=${X}, B=2'\n!!cmd.run env:'${P}, z'\n!!cmd.run env:[{P}]\n"
    pb = parse(text, variables={"X": "1, LD_PRELOAD=/x.so", "P": "git,curl"})
    assert validate(pb, reg) == []
    assert all(r.ok for r in run(pb, reg))
    assert got == [["A=1, LD_PRELOAD=/x.so", "B=2"], ["git", "curl", "z"], ["git", "curl"]]
    # without variables a list reads as before
    assert all(r.ok for r in run(parse("!!cmd.run env:'A=1, B=2'\n"), reg))
    assert got[-1] == ["A=1", "B=2"]
