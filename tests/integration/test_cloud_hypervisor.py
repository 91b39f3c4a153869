"""The default image under a real Cloud Hypervisor: boot, bootstrap, exec and cp over vsock, pause, snapshots
(running and stopped) restored, a clone of a running snapshot, down.

Runs where a `cloud-hypervisor` binary is on PATH (or HEROVM_CLOUD_HYPERVISOR) and KVM really runs guests.
On our development and CI machines neither holds (see docs/cloud-hypervisor.md), so it is skipped there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from herovm import accel, disks, state
from herovm.backends.base import MachineSpec
from herovm.backends.cloud_hypervisor import CloudHypervisorBackend
from herovm.manager import Manager
from herovm.protocol import AGENT_VSOCK_PORT

BINARY = os.environ.get("HEROVM_CLOUD_HYPERVISOR") or shutil.which("cloud-hypervisor")
KVM = accel.detect()

pytestmark = [
    pytest.mark.skipif(
        BINARY is None, reason="no cloud-hypervisor binary on PATH (nor HEROVM_CLOUD_HYPERVISOR)"
    ),
    pytest.mark.skipif(
        KVM.accel != "kvm", reason=f"Cloud Hypervisor needs working KVM: {'; '.join(KVM.reasons)}"
    ),
]

BOOTSTRAP = """
!!file.write path:/etc/motd content:'hello from cloud-hypervisor'
!!env.set GREETING=hello
!!cmd.run cmd:'echo "$GREETING" > /run/ready' timeout:30s
"""


def test_boot_bootstrap_exec_snapshot_down(image, tmp_path) -> None:
    name = f"ch-{uuid.uuid4().hex[:6]}"
    backend = CloudHypervisorBackend(BINARY)
    with Manager(backend) as m:
        try:
            vm = m.up(name, bootstrap=BOOTSTRAP, net="none", memory="1GB", timeout="2m")
            assert m.status(name)["agent"] == "ready"
            r = vm.exec(["cat", "/run/ready", "/etc/motd"])
            assert r.exit_code == 0 and r.stdout.startswith(b"hello\nhello from cloud-hypervisor")
            r = vm.exec("exit 7")
            assert r.exit_code == 7
            (tmp_path / "up.txt").write_text("over vsock")
            vm.put(tmp_path / "up.txt", "/root/up.txt")
            assert vm.exec(["cat", "/root/up.txt"]).stdout == b"over vsock"
            vm.close()

            backend.pause(name)
            assert backend.get(name).state == "paused"
            backend.resume(name)

            # a running snapshot: memory and disk; what changes after it is gone after the restore
            row = m.snapshot(name, "s1")
            assert (row["kind"], row["state"]) == ("memory", "running")
            assert backend.get(name).state == "running"
            vm = m.get(name)
            assert vm.exec("echo after > /root/after.txt && rm /root/up.txt").exit_code == 0
            vm.close()
            assert m.restore(name, "s1")["vm_state"] == "running"
            vm = m.get(name)
            r = vm.exec("cat /root/up.txt; test ! -e /root/after.txt")
            assert (r.exit_code, r.stdout) == (0, b"over vsock")
            vm.close()

            # a clone of that snapshot: a second VM from its memory, on its own overlay, files and sockets
            clone_check(backend, name, f"{name}-c")

            m.stop(name)
            assert backend.get(name).state == "stopped"
            m.start(name, timeout="2m")  # a fresh VMM; the bootstrap does not run again
            assert m.get(name).exec(["cat", "/run/ready"]).stdout == b"hello\n"

            # a stopped VM's snapshot is its disk; restoring it leaves the VM stopped
            m.stop(name)
            assert m.snapshot(name, "s2")["kind"] == "disk"
            m.start(name, timeout="2m")
            assert m.get(name).exec("touch /root/later").exit_code == 0
            assert m.restore(name, "s2")["vm_state"] == "stopped"
            m.start(name, timeout="2m")
            assert m.get(name).exec("test ! -e /root/later").exit_code == 0
        finally:
            if backend.get(name) is not None or state.VMDir(name).exists():
                m.down(name)
    assert backend.get(name) is None and not state.VMDir(name).exists()
    assert not (backend.state_dir() / f"{name}.json").exists()


def clone_check(backend: CloudHypervisorBackend, source: str, name: str) -> None:
    """Clone `source`'s snapshot s1 as VM `name` (a spec made here as the Manager makes one: a new VM
    directory, an overlay on the frozen disk, the drive copied) and check that its guest runs on: its agent
    answers on its own vsock socket, while the source's snapshot stays as it was."""
    src = state.VMDir(source)
    taken = json.loads((src.snapshots / "s1" / "snapshot.json").read_text())
    memory = src.snapshots / "s1" / taken["memory"]
    before = {p.name: p.stat().st_mtime_ns for p in memory.iterdir()}
    st = json.loads((backend.state_dir() / f"{source}.json").read_text())
    config = st["config"]
    vmdir = state.VMDir(name)
    vmdir.create()
    cloner = CloudHypervisorBackend(backend.binary, kernel=lambda vmlinux: vmlinux)  # the source's vmlinux
    try:
        disks.create_overlay(src.path / taken["disk"], vmdir.disk, what=name)
        shutil.copyfile(src.drive, vmdir.drive)
        spec = MachineSpec(
            name=name,
            cpus=config["cpus"]["boot_vcpus"],
            memory=config["memory"]["size"],
            kernel=Path(config["payload"]["kernel"]),
            initrd=Path(config["payload"]["initramfs"]),
            cmdline=config["payload"]["cmdline"],
            disk=vmdir.disk,
            drive=vmdir.drive,
            console_log=vmdir.console_log,
            channel=vmdir.agent_socket,
            ssh_port=None,
            accel="kvm",
            metadata={**st["metadata"], "name": name},
            net="none",
        )
        t = time.monotonic()
        cloner.clone(spec, memory)
        print(f"clone of {source}/s1 running after {time.monotonic() - t:.3f}s")
        assert cloner.get(name).state == "running" and cloner.disk(name) == vmdir.disk
        with cloner.guest_connector(name, None)(AGENT_VSOCK_PORT, time.monotonic() + 30):
            pass  # the restored guest's agent listens on the clone's own vsock socket
        assert backend.get(source).state == "running"
        assert {p.name: p.stat().st_mtime_ns for p in memory.iterdir()} == before
    finally:
        cloner.undefine(name)
        shutil.rmtree(vmdir.path, ignore_errors=True)
