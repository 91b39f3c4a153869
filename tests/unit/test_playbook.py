"""Host playbooks without guests: the `vm.*` schemas, validation errors with FILE:LINE:COL, plans, the
runner's logic over a fake Manager, and `herovm run` / `herovm script check` through typer's CliRunner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from herovm.cli import app
from herovm.errors import AlreadyExists, NotFound
from herovm.heroscript import HeroScriptError, parse, validate
from herovm.playbook import (
    check_playbook,
    host_registry,
    is_inline,
    load_playbook,
    resolve_bootstrap,
    run_playbook,
    split_remote,
)

ACTIONS = {
    "vm.create": [
        "name",
        "image",
        "cpus",
        "memory",
        "disk",
        "bootstrap",
        "bootstrap_sha256",
        "vars",
        "secrets",
        "allow_empty",
        "timeout",
        "accel",
        "net",
        "kernel_args",
        "publish",
        "template",
        "ttl",
        "host",
        "keep_failed",
        "replace",
    ],
    "vm.start": ["name", "timeout"],
    "vm.stop": ["name", "timeout"],
    "vm.delete": ["name"],
    "vm.exec": ["name", "cmd", "timeout", "env", "cwd", "expect_exit"],
    "vm.copy": ["src", "dst"],
    "vm.wait": ["name", "timeout"],
}


def problems_of(text: str, tmp_path: Path, name: str = "play.hero") -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [f"{Path(p.file).name}:{p.line}:{p.col}: {p.message}" for p in check_playbook(load_playbook(path))]


# ------------------------------------------------------------------------------------------- schemas


def test_host_actions_and_their_parameters() -> None:
    reg = host_registry()
    assert reg.names() == sorted(ACTIONS)
    for name, params in ACTIONS.items():
        spec = reg.get(name)
        assert [p.name for p in spec.params] == params, name
        assert spec.help and spec.example.startswith(f"!!{name} "), name


def test_typed_defaults() -> None:
    create = host_registry().get("vm.create")
    defaults = {p.name: p.default for p in create.params}
    assert defaults["memory"] == 1 << 30 and defaults["disk"] == 10 << 30
    assert defaults["timeout"] == 300.0 and defaults["cpus"] == 1 and defaults["replace"] is False
    assert [p.name for p in create.params if p.required] == ["name"]
    ex = host_registry().get("vm.exec")
    assert {p.name: p.default for p in ex.params}["expect_exit"] == 0
    assert [p.name for p in ex.params if p.required] == ["name", "cmd"]


def test_every_example_validates(tmp_path: Path) -> None:
    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true\n")
    for spec in host_registry().specs():
        pb = parse(spec.example + "\n", path=str(tmp_path / "ex.hero"))
        assert [str(p) for p in validate(pb, host_registry())] == [], spec.fullname


def test_inline_url_and_file_bootstraps() -> None:
    assert is_inline("!!cmd.run cmd:true") and is_inline("  !!x.y") and is_inline("a\nb")
    assert not is_inline("setup.hero") and not is_inline("https://h/x.hero")
    assert resolve_bootstrap("setup.hero", "/p/play.hero") == "/p/setup.hero"
    assert resolve_bootstrap("/abs/setup.hero", "/p/play.hero") == "/abs/setup.hero"
    assert resolve_bootstrap("setup.hero", "<stdin>") == "setup.hero"
    assert resolve_bootstrap("https://h/x.hero", "/p/play.hero") == "https://h/x.hero"
    assert resolve_bootstrap("", "/p/play.hero") is None
    assert split_remote("box:/tmp/x") == ("box", "/tmp/x")
    assert split_remote("./a:b") == (None, "./a:b") and split_remote("/x") == (None, "/x")


# ----------------------------------------------------------------------------------------- validation


def test_typos_in_actions_and_parameters(tmp_path: Path) -> None:
    text = "!!vm.create name:a\n!!vm.crate name:a\n!!vm.exec name:a cmd:true timout:3s\n"
    assert problems_of(text, tmp_path) == [
        "play.hero:2:1: unknown action 'vm.crate'",
        "play.hero:3:27: vm.exec: unknown parameter 'timout'",
    ]
    problems = check_playbook(load_playbook(tmp_path / "play.hero"))
    assert problems[0].hint == "did you mean vm.create or vm.wait?"
    assert problems[1].hint == "did you mean timeout?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("!!vm.create memory:1GB", "play.hero:1:1: vm.create: missing parameter 'name'"),
        ("!!vm.create name:Bad_Name", "play.hero:1:13: vm.create: invalid VM name 'Bad_Name'"),
        ("!!vm.create name:a memory:512", "play.hero:1:20: memory: '512' is not a size; give a unit"),
        (
            "!!vm.create name:a memory:64MB",
            "play.hero:1:20: vm.create: memory 64 MiB is below the minimum of 128 MiB",
        ),
        (
            "!!vm.create name:a cpus:0",
            "play.hero:1:20: vm.create: cpus 0 must be a whole number from 1 to 64",
        ),
        ("!!vm.create name:a accel:xen", "play.hero:1:20: vm.create: unknown accelerator 'xen'"),
        ("!!vm.create name:a vars:NOEQUALS", "play.hero:1:20: vm.create: 'NOEQUALS' is not NAME=VALUE"),
        ("!!vm.create name:a replace:maybe", "play.hero:1:20: replace: 'maybe' is not a boolean"),
        ("!!vm.exec name:a", "play.hero:1:1: vm.exec: missing parameter 'cmd'"),
        (
            "!!vm.exec name:a cmd:x expect_exit:300",
            "play.hero:1:24: vm.exec: expect_exit must be from 0 to 255",
        ),
        ("!!vm.exec name:a cmd:x expect_exit:one", "play.hero:1:24: expect_exit: 'one' is not an integer"),
        ("!!vm.exec name:a cmd:x timeout:0s", "play.hero:1:24: vm.exec: timeout must be longer than zero"),
        ("!!vm.copy src:a dst:b", "play.hero:1:11: vm.copy: exactly one of src and dst must be NAME:/path"),
        (
            "!!vm.copy src:a:/x dst:b:/y",
            "play.hero:1:11: vm.copy: exactly one of src and dst must be NAME:/path",
        ),
        ("!!vm.copy src:./a dst:B_x:/y", "play.hero:1:19: vm.copy: invalid VM name 'B_x'"),
        ("!!vm.wait name:a timeout:5", "play.hero:1:18: timeout: '5' is not a duration"),
        ("!!vm.delete name:a force:true", "play.hero:1:20: vm.delete: unknown parameter 'force'"),
        ("!!cmd.run cmd:true", "play.hero:1:1: unknown action 'cmd.run'"),
    ],
)
def test_bad_parameters(tmp_path: Path, text: str, expected: str) -> None:
    got = problems_of(text + "\n", tmp_path)
    assert len(got) == 1 and got[0].startswith(expected), got


def test_bootstrap_file_is_relative_to_the_playbook(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "setup.hero").write_text("!!cmd.run cmd:true\n")
    monkeypatch.chdir(tmp_path)  # the current directory does not matter
    assert problems_of("!!vm.create name:a bootstrap:setup.hero\n", tmp_path, "sub/play.hero") == []
    got = problems_of("!!vm.create name:a\n    bootstrap:missing.hero\n", tmp_path, "sub/play.hero")
    assert got == [f"play.hero:2:5: vm.create: bootstrap file {tmp_path}/sub/missing.hero does not exist"]


def test_bootstrap_file_is_checked_against_guest_actions(tmp_path: Path) -> None:
    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true\n!!pkg.instal git\n")
    got = problems_of("!!vm.create name:a bootstrap:setup.hero\n", tmp_path)
    assert len(got) == 1 and got[0].startswith("play.hero:1:20: vm.create: bootstrap is invalid")
    assert "unknown action 'pkg.instal'" in got[0]


def test_inline_bootstrap_errors_point_into_the_playbook(tmp_path: Path) -> None:
    text = (
        "// header\n"
        "!!vm.create name:a bootstrap:'''\n"
        "    !!file.write path:/x content:hi\n"
        "    !!cmd.runn cmd:true\n"
        "    !!cmd.run cmd:true timout:3s\n"
        "    '''\n"
    )
    assert problems_of(text, tmp_path) == [
        "play.hero:4:5: inline bootstrap: unknown action 'cmd.runn'",
        "play.hero:5:24: inline bootstrap: cmd.run: unknown parameter 'timout'",
    ]
    assert problems_of("!!vm.create name:a bootstrap:'!!cmd.run cmd:true'\n", tmp_path) == []


def test_an_include_in_a_bootstrap_is_refused_where_it_is_written(tmp_path: Path, monkeypatch) -> None:
    """Includes are for playbooks: a bootstrap (a file, or inline in a playbook) that includes a file is
    refused, and the file it names is never read, even where one of that name exists."""
    (tmp_path / "more.hero").write_text("!!cmd.run cmd:true\n")
    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true\n!!play.include path:more.hero\n")
    monkeypatch.chdir(tmp_path)
    why = "!!play.include in a bootstrap: the guest gets this one script, not the files it includes"
    inline = (
        "!!vm.create name:a bootstrap:'''\n"
        "    !!cmd.run cmd:true\n"
        "    !!play.include path:more.hero\n"
        "    '''\n"
    )
    assert problems_of(inline, tmp_path) == [f"play.hero:3:5: inline bootstrap: {why}"]
    with pytest.raises(HeroScriptError) as e:
        run_playbook(tmp_path / "play.hero", manager=Boom())
    assert e.value.problems[0].hint == "includes work in playbooks; inline the file"
    got = problems_of("!!vm.create name:a bootstrap:setup.hero\n", tmp_path)
    assert got == [f"play.hero:1:20: vm.create: setup.hero:2:1: {why}"]
    # a playbook itself still includes files
    (tmp_path / "main.hero").write_text("!!play.include path:play.hero\n")
    assert [a.fullname for a in load_playbook(tmp_path / "main.hero")] == ["vm.create"]


def test_bootstrap_sha256_is_checked(tmp_path: Path) -> None:
    got = problems_of(
        "!!vm.create name:a bootstrap:'!!cmd.run cmd:true' bootstrap_sha256:" + "0" * 64, tmp_path
    )
    assert len(got) == 1 and "bootstrap sha256 is" in got[0]
    got = problems_of("!!vm.create name:a bootstrap:https://h/x.hero\n", tmp_path)
    assert len(got) == 1 and "needs --bootstrap-sha256" in got[0]


def test_all_errors_at_once_and_nothing_runs(tmp_path: Path) -> None:
    path = tmp_path / "play.hero"
    path.write_text("!!vm.create name:a\n!!vm.exek name:a cmd:true\n!!vm.delete name:a nme:x\n")
    with pytest.raises(HeroScriptError) as e:
        run_playbook(path, manager=Boom())
    assert [(p.line, p.col) for p in e.value.problems] == [(2, 1), (3, 20)]


def test_variables(tmp_path: Path) -> None:
    path = tmp_path / "play.hero"
    path.write_text("!!vm.create name:${NAME} memory:{MEM}\n")
    pb = load_playbook(path, variables={"NAME": "box", "MEM": "512MB"})
    assert pb.actions[0].params.to_dict() == {"name": "box", "memory": "512MB"}


# ---------------------------------------------------------------------------------- running (fake VMs)


class Boom:
    """A manager that must not be used."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the manager was used: {name}")


