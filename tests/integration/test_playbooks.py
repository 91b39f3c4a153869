"""Playbooks against real guests: `herovm run` (as a user runs it) and run_playbook, and the examples.

Every VM here is named pb-RUNID-..., and every test removes the VMs of its prefix at teardown, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from herovm import state
from herovm.heroscript import HeroScriptError
from herovm.manager import Manager
from herovm.playbook import run_playbook

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PREFIX = f"pb-{uuid.uuid4().hex[:6]}"


def herovm(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "herovm"), *args], cwd=cwd, input=input, capture_output=True, text=True, timeout=240
    )


def remove_prefixed(prefix: str) -> None:
    with Manager() as m:
        for row in m.ls():
            if row["name"].startswith(prefix):
                with contextlib.suppress(Exception):
                    m.down(row["name"])


def exists(name: str) -> bool:
    with Manager() as m:
        return m.backend.get(name) is not None or state.VMDir(name).exists()


@pytest.fixture(scope="module")
def vm_name(image) -> Iterator[str]:
    """One VM shared by the module's lifecycle tests (boots are the expensive part); removed at the end."""
    name = f"{PREFIX}-life"
    try:
        yield name
    finally:
        remove_prefixed(name)


PLAY = """\
// create with an inline bootstrap, copy a file in, check it, check an expected non-zero exit
!!vm.create name:${NAME} memory:512MB bootstrap:'''
    !!file.write path:/etc/pb.txt content:'from the bootstrap'
    !!env.set PB=yes
    '''
!!vm.copy src:data/in.txt dst:${NAME}:/root/in.txt
!!vm.exec name:${NAME} cmd:'cat /etc/pb.txt; echo; cat /root/in.txt'
!!vm.exec name:${NAME} cmd:'. /etc/profile.d/herovm-env.sh; test "$PB" = yes && exit 3' expect_exit:3
"""


def write_play(tmp_path: Path, text: str, name: str = "play.hero") -> Path:
    path = tmp_path / name
    path.write_text(text)
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "in.txt").write_text("copied in\n")
    return path


def test_cli_run_and_rerun_changes_nothing(vm_name: str, tmp_path: Path) -> None:
    play = write_play(tmp_path, PLAY)
    first = herovm("run", str(play), "--var", f"NAME={vm_name}", "--json")
    assert first.returncode == 0, first.stderr
    results = json.loads(first.stdout)
    assert [(r["action"], r["line"], r["ok"]) for r in results] == [
        ("vm.create", 2, True),
        ("vm.copy", 6, True),
        ("vm.exec", 7, True),
        ("vm.exec", 8, True),
    ]
    assert results[0]["value"]["changed"] is True
    assert results[2]["value"]["stdout"] == "from the bootstrap\ncopied in\n"
    assert results[3]["value"]["exit_code"] == 3
    # live progress: one line per action start and end on stderr
    assert len(re.findall(r"\[\d/4\] vm\.\w+ .*\.\.\.$", first.stderr, re.M)) == 4
    assert len(re.findall(r"\[\d/4\] vm\.\w+ .*: ok in", first.stderr)) == 4
    with Manager() as m:
        before = m.status(vm_name)

    again = herovm("run", str(play), "--var", f"NAME={vm_name}", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)[0]["value"]["changed"] is False
    with Manager() as m:
        after = m.status(vm_name)
    for key in ("ssh_port", "created", "last_boot"):
        assert after[key] == before[key], key


def test_python_entry_failures_and_keep_going(vm_name: str, tmp_path: Path) -> None:
    play = write_play(tmp_path, PLAY)
    assert all(r.ok for r in run_playbook(play, variables={"NAME": vm_name}))  # boots only if run alone
    fail = write_play(
        tmp_path,
        f"!!vm.exec name:{vm_name} cmd:'true'\n"
        f"!!vm.exec name:{vm_name} cmd:'echo to-out; echo to-err >&2; exit 1' expect_exit:0\n"
        f"!!vm.exec name:{vm_name} cmd:'touch /root/later'\n",
        "fail.hero",
    )
    results = run_playbook(fail)
    assert [r.ok for r in results] == [True, False]
    bad = results[1]
    assert (bad.action.line, bad.error, bad.exit_code) == (2, "exited with 1, expected 0", 1)
    assert "to-out" in bad.output and "to-err" in bad.output
    with Manager() as m, m.get(vm_name) as vm:
        assert vm.exec("test -e /root/later").exit_code == 1  # the action after the failure did not run

    cli = herovm("run", str(fail))
    assert cli.returncode == 1
    assert f"herovm: error: {fail}:2:1: vm.exec failed: exited with 1, expected 0" in cli.stderr
    assert "| to-err" in cli.stderr and "--keep-going" in cli.stderr

    cli = herovm("run", str(fail), "--keep-going")
    assert cli.returncode == 1
    with Manager() as m, m.get(vm_name) as vm:
        assert vm.exec("test -e /root/later").exit_code == 0

    # other settings: an error that leaves the VM as it is
    with Manager() as m:
        before = m.status(vm_name)
    other = write_play(tmp_path, f"!!vm.create name:{vm_name} memory:768MB\n", "other.hero")
    [r] = run_playbook(other)
    assert not r.ok and "with other settings" in r.error and "replace:true" in r.error
    with Manager() as m:
        assert m.status(vm_name)["last_boot"] == before["last_boot"]


