"""Pause and resume (Manager.pause/resume, `herovm pause/resume`) over libvirt's test driver: the states a VM
may be paused or resumed from, the marker that makes `exec` into a paused VM fail at once, stop, start, gc
and status of a paused VM, and the CLI's output and exit codes. tests/integration/test_pause.py does the same
with a real guest."""

from __future__ import annotations

import json
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from specs import define_in_vmdir, unique
from typer.testing import CliRunner

from herovm import state
from herovm.backends import require
from herovm.backends.base import Pausable
from herovm.backends.libvirt import LibvirtBackend
from herovm.cli import app
from herovm.errors import GuestError, NotFound, Unsupported
from herovm.manager import Manager
from herovm.protocol import Command

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "herovm/_data/agent"))
from herovm_agent import main as agent_main  # noqa: E402

URI = "test:///default"


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


def running_vm(backend: LibvirtBackend, tmp_path: Path, **metadata: object) -> str:
    name = unique("pz")
    define_in_vmdir(backend, tmp_path, name, {"last_boot": {"nonce": "n", "outcome": "ready"}, **metadata})
    backend.start(name)
    return name


def test_libvirt_is_pausable(backend: LibvirtBackend) -> None:
    assert require(backend, Pausable) is backend


def test_pause_and_resume_a_running_vm(manager: Manager, backend, tmp_path: Path) -> None:
    name = running_vm(backend, tmp_path)
    vmdir = state.VMDir(name)
    manager.pause(name)
    assert backend.get(name).state == "paused"
    assert stat.S_IMODE(vmdir.paused_file.stat().st_mode) == 0o600  # like every file of a VM
    since = manager.status(name)["paused_since"]
    assert since and since == vmdir.paused_since()
    assert [r["state"] for r in manager.ls() if r["name"] == name] == ["paused"]
    manager.pause(name)  # paused already: left as it is, since when unchanged
    assert manager.status(name)["paused_since"] == since
    manager.resume(name)
    assert backend.get(name).state == "running" and not vmdir.paused_file.exists()
    assert manager.status(name)["paused_since"] is None
    manager.resume(name)  # running already: left as it is
    assert backend.get(name).state == "running"


def test_a_vm_paused_by_someone_else_is_paused_for_herovm_too(manager: Manager, backend, tmp_path) -> None:
    name = running_vm(backend, tmp_path)
    backend.pause(name)  # as `virsh suspend` would: no marker
    assert manager.machine(name).state == "paused"
    with pytest.raises(GuestError) as info:
        manager.require_running(name)
    assert info.value.message == f"VM {name} is paused"
    manager.pause(name)
    assert state.VMDir(name).paused_file.exists()
    manager.resume(name)
    assert backend.get(name).state == "running"


def test_only_a_running_vm_pauses_and_only_a_paused_one_resumes(manager: Manager, backend, tmp_path) -> None:
    name = unique("pz")
    define_in_vmdir(backend, tmp_path, name, {})
    for verb, wanted in ((manager.pause, "running"), (manager.resume, "paused")):
        with pytest.raises(GuestError) as info:
            verb(name)
        assert info.value.message == f"VM {name} is stopped: only a {wanted} VM can be {verb.__name__}d"
        assert info.value.hint == f"start it with `herovm start {name}`"
        assert info.value.exit_code == 255
    assert not state.VMDir(name).paused_file.exists()
    for verb in (manager.pause, manager.resume):
        with pytest.raises(NotFound):
            verb(unique("none"))


def test_exec_into_a_paused_vm_fails_at_once_naming_the_state(manager: Manager, backend, tmp_path) -> None:
    # agent_exec with a port nothing answers on: without the marker, exec would wait for the agent first
    name = running_vm(backend, tmp_path, agent_exec=True, ssh_port=9)
    manager.pause(name)
    vm = manager.attach(name)
    t0 = time.monotonic()
    with pytest.raises(GuestError) as info:
        vm.exec(["true"])
    assert time.monotonic() - t0 < 1
    assert (info.value.message, info.value.hint) == (
        f"VM {name} is paused",
        f"resume it with `herovm resume {name}`",
    )
    for ssh_use in (vm.connection, lambda: vm.put(tmp_path, "/root/x")):  # herovm ssh, cp
        t0 = time.monotonic()
        with pytest.raises(GuestError, match=f"VM {name} is paused"):
            ssh_use()
        assert time.monotonic() - t0 < 1


def test_start_of_a_paused_vm_says_resume(manager: Manager, backend, tmp_path: Path) -> None:
    name = running_vm(backend, tmp_path)
    manager.pause(name)
    with pytest.raises(GuestError, match=f"VM {name} is paused") as info:
        manager.start(name)
    assert info.value.hint == f"resume it with `herovm resume {name}`"
    assert backend.get(name).state == "paused"