class FakeVM:
    def __init__(self, manager: FakeManager, name: str) -> None:
        self.manager, self.name = manager, name
        self.meta = manager.vms[name]
        self.closed = False

    @property
    def ssh_port(self):
        return self.meta["ssh_port"]

    @property
    def record(self):
        return SimpleNamespace(created=self.meta["created"])

    def exec(self, cmd, env=None, cwd=None, timeout=None):
        self.manager.calls.append(("exec", self.name, cmd))
        code = int(cmd.split()[1]) if cmd.startswith("exit ") else 0
        return SimpleNamespace(
            exit_code=code, stdout=b"out\n" * 3, stderr=b"err!\n", timed_out=False, seconds=0.01, ok=code == 0
        )

    def put(self, local, remote):
        self.manager.calls.append(("put", self.name, local, remote))

    def get(self, remote, local):
        self.manager.calls.append(("get", self.name, remote, local))

    def close(self):
        self.closed = True


class FakeManager:
    def __init__(self) -> None:
        self.vms: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.port = 40000
        self.backend = SimpleNamespace(get=self._machine)

    def _machine(self, name):
        meta = self.vms.get(name)
        return SimpleNamespace(state=meta["state"], metadata=meta) if meta else None

    def up(self, name, settings):
        self.calls.append(("up", name))
        settings = {k: v for k, v in dataclasses.asdict(settings).items() if k != "timeout"}
        meta = self.vms.get(name)
        if meta is not None:
            if meta["settings"] == settings and meta["state"] == "running":
                return FakeVM(self, name)
            raise AlreadyExists(f"VM {name} already exists ({meta['state']}) with other settings")
        self.port += 1
        self.vms[name] = {"settings": settings, "state": "running", "ssh_port": self.port, "created": "now"}
        return FakeVM(self, name)

    def machine(self, name):
        machine = self._machine(name)
        if machine is None:
            raise NotFound(f"VM {name} not found", hint="see `herovm ls`")
        return machine

    def get(self, name):
        self.machine(name)
        return FakeVM(self, name)

    def down(self, name):
        self.calls.append(("down", name))
        if self.vms.pop(name, None) is None:
            raise NotFound(f"VM {name} not found")

    def start(self, name, timeout=None):
        self.calls.append(("start", name))
        self.vms[name]["state"] = "running"
        return FakeVM(self, name)

    def stop(self, name, timeout=None):
        self.calls.append(("stop", name))
        self.vms[name]["state"] = "stopped"

    def require_running(self, name):
        pass


