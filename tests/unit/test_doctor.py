"""`herovm doctor`'s /dev/kvm check, on a character device node of KVM's numbers that the test makes: the
permission trap that made every define re-probe QEMU on a fresh machine."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from herovm.doctor import kvm_device_access

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chown need root")


@pytest.fixture
def user() -> str:
    """A throwaway system user standing for libvirt-qemu."""
    name = f"hvq{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
    )
    yield name
    subprocess.run(["userdel", name], check=False)
    subprocess.run(["groupdel", name], check=False, capture_output=True)


def make_kvm_node(path: Path, mode: int, gid: int = 0) -> str:
    os.mknod(path, mode | stat.S_IFCHR, os.makedev(10, 232))
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    return str(path)


def test_a_device_only_root_may_open_is_reported_with_the_fix(tmp_path: Path, user: str) -> None:
    check = kvm_device_access(make_kvm_node(tmp_path / "kvm", 0o600), user)
    assert check is not None and check.status == "fail"
    assert "0600 root:root" in check.detail and user in check.detail
    assert "chmod 0660" in check.fix and f"usermod -aG kvm {user}" in check.fix


def test_the_group_debians_rule_gives_makes_it_ok(tmp_path: Path, user: str) -> None:
    group = grp.getgrgid(pwd.getpwnam(user).pw_gid)
    check = kvm_device_access(make_kvm_node(tmp_path / "kvm", 0o660, group.gr_gid), user)
    assert check is not None and check.status == "ok", check
    # the same node, group-readable only: still not openable read-write
    os.chmod(tmp_path / "kvm", 0o640)
    assert kvm_device_access(str(tmp_path / "kvm"), user).status == "fail"


def test_nothing_to_check_without_the_device_or_the_user(tmp_path: Path, user: str) -> None:
    assert kvm_device_access(str(tmp_path / "absent"), user) is None
    (tmp_path / "plain").write_text("not a device")
    assert kvm_device_access(str(tmp_path / "plain"), user) is None
    assert kvm_device_access(make_kvm_node(tmp_path / "kvm", 0o600), "no-such-user-hv") is None
