"""herovm.accel: KVM only where it really works, judged from a fake root directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from herovm import accel
from herovm.errors import InvalidInput

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse vmx sse sse2 hypervisor\n\n"
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme svm sse sse2\n\n"
NONE = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme sse sse2 hypervisor\n\n"


def fake_root(tmp_path: Path, *, kvm: bool = True, pvm: bool = False, cpuinfo: str | None = INTEL) -> Path:
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    (root / "proc").mkdir()
    if kvm:
        (root / "dev/kvm").write_text("")
    if pvm:
        (root / "sys/module/kvm_pvm").mkdir(parents=True)
    if cpuinfo is not None:
        (root / "proc/cpuinfo").write_text(cpuinfo)
    return root


def test_kvm_with_vmx(tmp_path: Path) -> None:
    choice = accel.detect(fake_root(tmp_path))
    assert choice.accel == "kvm"
    assert "vmx" in choice.reasons[0]


def test_kvm_with_svm(tmp_path: Path) -> None:
    choice = accel.detect(fake_root(tmp_path, cpuinfo=AMD))
    assert choice.accel == "kvm"
    assert "svm" in choice.reasons[0]


def test_no_dev_kvm(tmp_path: Path) -> None:
    choice = accel.detect(fake_root(tmp_path, kvm=False))
    assert choice.accel == "tcg"
    assert "does not exist" in choice.reasons[0]


def test_pvm_host_gets_tcg_even_with_vmx(tmp_path: Path) -> None:
    choice = accel.detect(fake_root(tmp_path, pvm=True, cpuinfo=INTEL))
    assert choice.accel == "tcg"
    assert "kvm_pvm" in choice.reasons[0]


def test_cpu_without_vmx_or_svm(tmp_path: Path) -> None:
    choice = accel.detect(fake_root(tmp_path, cpuinfo=NONE))
    assert choice.accel == "tcg"
    assert "neither vmx nor svm" in choice.reasons[0]


def test_vmx_outside_the_flags_line_does_not_count(tmp_path: Path) -> None:
    # "vmx" in a model name or in "vmx flags" (a later line) is not the CPU flag
    text = "model name\t: vmx svm marketing\nflags\t\t: fpu sse\nvmx flags\t: ept vpid\n"
    assert accel.detect(fake_root(tmp_path, cpuinfo=text)).accel == "tcg"


def test_unreadable_cpuinfo(tmp_path: Path) -> None:
    choice = accel.detect(fake_root(tmp_path, cpuinfo=None))
    assert choice.accel == "tcg"


def test_permission_denied(tmp_path: Path, mocker) -> None:
    root = fake_root(tmp_path)
    os.chmod(root / "dev/kvm", 0)
    # We run as root, and os.access() ignores mode bits for root, so chmod 000 alone cannot make /dev/kvm
    # unopenable here. Patch os.access for this one case (the check a non-root user in no kvm group hits).
    access = mocker.patch.object(accel.os, "access", return_value=False)
    choice = accel.detect(root)
    assert choice.accel == "tcg"
    assert "cannot open" in choice.reasons[0]
    access.assert_called_once_with(root / "dev/kvm", os.R_OK | os.W_OK)


def test_this_host() -> None:
    # MACHINE-NOTES: this machine kind has /dev/kvm backed by kvm_pvm, which must give tcg.
    choice = accel.detect()
    assert choice.accel in accel.ACCELS
    assert choice.reasons
    if Path("/sys/module/kvm_pvm").exists():
        assert choice.accel == "tcg"


@pytest.mark.parametrize("requested", ["kvm", "tcg"])
def test_choose_override(requested: str) -> None:
    choice = accel.choose(requested)
    assert choice.accel == requested
    assert f"--accel {requested}" in choice.reasons[0]


@pytest.mark.parametrize("requested", [None, "", "auto"])
def test_choose_auto_detects(requested: str | None, mocker) -> None:
    detected = accel.AccelChoice("kvm", ["pretend"])
    detect = mocker.patch.object(accel, "detect", return_value=detected)
    assert accel.choose(requested) is detected
    detect.assert_called_once_with()


@pytest.mark.parametrize("requested", ["KVM", "hvf", "qemu", "xen", " tcg"])
def test_choose_rejects_unknown(requested: str) -> None:
    with pytest.raises(InvalidInput) as info:
        accel.choose(requested)
    assert repr(requested) in info.value.message
    assert info.value.hint == "use kvm, tcg or auto"