def run_text(tmp_path: Path, text: str, manager: FakeManager, **kw):
    path = tmp_path / "play.hero"
    path.write_text(text)
    return run_playbook(path, manager=manager, **kw)


def test_create_is_idempotent(tmp_path: Path) -> None:
    m = FakeManager()
    text = "!!vm.create name:a memory:512MB\n!!vm.exec name:a cmd:true\n"
    first = run_text(tmp_path, text, m)
    second = run_text(tmp_path, text, m)
    assert [r.ok for r in first + second] == [True] * 4
    assert first[0].value["changed"] is True and second[0].value["changed"] is False
    assert first[0].value["ssh_port"] == second[0].value["ssh_port"]
    assert [c for c in m.calls if c[0] == "down"] == []


def test_other_settings_need_replace(tmp_path: Path) -> None:
    m = FakeManager()
    run_text(tmp_path, "!!vm.create name:a memory:512MB\n", m)
    port = m.vms["a"]["ssh_port"]
    [r] = run_text(tmp_path, "!!vm.create name:a memory:1GB\n", m)
    assert not r.ok and "add replace:true" in r.error and m.vms["a"]["ssh_port"] == port
    [r] = run_text(tmp_path, "!!vm.create name:a memory:1GB replace:true\n", m)
    assert r.ok and r.value["changed"] is True and m.vms["a"]["ssh_port"] != port
    assert ("down", "a") in m.calls


