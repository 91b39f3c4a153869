"""The agent's side of the event protocol (docs/protocol.md): JSON lines on a virtio-serial port,
mirrored on the console, replayed to every host that says hello."""

from __future__ import annotations

import _thread
import os
import sys
import time
from _queue import SimpleQueue

from herovm.protocol import AGENT_PORT_NAME, CONSOLE_PREFIX, Command

from . import jsonio

TYPE_CHECKING = False  # typing and collections.abc are a cost at boot
if TYPE_CHECKING:
    from collections.abc import Callable


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def find_port(name: str = AGENT_PORT_NAME) -> str | None:
    """The /dev node of the virtio-serial port called `name` (no udev here, so no /dev/virtio-ports)."""
    try:
        ports = os.listdir("/sys/class/virtio-ports")
    except OSError:
        return None
    for port in ports:
        try:
            with open(f"/sys/class/virtio-ports/{port}/name") as f:
                if f.read().strip() == name:
                    return "/dev/" + port
        except OSError:
            continue
    return None


class Events:
    """Emits events; keeps them all for replay; hands host commands to `on_command`."""

    def __init__(self, port: str | None, console=None, vsock_port: int | None = None) -> None:
        self._history: list[str] = []
        self._secrets: list[tuple[str, str]] = []  # (value, name), longest value first
        self._lock = _thread.allocate_lock()
        self._outbox: SimpleQueue[str | None] = SimpleQueue()
        self._console = console if console is not None else sys.stdout
        self.on_command: Callable[[dict], None] = lambda cmd: None
        self._fd: int | None = None
        self.vsock = False
        if port:
            try:
                self._fd = os.open(port, os.O_RDWR)
            except OSError as e:
                self._mirror(f"cannot open {port}: {e}")
        if self._fd is not None:
            _thread.start_new_thread(self._writer, ())
            _thread.start_new_thread(self._reader, ())
        elif vsock_port is not None:
            self._listen_vsock(vsock_port)

    def keep_secret(self, secrets: dict[str, str]) -> None:
        """From now on every event carries `[secret NAME]` where a secret's value would be (an action's
        output, an error quoting a parameter): events are mirrored on the console, which the host keeps."""
        self._secrets = sorted(((v, k) for k, v in secrets.items() if v), key=lambda s: -len(s[0]))

    def redact(self, obj):
        if not self._secrets:
            return obj
        if isinstance(obj, str):
            for value, name in self._secrets:
                if value in obj:
                    obj = obj.replace(value, "[secret " + name + "]")
            return obj
        if isinstance(obj, dict):
            return {k: self.redact(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.redact(v) for v in obj]
        return obj

    def emit(self, event: str, **fields: object) -> dict:
        if self._secrets:
            fields = self.redact(fields)
        with self._lock:
            record = {"event": event, "seq": len(self._history), "t": round(uptime(), 3), **fields}
            line = jsonio.dumps(record)
            self._history.append(line)
            self._outbox.put(line)
            self._mirror(line)
        return record

    def _mirror(self, line: str) -> None:
        try:
            self._console.write(CONSOLE_PREFIX + line + "\n")
            self._console.flush()
        except (OSError, ValueError):
            pass

    def replay(self) -> None:
        with self._lock:
            for line in self._history:
                self._outbox.put(line)

    def _writer(self) -> None:
        # A write to a port whose host side is not connected blocks until the host connects: a thread of its
        # own keeps that from stalling the boot. Anything lost while a host went away is replayed on hello.
        while True:
            data = (self._outbox.get() + "\n").encode()
            try:
                while data:
                    data = data[os.write(self._fd, data) :]  # type: ignore[arg-type]
            except OSError:
                time.sleep(0.2)

    def _listen_vsock(self, port: int) -> None:
        """The same protocol on AF_VSOCK `port` (Cloud Hypervisor: no virtio-serial port there). The host
        connection that said hello last gets the replay, then the stream, in order (see _hello)."""
        import socket

        try:
            srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            srv.bind((socket.VMADDR_CID_ANY, port))
            srv.listen(4)
        except (OSError, AttributeError) as e:
            self._mirror(f"no agent channel: cannot listen on vsock port {port}: {e}")
            return
        self.vsock = True

        def accept() -> None:
            while True:
                conn, _ = srv.accept()
                _thread.start_new_thread(self._reader, (conn,))

        _thread.start_new_thread(accept, ())

    def _hello(self, conn) -> None:
        """A new outbox holding the replay, swapped in under the emit lock: nothing is sent out of order."""
        with self._lock:
            previous, self._outbox = self._outbox, SimpleQueue()
            for line in self._history:
                self._outbox.put(line)
            outbox = self._outbox
        previous.put(None)  # ends the previous connection's sender

        def send() -> None:
            while (line := outbox.get()) is not None:
                try:
                    conn.sendall((line + "\n").encode())
                except OSError:
                    return

        _thread.start_new_thread(send, ())

    def _reader(self, conn=None) -> None:
        buf = b""
        while True:
            try:
                chunk = conn.recv(4096) if conn is not None else os.read(self._fd, 4096)  # type: ignore[arg-type]
            except OSError:
                chunk = b""
            if not chunk and conn is not None:  # this host went away
                conn.close()
                return
            if not chunk:  # no host connected: reads return EOF at once until one is
                time.sleep(0.1)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    cmd = jsonio.loads(line)
                except ValueError:
                    self._mirror(f"ignored command line {line[:80]!r}")
                    continue
                if isinstance(cmd, dict):
                    if cmd.get("op") == Command.HELLO:
                        if conn is not None:
                            self._hello(conn)
                        else:
                            self.replay()
                    else:
                        self.on_command(cmd)
