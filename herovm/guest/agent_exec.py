"""``exec`` through the guest agent, without SSH (docs/protocol.md, "Exec without SSH").

The agent answers on the guest's SSH port: a connection that opens with ``EXEC_MAGIC`` is served by the
agent, which spawns the command itself. There is no SSH handshake per connection and no sshd session or
login shell per command, the two costs that dominate an SSH ``exec`` under emulation.

Both sides prove they hold the VM's exec token (a file in its secrets directory, 0600) with HMAC-SHA256 over
both sides' fresh nonces, the agent first: we send nothing but a nonce until the agent has proved it, so a
process that holds a stopped VM's port gets no command, environment or stdin. The token never crosses the
wire. Our answer travels with the first request, so the handshake costs no round trip more than the
agent's greeting did before. The framing, the limits and the HMACs are herovm.protocol's, which the agent
imports too.

Same contract as :meth:`herovm.guest.ssh.GuestConnection.exec`: a list is run as it is (no shell), a
string by ``bash -c``; on timeout the command's process group is killed and the result says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

from ..errors import GuestError
from ..protocol import (
    EXEC_MAGIC,
    FRAME_HEADER_SIZE,
    MAX_CHALLENGE,
    MAX_CHUNK,
    Frame,
    agent_proof,
    frame,
    frame_header,
    host_answer,
    is_hex64,
    same_digest,
)
from . import execution
from .execution import TIMEOUT_EXIT_CODE, ExecResult

_CONNECT_ATTEMPT_S = 5.0


class _NotTheAgent(Exception):
    """The peer answered, but did not prove it holds the VM's exec token."""

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(reason)
        self.reason, self.where = reason, where


class FrameRefused(Exception):
    """The agent sent a frame of a kind not expected there, or longer than its limit (judged from the
    header: its payload is never read). The connection is of no further use."""


