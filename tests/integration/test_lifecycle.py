"""Issue 4: up / exec / cp / stop / start / down over a real libvirtd, with real guests."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from guests import HEROVM, assert_nothing_left

from herovm import state
from herovm.errors import AlreadyExists, GuestError


@pytest.fixture(scope="module")
def box(module_vm_factory, run_id):
    """One plain VM shared by the exec tests of this module."""
    vm = module_vm_factory(f"it-{run_id}-box")
    yield vm
    vm.close()


def test_exec_exit_codes_stderr_env_cwd_stdin(box):
    r = box.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = box.exec(["sh", "-c", 'echo "$FOO:$(pwd)"'], env={"FOO": "a b"}, cwd="/tmp")
    assert r.stdout == b"a b:/tmp\n"
    assert box.exec(["cat"], stdin=b"piped in").stdout == b"piped in"
    assert box.exec(["echo", "$HOME", "'q'"]).stdout == b"$HOME 'q'\n"


def test_exec_100mb_output_streams(box):
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    r = box.exec("head -c 104857600 /dev/zero", on_stdout=count, timeout=300)
    assert r.exit_code == 0 and total == 100 * 1024 * 1024


def test_exec_timeout_kills_remote_command(box):
    t = time.monotonic()
    r = box.exec("echo $$ > /tmp/sleeper.pid; exec sleep 300", timeout=2)
    assert r.timed_out and r.exit_code == 124 and time.monotonic() - t < 30
    pid = box.exec(["cat", "/tmp/sleeper.pid"]).stdout.decode().strip()
    assert box.exec(["sh", "-c", f"kill -0 {pid} 2>/dev/null && echo alive || echo gone"]).stdout == b"gone\n"


def test_cp_both_ways_files_and_directories(box, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.sh").write_text("#!/bin/sh\necho b\n")
    os.chmod(src / "sub" / "b.sh", 0o750)
    box.put(src, "/root/tree")
    assert (
        box.exec("cat /root/tree/a.txt; /root/tree/sub/b.sh; stat -c %a /root/tree/sub/b.sh").stdout
        == b"alpha\nb\n750\n"
    )
    back = tmp_path / "back"
    box.get("/root/tree", back)
    assert (back / "a.txt").read_text() == "alpha\n"
    assert (back / "sub" / "b.sh").stat().st_mode & 0o777 == 0o750


def test_up_again_is_noop_and_other_settings_are_refused(box, module_vm_factory):
    m = module_vm_factory.manager
    again = m.up(box.name, timeout="1m")
    assert again.meta["ssh_port"] == box.ssh_port
    with pytest.raises(AlreadyExists):
        m.up(box.name, memory="2GB")


def _root_fs_bytes(vm) -> int:
    return int(vm.exec(["df", "-B1", "--output=size", "/"]).stdout.split()[-1])


def test_stop_start_keeps_files_and_the_root_fills_the_disk(vm_factory, unique_name):
    name = unique_name("restart")
    vm = vm_factory(name, disk="12GB")
    # The image's file system is 10 GB; the first boot grows it to the disk asked for.
    assert 11.5 * (1 << 30) < _root_fs_bytes(vm) <= 12 << 30
    vm.exec("echo kept > /root/keep.txt && sync")
    m = vm_factory.manager
    m.stop(name)
    assert m.backend.get(name).state == "stopped"
    with pytest.raises(GuestError, match="is stopped"):
        vm.exec(["true"])
    m.start(name)
    # The same handle: its kept connection died with the old boot; the next exec makes a new one.
    assert vm.exec(["cat", "/root/keep.txt"]).stdout == b"kept\n"
    assert 11.5 * (1 << 30) < _root_fs_bytes(vm) <= 12 << 30
    vm.close()


def test_down_leaves_nothing(vm_factory, unique_name):
    name = unique_name("down")
    vm = vm_factory(name)
    vm.close()
    m = vm_factory.manager
    vmdir = state.VMDir(name)
    assert vmdir.exists() and vmdir.disk.exists()
    m.down(name)
    assert_nothing_left(name)


def test_two_vms_at_once_get_distinct_ports(vm_factory, unique_name):
    names = [unique_name("pair"), unique_name("pair")]
    vms: dict[str, object] = {}
    errors: list[BaseException] = []

    def up(n: str) -> None:
        try:
            vms[n] = vm_factory(n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=up, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ports = {vms[n].ssh_port for n in names}
    assert len(ports) == 2
    for n in names:
        assert vms[n].exec(["hostname"]).stdout.decode().strip() == n
        vms[n].close()


def test_cli_as_a_new_user(unique_name):
    """What the README promises: `herovm up NAME`, then `herovm exec NAME -- uname -a`."""
    name = unique_name("cli")
    try:
        up = subprocess.run([*HEROVM, "up", name], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr
        assert "ready" in up.stdout and "starting" in up.stderr
        ex = subprocess.run(
            [*HEROVM, "exec", name, "--", "uname", "-a"], capture_output=True, text=True, timeout=60
        )
        assert ex.returncode == 0 and ex.stdout.startswith("Linux " + name + " "), ex
        fail = subprocess.run(
            [*HEROVM, "exec", name, "--", "sh", "-c", "exit 42"], capture_output=True, timeout=60
        )
        assert fail.returncode == 42
        ls = subprocess.run([*HEROVM, "ls", "--json"], capture_output=True, text=True, timeout=60)
        assert any(r["name"] == name and r["state"] == "running" for r in __import__("json").loads(ls.stdout))
    finally:
        down = subprocess.run([*HEROVM, "down", name, "--force"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not Path(state.VMDir(name).path).exists()
