"""Processes, files and watches in a guest, through its agent (docs/protocol.md, "Ops"): the host side of
what an E2B-style server needs of a sandbox. Over the same authenticated connections as
:class:`herovm.guest.agent_exec.AgentExec` (its handshake, its pool of idle connections); ``vm.ops`` is one.

The API (every ``user`` is a guest user name, default ``root``; a relative path is relative to that user's
home; a process is named by its pid (int) or its tag (str))::

    ops = vm.ops
    h = ops.start_process(["python3", "-u", "x.py"] | "shell line", env={}, cwd=None, user="root",
                          tag=None, stdin=False)        # -> ProcessHandle: h.pid, h.tag, at once
    for event in h: ...                 # Output(stream "stdout"|"stderr", data), Dropped(bytes), then End
    h.wait() -> End                     # End(exit_code, signal, stdout, stderr): what came, while following
    h.close()                           # stop following; the process runs on
    ops.connect(pid_or_tag, replay=False) -> ProcessHandle   # events from now on (replay: the kept output)
    ops.list_processes() -> list[ProcessInfo]                # running, and those ended in the last minute
    ops.send_stdin(pid_or_tag, data: bytes); ops.close_stdin(pid_or_tag)
    ops.signal(pid_or_tag, "TERM" | "KILL" | "INT" | ... | number)
    ops.read_file(path, user=, offset=0, limit=None) -> bytes ; ops.read_file_chunks(...) -> Iterator[bytes]
    ops.write_file(path, data: bytes | BinaryIO | Iterable[bytes], user=, mode=None) -> EntryInfo
    ops.stat(path, user=) -> EntryInfo ; ops.exists(path, user=) -> bool
    ops.list_dir(path, depth=1, user=) -> list[EntryInfo]
    ops.make_dir(path, user=, parents=True) -> bool (False: it existed)
    ops.move(path, to, user=) -> EntryInfo ; ops.remove(path, user=, recursive=False)
    ops.watch(path, recursive=False, user=) -> Watcher: iterate WatchEvent(type, name, path); .close()

Failures of an op are :class:`OpError` (a GuestError) with ``code`` one of ``not_found``, ``exists``,
``permission``, ``not_a_directory``, ``is_a_directory``, ``invalid``, ``other`` and a one-line ``message``;
losing the guest is a plain GuestError.

Everything the guest sends is hostile input (docs/security.md): each frame's kind and length are checked
from its header before its payload is read (RESULT and EVENT at most 1 MiB, FAILED 4 KiB, data 64 KiB),
every JSON value is parsed with a bound on nesting and checked field by field (types, vocabularies, lengths),
totals are bounded (entries of a listing, processes of a list, a file's bytes by ``limit``), and an agent
that breaks any of it loses the connection and the call fails with GuestError.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import select
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import GuestError
from ..protocol import (
    MAX_CHUNK,
    MAX_FAILURE,
    MAX_LIST_ENTRIES,
    MAX_PATH,
    MAX_PROCESSES,
    MAX_READ,
    MAX_REPLY,
    MAX_TAG,
    MAX_WATCHES,
    SIGNALS,
    EntryType,
    Frame,
    Op,
    WatchType,
)
from ..protocol import OpError as Codes
from . import execution
from .agent_exec import AgentExec, FrameRefused, _Stream

IDLE_TIMEOUT_S = 60.0  # an op's connection silent this long (after a ping went unanswered): the guest is lost
FIRST_FRAME_S = 30.0  # how long a process start or a watch may take to say it has begun
STDIN_SLICE = 48 << 10  # bytes per proc.input request (base64 keeps it under the request's limit)
MAX_NAME = 256  # characters of a user or group name the agent reports

# What the host reads on an op's connection, and how long each may be.
_LIMITS = {
    Frame.RESULT: MAX_REPLY,
    Frame.EVENT: MAX_REPLY,
    Frame.FAILED: MAX_FAILURE,
    Frame.STDOUT: MAX_CHUNK,
    Frame.STDERR: MAX_CHUNK,
    Frame.PONG: 0,
    Frame.ERROR: MAX_FAILURE,
}


class OpError(GuestError):
    """An op failed in the guest: ``code`` (see the module docstring) and a one-line ``message``."""

    exit_code = 1

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class Hostile(Exception):
    """The agent broke the contract: an unexpected frame, a malformed or out-of-bounds value."""


@dataclass(frozen=True)
class EntryInfo:
    name: str
    path: str
    type: str  # EntryType: file, dir, symlink, other (lstat: a symlink is itself)
    size: int
    mode: int  # permission bits, 0o7777 at most
    permissions: str  # as ls shows them: -rw-r--r--
    owner: str
    group: str
    mtime: float  # seconds since 1970
    symlink_target: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    tag: str | None
    argv: list[str]
    env: dict[str, str]
    cwd: str
    user: str
    started: float  # seconds since 1970, by the guest's clock
    running: bool
    stdin: bool  # its stdin is open for send_stdin
    exit_code: int | None = None  # once ended: its status, or 128 + its signal
    signal: int | None = None


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Dropped:
    """This many bytes of output were dropped (the guest keeps 1 MiB per process) before we got them."""

    bytes: int


@dataclass(frozen=True)
class End:
    exit_code: int  # the exit status, or 128 + the signal that ended it
    signal: int | None
    stdout: bytes = b""  # what the handle's wait() collected
    stderr: bytes = b""


@dataclass(frozen=True)
class WatchEvent:
    type: str  # WatchType: create, write, remove, rename, chmod
    name: str  # relative to the watched directory
    path: str  # absolute


# ---------------------------------------------------------------------------------------- validation


def _json(payload: bytes) -> dict:
    if payload.count(b"[") + payload.count(b"{") > 200_000:
        raise Hostile("a reply with too many objects")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise Hostile(f"a reply that is not JSON ({str(e)[:60]})") from None
    if not isinstance(value, dict):
        raise Hostile("a reply that is not an object")
    return value


def _str(d: dict, key: str, limit: int, *, optional: bool = False) -> str | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Hostile(f"{key} is not a string of at most {limit} characters")
    return value


def _int(d: dict, key: str, low: int = -(2**63), high: int = 2**63, *, optional: bool = False) -> int | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if type(value) is not int or not low <= value <= high:
        raise Hostile(f"{key} is not an integer from {low} to {high}")
    return value


def _bool(d: dict, key: str) -> bool:
    value = d.get(key)
    if type(value) is not bool:
        raise Hostile(f"{key} is not a boolean")
    return value


def _num(d: dict, key: str) -> float:
    value = d.get(key)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise Hostile(f"{key} is not a finite number")
    return float(value)


def _entry(d: object) -> EntryInfo:
    if not isinstance(d, dict):
        raise Hostile("an entry that is not an object")
    kind = _str(d, "type", 16)
    if kind not in EntryType.ALL:
        raise Hostile(f"an entry of type {kind!r}")
    return EntryInfo(
        name=_str(d, "name", MAX_PATH),  # type: ignore[arg-type]
        path=_str(d, "path", MAX_PATH),  # type: ignore[arg-type]
        type=kind,  # type: ignore[arg-type]
        size=_int(d, "size", 0),  # type: ignore[arg-type]
        mode=_int(d, "mode", 0, 0o7777),  # type: ignore[arg-type]
        permissions=_str(d, "permissions", 16),  # type: ignore[arg-type]
        owner=_str(d, "owner", MAX_NAME),  # type: ignore[arg-type]
        group=_str(d, "group", MAX_NAME),  # type: ignore[arg-type]
        mtime=_num(d, "mtime"),
        symlink_target=_str(d, "symlink_target", MAX_PATH, optional=True),
    )


def _strings(value: object, key: str, *, limit: int = 4096) -> list[str]:
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(v, str) for v in value):
        raise Hostile(f"{key} is not a list of strings")
    return value


def _process(d: object) -> ProcessInfo:
    if not isinstance(d, dict):
        raise Hostile("a process that is not an object")
    env = d.get("env")
    if not isinstance(env, dict) or len(env) > 4096 or not all(isinstance(v, str) for v in env.values()):
        raise Hostile("env is not an object of strings")
    return ProcessInfo(
        pid=_int(d, "pid", 1, 2**22),  # type: ignore[arg-type]
        tag=_str(d, "tag", MAX_TAG, optional=True),
        argv=_strings(d.get("argv"), "argv"),
        env=env,
        cwd=_str(d, "cwd", MAX_PATH),  # type: ignore[arg-type]
        user=_str(d, "user", MAX_NAME),  # type: ignore[arg-type]
        started=_num(d, "started"),
        running=_bool(d, "running"),
        stdin=_bool(d, "stdin"),
        exit_code=_int(d, "exit_code", -1, 255, optional=True),
        signal=_int(d, "signal", 1, 64, optional=True),
    )


def _end(d: dict) -> End:
    return End(exit_code=_int(d, "exit_code", -1, 255), signal=_int(d, "signal", 1, 64, optional=True))  # type: ignore[arg-type]


def _failure(payload: bytes) -> OpError:
    d = _json(payload)
    code = _str(d, "error", 32)
    if code not in Codes.ALL:
        raise Hostile(f"a failure of kind {code!r}")
    message = " ".join(_str(d, "message", MAX_FAILURE).split())  # type: ignore[union-attr]
    return OpError(code, message[:300])  # type: ignore[arg-type]


def _user(user: str) -> str:
    if not isinstance(user, str) or not user:
        raise ValueError("user must be a user name")
    return user


def _path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if (
        not isinstance(path, str)
        or not path
        or "\0" in path
        or len(path.encode(errors="surrogateescape")) > MAX_PATH
    ):
        raise ValueError(f"not a guest path: {str(path)[:80]!r}")
    return path


def _target(process: int | str) -> dict:
    if isinstance(process, bool) or not isinstance(process, int | str):
        raise TypeError("a process is its pid (int) or its tag (str)")
    return {"pid": process} if isinstance(process, int) else {"tag": process}


# ------------------------------------------------------------------------------------------ the client


class _Call:
    """One op on one connection: the request out, frames in (checked), the connection back to the pool
    when the op ended cleanly."""

    def __init__(self, ops: GuestOps, request: dict) -> None:
        self.ops = ops
        self.stream: _Stream = ops.agent.checkout()
        self.done = False  # a RESULT or FAILED ended the op: the connection is between requests
        self.broken = False
        try:
            self.stream.send(Frame.REQUEST, json.dumps(request).encode())
        except OSError as e:
            self.finish()
            raise self.lost(e) from None

    def lost(self, why: object) -> GuestError:
        self.broken = True
        self.finish()
        return GuestError(
            f"the connection to the agent of {self.ops.agent.target} was lost during an op: {why}",
            hint="the VM may have stopped or rebooted; check `herovm status`",
        )

    def next(self, patience: float = IDLE_TIMEOUT_S) -> tuple[bytes, bytes]:
        """The next frame other than a pong; OpError on FAILED (the op ended); GuestError if the guest
        broke the contract, hung up or went quiet (it is pinged after QUIET_PROBE_S of silence)."""
        probing_since: float | None = None
        quiet_since = time.monotonic()
        while True:
            wait = (
                execution.PROBE_ANSWER_S
                if probing_since is not None
                else min(patience, execution.QUIET_PROBE_S)
            )
            try:
                frame = self.stream.read(wait, limits=_LIMITS)
            except FrameRefused as e:
                raise self.hostile(Hostile(f"it sent {e}")) from None
            except (OSError, EOFError) as e:
                self.finish()
                raise self.lost(e) from None
            if frame is None:
                if probing_since is not None or time.monotonic() - quiet_since >= patience:
                    self.finish()
                    raise self.lost("the guest stopped answering")
                with contextlib.suppress(OSError):
                    self.stream.send(Frame.PING)
                probing_since = time.monotonic()
                continue
            kind, payload = frame
            if kind == Frame.PONG:
                probing_since, quiet_since = None, time.monotonic()
                continue
            if kind == Frame.FAILED:
                try:
                    error = _failure(payload)
                except Hostile as e:
                    raise self.hostile(e) from None
                self.done = True
                self.finish()
                raise error
            if kind == Frame.ERROR:
                self.finish()
                message = _json_or_text(payload)
                raise GuestError(f"the agent of {self.ops.agent.target} refused the op: {message}")
            if kind == Frame.RESULT:
                self.done = True
            return kind, payload

    def hostile(self, e: Hostile) -> GuestError:
        """The error to raise; the connection is closed, never reused."""
        self.broken = True
        self.finish()
        return GuestError(
            f"the agent of {self.ops.agent.target} broke the protocol: {e}",
            hint="the guest is not trusted; its answer was dropped and the connection closed",
        )

    def json(self, payload: bytes) -> dict:
        try:
            return _json(payload)
        except Hostile as e:
            raise self.hostile(e) from None

    def result(self, parse=None, patience: float = IDLE_TIMEOUT_S):  # noqa: ANN201 - what parse returns
        """The RESULT of a one-shot op, through ``parse`` (which raises Hostile) before the connection
        goes back to the pool."""
        kind, payload = self.next(patience)
        if kind != Frame.RESULT:
            raise self.hostile(Hostile(f"a {kind!r} frame where a result was due"))
        value = self.json(payload)
        if parse is not None:
            value = self.checked(parse, value)
        self.finish()
        return value

    def checked(self, fn, *args):
        """fn(*args) turning Hostile into GuestError (and dropping the connection)."""
        try:
            return fn(*args)
        except Hostile as e:
            raise self.hostile(e) from None

    def finish(self) -> None:
        if self.stream is not None:
            self.ops.agent.checkin(self.stream, self.done and not self.broken)
            self.stream = None  # type: ignore[assignment]


def _json_or_text(payload: bytes) -> str:
    try:
        value = json.loads(payload)
        return str(value.get("error"))[:300] if isinstance(value, dict) else "?"
    except (ValueError, RecursionError):
        return payload[:200].decode(errors="replace")


class _Follower:
    """A streamed op being followed on its own connection. ``close()`` stops it, from any thread: while
    another thread iterates, it only asks the agent to stop (KILL) and that iteration ends; otherwise it
    also waits for the agent's confirmation, so that the connection can be kept."""

    def __init__(self, call: _Call) -> None:
        self._call: _Call | None = call
        self._lock = threading.Lock()
        self._iterating = False

    def _frames(self) -> Iterator[tuple[bytes, dict | bytes]]:
        """The stream's frames, until its RESULT (yielded last); JSON frames decoded."""
        with self._lock:
            call = self._call
            if call is None or self._iterating:
                return
            self._iterating = True
        try:
            while True:
                kind, payload = call.next(float("inf"))
                if kind in (Frame.STDOUT, Frame.STDERR):
                    yield kind, payload
                    continue
                value = call.json(payload)
                if kind == Frame.RESULT:
                    with self._lock:
                        self._call = None
                    yield kind, value
                    return
                yield kind, value
        finally:
            with self._lock:
                self._iterating = False
                ended = self._call is None
            if not ended:
                self.close()

    def close(self) -> None:
        with self._lock:
            call = self._call
            if call is None:
                return
            if self._iterating:  # that thread reads the agent's confirmation and ends
                with contextlib.suppress(OSError):
                    call.stream.send(Frame.KILL)
                return
            self._call = None
        if call.stream is None:
            return
        try:
            call.stream.send(Frame.KILL)
            deadline = time.monotonic() + execution.KILL_GRACE_S
            while time.monotonic() < deadline:
                kind, _ = call.next(max(0.1, deadline - time.monotonic()))
                if kind == Frame.RESULT:
                    break
        except (GuestError, OSError):
            pass
        finally:
            if call.stream is not None:
                call.broken = not call.done
                call.finish()

    def _hostile(self, why: str) -> GuestError:
        with self._lock:
            call, self._call = self._call, None
        if call is None:
            return GuestError(why)
        call.finish()
        return call.hostile(Hostile(why))

    def __enter__(self):  # noqa: ANN204 - the subclass
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessHandle(_Follower):
    """A process in the guest being followed: ``pid``, ``tag``; iterate for its events (Output, Dropped,
    and End last). ``close()`` stops following (the process runs on); so does leaving the iteration early."""

    def __init__(self, call: _Call, pid: int, tag: str | None) -> None:
        super().__init__(call)
        self.pid, self.tag = pid, tag
        self.end: End | None = None

    def __iter__(self) -> Iterator[Output | Dropped | End]:
        for kind, value in self._frames():
            if kind in (Frame.STDOUT, Frame.STDERR):
                yield Output("stdout" if kind == Frame.STDOUT else "stderr", value)  # type: ignore[arg-type]
                continue
            assert isinstance(value, dict)
            event = value.get("event")
            try:
                if kind == Frame.EVENT and event == "dropped":
                    yield Dropped(_int(value, "bytes", 0))  # type: ignore[arg-type]
                elif kind == Frame.RESULT and event == "end":
                    self.end = _end(value)
                    yield self.end
                elif kind == Frame.RESULT and event == "detached":
                    return
                else:
                    raise Hostile(f"a {kind!r} frame of event {str(event)[:40]!r} in a process stream")
            except Hostile as e:
                raise self._hostile(str(e)) from None

    def wait(self, max_output: int = 64 << 20) -> End:
        """Follow to the end; the End carries the output that came meanwhile (at most ``max_output``
        bytes of each stream are kept). OpError/GuestError as the iteration."""
        out: list[bytes] = []
        err: list[bytes] = []
        sizes = [0, 0]
        for event in self:
            if isinstance(event, Output):
                i = 0 if event.stream == "stdout" else 1
                if sizes[i] + len(event.data) <= max_output:
                    (out if i == 0 else err).append(event.data)
                    sizes[i] += len(event.data)
            elif isinstance(event, End):
                return End(event.exit_code, event.signal, b"".join(out), b"".join(err))
        raise GuestError(f"process {self.pid}: stopped following before its end")