def test_copy_out_and_shebang_script(vm_name: str, tmp_path: Path) -> None:
    write_play(tmp_path, PLAY)
    assert all(r.ok for r in run_playbook(tmp_path / "play.hero", variables={"NAME": vm_name}))
    script = tmp_path / "out.hero"
    script.write_text(
        "#!/usr/bin/env -S herovm run\n"
        "!!vm.exec name:${NAME} cmd:'hostname > /root/name.txt'\n"
        "!!vm.copy src:${NAME}:/root/name.txt dst:got/name.txt\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    r = subprocess.run(
        [str(script), "--var", f"NAME={vm_name}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "got" / "name.txt").read_text() == f"{vm_name}\n"


def test_delete_playbook(vm_name: str, tmp_path: Path) -> None:
    write_play(tmp_path, PLAY)
    assert all(r.ok for r in run_playbook(tmp_path / "play.hero", variables={"NAME": vm_name}))
    delete = write_play(tmp_path, f"!!vm.delete name:{vm_name}\n", "delete.hero")
    [r] = run_playbook(delete)
    assert r.ok and r.value["changed"] is True
    assert not exists(vm_name)
    r2 = herovm("run", str(delete), "--json")
    assert r2.returncode == 0 and json.loads(r2.stdout)[0]["value"]["changed"] is False


def test_invalid_playbook_touches_nothing(image, tmp_path: Path) -> None:
    name = f"{PREFIX}-invalid"
    play = write_play(
        tmp_path,
        f"!!vm.create name:{name} memory:512MB\n"  # valid, but must not run: a later line is wrong
        f"!!vm.exec name:{name} cmd:true\n"
        f"!!vm.exce name:{name} cmd:true\n"
        f"!!vm.delete name:{name} forse:true\n",
    )
    try:
        r = herovm("run", str(play))
        assert r.returncode == 2
        assert f"{play}:3:1: error: unknown action 'vm.exce'" in r.stderr
        assert f"{play}:4:{len(name) + 19}: error: vm.delete: unknown parameter 'forse'" in r.stderr
        assert not exists(name)
        with pytest.raises(HeroScriptError) as e:
            run_playbook(play)
        assert [(p.line, p.col) for p in e.value.problems] == [(3, 1), (4, len(name) + 19)]
        assert not exists(name)
    finally:
        remove_prefixed(name)


def test_plan_touches_nothing(image, tmp_path: Path) -> None:
    name = f"{PREFIX}-plan"
    play = write_play(tmp_path, PLAY)
    try:
        r = herovm("run", str(play), "--plan", "--var", f"NAME={name}")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == 4 and lines[0].startswith(f"[1/4] {play}:2: create VM {name} (")
        assert not exists(name)
    finally:
        remove_prefixed(name)


# ------------------------------------------------------------------------------------------ examples

EXAMPLE_VMS = {
    "dev-sandbox.hero": ["dev-sandbox"],
    "ci-test-vm.hero": ["ci-test-vm"],
    "cluster.hero": ["node1", "node2", "node3"],
}


@pytest.mark.parametrize("example", sorted(EXAMPLE_VMS))
def test_example(image, example: str, tmp_path: Path) -> None:
    """Each example as it is, but with its VM names prefixed so that parallel runs never collide."""
    prefix = f"{PREFIX}-ex{sorted(EXAMPLE_VMS).index(example)}"
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy)
    path = copy / example
    names = "|".join(map(re.escape, EXAMPLE_VMS[example]))
    text, n = re.subn(rf"(?<![/\w-])({names})(?![\w.-])", rf"{prefix}-\1", path.read_text())
    assert n >= 2 * len(EXAMPLE_VMS[example])
    path.write_text(text)
    try:
        r = herovm("run", str(path), "--json")
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout)
        assert results and all(x["ok"] for x in results)
        for vm in EXAMPLE_VMS[example]:
            assert not exists(f"{prefix}-{vm}")
    finally:
        remove_prefixed(prefix)
