"""Fixtures shared by the unit tests of the libvirt layer (libvirt's own test:///default driver)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from herovm.backends.libvirt import LibvirtBackend
from herovm.manager import Manager

TEST_DRIVER_URI = "test:///default"


@pytest.fixture
def backend() -> Iterator[LibvirtBackend]:
    b = LibvirtBackend(TEST_DRIVER_URI)
    before = {d.name() for d in b.conn.listAllDomains()}
    yield b
    for d in b.conn.listAllDomains():  # leave the shared test driver as we found it
        if d.name() not in before:
            if d.isActive():
                d.destroy()
            d.undefine()
    b.close()


@pytest.fixture
def manager(backend: LibvirtBackend) -> Manager:
    """A Manager over the test driver (a module may define its own, e.g. to record progress)."""
    return Manager(backend)


@pytest.fixture
def isolated_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A HEROVM_HOME of the test's own, and libvirt's default URI, whatever the environment says. Directly
    under /tmp: an agent socket's path must fit in a sockaddr_un (107 bytes), and pytest's tmp_path under
    xdist (`.../popen-gw0/test_name0`) made some too long."""
    top = Path(tempfile.mkdtemp(prefix="hvu", dir="/tmp"))
    h = top / "h"
    monkeypatch.setenv("HEROVM_HOME", str(h))
    monkeypatch.delenv("HEROVM_LIBVIRT_URI", raising=False)
    yield h
    shutil.rmtree(top, ignore_errors=True)