class Watcher(_Follower):
    """A directory watch: iterate for WatchEvents until ``close()`` (or the directory goes away).
    ``complete`` is False when a recursive watch has more directories than it follows (MAX_WATCHES)."""

    def __init__(self, call: _Call, root: str, complete: bool) -> None:
        super().__init__(call)
        self.root, self.complete = root, complete
        self.overflowed = False  # the guest's event queue overflowed: some events are missing

    def __iter__(self) -> Iterator[WatchEvent]:
        for kind, value in self._frames():
            if kind == Frame.RESULT:
                return
            events = value.get("events") if isinstance(value, dict) else None
            try:
                if kind != Frame.EVENT or not isinstance(events, list):
                    raise Hostile(f"a {kind!r} frame in a watch")
                if value.get("overflow") is True:  # type: ignore[union-attr]
                    self.overflowed = True
                checked = [self._event(event) for event in events]
            except Hostile as e:
                raise self._hostile(str(e)) from None
            yield from checked

    def _event(self, event: object) -> WatchEvent:
        if not isinstance(event, dict):
            raise Hostile("a watch event that is not an object")
        kind = _str(event, "type", 16)
        if kind not in WatchType.ALL:
            raise Hostile(f"a watch event of type {kind!r}")
        name = _str(event, "name", MAX_PATH)
        if name.startswith("/") or ".." in name.split("/"):  # type: ignore[union-attr]
            raise Hostile(f"a watch event outside the directory: {name[:80]!r}")  # type: ignore[index]
        return WatchEvent(kind, name, os.path.join(self.root, name) if name else self.root)  # type: ignore[arg-type]


