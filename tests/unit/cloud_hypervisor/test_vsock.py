"""Hybrid vsock as Cloud Hypervisor serves it (a unix socket, `CONNECT <port>` / `OK <port>`), played by a
real unix-socket server thread, carrying the agent protocol (the guest agent's own Events class on the far
side) and an SSH session (GuestConnection against a real local sshd)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from herovm.boot import agent_channel
from herovm.guest import vsock
from herovm.guest.events import AgentChannel
from herovm.guest.ssh import GuestConnection
from herovm.manager import Manager
from herovm.protocol import AGENT_VSOCK_PORT, SSH_PORT
from herovm.record import VMRecord
from herovm.vm import VM

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "herovm/_data/agent"))
from herovm_agent.events import Events  # noqa: E402


class HybridVsock:
    """Cloud Hypervisor's side: accept on the unix socket, read `CONNECT <port>\\n`, open the guest port
    (`ports[port]()` -> a socket, or None: nothing listens, so the connection is closed), answer
    `OK <host port>\\n`, then relay bytes both ways."""

    def __init__(self, path: Path, ports: dict[int, Callable[[], socket.socket | None]]) -> None:
        self.path = path
        self.ports = ports
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.connects: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            c = conn.recv(1)
            if not c:
                conn.close()
                return
            line += c
        port = int(line.split()[1])
        self.connects.append(port)
        guest = self.ports.get(port, lambda: None)()
        if guest is None:
            conn.close()
            return
        conn.sendall(f"OK {1073741824 + len(self.connects)}\n".encode())
        for a, b in ((conn, guest), (guest, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.server.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="hvvs-") as d:  # short: unix socket paths are limited
        yield Path(d)


def test_handshake_waits_for_the_listener_and_keeps_what_follows(sock_dir: Path) -> None:
    listening = threading.Event()

    def banner() -> socket.socket | None:
        if not listening.is_set():
            return None
        guest, far = socket.socketpair()
        far.sendall(b"SSH-2.0-guest\r\n")  # the guest speaks first, right after the OK line
        return guest

    path = sock_dir / "vsock.sock"
    with pytest.raises(TimeoutError):
        vsock.connect_hybrid(path, 22, time.monotonic() + 0.2)  # no socket yet
    hv = HybridVsock(path, {22: banner})
    threading.Timer(0.3, listening.set).start()
    t = time.monotonic()
    s = vsock.connect_hybrid(path, 22, time.monotonic() + 5)
    assert 0.25 < time.monotonic() - t < 3
    assert s.recv(100) == b"SSH-2.0-guest\r\n"  # not eaten by the handshake
    assert hv.connects[-1] == 22 and len(hv.connects) > 1  # refused (closed) before, then OK
    s.close()
    with pytest.raises(ConnectionError):
        vsock.connect_hybrid(path, 99, time.monotonic() + 5, alive=lambda: False)
    hv.close()


def test_the_agent_protocol_over_vsock(sock_dir: Path) -> None:
    console = io.StringIO()
    events = Events(None, console=console)  # the guest agent's events, as PID 1 has them
    commands: list[dict] = []
    events.on_command = commands.append
    events.emit("boot", nonce="n1")
    events.emit("setup", step="network", ok=True)

    def agent_port() -> socket.socket:  # the agent's vsock accept loop, with a socketpair for AF_VSOCK
        guest, host_side = socket.socketpair()
        threading.Thread(target=events._reader, args=(guest,), daemon=True).start()
        return host_side

    hv = HybridVsock(sock_dir / "v.sock", {AGENT_VSOCK_PORT: agent_port})
    deadline = time.monotonic() + 10
    ch = AgentChannel(None, deadline, sock=vsock.connect_hybrid(hv.path, AGENT_VSOCK_PORT, deadline))
    it = ch.events(deadline)
    assert [next(it)["event"], next(it)["event"]] == ["boot", "setup"]  # the replay on hello
    events.emit("ready", actions=0)
    assert next(it)["event"] == "ready"  # then the stream
    ch.send({"op": "status"})
    for _ in range(100):
        if commands:
            break
        time.sleep(0.02)
    assert commands == [{"op": "status"}]
    # a second host (e.g. `herovm stop`) gets the whole boot again, in order
    ch2 = AgentChannel(None, deadline, sock=vsock.connect_hybrid(hv.path, AGENT_VSOCK_PORT, deadline))
    it2 = ch2.events(deadline)
    assert [next(it2)["seq"] for _ in range(3)] == [0, 1, 2]
    ch.close()
    ch2.close()
    hv.close()
    assert json.loads(console.getvalue().splitlines()[0].removeprefix("@herovm "))["event"] == "boot"


def _local_sshd_module():
    spec = importlib.util.spec_from_file_location(
        "herovm_test_local_sshd", ROOT / "tests/unit/guest/conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_an_ssh_session_over_vsock(sock_dir: Path, tmp_path: Path) -> None:
    local = _local_sshd_module()
    if reason := local.sshd_unavailable_reason():
        pytest.skip(reason)
    keys = local.ClientKeys(tmp_path / "keys")
    with local.LocalSshd(tmp_path / "sshd", keys).start() as sshd:
        hv = HybridVsock(
            sock_dir / "v.sock", {SSH_PORT: lambda: socket.create_connection(("127.0.0.1", sshd.port))}
        )
        conn = GuestConnection(
            port=SSH_PORT,
            client_key=keys.client_key,
            host_key=keys.host_public,
            user=sshd.user,
            sock_factory=lambda t: vsock.connect_hybrid(hv.path, SSH_PORT, time.monotonic() + t),
        )
        with conn.connect(10):
            r = conn.exec(["sh", "-c", "echo over-vsock; exit 3"])
        assert (r.exit_code, r.stdout) == (3, b"over-vsock\n")
        assert hv.connects == [SSH_PORT]
        hv.close()


def test_the_agent_channel_and_exec_take_the_transport_from_the_backend(sock_dir: Path) -> None:
    class Vsock:  # a backend that reaches its guests as Cloud Hypervisor does
        name = "vsock"

        def guest_connector(self, name: str, ssh_port: int | None):
            return lambda port, deadline: vsock.connect_hybrid(sock_dir / f"{name}.sock", port, deadline)

        def close(self) -> None:
            pass

    pairs: list[tuple[socket.socket, socket.socket]] = []

    def guest_port() -> socket.socket:  # the far end stays open: closed, it ended the relay under our hello
        pairs.append(socket.socketpair())
        return pairs[-1][0]

    hv = HybridVsock(sock_dir / "box.sock", {AGENT_VSOCK_PORT: guest_port, SSH_PORT: guest_port})
    agent_channel(Vsock(), VMRecord(name="box"), time.monotonic() + 2).close()  # type: ignore[arg-type]
    VM(Manager(Vsock()), VMRecord(name="box"))._connect(2).close()  # type: ignore[arg-type]
    assert hv.connects == [AGENT_VSOCK_PORT, SSH_PORT]
    hv.close()
    for a, b in pairs:
        a.close()
        b.close()
