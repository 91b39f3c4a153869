"""Snapshots with a real guest under the default network mode (passt): a memory snapshot of a running VM and
its restore (the file comes back, exec works through a passt started again, status tells the boot that runs
again), a disk snapshot of a stopped VM, rm, a `snapshot create` killed halfway and `gc`, down leaving
nothing. Prints the CLI's create and restore times and the first exec after a restore."""

from __future__ import annotations

import os
import signal
import stat
import statistics
import subprocess
import time
from pathlib import Path

from guests import HEROVM, assert_nothing_left, cli

from herovm import disks, state


def passt_pids(vmdir: state.VMDir) -> list[int]:
    """passt processes serving this VM (their command line names its socket)."""
    sock = str(vmdir.net_dir / "passt.sock").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"passt" in cmdline.split(b"\0")[0] and sock in cmdline:
                pids.append(int(proc.name))
    return pids


def timed(*args: str) -> float:
    t0 = time.monotonic()
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0


def assert_private(vmdir: state.VMDir) -> None:
    """docs/security.md: every file under a VM's directory 0600, directories not listable by others."""
    for root, dirs, files in os.walk(vmdir.path):
        for d in dirs:
            assert stat.S_IMODE(os.lstat(os.path.join(root, d)).st_mode) & 0o077 == 0, d
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if stat.S_ISREG(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o600, (f, oct(st.st_mode))


def test_memory_snapshot_restore_under_the_default_network(vm_factory, unique_name):
    name = unique_name("snap")
    vm = vm_factory(name, net="default")
    m = vm_factory.manager
    vmdir = state.VMDir(name)
    vm.exec("echo before > /root/file; echo $$ > /root/shell.pid")
    boot = m.record(name).last_boot

    creates, restores, first_execs = [], [], []
    for i in range(3):
        snap = f"s{i}"
        creates.append(timed("snapshot", "create", name, snap))
        assert m.machine(name).state == "running"
        assert vm.exec("cat /root/file").stdout == b"before\n", "the VM runs on after the snapshot"
        vm.exec("echo after > /root/file; rm -f /root/shell.pid; echo new > /root/new")
        restores.append(timed("snapshot", "restore", name, snap))
        t0 = time.monotonic()
        r = m.get(name).exec("cat /root/file /root/shell.pid; ls /root/new 2>&1 || true")
        first_execs.append(time.monotonic() - t0)
        lines = r.stdout.decode().splitlines()
        assert lines[0] == "before" and lines[1].isdigit() and "No such file" in lines[2], r
        time.sleep(0.2)  # the clock of the snapshot's moment, set to now by the restore
        skew = float(m.get(name).exec("date +%s.%N").stdout) - time.time()
        assert abs(skew) < 0.5, f"the restored guest's clock is {skew:+.2f}s off"
        assert len(passt_pids(vmdir)) == 1, "one passt serves the restored QEMU, none is left over"

    st = m.status(name)
    assert st["state"] == "running" and st["agent"] == "ready" and st["events"] == "whole"
    assert st["last_boot"]["nonce"] == boot.nonce, "the boot that runs again is the snapshot's"
    assert st["restored"]["snapshot"] == "s2"

    # after a boot of its own, a memory restore brings the earlier boot back, and status says so
    assert cli("stop", name).returncode == 0
    assert cli("start", name).returncode == 0
    rebooted = m.record(name).last_boot.nonce
    assert rebooted != boot.nonce and m.status(name)["restored"] is None
    timed("snapshot", "restore", name, "s0")
    assert m.record(name).last_boot.nonce == boot.nonce
    assert m.get(name).exec("cat /root/file").stdout == b"before\n"

    rows = {r["name"]: r for r in m.snapshots(name)}
    assert set(rows) == {"s0", "s1", "s2"} and all(r["kind"] == "memory" for r in rows.values())
    assert all(r["memory_bytes"] > 50 << 20 for r in rows.values())
    assert_private(vmdir)
    print(
        f"\nsnapshot (CLI, medians of 3): create {statistics.median(creates):.3f}s "
        f"(libvirt {statistics.median(r['seconds'] for r in rows.values()):.3f}s), "
        f"restore {statistics.median(restores):.3f}s, "
        f"first exec after {statistics.median(first_execs):.3f}s; "
        f"memory file {statistics.median(r['memory_bytes'] for r in rows.values()) / 1e6:.0f} MB"
    )
    for snap in ("s0", "s1", "s2"):
        assert cli("snapshot", "rm", name, snap).returncode == 0
    assert m.snapshots(name) == []
    assert len(disks.chain(m.backend.disk(name))) == 3  # its overlay, the snapshot's disk, the base
    assert cli("down", name).returncode == 0
    assert_nothing_left(name)
    assert passt_pids(vmdir) == []


def test_disk_snapshot_of_a_stopped_vm(vm_factory, unique_name):
    name = unique_name("disksnap")
    vm = vm_factory(name, net="restricted")
    m = vm_factory.manager
    vm.exec("echo one > /root/file")
    vm.close()
    assert cli("stop", name).returncode == 0
    r = cli("snapshot", "create", name, "d1")
    assert r.returncode == 0 and r.stdout.endswith("(disk)\n"), r
    assert cli("start", name).returncode == 0
    m.get(name).exec("echo two > /root/file; touch /root/later")
    r = cli("snapshot", "restore", name, "d1")  # the VM runs: stopped hard, left stopped on d1's disk
    assert r.returncode == 0 and "stopped" in r.stdout, r
    assert m.machine(name).state == "stopped"
    assert cli("start", name).returncode == 0
    r = m.get(name).exec("cat /root/file; ls /root/later 2>&1 || true")
    assert r.stdout.decode().splitlines()[0] == "one" and "No such file" in r.stdout.decode(), r
    assert_private(state.VMDir(name))
    assert cli("snapshot", "rm", name, "d1").returncode == 0
    assert cli("down", name).returncode == 0
    assert_nothing_left(name)


def test_a_killed_snapshot_create_leaves_a_partial_that_gc_removes(vm_factory, unique_name):
    name = unique_name("killsnap")
    vm = vm_factory(name, net="restricted")
    m = vm_factory.manager
    vm.exec("echo kept > /root/file")
    vmdir = state.VMDir(name)
    partial = vmdir.snapshots / ".k1.partial"
    proc = subprocess.Popen([*HEROVM, "snapshot", "create", name, "k1"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # while libvirt takes the snapshot: it finishes it without us
    proc.wait()
    assert partial.exists(), "killed after the partial directory was made"
    assert [r["name"] for r in m.snapshots(name)] == []
    time.sleep(1)  # let libvirtd's job end
    r = cli("gc")
    assert r.returncode == 0 and f"removed partial snapshot k1 of {name}" in r.stdout, r
    assert not partial.exists()
    assert m.machine(name).state == "running"
    assert m.get(name).exec("cat /root/file").stdout == b"kept\n"
    assert cli("snapshot", "create", name, "k1").returncode == 0  # the name is free again
    assert [r["name"] for r in m.snapshots(name)] == ["k1"]
    assert cli("down", name).returncode == 0
    assert_nothing_left(name)
