"""Templates and fork on real guests (herovm.templates, herovm.clones): a template made from a bootstrap that
writes a file, adds a user and starts a service; VMs restored from it share that work but not its identity
(hostname, SSH host key, exec token, random bytes), and the template's token is refused by them; a clone
stops and starts as itself; a fork sees its source's files, writes after the fork cross in neither direction,
and it outlives its source; a template in use cannot be removed; playbooks and the pytest plugin take
templates. The fault cases are in test_clone_faults.py."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from herovm import disks, state
from herovm.errors import Busy, GuestError
from herovm.guest.agent_exec import AgentExec
from herovm.manager import Manager
from herovm.progress import Progress
from herovm.protocol import SSH_PORT

HEROVM = [sys.executable, "-m", "herovm"]
BOOTSTRAP = """\
!!file.write path:/srv/marker content:'made by the template'
!!user.add name:agent
!!service.start name:ticker cmd:'sh -c "while true; do date +%s%N >> /run/ticks; sleep 0.5; done"'
"""


class Template:
    """The module's template, and what its build let us see: its VM's exec token (read while it was being
    sealed: the test plays a holder of the template's credentials)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.builder_token: str | None = None
        self.seconds: float = 0.0

    def watch(self, p: Progress) -> None:
        if p.stage == "template" and p.message.startswith("sealing "):
            builder = p.message.split()[1].rstrip(":")
            self.builder_token = state.VMDir(builder).exec_token.read_text().strip()


@pytest.fixture(scope="module")
def template(image, run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    t = Template(f"it-{run_id}-tpl")
    bootstrap = tmp_path_factory.mktemp("tpl") / "setup.hero"
    bootstrap.write_text(BOOTSTRAP)
    started = time.monotonic()
    with Manager(progress=t.watch) as m:
        m.create_template(t.name, bootstrap=str(bootstrap), net="restricted")
        t.seconds = time.monotonic() - started
        try:
            yield t
        finally:
            for vm in m.templates():
                for user in vm["used_by"] if vm["name"] == t.name else []:
                    with contextlib.suppress(Exception):
                        m.down(user)
            with contextlib.suppress(Exception):
                m.remove_template(t.name)


@pytest.fixture
def clones(template: Template) -> Iterator:
    """clones(name) -> a VM restored from the module's template; all removed at teardown."""
    made: list[str] = []
    m = Manager()

    def make(name: str):
        made.append(name)
        return m.up(name, template=template.name)

    make.manager = m  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for name in made:
            with contextlib.suppress(Exception):
                m.down(name)
        m.close()


def out(vm, command: str) -> str:
    result = vm.exec(command)
    assert result.exit_code == 0, (command, result.stderr)
    return result.stdout.decode().strip()


def ticks(vm) -> int:
    return int(out(vm, "wc -l < /run/ticks"))


def test_clones_share_the_templates_work_but_not_its_identity(
    template: Template, clones, unique_name
) -> None:
    assert template.builder_token, "the template's VM was seen being sealed"
    started = time.monotonic()
    a = clones(unique_name("a"))
    up_seconds = time.monotonic() - started
    b = clones(unique_name("b"))
    for vm in (a, b):
        assert out(vm, "cat /srv/marker") == "made by the template"
        assert out(vm, "id -un agent") == "agent"
        before = ticks(vm)
        time.sleep(1.2)
        assert ticks(vm) > before, "the template's service runs on in every clone"
        assert out(vm, "hostname") == vm.name
        # the SSH host key the guest serves is the one herovm generated for this VM, and pins
        served = out(vm, "ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key").split()[:2]
        assert served == vm.record.host_key.split()[:2]
    assert a.record.host_key != b.record.host_key
    tokens = {state.VMDir(vm.name).exec_token.read_text().strip() for vm in (a, b)}
    assert len(tokens) == 2 and template.builder_token not in tokens
    for vm in (a, b):  # the template's memory is older: its clock is the host's, set at the handover
        assert abs(float(out(vm, "date +%s.%N")) - time.time()) < 2.0
    randoms = [out(vm, "head -c 16 /dev/urandom | od -An -tx1") for vm in (a, b)]
    assert randoms[0] != randoms[1], "two clones drew the same random bytes"
    # the template's token, presented to a clone: refused (the agent cannot prove it holds that token)
    stale = AgentExec(
        target=a.name,
        token=template.builder_token,
        connect=lambda timeout: a.manager.backend.guest_connector(a.name, a.ssh_port)(
            SSH_PORT, time.monotonic() + timeout
        ),
    )
    with pytest.raises(GuestError, match="did not prove it is VM"):
        stale.exec(["true"], timeout=10)
    stale.close()
    status = a.manager.status(a.name)
    assert status["agent"] == "ready" and status["events"] == "whole"
    assert a.manager.record(a.name).origin == {"template": template.name}
    print(f"\ntemplate made in {template.seconds:.1f}s; up --template to ready {up_seconds:.2f}s (API)")


def test_a_clone_stops_and_starts_as_itself(template: Template, clones, unique_name) -> None:
    vm = clones(unique_name("again"))
    m = clones.manager
    m.stop(vm.name)
    vm = m.start(vm.name, timeout="3m")
    assert out(vm, "hostname") == vm.name
    assert out(vm, "cat /srv/marker") == "made by the template"
    before = ticks(vm)
    time.sleep(1.2)
    assert ticks(vm) > before, "the service is started again on a later boot"
    sources = [e.get("source") for e in m.logs(vm.name) if e["event"] == "bootstrap"]  # type: ignore[union-attr]
    assert sources == ["done"], "the bootstrap does not run again: it ran in the template"
    served = out(vm, "ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key").split()[:2]
    assert served == vm.record.host_key.split()[:2]


def test_a_fork_holds_its_sources_state_and_outlives_it(template: Template, clones, unique_name) -> None:
    source = clones(unique_name("src"))
    out(source, "echo before > /root/f; nohup sh -c 'sleep 600' >/dev/null 2>&1 &")
    m = clones.manager
    names = [unique_name("fork"), unique_name("fork")]
    try:
        result = m.fork(source.name, names)
        assert [c["name"] for c in result["clones"]] == names
        assert result["source_pause_seconds"] > 0
        forks = [m.get(n) for n in names]
        layer = disks.chain(state.VMDir(names[0]).disk)[1]
        assert layer.parent.name == "layers" and layer == disks.chain(state.VMDir(names[1]).disk)[1]
        out(source, "echo source-after > /root/f")
        out(forks[0], "echo fork-after > /root/f")
        assert out(forks[1], "cat /root/f") == "before"
        assert out(forks[0], "cat /root/f") == "fork-after"
        assert out(source, "cat /root/f") == "source-after"
        for vm in forks:
            assert out(vm, "hostname") == vm.name
            assert out(vm, "pgrep -f 'sleep 600' >/dev/null && echo running") == "running"
            assert m.record(vm.name).origin["fork"] == source.name
        assert m.machine(source.name).state == "running"
        m.down(source.name)  # the forks' disks lie on a layer of their own
        # ... but their memory maps the template's memory file when they start from memory: it stays
        with pytest.raises(Busy, match=f"template {template.name} is in use: .*{names[0]}"):
            m.remove_template(template.name)
        assert out(forks[0], "cat /srv/marker && sync && echo ok").endswith("ok")
        m.stop(names[1])
        again = m.start(names[1], timeout="3m")
        assert out(again, "cat /root/f") == "before"
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                m.down(name)
    assert layer.exists()
    m.gc()
    assert not layer.exists(), "gc removes a layer once no VM lies on it"


def test_a_template_in_use_is_not_removed(template: Template, clones, unique_name) -> None:
    vm = clones(unique_name("user"))
    m = clones.manager
    with pytest.raises(Busy, match=f"template {template.name} is in use: {vm.name} lie on it"):
        m.remove_template(template.name)
    cli = subprocess.run([*HEROVM, "template", "rm", template.name], capture_output=True, text=True)
    assert cli.returncode == 4 and cli.stderr.startswith(f"herovm: error: template {template.name} is in use")
    listed = json.loads(subprocess.run([*HEROVM, "template", "ls", "--json"], capture_output=True).stdout)
    row = next(r for r in listed if r["name"] == template.name)
    assert row["used_by"] == [vm.name] and row["memory_bytes"] > 0


def test_playbooks_and_the_pytest_plugin_take_a_template(
    template: Template, unique_name, tmp_path: Path, pytester_runner
) -> None:
    name = unique_name("play")
    play = tmp_path / "play.hero"
    play.write_text(
        f"!!vm.create name:{name} template:{template.name}\n"
        f"!!vm.exec name:{name} cmd:'test \"$(hostname)\" = {name} && cat /srv/marker'\n"
        f"!!vm.delete name:{name}\n"
    )
    run = subprocess.run([*HEROVM, "run", str(play)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with Manager() as m:
        assert m.backend.get(name) is None
    result = pytester_runner(
        """
        def test_from_template(herovm_vm, herovm_manager):
            assert herovm_vm.exec(["cat", "/srv/marker"]).stdout == b"made by the template"
            assert herovm_manager.record(herovm_vm.name).origin is not None
        """,
        "--herovm-template",
        template.name,
    )
    result.assert_outcomes(passed=1)


pytest_plugins = ["pytester"]


@pytest.fixture
def pytester_runner(pytester: pytest.Pytester, run_id: str) -> Iterator:
    prefix = f"pt{run_id}"

    def run(source: str, *args: str):
        pytester.makepyfile(test_vm=source)
        return pytester.runpytest_subprocess("--herovm-name-prefix", prefix, "-p", "no:cacheprovider", *args)

    try:
        yield run
    finally:
        with Manager() as m:
            for row in m.ls():
                if row["name"].startswith(prefix):
                    with contextlib.suppress(Exception):
                        m.down(row["name"])
