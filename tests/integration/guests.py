"""Helpers the integration tests share: run the CLI, and check that a VM left nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time

import libvirt
import pytest

from herovm import state
from herovm.backends.libvirt import PREFIX

HEROVM = [sys.executable, "-m", "herovm.cli"]


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*HEROVM, *args], capture_output=True, text=True, timeout=timeout, **kw)


def qemu_running(name: str) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return f"guest={PREFIX}{name}," in ps


def assert_nothing_left(name: str) -> None:
    conn = libvirt.open("qemu:///system")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(PREFIX + name)
    finally:
        conn.close()
    assert not state.VMDir(name).path.exists(), f"{name}: directory left behind"
    assert not (state.home() / "locks" / f"vm-{name}.lock").exists(), f"{name}: lock file left behind"
    for _ in range(50):  # QEMU may take a moment to exit after destroy
        if not qemu_running(name):
            break
        time.sleep(0.1)
    assert not qemu_running(name), f"{name}: QEMU process left behind"
