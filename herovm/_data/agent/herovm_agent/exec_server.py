"""`exec` served by the agent itself, on the SSH port (docs/protocol.md, "Exec without SSH").

The SSH listener hands us a connection that began with EXEC_MAGIC. Each command is spawned straight from
PID 1: no sshd session process and no login shell, which under emulation is most of an SSH exec's cost.

Frames both ways: 1 byte kind, 4 bytes big-endian length, payload. Before authentication only two small
frames are read, within AUTH_DEADLINE_S, and at most MAX_UNAUTHENTICATED connections are at that stage at
once: whoever can reach the port cannot make the agent hold more than a few hundred bytes or a thread for
long without the VM's exec token. The proof goes both ways, over both sides' fresh nonces: the host sends
HELLO{nonce}, we answer CHALLENGE{challenge, proof}, proving we hold the token before the host sends anything
that matters (a process squatting a stopped VM's port learns nothing), and the host answers AUTH{answer}.
The token itself never crosses the wire, and an answer is worth nothing on another connection or in the
other direction. After that every frame kind has its cap; one command at a time per connection, which then
waits for the next request. The frames, their caps, the request's fields, the base environment and the
HMACs are herovm.protocol's, which the host's side (herovm/guest/agent_exec.py) imports too.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import queue
import select
import signal
import subprocess
import threading
import time

from herovm.protocol import (
    AUTHENTICATED_LIMITS,
    EXEC_ENV,
    EXEC_HOME,
    FRAME_HEADER_SIZE,
    MAX_CHUNK,
    MAX_HANDSHAKE,
    OP_FIELD,
    REQUEST_COMMANDS,
    REQUEST_FIELDS,
    Frame,
    agent_proof,
    frame,
    frame_header,
    host_answer,
    is_hex64,
    same_digest,
)

from . import jsonio

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .system import Socket

STDIN_BUFFERED_CHUNKS = 64  # stdin read ahead of the command, at most this many frames
AUTH_DEADLINE_S = 5.0  # from the magic to a verified AUTH
MAX_UNAUTHENTICATED = 32  # connections between the magic and a verified AUTH, at once; more are closed
ERROR_SEND_S = 2.0  # how long an E frame may wait for room in the send buffer before we hang up anyway


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
    """The peer hung up, or did not finish the handshake in time."""


class ProtocolError(Exception):
    """A frame the protocol does not allow here; its message goes to the host in an E frame."""


def _read_exact(conn: Socket, n: int, deadline: float | None = None) -> bytes:
    data = bytearray()
    while len(data) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Disconnected
            conn.settimeout(left)
        try:
            chunk = conn.recv(min(n - len(data), MAX_CHUNK))
        except TimeoutError:
            raise Disconnected from None
        if not chunk:
            raise Disconnected
        data += chunk
    return bytes(data)


def read_frame(conn: Socket, limits: dict[bytes, int], deadline: float | None = None) -> tuple[bytes, bytes]:
    """The next frame, of one of the kinds in `limits` and at most that long; anything else is refused
    from its header alone, before any of its payload is read."""
    kind, length = frame_header(_read_exact(conn, FRAME_HEADER_SIZE, deadline))
    limit = limits.get(kind)
    if limit is None:
        raise ProtocolError(f"unexpected frame kind {kind!r}")
    if length > limit:
        raise ProtocolError(f"a {kind!r} frame of {length} bytes is over its limit of {limit}")
    return kind, _read_exact(conn, length, deadline)


_sessions: dict[str, Session] = {}  # by challenge: the host may kill a session's command from another
_sessions_lock = threading.Lock()
_unauthenticated = 0  # connections between the magic and a verified AUTH
_unauthenticated_lock = threading.Lock()


def _admit() -> bool:
    global _unauthenticated
    with _unauthenticated_lock:
        if _unauthenticated >= MAX_UNAUTHENTICATED:
            return False
        _unauthenticated += 1
        return True


def _authenticated_or_gone() -> None:
    global _unauthenticated
    with _unauthenticated_lock:
        _unauthenticated -= 1


class Session:
    """One connection: the handshake, then its commands one after another."""

    def __init__(self, conn: Socket, token: bytes, processes) -> None:
        self.conn = conn
        self.token = token
        self.processes = processes
        self.challenge = ""
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.stdin: queue.Queue | None = None
        self.stream: threading.Event | None = None  # an op's stream (ops.py): set it to stop the stream

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self._send_lock:
            self.conn.sendall(frame(kind, payload))

    def send_json(self, kind: bytes, obj: dict) -> None:
        self.send(kind, jsonio.dumps(obj).encode())

    def serve(self) -> None:
        try:
            if not _admit():
                return  # too many connections are not authenticated yet: hang up at once
            try:
                self.authenticate()
            finally:
                _authenticated_or_gone()
            self.run()
        except ProtocolError as e:
            self.refuse(str(e))
        except (Disconnected, OSError):
            pass
        except Exception as e:  # PID 1 prints no traceback on the console for what a client sent
            self.refuse(f"internal error: {type(e).__name__}: {e}"[:200])
        finally:
            with _sessions_lock:
                _sessions.pop(self.challenge, None)
            self.kill()  # the host went away: its command must not outlive it
            stream = self.stream
            if stream is not None:
                stream.set()  # an op's stream ends with the connection (its process runs on)
            with contextlib.suppress(OSError):
                self.conn.close()

    def authenticate(self) -> None:
        """HELLO in, CHALLENGE (with our proof) out, AUTH in: returns once the host has proved it holds the
        token; raises ProtocolError (wrong answer, another frame) or Disconnected (hung up, too slow)."""
        deadline = time.monotonic() + AUTH_DEADLINE_S
        _, payload = read_frame(self.conn, {Frame.HELLO: MAX_HANDSHAKE}, deadline)
        nonce = _hex_field(payload, "nonce")
        challenge = os.urandom(32).hex()
        proof = agent_proof(self.token, nonce, challenge)
        self.send_json(Frame.CHALLENGE, {"challenge": challenge, "proof": proof})
        _, payload = read_frame(self.conn, {Frame.AUTH: MAX_HANDSHAKE}, deadline)
        answer = _hex_field(payload, "answer")
        if not same_digest(answer, host_answer(self.token, nonce, challenge)):
            raise ProtocolError("exec refused: wrong token")
        self.conn.settimeout(None)
        self.challenge = challenge
        with _sessions_lock:
            _sessions[challenge] = self

    def run(self) -> None:
        while True:
            kind, payload = read_frame(self.conn, AUTHENTICATED_LIMITS)
            if kind == Frame.PING:
                self.send(Frame.PONG)
            elif kind == Frame.REQUEST:
                request = parse_request(payload)
                if "kill_session" in request:
                    self.kill_session(request["kill_session"])
                    continue
                if self.proc is not None or self.stream is not None:
                    raise ProtocolError("one command at a time per connection")
                if OP_FIELD in request:
                    from . import ops  # first needed long after `ready`

                    ops.handle(self, request)
                    continue
                self.start(request)
            elif kind == Frame.STDIN:
                self.feed(payload)  # also the rest of a failed file write's bytes: dropped
            elif kind == Frame.KILL:
                stream = self.stream
                if stream is not None:
                    stream.set()
                else:
                    self.kill()

    def refuse(self, message: str) -> None:
        """Tell the host why (an E frame), then the caller hangs up. A peer that does not read gets the
        frame only if it fits in the send buffer within ERROR_SEND_S."""
        with contextlib.suppress(OSError):
            self.conn.settimeout(ERROR_SEND_S)
            self.send_json(Frame.ERROR, {"error": message})
            self.conn.shutdown(_socket.SHUT_WR)

    def start(self, request: dict) -> None:
        argv = request["argv"] if "argv" in request else _simple_command(request["shell"])
        env = dict(EXEC_ENV)
        env.update(request.get("env") or {})
        cwd = os.path.normpath(os.path.join(EXEC_HOME, request.get("cwd") or "."))  # relative to home, as SSH
        env.setdefault("PWD", cwd)
        refused = _refusal(argv[0], cwd, env["PATH"], explicit_cwd=bool(request.get("cwd")))
        if refused is not None:
            code, message = refused
            self.send(Frame.STDERR, f"herovm: {message}\n".encode(errors="replace"))
            self.send_json(Frame.EXIT, {"exit_code": code})
            return
        try:
            proc = self.processes.spawn(
                argv,
                stdin=subprocess.PIPE if request.get("stdin") else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group, so a kill takes its children too
            )
        except OSError as e:
            self.send(Frame.STDERR, f"herovm: {argv[0]}: {e.strerror}\n".encode(errors="replace"))
            self.send_json(Frame.EXIT, {"exit_code": 127 if isinstance(e, FileNotFoundError) else 126})
            return
        stdin_queue: queue.Queue | None = None
        if proc.stdin is not None:
            stdin_queue = queue.Queue(STDIN_BUFFERED_CHUNKS)
            threading.Thread(target=_write_stdin, args=(proc.stdin, stdin_queue, proc), daemon=True).start()
        with self._lock:
            self.proc, self.stdin = proc, stdin_queue
        readers = [
            threading.Thread(target=self._pump, args=(proc.stdout, Frame.STDOUT), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, Frame.STDERR), daemon=True),
        ]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._finish, args=(proc, readers), daemon=True).start()

    def _pump(self, pipe, kind: bytes) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = os.read(pipe.fileno(), MAX_CHUNK)
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
            self.send_json(Frame.EXIT, {"exit_code": -1 if exit_code is None else exit_code})

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
        self.send_json(Frame.EXIT, {"exit_code": 0 if other is not None else 1})

    def kill(self) -> None:
        with self._lock:
            proc = self.proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def parse_request(payload: bytes) -> dict:
    """The request in an R frame, checked whole before anything runs; ProtocolError says what is wrong."""
    try:
        request = jsonio.loads(payload)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"bad request: not JSON ({str(e)[:80]})") from None
    if not isinstance(request, dict):
        raise ProtocolError("bad request: not a JSON object")
    if OP_FIELD in request:  # an op (its own fields): ops.parse checks it, and answers FAILED, not E
        return request
    unknown = sorted(set(request) - REQUEST_FIELDS)
    if unknown:
        raise ProtocolError(f"bad request: unknown field {unknown[0][:40]!r}")
    if sum(key in request for key in REQUEST_COMMANDS) != 1:
        raise ProtocolError("bad request: it needs exactly one of argv, shell and kill_session")
    if "argv" in request:
        argv = request["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise ProtocolError("bad request: argv must be a list of strings, the first not empty")
        for arg in argv:
            _os_string(arg, "argv")
    if "shell" in request:
        _os_string(request["shell"], "shell")
    if "kill_session" in request and not isinstance(request["kill_session"], str):
        raise ProtocolError("bad request: kill_session must be a string")
    env = request.get("env")
    if env is not None:
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ProtocolError("bad request: env must be an object of strings")
        for key, value in env.items():
            if not key or "=" in key:
                raise ProtocolError(f"bad request: {key[:40]!r} cannot be an environment variable's name")
            _os_string(key, "env")
            _os_string(value, "env")
    if request.get("cwd") is not None:
        _os_string(request["cwd"], "cwd")
    if not isinstance(request.get("stdin", False), bool):
        raise ProtocolError("bad request: stdin must be true or false")
    return request


def _os_string(value: object, field: str) -> None:
    """`value` can be an argument, a path or an environment entry: a string without NUL that encodes."""
    if not isinstance(value, str):
        raise ProtocolError(f"bad request: {field} must be a string")
    if "\0" in value:
        raise ProtocolError(f"bad request: a NUL character in {field}")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise ProtocolError(f"bad request: {field} does not encode (a lone surrogate)") from None


def _hex_field(payload: bytes, name: str) -> str:
    """`{"<name>": "<64 lowercase hex>"}`, as HELLO and AUTH carry: that value, or ProtocolError."""
    try:
        message = jsonio.loads(payload)
    except (ValueError, RecursionError):
        message = None
    value = message.get(name) if isinstance(message, dict) else None
    if not is_hex64(value):
        raise ProtocolError(f"exec refused: malformed handshake (no {name})")
    return value


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
