"""The backend interface (herovm/backends/base.py): every backend has Backend's methods, documented there;
optional capabilities are small interfaces checked by type, and a backend without one is Unsupported by name;
every backend says how to reach its guests (libvirt here: the agent's socket and the SSH forward)."""

from __future__ import annotations

import inspect
import re
import socket
import tempfile
import time
from pathlib import Path

import pytest

from herovm import resources, state
from herovm.backends import require
from herovm.backends.base import Backend, Clones, Pausable, Snapshots
from herovm.backends.cloud_hypervisor import CloudHypervisorBackend
from herovm.backends.libvirt import LibvirtBackend
from herovm.errors import GuestError, InvalidInput, Unsupported
from herovm.protocol import AGENT_VSOCK_PORT, SSH_PORT

BACKENDS = (LibvirtBackend, CloudHypervisorBackend)
METHODS = [name for name, _ in inspect.getmembers(Backend, inspect.isfunction) if not name.startswith("_")]


def test_every_method_of_the_interface_is_documented_there() -> None:
    assert "guest_connector" in METHODS and len(METHODS) == 9
    for name in METHODS:
        assert inspect.getdoc(getattr(Backend, name)), name


@pytest.mark.parametrize("cls", BACKENDS)
def test_every_backend_has_the_interface_with_its_parameters(cls: type) -> None:
    for name in METHODS:
        wanted = list(inspect.signature(getattr(Backend, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == wanted, f"{cls.__name__}.{name}"


@pytest.mark.parametrize("capability", [Pausable, Snapshots, Clones])
def test_capabilities_are_checked_by_type(capability: type) -> None:
    assert issubclass(LibvirtBackend, capability) and issubclass(CloudHypervisorBackend, capability)
    ch, lv = CloudHypervisorBackend(), LibvirtBackend("test:///default")
    assert require(ch, capability) is ch and require(lv, capability) is lv


class Plain:
    """A backend with Backend's methods only (one written elsewhere, say)."""

    name = "plain"


def test_a_missing_capability_names_the_backend() -> None:
    with pytest.raises(Unsupported) as info:
        require(Plain(), Snapshots)  # type: ignore[arg-type]
    assert info.value.message == "the plain backend cannot take or restore snapshots"
    assert info.value.hint == "the backends that can: libvirt, cloud-hypervisor (--backend)"
    assert isinstance(info.value, InvalidInput) and info.value.exit_code == 2
    with pytest.raises(Unsupported, match="plain backend cannot start clones of a snapshot"):
        require(Plain(), Clones)  # type: ignore[arg-type]


def test_nothing_asks_a_backend_for_a_method_by_name() -> None:
    """Optional capabilities are checked with isinstance (herovm.backends.require), never getattr."""
    for path in sorted(resources.PACKAGE.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"getattr\(\s*[\w.]*backend", text), path


# ------------------------------------------------------------------------- libvirt's guest connector


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch):
    with tempfile.TemporaryDirectory(prefix="hvbi-") as d:  # short: unix socket paths are limited
        monkeypatch.setenv("HEROVM_HOME", d)
        yield Path(d)


def test_libvirt_reaches_the_agent_socket_and_the_ssh_forward(home: Path) -> None:
    vmdir = state.VMDir("box")
    vmdir.create()
    with socket.socket(socket.AF_UNIX) as agent, socket.create_server(("127.0.0.1", 0)) as forward:
        agent.bind(str(vmdir.agent_socket))
        agent.listen()
        connect = LibvirtBackend("test:///default").guest_connector("box", forward.getsockname()[1])
        deadline = time.monotonic() + 2
        with connect(AGENT_VSOCK_PORT, deadline) as a, connect(SSH_PORT, deadline) as s:
            assert a.family == socket.AF_UNIX and s.getpeername() == forward.getsockname()
        with pytest.raises(GuestError, match="libvirt reaches no guest port 80 of box"):
            connect(80, deadline)


def test_libvirt_without_a_nic_has_no_ssh_port(home: Path) -> None:
    connect = LibvirtBackend("test:///default").guest_connector("box", None)
    with pytest.raises(GuestError, match=r"VM box has no network \(--net none\), so no exec or SSH"):
        connect(SSH_PORT, time.monotonic() + 1)
    with pytest.raises(TimeoutError, match="did not appear"):  # the agent's socket: waited for, to the end
        connect(AGENT_VSOCK_PORT, time.monotonic() + 0.2)
