"""Helpers the integration tests share: run the CLI, and check that a VM left nothing behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from herovm import images, state
from herovm.backends.libvirt import PREFIX, LibvirtBackend
from herovm.record import VMRecord

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


def link_image(image: images.Image, home: Path) -> Path:
    """The image, hard-linked into `home` (same file system: no copy)."""
    target = home / "images" / image.recipe / image.id
    target.mkdir(parents=True)
    for f in image.path.iterdir():
        if f.is_file():
            os.link(f, target / f.name)
    os.chmod(home / "images", 0o755)
    return target


def home_domains(home: Path) -> dict[str, str]:
    """libvirt's herovm domains whose record names `home` (or names none: the disk says): name -> state."""
    backend = LibvirtBackend("qemu:///system")
    try:
        found = {}
        for machine in backend.list():
            recorded = VMRecord.from_json(machine.name, machine.metadata).home
            if recorded is None or os.path.realpath(recorded) == os.path.realpath(home):
                found[machine.name] = machine.state
        return found
    finally:
        backend.close()


@contextlib.contextmanager
def e2b_sdk_at(url: str, key: str) -> Iterator[None]:
    """The E2B SDK pointed at a herovm serve through its own environment variables, as its users point it
    (put back afterwards); on the way out every sandbox it lists there is killed."""
    from e2b import Sandbox

    with pytest.MonkeyPatch.context() as env:
        env.setenv("E2B_API_URL", url)
        env.setenv("E2B_SANDBOX_URL", url)
        env.setenv("E2B_API_KEY", key)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                for info in Sandbox.list().next_items():
                    Sandbox.kill(info.sandbox_id)


@contextlib.contextmanager
def alone(what: str) -> Iterator[None]:
    """Hold a lock of this machine's for `what` (a file under /tmp, flock): test files that share state the
    suite cannot give each its own wait for each other, whichever pytest-xdist workers run them."""
    import fcntl

    with open(f"/tmp/herovm-tests-{what}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