HOSTILE = "a'\n!!vm.copy src:box:/etc/shadow dst:./loot\n"


def test_a_playbook_variable_cannot_add_an_action(tmp_path: Path) -> None:
    m = FakeManager()
    text = "!!vm.create name:box\n!!vm.exec name:box cmd:'echo ${X}'\n"
    path = tmp_path / "play.hero"
    path.write_text(text)
    pb = load_playbook(path, variables={"X": HOSTILE})
    assert [a.fullname for a in pb] == ["vm.create", "vm.exec"]
    results = run_playbook(pb, manager=m)
    assert [r.ok for r in results] == [True, True]
    assert ("exec", "box", "echo " + HOSTILE) in m.calls and not [c for c in m.calls if c[0] == "get"]


def test_an_inline_bootstrap_gets_playbook_variables_as_variables(tmp_path: Path) -> None:
    """The inline script is checked and sent as written; the playbook's variables it uses go with it."""
    m = FakeManager()
    text = (
        "!!vm.create name:box vars:'WHO=${WHO}' bootstrap:'\n    !!cmd.run cmd:\"echo ${X} ${WHO}\"\n    '\n"
    )
    path = tmp_path / "play.hero"
    path.write_text(text)
    pb = load_playbook(path, variables={"X": HOSTILE, "WHO": "a, b=c", "UNUSED": "u"})
    assert check_playbook(pb) == []
    [r] = run_playbook(pb, manager=m)
    assert r.ok, r.error
    settings = m.vms["box"]["settings"]
    assert settings["bootstrap"] == '!!cmd.run cmd:"echo ${X} ${WHO}"'
    assert settings["variables"] == {"X": HOSTILE, "WHO": "a, b=c"}  # a comma in a value: still one value
    assert settings["secrets"] == {} and settings["allow_empty"] is False


