"""`exec` served by the agent itself, on the SSH port (bootstrap/PROTOCOL.md, "Exec without SSH").

The SSH listener hands us a connection that began with MAGIC. Each command is spawned straight from PID 1:
no sshd session process and no login shell, which under emulation is most of an SSH exec's cost. The host
proves it holds the VM's exec token by answering a fresh challenge with HMAC-SHA256(token, challenge), so
the token never crosses the wire and a recorded answer is worth nothing on another connection.

Frames both ways: 1 byte kind, 4 bytes big-endian length, payload. One command at a time per connection;
the connection then waits for the next request.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import queue
import select
import signal
import struct
import subprocess
import threading
from _operator import _compare_digest as compare_digest  # what hmac.compare_digest falls back to
from _sha256 import sha256

from . import jsonio

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .system import Socket

MAGIC = b"HEROVM-EXEC/1\n"
HEADER = struct.Struct(">cI")
MAX_REQUEST = 1 << 20
CHUNK = 64 * 1024
STDIN_BUFFERED_CHUNKS = 64  # stdin read ahead of the command, at most this many frames
# guest -> host
CHALLENGE, STDOUT, STDERR, EXIT, ERROR, PONG = b"C", b"1", b"2", b"X", b"E", b"P"
# host -> guest
REQUEST, STDIN, KILL, PING = b"R", b"0", b"K", b"P"

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
}


# A line of plain words: these characters and spaces only (and not starting with "=").
SIMPLE_LINE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:=,+@%- ")
# Builtins and keywords that act on the shell itself or have no program of the same name.
_SHELL_ONLY_WORDS = (
    ". alias bg bind break builtin caller cd command compgen complete compopt continue declare dirs "
    "disown enable eval exec exit export fc fg getopts hash help history jobs let local logout "
    "mapfile popd pushd read readarray readonly return set shift shopt source suspend time times "
    "trap type typeset ulimit umask unalias unset wait"
)
SHELL_ONLY = frozenset(_SHELL_ONLY_WORDS.split())


class Disconnected(Exception):
    pass


def _read_exact(conn: Socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise Disconnected
        data += chunk
    return bytes(data)


def read_frame(conn: Socket) -> tuple[bytes, bytes]:
    kind, length = HEADER.unpack(_read_exact(conn, HEADER.size))
    if length > MAX_REQUEST and kind != STDIN:
        raise Disconnected
    return kind, _read_exact(conn, length)


_sessions: dict[str, Session] = {}  # by challenge: the host may kill a session's command from another
_sessions_lock = threading.Lock()


class Session:
    """One authenticated connection; runs its commands one after another."""

    def __init__(self, conn: Socket, token: bytes, processes) -> None:
        self.conn = conn
        self.token = token
        self.processes = processes
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.stdin: queue.Queue | None = None

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self._send_lock:
            self.conn.sendall(HEADER.pack(kind, len(payload)) + payload)

    def send_json(self, kind: bytes, obj: dict) -> None:
        self.send(kind, jsonio.dumps(obj).encode())

    def serve(self) -> None:
        challenge = os.urandom(32).hex()
        expected = hmac_sha256(self.token, challenge.encode())
        with _sessions_lock:
            _sessions[challenge] = self
        try:
            self.send_json(CHALLENGE, {"challenge": challenge})
            authenticated = False
            while True:
                kind, payload = read_frame(self.conn)
                if kind == PING:
                    self.send(PONG)
                elif kind == REQUEST:
                    request = jsonio.loads(payload)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    if not authenticated:
                        if not compare_digest(str(request.get("auth", "")).encode(), expected.encode()):
                            self.send_json(ERROR, {"error": "exec refused: wrong or missing token"})
                            return
                        authenticated = True
                    if "kill_session" in request:
                        self.kill_session(str(request["kill_session"]))
                        continue
                    if self.proc is not None:
                        self.send_json(ERROR, {"error": "one command at a time per connection"})
                        return
                    self.start(request)
                elif kind == STDIN:
                    self.feed(payload)
                elif kind == KILL:
                    self.kill()
        except (Disconnected, OSError, ValueError):
            pass
        finally:
            with _sessions_lock:
                _sessions.pop(challenge, None)
            self.kill()  # the host went away: its command must not outlive it
            with contextlib.suppress(OSError):
                self.conn.close()

    def start(self, request: dict) -> None:
        argv = request.get("argv") or _simple_command(request.get("shell") or "")
        env = dict(BASE_ENV)
        env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
        cwd = os.path.normpath(os.path.join("/root", request.get("cwd") or "."))  # relative to home, as SSH
        env.setdefault("PWD", cwd)
        refused = _refusal(argv[0], cwd, env["PATH"], explicit_cwd=bool(request.get("cwd")))
        if refused is not None:
            code, message = refused
            self.send(STDERR, f"herovm: {message}\n".encode())
            self.send_json(EXIT, {"exit_code": code})
            return
        try:
            proc = self.processes.spawn(
                [str(a) for a in argv],
                stdin=subprocess.PIPE if request.get("stdin") else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group, so a kill takes its children too
            )
        except OSError as e:
            self.send(STDERR, f"herovm: {argv[0]}: {e.strerror}\n".encode())
            self.send_json(EXIT, {"exit_code": 127 if isinstance(e, FileNotFoundError) else 126})
            return
        stdin_queue: queue.Queue | None = None
        if proc.stdin is not None:
            stdin_queue = queue.Queue(STDIN_BUFFERED_CHUNKS)
            threading.Thread(target=_write_stdin, args=(proc.stdin, stdin_queue, proc), daemon=True).start()
        with self._lock:
            self.proc, self.stdin = proc, stdin_queue
        readers = [
            threading.Thread(target=self._pump, args=(proc.stdout, STDOUT), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, STDERR), daemon=True),
        ]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._finish, args=(proc, readers), daemon=True).start()

    def _pump(self, pipe, kind: bytes) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = os.read(pipe.fileno(), CHUNK)
                if not data:
                    break
                self.send(kind, data)
        pipe.close()

    def _finish(self, proc: subprocess.Popen, readers: list[threading.Thread]) -> None:
        code = self.processes.wait(proc)
        for reader in readers:  # like SSH: the outputs end when every holder of them has closed them
            reader.join()
        with self._lock:
            self.proc, self.stdin = None, None
        exit_code = 128 - code if code is not None and code < 0 else code
        with contextlib.suppress(OSError):
            self.send_json(EXIT, {"exit_code": -1 if exit_code is None else exit_code})

    def feed(self, data: bytes) -> None:
        """Queue stdin for the command (empty data: EOF). While the command does not read, we wait, but
        keep watching for the host hanging up: its kill request may be stuck behind this stdin."""
        with self._lock:
            stdin_queue = self.stdin
        while stdin_queue is not None:  # None: the command has ended, or it had no stdin
            try:
                stdin_queue.put(data, timeout=0.2)
                return
            except queue.Full:
                if _hung_up(self.conn):
                    raise Disconnected from None
                if self.stdin is not stdin_queue:
                    return  # the command ended meanwhile

    def kill_session(self, challenge: str) -> None:
        """Kill another connection's command: the way out when that connection is clogged with stdin the
        command does not read, so a kill request sent on it would wait behind that stdin."""
        with _sessions_lock:
            other = _sessions.get(challenge)
        if other is not None:
            other.kill()
        self.send_json(EXIT, {"exit_code": 0 if other is not None else 1})

    def kill(self) -> None:
        with self._lock:
            proc = self.proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def hmac_sha256(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 (RFC 2104), hex, on the interpreter's built-in SHA-256: `hmac` and `hashlib` load
    OpenSSL's libcrypto first, ~50 ms of the first exec at boot under emulation."""
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(bytes(b ^ 0x36 for b in key) + message).digest()
    return sha256(bytes(b ^ 0x5C for b in key) + inner).hexdigest()