def test_stop_and_down_of_a_paused_vm(manager: Manager, backend, tmp_path: Path) -> None:
    name = running_vm(backend, tmp_path)
    manager.pause(name)
    manager.stop(name, timeout=0.2)  # resumed, so that it may power off; the test driver has no agent
    assert backend.get(name).state == "stopped"
    assert not state.VMDir(name).paused_file.exists()
    other = running_vm(backend, tmp_path)
    manager.pause(other)
    manager.down(other)
    assert backend.get(other) is None and not state.VMDir(other).path.exists()


def test_gc_never_touches_a_paused_vm(manager: Manager, backend, tmp_path: Path) -> None:
    name = unique("pz")
    define_in_vmdir(backend, tmp_path, name, {})  # no last_boot: gc removes such a VM when stopped
    backend.start(name)
    manager.pause(name)
    assert manager.gc() == []
    assert backend.get(name).state == "paused"


def test_a_backend_that_cannot_pause_is_unsupported(tmp_path: Path) -> None:
    class NoPause:
        name = "nopause"

    with pytest.raises(Unsupported, match="the nopause backend cannot pause or resume"):
        Manager(NoPause()).pause("box")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- the clock


def test_resume_tells_the_agent_the_time(manager: Manager, backend, tmp_path: Path) -> None:
    """The guest's clock stands still while it is paused: resume sends the host's time on the agent's
    channel (the test driver runs no guest: a socket in the VM's directory plays its agent)."""
    name = running_vm(backend, tmp_path)
    manager.pause(name)
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as agent:
        agent.bind(str(state.VMDir(name).agent_socket))
        agent.listen()

        def serve() -> None:
            conn, _ = agent.accept()
            with conn:
                got.append(conn.makefile("rb").readline())

        thread = threading.Thread(target=serve)
        thread.start()
        before = time.time()
        manager.resume(name)
        thread.join(5)
    command = json.loads(got[0])
    assert command["op"] == Command.CLOCK and before <= command["time"] <= time.time()


def test_the_agent_sets_its_clock_to_a_plausible_time_only(monkeypatch, capsys) -> None:
    calls: list[tuple[int, float]] = []
    monkeypatch.setattr(agent_main.time, "clock_settime", lambda clock, t: calls.append((clock, t)))
    agent_main.set_clock(1_800_000_000.25)
    assert calls == [(agent_main.time.CLOCK_REALTIME, 1_800_000_000.25)]
    for bad in (None, True, "1800000000", 5, float("nan"), float("inf"), 1e12, [1]):
        agent_main.set_clock(bad)
    assert len(calls) == 1
    assert capsys.readouterr().out.count("herovm-agent: ignored clock") == 8


# --------------------------------------------------------------------------------------------- CLI


def run(*args: str):
    return CliRunner().invoke(app, ["--connect", URI, *args])


def test_cli_pause_resume_and_exec_between(backend, tmp_path: Path) -> None:
    name = running_vm(backend, tmp_path, agent_exec=True, ssh_port=9)
    r = run("pause", name)
    assert (r.exit_code, r.stdout) == (0, f"{name} is paused\n")
    r = run("ls", "--json")
    assert [v["state"] for v in json.loads(r.stdout) if v["name"] == name] == ["paused"]
    assert json.loads(run("status", name, "--json").stdout)["state"] == "paused"
    r = run("exec", name, "--", "true")
    assert r.exit_code == 255
    assert r.stderr.splitlines() == [
        f"herovm: error: VM {name} is paused",
        f"  hint: resume it with `herovm resume {name}`",
    ]
    r = run("resume", name, "--json")
    assert (r.exit_code, json.loads(r.stdout)) == (0, {"name": name, "state": "running"})
    r = run("resume", name)
    assert (r.exit_code, r.stdout) == (0, f"{name} is running\n")


def test_cli_exit_codes() -> None:
    r = run("pause", "nope")
    assert (r.exit_code, r.stderr.splitlines()[0]) == (3, "herovm: error: VM nope not found")
    r = run("resume", "nope", "--json")
    assert r.exit_code == 3 and json.loads(r.stdout)["error"] == "NotFound"
    r = run("pause", "Bad_Name", "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"] == "InvalidInput"


def test_cli_pause_of_a_stopped_vm(backend, tmp_path: Path) -> None:
    name = unique("pz")
    define_in_vmdir(backend, tmp_path, name, {})
    r = run("pause", name)
    assert r.exit_code == 255
    assert r.stderr.splitlines() == [
        f"herovm: error: VM {name} is stopped: only a running VM can be paused",
        f"  hint: start it with `herovm start {name}`",
    ]