def test_a_variable_cannot_turn_a_bootstrap_path_into_a_script(tmp_path: Path) -> None:
    path = tmp_path / "play.hero"
    path.write_text("!!vm.create name:box bootstrap:${B}\n")
    problems = check_playbook(load_playbook(path, variables={"B": "!!cmd.run cmd:'rm -rf /'"}))
    assert [(p.line, p.col, p.message) for p in problems] == [
        (1, 22, "vm.create: a variable turned this bootstrap into an inline script")
    ]


def test_create_with_secrets(tmp_path: Path) -> None:
    m = FakeManager()
    (tmp_path / "setup.hero").write_text("!!env.set TOKEN=${TOKEN}\n")
    text = "!!vm.create name:box bootstrap:setup.hero secrets:'TOKEN=${T}' vars:'A=1'\n"
    results = run_text(tmp_path, text, m, variables={"T": "s3cr3t, with=comma"})
    assert [r.ok for r in results] == [True]
    settings = m.vms["box"]["settings"]
    assert settings["secrets"] == {"TOKEN": "s3cr3t, with=comma"} and settings["variables"] == {"A": "1"}
    assert "s3cr3t" not in json.dumps([r.value for r in results])


def test_secrets_errors_do_not_repeat_the_value(tmp_path: Path) -> None:
    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true timeout:${TOKEN}\n")
    problems = problems_of(
        "!!vm.create name:a bootstrap:setup.hero secrets:'TOKEN=s3cr3t-x'\n"
        "!!vm.create name:b secrets:'s3cr3t-y'\n"
        "!!vm.create name:c vars:'T=1' secrets:'T=2'\n",
        tmp_path,
    )
    assert not [p for p in problems if "s3cr3t" in p]
    assert problems == [
        "play.hero:1:20: vm.create: bootstrap is invalid:\n"
        "setup.hero:1:20: timeout: '[secret TOKEN]' is not a duration; use s, m, h or d, e.g. 30s or 1h30m",
        "play.hero:2:20: vm.create: item 1 of secrets is not NAME=VALUE",
        "play.hero:3:31: vm.create: T: given both as a variable and as a secret",
    ]