def _simple_command(line: str) -> list[str]:
    """The argv for a shell line: its words when bash would just run one program with them (plain words,
    nothing to expand, not a builtin), sparing bash's start-up (~25 ms under emulation); else bash -c."""
    words = line.split()
    plain = set(line.strip()) <= SIMPLE_LINE_CHARS
    if words and plain and "=" not in words[0] and words[0] not in SHELL_ONLY:
        return words
    return ["/bin/bash", "-c", line]


def _write_stdin(pipe, chunks: queue.Queue, proc: subprocess.Popen) -> None:
    fd = pipe.fileno()
    writable = True
    while True:
        try:
            data = chunks.get(timeout=0.5)
        except queue.Empty:
            if proc.returncode is not None:
                break  # the command has ended (the reaper set its return code)
            continue
        if not data:  # end of stdin
            break
        view = memoryview(data)
        while writable and view:
            try:
                view = view[os.write(fd, view) :]
            except OSError:
                writable = False  # the command closed its stdin: drop the rest, like EPIPE locally
    with contextlib.suppress(OSError):
        pipe.close()


def _hung_up(conn: Socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def _refusal(program: str, cwd: str, path: str, *, explicit_cwd: bool) -> tuple[int, str] | None:
    """What a shell would say before running anything: a missing directory (1), command not found (127)."""
    if explicit_cwd and not os.path.isdir(cwd):
        return 1, f"cd: {cwd}: No such file or directory"
    if "/" not in program and not any(os.access(os.path.join(d, program), os.X_OK) for d in path.split(":")):
        return 127, f"{program}: command not found"
    return None


def serve(conn: Socket, token: bytes, processes) -> None:
    """Serve one connection whose MAGIC the caller has already read."""
    if conn.family in (_socket.AF_INET, _socket.AF_INET6):
        conn.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    Session(conn, token, processes).serve()