class _Stream:
    """One connection to the agent: frames out (from any thread), frames in (from one)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._send_lock = threading.Lock()
        self.challenge = ""  # the agent's, for this connection: names it in a kill_session request
        self.pending = b""  # our AUTH frame, sent with the first request

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self._send_lock:
            self.sock.sendall(self.pending + frame(kind, payload))
            self.pending = b""

    def read(
        self, timeout: float | None, limit: int | None = None, limits: Mapping[bytes, int] | None = None
    ) -> tuple[bytes, bytes] | None:
        """The next frame, or None if none arrived within ``timeout``; EOFError when the agent hung up.
        With a ``limit`` (a peer not yet proved): _NotTheAgent for a longer frame (we do not wait for its
        payload) or an SSH server's greeting. With ``limits`` (kind -> most bytes): FrameRefused for any
        other kind or a longer frame, from its header."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if limit is not None and self._buffer.startswith(b"SSH-"):
                raise _NotTheAgent("it answered as an SSH server")
            if len(self._buffer) >= FRAME_HEADER_SIZE:
                kind, length = frame_header(self._buffer)
                if limit is not None and length > limit:
                    raise _NotTheAgent(f"it announced a {kind!r} frame of {length} bytes")
                if limits is not None and (kind not in limits or length > limits[kind]):
                    raise FrameRefused(f"a {kind!r} frame of {length} bytes")
                if len(self._buffer) >= FRAME_HEADER_SIZE + length:
                    payload = bytes(self._buffer[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length])
                    del self._buffer[: FRAME_HEADER_SIZE + length]
                    return kind, payload
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], wait)[0]:
                return None
            data = self.sock.recv(256 * 1024)
            if not data:
                raise EOFError("the guest agent closed the connection")
            self._buffer += data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class AgentExec:
    """Runs commands on one guest through its agent. Keeps idle connections for the next call; several
    threads may call :meth:`exec` at once (one connection each)."""

    def __init__(
        self,
        *,
        target: str,
        token: str,
        connect: Callable[[float], socket.socket],
        on_unreachable: Callable[[], None] | None = None,
    ) -> None:
        self.target = target
        self._token = token.encode()
        self._connect = connect  # (timeout) -> a connected stream to the guest's SSH port
        self._on_unreachable = on_unreachable  # may raise a better error than "cannot reach" (VM stopped)
        self._idle: list[_Stream] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for stream in idle:
            stream.close()

    def __enter__(self) -> AgentExec:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkout(self, timeout: float = _CONNECT_ATTEMPT_S * 2) -> _Stream:
        """An authenticated connection of our own (an idle one, or a new one), for herovm.guest.ops; give it
        back with :meth:`checkin`. GuestError when the agent cannot be reached or does not prove itself."""
        return self._take(time.monotonic() + timeout)

    def checkin(self, stream: _Stream, reusable: bool) -> None:
        """Keep ``stream`` for the next call if ``reusable`` (it is between requests), else close it."""
        if reusable:
            with self._lock:
                self._idle.append(stream)
        else:
            stream.close()

    def exec(
        self,
        command: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | BinaryIO | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> ExecResult:
        """Run ``command`` and wait for it; see :meth:`herovm.guest.ssh.GuestConnection.exec`."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0")
        request: dict[str, object] = {
            "env": {str(k): str(v) for k, v in (env or {}).items()},
            "cwd": os.fspath(cwd) if cwd else None,
        }
        if isinstance(command, str):
            if not command.strip():
                raise ValueError("command is empty")
            request["shell"] = command
        else:
            argv = [os.fspath(arg) for arg in command]
            if not argv:
                raise ValueError("command is empty")
            request["argv"] = argv
        request["stdin"] = stdin is not None

        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        emit = {Frame.STDOUT: on_stdout or out.append, Frame.STDERR: on_stderr or err.append}
        stream = self._take(started + _CONNECT_ATTEMPT_S * 2)
        reusable = False
        feeder: _Feeder | None = None
        try:
            stream.send(Frame.REQUEST, json.dumps(request).encode())
            feeder = _Feeder(stream, stdin)
            exit_code, timed_out = self._wait(stream, feeder, emit, deadline)
            reusable = not timed_out and feeder.finished(timeout=1.0)
        except (OSError, EOFError) as exc:
            raise GuestError(
                f"the connection to the agent of {self.target} was lost while a command ran: {exc}",
                hint="the VM may have stopped or rebooted; check whether the command ran",
            ) from None
        finally:
            if feeder is not None:
                feeder.stop()
            if reusable:
                with self._lock:
                    self._idle.append(stream)
            else:
                stream.close()
        return ExecResult(
            exit_code=exit_code,
            stdout=b"".join(out),
            stderr=b"".join(err),
            timed_out=timed_out,
            seconds=time.monotonic() - started,
        )

    def _wait(
        self,
        stream: _Stream,
        feeder: _Feeder,
        emit: dict[bytes, Callable[[bytes], None]],
        deadline: float | None,
    ) -> tuple[int, bool]:
        timed_out = False
        give_up_at: float | None = None
        heard_at = time.monotonic()
        probing = False
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline and not timed_out:
                    timed_out, give_up_at = True, now + execution.KILL_GRACE_S
                    if not self._kill(stream, feeder):
                        return TIMEOUT_EXIT_CODE, True
                if give_up_at is not None and now >= give_up_at:
                    return TIMEOUT_EXIT_CODE, True  # the agent did not confirm the kill; stop waiting
                limit = give_up_at if timed_out else deadline
                patience = execution.PROBE_ANSWER_S if probing else execution.QUIET_PROBE_S
                wait = min(patience, max(0.0, limit - now)) if limit is not None else patience
                frame = stream.read(wait)
                if frame is None:
                    if time.monotonic() - heard_at < patience:
                        continue
                    if probing:
                        raise GuestError(
                            f"the guest {self.target} stopped answering while a command ran",
                            hint="the VM may be frozen or paused; check `herovm status`",
                        )
                    if feeder.done:  # a quiet command is normal, a frozen guest is not: ask the agent
                        stream.send(Frame.PING)
                        probing = True
                    heard_at = time.monotonic()
                    continue
                heard_at, probing = time.monotonic(), False
                kind, payload = frame
                if kind in emit:
                    emit[kind](payload)
                elif kind == Frame.EXIT:
                    code = int(json.loads(payload).get("exit_code", -1))
                    return (TIMEOUT_EXIT_CODE, True) if timed_out else (code, False)
                elif kind == Frame.ERROR:
                    raise GuestError(
                        f"the agent of {self.target} refused the command: {json.loads(payload).get('error')}",
                        hint="the VM's exec token may not match this host's; recreate the VM",
                    )
        except BaseException:
            # A callback raised, or KeyboardInterrupt: do not leave the command running on the guest.
            with contextlib.suppress(Exception):
                self._kill(stream, feeder)
            raise

    def _kill(self, stream: _Stream, feeder: _Feeder) -> bool:
        """Kill the command running on ``stream``. True: asked on the stream itself, its exit follows
        there. False: the stream is clogged with stdin (a kill request would wait behind it), so another
        connection asked for it, and ``stream`` is of no further use."""
        if feeder.done:
            stream.send(Frame.KILL)
            return True
        other = self._open(_CONNECT_ATTEMPT_S)
        try:
            other.send(Frame.REQUEST, json.dumps({"kill_session": stream.challenge}).encode())
            other.read(_CONNECT_ATTEMPT_S)
        finally:
            other.close()
        return False

    def _take(self, deadline: float) -> _Stream:
        while True:
            with self._lock:
                if not self._idle:
                    break
                stream = self._idle.pop()
            # An idle connection has nothing to say: readable means the guest closed it (a reboot, a stop).
            if not select.select([stream.sock], [], [], 0)[0]:
                return stream
            stream.close()
        last: Exception | None = None
        while True:
            try:
                return self._open(min(_CONNECT_ATTEMPT_S, max(0.1, deadline - time.monotonic())))
            except _NotTheAgent as exc:
                raise GuestError(
                    f"the process on {exc.where} did not prove it is VM {self.target}'s agent: {exc.reason}",
                    hint=f"another process may hold the port while {self.target} is stopped (nothing was "
                    "sent to it), or the VM's agent or exec token is not this herovm's: recreate the VM",
                ) from None
            except (OSError, EOFError, ValueError) as exc:
                if last is None and self._on_unreachable is not None:
                    self._on_unreachable()
                last = exc
            if time.monotonic() >= deadline:
                raise GuestError(
                    f"cannot reach the agent of {self.target}: {last}",
                    hint="is the VM running and ready? see `herovm status`",
                )
            time.sleep(0.1)

    def _open(self, timeout: float) -> _Stream:
        sock = self._connect(timeout)
        stream = _Stream(sock)
        try:
            sock.settimeout(None)  # waits are bounded by select() in _Stream.read
            nonce = os.urandom(32).hex()
            hello = json.dumps({"nonce": nonce}).encode()
            sock.sendall(EXEC_MAGIC + frame(Frame.HELLO, hello))
            try:
                greeting = stream.read(timeout, limit=MAX_CHALLENGE)
                if greeting is None:
                    raise EOFError("the guest did not answer as a herovm agent")
                stream.challenge = self._verify(nonce, *greeting)
            except _NotTheAgent as exc:
                raise _NotTheAgent(exc.reason, _describe_peer(sock)) from None
            answer = json.dumps({"answer": host_answer(self._token, nonce, stream.challenge)}).encode()
            stream.pending = frame(Frame.AUTH, answer)
        except BaseException:
            stream.close()
            raise
        return stream

    def _verify(self, nonce: str, kind: bytes, payload: bytes) -> str:
        """The challenge in the agent's CHALLENGE frame, once its proof shows it holds the token."""
        if kind == Frame.ERROR:  # the agent's own refusal says why: shown (hostile text, one short line)
            from ..protocol_host import printable

            try:
                why = json.loads(payload).get("error")
            except (ValueError, AttributeError):
                why = None
            raise _NotTheAgent(f"it answered with an error, not a challenge: {printable(why, True)[:200]}")
        if kind != Frame.CHALLENGE:
            raise _NotTheAgent(f"it answered with a {kind!r} frame, not a challenge")
        try:
            greeting = json.loads(payload)
        except ValueError:
            greeting = None
        if not isinstance(greeting, dict) or not all(
            is_hex64(greeting.get(k)) for k in ("challenge", "proof")
        ):
            raise _NotTheAgent("its challenge is malformed")
        challenge = greeting["challenge"]
        if not same_digest(greeting["proof"], agent_proof(self._token, nonce, challenge)):
            raise _NotTheAgent("its proof is wrong")
        return challenge


class _Feeder:
    """Sends stdin, then its end. Small byte strings inline; anything else from a thread, so that a
    command that does not read its stdin never stops us from reading its output."""

    _INLINE_LIMIT = 32 * 1024

    def __init__(self, stream: _Stream, stdin: bytes | BinaryIO | None) -> None:
        self._stream = stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if stdin is None:
            return
        if isinstance(stdin, (bytes, bytearray, memoryview)) and len(stdin) <= self._INLINE_LIMIT:
            if stdin:
                stream.send(Frame.STDIN, bytes(stdin))
            stream.send(Frame.STDIN)
            return
        self._thread = threading.Thread(
            target=self._feed, args=(stdin,), name="herovm-agent-stdin", daemon=True
        )
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def finished(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    def stop(self) -> None:
        self._stop.set()

    def _feed(self, stdin: bytes | BinaryIO) -> None:
        try:
            if isinstance(stdin, (bytes, bytearray, memoryview)):
                view = memoryview(stdin)
                chunks = (bytes(view[i : i + MAX_CHUNK]) for i in range(0, len(view), MAX_CHUNK))
            else:
                chunks = iter(lambda: stdin.read(MAX_CHUNK), b"")
            for chunk in chunks:
                for start in range(0, len(chunk), MAX_CHUNK):  # a read may return more than asked
                    if self._stop.is_set():
                        return
                    self._stream.send(Frame.STDIN, bytes(chunk[start : start + MAX_CHUNK]))
            self._stream.send(Frame.STDIN)
        except (OSError, ValueError):
            pass  # the connection is gone; the reader reports it


def _describe_peer(sock: socket.socket) -> str:
    """Where ``sock`` leads, for an error message: ``127.0.0.1:PORT`` for the usual forward."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "the VM's exec port"
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(peer[0], str):
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "the VM's exec port"