def test_create_with_an_empty_bootstrap_needs_allow_empty(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("just text\n")
    problems = problems_of("!!vm.create name:a bootstrap:notes.txt\n", tmp_path)
    assert problems == [
        "play.hero:1:20: vm.create: bootstrap notes.txt has no actions (no `!!actor.name` line): "
        "is it a HeroScript file?"
    ]
    assert problems_of("!!vm.create name:a bootstrap:notes.txt allow_empty:true\n", tmp_path) == []


def test_a_stopped_vm_is_started(tmp_path: Path) -> None:
    m = FakeManager()
    run_text(tmp_path, "!!vm.create name:a\n!!vm.stop name:a\n", m)
    assert m.vms["a"]["state"] == "stopped"
    [r] = run_text(tmp_path, "!!vm.create name:a\n", m)
    assert r.ok and r.value["changed"] is False and ("start", "a") in m.calls


def test_exec_expect_exit_and_stop_at_first_failure(tmp_path: Path) -> None:
    m = FakeManager()
    text = (
        "!!vm.create name:a\n"
        "!!vm.exec name:a cmd:'exit 3' expect_exit:3\n"
        "!!vm.exec name:a cmd:'exit 1'\n"
        "!!vm.exec name:a cmd:'exit 0'\n"
    )
    results = run_text(tmp_path, text, m)
    assert [r.ok for r in results] == [True, True, False]
    bad = results[2]
    assert bad.action.line == 3 and bad.error == "exited with 1, expected 0" and bad.exit_code == 1
    assert bad.output == "stdout:\nout\nout\nout\nstderr:\nerr!\n"
    results = run_text(tmp_path, text, m, keep_going=True)
    assert [r.ok for r in results] == [True, True, False, True]


def test_delete_copy_and_errors(tmp_path: Path) -> None:
    m = FakeManager()
    text = (
        "!!vm.create name:a\n"
        "!!vm.copy src:f.txt dst:a:/root/f.txt\n"
        "!!vm.copy src:a:/etc/hostname dst:out/h\n"
        "!!vm.delete name:a\n"
        "!!vm.delete name:a\n"
        "!!vm.exec name:a cmd:true\n"
    )
    results = run_text(tmp_path, text, m)
    assert [r.ok for r in results] == [True, True, True, True, True, False]
    assert ("put", "a", str(tmp_path / "f.txt"), "/root/f.txt") in m.calls
    assert ("get", "a", "/etc/hostname", str(tmp_path / "out/h")) in m.calls
    assert results[3].value["changed"] is True and results[4].value["changed"] is False
    assert results[5].error == "VM a not found (hint: see `herovm ls`)"


def test_plan_does_nothing(tmp_path: Path) -> None:
    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true\n")
    text = (
        "!!vm.create name:a memory:512MB bootstrap:setup.hero\n"
        "!!vm.exec name:a cmd:'exit 3' expect_exit:3\n"
        "!!vm.copy src:x dst:a:/x\n"
        "!!vm.delete name:a\n"
    )
    results = run_text(tmp_path, text, Boom(), plan=True)  # type: ignore[arg-type]
    assert [r.value["plan"] for r in results] == [
        "create VM a (image default, 1 CPU, 512 MiB, disk 10 GiB, bootstrap setup.hero); "
        "keep it if it already runs with these settings",
        "run `exit 3` in VM a, expect exit 3",
        "copy x to a:/x",
        "delete VM a if it exists",
    ]


# ----------------------------------------------------------------------------------------------- CLI


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def test_cli_invalid_playbook_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "play.hero"
    path.write_text("!!vm.create name:a\n!!vm.crate name:b\n!!vm.exec name:a cmd:x timout:1s\n")
    r = cli("run", str(path))
    assert r.exit_code == 2
    assert f"{path}:2:1: error: unknown action 'vm.crate'" in r.stderr
    assert f"{path}:3:24: error: vm.exec: unknown parameter 'timout'" in r.stderr
    assert "nothing was done" in r.stderr
    r = cli("run", str(path), "--json")
    assert r.exit_code == 2
    assert [p["line"] for p in json.loads(r.stdout)["problems"]] == [2, 3]


def test_cli_plan_and_stdin(tmp_path: Path) -> None:
    text = "#!/usr/bin/env -S herovm run\n!!vm.create name:${N}\n!!vm.delete name:${N}\n"
    r = cli("run", "-", "--plan", "--var", "N=box", input=text)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "[1/2] <stdin>:2: create VM box (image default, 1 CPU, 1 GiB, disk 10 GiB); "
        "keep it if it already runs with these settings",
        "[2/2] <stdin>:3: delete VM box if it exists",
    ]
    r = cli("run", "-", "--plan", "--json", "--var", "N=box", input=text)
    assert [row["action"] for row in json.loads(r.stdout)] == ["vm.create", "vm.delete"]
    r = cli("run", "-", "--plan", "--var", "N", input=text)
    assert r.exit_code == 2 and "is not KEY=VALUE" in r.stderr


def test_cli_missing_file(tmp_path: Path) -> None:
    r = cli("run", str(tmp_path / "nope.hero"))
    assert r.exit_code == 2 and "cannot read" in r.stderr


def test_script_check_knows_host_and_guest_actions(tmp_path: Path) -> None:
    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true\n")
    play = tmp_path / "play.hero"
    play.write_text("!!vm.create name:a bootstrap:setup.hero\n!!vm.exec name:a cmd:true\n")
    r = cli("script", "check", str(play), str(tmp_path / "setup.hero"))
    assert r.exit_code == 0, r.output
    play.write_text("!!vm.create name:a bootstrap:nope.hero\n")
    r = cli("script", "check", str(play))
    assert r.exit_code == 1 and f"{play}:1:20: error: vm.create: bootstrap file" in r.output


def test_pytest_plugin_names_are_valid_vm_names() -> None:
    from herovm import state
    from herovm.pytest_plugin import _Session, _unique_name

    s = _Session()
    for test in ("test_x", "test_" + "long_name_" * 10, "test_p[a-B/c]", "test_", "TEST_Ünïcode"):
        name = _unique_name(s, "pt", test)
        assert state.validate_name(name) == name and len(name) <= 40
    assert _unique_name(s, "pt", "test_x") != _unique_name(s, "pt", "test_x")
