"""The default image under a real Cloud Hypervisor: boot, bootstrap, exec and cp over vsock, snapshot, down.

Runs where a `cloud-hypervisor` binary is on PATH (or HEROVM_CLOUD_HYPERVISOR) and KVM really runs guests.
On our development and CI machines neither holds (see docs/cloud-hypervisor.md), so it is skipped there.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from herovm import accel, state
from herovm.backends.cloud_hypervisor import CloudHypervisorBackend
from herovm.manager import Manager

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
            snap = backend.save_state(name, tmp_path / "snap")
            assert (snap / "config.json").is_file()

            m.stop(name)
            assert backend.get(name).state == "stopped"
            m.start(name, timeout="2m")  # a fresh VMM; the bootstrap does not run again
            assert m.get(name).exec(["cat", "/run/ready"]).stdout == b"hello\n"
        finally:
            if backend.get(name) is not None or state.VMDir(name).exists():
                m.down(name)
    assert backend.get(name) is None and not state.VMDir(name).exists()
    assert not (backend.state_dir() / f"{name}.json").exists()