class GuestOps:
    """Processes, files and watches of one guest (module docstring), over ``agent``'s connections."""

    def __init__(self, agent: AgentExec) -> None:
        self.agent = agent

    # ------------------------------------------------------------------------------------ processes

    def start_process(
        self,
        command: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str = "root",
        tag: str | None = None,
        stdin: bool = False,
    ) -> ProcessHandle:
        """Start ``command`` (a list: run as is; a string: by ``bash -c``) and follow it from its start."""
        request: dict[str, object] = {"op": Op.PROC_START, "user": _user(user), "stdin": bool(stdin)}
        if isinstance(command, str):
            request["shell"] = command
        else:
            request["argv"] = [os.fspath(a) for a in command]
        if env:
            request["env"] = {str(k): str(v) for k, v in env.items()}
        if cwd is not None:
            request["cwd"] = _path(cwd)
        if tag is not None:
            request["tag"] = tag
        return self._follow(request)

    def connect(self, process: int | str, *, replay: bool = False) -> ProcessHandle:
        """Follow a process started before (running, or ended within the last minute): its events from
        now on, or with ``replay`` the output the guest still holds first; then its End."""
        return self._follow({"op": Op.PROC_CONNECT, **_target(process), "replay": bool(replay)})

    def _follow(self, request: dict) -> ProcessHandle:
        call = _Call(self, request)
        kind, payload = call.next(FIRST_FRAME_S)
        value = call.json(payload)
        if kind != Frame.EVENT or value.get("event") != "start":
            raise call.hostile(Hostile(f"a {kind!r} frame where a process's start was due"))
        pid = call.checked(_int, value, "pid", 1, 2**22)
        tag = call.checked(lambda: _str(value, "tag", MAX_TAG, optional=True))
        return ProcessHandle(call, pid, tag)

    def list_processes(self) -> list[ProcessInfo]:
        def parse(value: dict) -> list[ProcessInfo]:
            procs = value.get("processes")
            if not isinstance(procs, list) or len(procs) > MAX_PROCESSES:
                raise Hostile("processes is not a list of at most MAX_PROCESSES")
            return [_process(p) for p in procs]

        return _Call(self, {"op": Op.PROC_LIST}).result(parse)

    def send_stdin(self, process: int | str, data: bytes) -> None:
        """Queue ``data`` on the process's stdin (it was started with ``stdin=True``)."""
        view = memoryview(bytes(data))
        for start in range(0, max(1, len(view)), STDIN_SLICE):
            chunk = base64.b64encode(view[start : start + STDIN_SLICE]).decode()
            _Call(self, {"op": Op.PROC_INPUT, **_target(process), "data": chunk}).result()

    def close_stdin(self, process: int | str) -> None:
        _Call(self, {"op": Op.PROC_CLOSE_STDIN, **_target(process)}).result()

    def signal(self, process: int | str, sig: str | int = "TERM") -> None:
        """Send a signal to the process's group: a name of protocol.SIGNALS (TERM, KILL, INT, ...) or a
        number from 1 to 64."""
        if isinstance(sig, str):
            sig = sig.upper().removeprefix("SIG")
            if sig not in SIGNALS:
                raise ValueError(f"signal must be one of {', '.join(SIGNALS)} or a number")
        elif isinstance(sig, bool) or not isinstance(sig, int) or not 1 <= sig <= 64:
            raise ValueError("a signal number is from 1 to 64")
        _Call(self, {"op": Op.PROC_SIGNAL, **_target(process), "signal": sig}).result()

    # ---------------------------------------------------------------------------------------- files

    def read_file_chunks(
        self, path: str, *, user: str = "root", offset: int = 0, limit: int | None = None
    ) -> Iterator[bytes]:
        """The file's bytes, in chunks of at most 64 KiB, at most ``limit`` of them (default 1 GiB);
        OpError before the first chunk when it cannot be read."""
        limit = MAX_READ if limit is None else limit
        if limit < 0 or offset < 0:
            raise ValueError("offset and limit are >= 0")
        call = _Call(self, {"op": Op.FILE_READ, "path": _path(path), "user": _user(user), "offset": offset,
                            "limit": limit})  # fmt: skip
        got = 0
        try:
            while True:
                kind, payload = call.next()
                if kind == Frame.STDOUT:
                    got += len(payload)
                    if got > limit:
                        raise call.hostile(Hostile(f"more than the {limit} bytes asked for"))
                    yield payload
                    continue
                value = call.json(payload)
                if kind != Frame.RESULT or call.checked(_int, value, "size", 0) != got:
                    raise call.hostile(Hostile("a read that does not add up"))
                call.finish()
                return
        finally:
            if not call.done:
                call.broken = True
                call.finish()

    def read_file(self, path: str, *, user: str = "root", offset: int = 0, limit: int | None = None) -> bytes:
        return b"".join(self.read_file_chunks(path, user=user, offset=offset, limit=limit))

    def write_file(
        self,
        path: str,
        data: bytes | bytearray | memoryview | BinaryIO | Iterable[bytes],
        *,
        user: str = "root",
        mode: int | None = None,
    ) -> EntryInfo:
        """Write the file atomically (a temporary file beside it, renamed over it), creating missing
        parent directories, as ``user``. An existing file keeps its mode unless ``mode`` is given."""
        request: dict[str, object] = {"op": Op.FILE_WRITE, "path": _path(path), "user": _user(user)}
        if mode is not None:
            if not 0 <= mode <= 0o7777:
                raise ValueError("mode is from 0 to 0o7777")
            request["mode"] = mode
        call = _Call(self, request)
        try:
            for chunk in _chunks(data):
                # the agent says at once when the write cannot be done: stop sending then
                if select.select([call.stream.sock], [], [], 0)[0]:
                    break
                call.stream.send(Frame.STDIN, chunk)
            else:
                call.stream.send(Frame.STDIN)
        except OSError as e:
            call.finish()
            raise call.lost(e) from None
        return call.result(lambda value: _entry(value.get("entry")))

    def stat(self, path: str, *, user: str = "root") -> EntryInfo:
        call = _Call(self, {"op": Op.FILE_STAT, "path": _path(path), "user": _user(user)})
        return call.result(_entry)

    def exists(self, path: str, *, user: str = "root") -> bool:
        try:
            self.stat(path, user=user)
        except OpError as e:
            if e.code == Codes.NOT_FOUND:
                return False
            raise
        return True

    def list_dir(self, path: str, *, depth: int = 1, user: str = "root") -> list[EntryInfo]:
        """The entries below ``path``, down to ``depth`` levels (1: its own), breadth first, at most
        MAX_LIST_ENTRIES (protocol.py) of them."""
        call = _Call(self, {"op": Op.FILE_LIST, "path": _path(path), "user": _user(user), "depth": depth})
        entries: list[EntryInfo] = []
        while True:
            kind, payload = call.next()
            value = call.json(payload)
            if kind == Frame.RESULT:
                call.finish()
                return entries
            batch = value.get("entries")
            if (
                kind != Frame.EVENT
                or not isinstance(batch, list)
                or len(entries) + len(batch) > MAX_LIST_ENTRIES
            ):
                raise call.hostile(Hostile("a listing over its bounds"))
            entries.extend(call.checked(_entry, e) for e in batch)

    def make_dir(self, path: str, *, user: str = "root", parents: bool = True) -> bool:
        """True: made; False: it was a directory already."""
        call = _Call(
            self, {"op": Op.FILE_MKDIR, "path": _path(path), "user": _user(user), "parents": parents}
        )
        return call.result(lambda value: _bool(value, "created"))

    def move(self, path: str, to: str, *, user: str = "root") -> EntryInfo:
        call = _Call(self, {"op": Op.FILE_MOVE, "path": _path(path), "to": _path(to), "user": _user(user)})
        return call.result(lambda value: _entry(value.get("entry")))

    def remove(self, path: str, *, user: str = "root", recursive: bool = False) -> None:
        call = _Call(
            self, {"op": Op.FILE_REMOVE, "path": _path(path), "user": _user(user), "recursive": recursive}
        )
        call.result()

    def watch(self, path: str, *, recursive: bool = False, user: str = "root") -> Watcher:
        """Watch a directory: returns once the guest watches it (events after that are seen)."""
        call = _Call(
            self, {"op": Op.FILE_WATCH, "path": _path(path), "user": _user(user), "recursive": recursive}
        )
        kind, payload = call.next(FIRST_FRAME_S)
        value = call.json(payload)
        if kind != Frame.EVENT or value.get("event") != "watching":
            raise call.hostile(Hostile(f"a {kind!r} frame where the watch's start was due"))
        call.checked(_int, value, "dirs", 1, MAX_WATCHES)
        root = call.checked(_str, value, "path", MAX_PATH)
        return Watcher(call, root, call.checked(_bool, value, "complete"))


def _chunks(data: bytes | bytearray | memoryview | BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), MAX_CHUNK):
            yield bytes(view[start : start + MAX_CHUNK])
        return
    chunks = iter(lambda: data.read(MAX_CHUNK), b"") if hasattr(data, "read") else iter(data)  # type: ignore[union-attr, arg-type]
    for chunk in chunks:
        for start in range(0, len(chunk), MAX_CHUNK):  # a read may return more than asked
            yield bytes(chunk[start : start + MAX_CHUNK])


__all__ = [
    "Dropped",
    "End",
    "EntryInfo",
    "GuestOps",
    "OpError",
    "Output",
    "ProcessHandle",
    "ProcessInfo",
    "WatchEvent",
    "Watcher",
]
