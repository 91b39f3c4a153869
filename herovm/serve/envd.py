"""The in-sandbox API ("envd"): the Connect services process.Process and filesystem.Filesystem, and the
HTTP file endpoints (`GET/POST /files`, `GET /health`), for every sandbox.

Everything that touches a guest goes through `SandboxOps` (`ops_for`): a thin adapter over the guest
agent's own operations (`vm.ops`, herovm/guest/ops.py) that turns their failures into `FsError` (E2B's
error kinds) and keeps one VM handle, and so one pool of agent connections, per sandbox.

Processes are the agent's: they outlive the call that started them. Like envd, a client that disconnects
from a Start or Connect stream only stops following (the process runs on; `commands.connect` follows it
again), and the call's deadline (`Connect-Timeout-Ms`, the SDK's `timeout`, 60 s by default) is the
process's: at the deadline it is killed (SIGKILL) whether or not anyone still follows it, unless it has
ended. Files stream both ways in chunks of at most 64 KiB, never whole in memory; an upload is limited to
`max_upload` bytes (1 GiB; HEROVM_SERVE_MAX_UPLOAD) after decompression.

Users: E2B's `user` (home /home/user; made in the guest when the sandbox is created, see
sandboxes.ENSURE_USER) unless the request names another; `root` on request. Processes run as their user and
file operations use that user's credentials in the guest: the guest's own permissions decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import secrets
import stat
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp as Ts
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import state
from ..errors import HeroVMError
from ..guest.ops import End, EntryInfo, OpError, Output, ProcessHandle, ProcessInfo, Watcher
from ..manager import Manager
from . import envd_pb
from .auth import basic_user
from .sandboxes import DEFAULT_USER, Sandbox, Sandboxes

USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
KEEPALIVE_S = (
    30.0  # between keepalive events of a quiet stream, unless the client asks (Keepalive-Ping-Interval)
)
MAX_UPLOAD = 1 << 30  # bytes of one uploaded file, after decompression
CHUNK = 64 << 10  # bytes of one chunk of a file on its way
PIPE_CHUNKS = 16  # chunks or events buffered between a guest thread and a stream: 1 MiB of file data
WATCH_EVENTS_KEPT = 4096  # events a polled watcher keeps between two GetWatcherEvents
WATCHER_IDLE_S = 600.0  # a polled watcher nobody asked for this long is removed
INTERNAL_TAG = "herovm-e2b-"  # tags the server gives untagged processes (to kill them at their deadline)

_SIGNAL_NAMES = {1: "hangup", 2: "interrupt", 3: "quit", 6: "aborted", 9: "killed", 13: "broken pipe",
                 15: "terminated", 10: "user defined signal 1", 12: "user defined signal 2"}  # fmt: skip


def home_of(user: str) -> str:
    return "/root" if user == "root" else f"/home/{user}"


class FsError(Exception):
    """An operation the guest refused: kind is not_found, exists, invalid or denied; `code` is the agent's
    finer code (herovm.protocol.OpError) when it came from the agent."""

    def __init__(self, kind: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code or kind


_KIND_OF_CODE = {
    "not_found": "not_found",
    "exists": "exists",
    "permission": "denied",
    "not_a_directory": "invalid",
    "is_a_directory": "invalid",
    "invalid": "invalid",
    "other": "invalid",
}


def fs_error(e: OpError, what: str = "") -> FsError:
    """The FsError of an agent's OpError, its message naming `what` (a path, a process)."""
    kind = _KIND_OF_CODE.get(e.code, "invalid")
    text = {
        "not_found": f"{what} does not exist" if what else e.message,
        "exists": f"{what} already exists" if what else e.message,
        "permission": f"permission denied: {what}: {e.message}"
        if what
        else f"permission denied: {e.message}",
        "not_a_directory": f"{what} is not a directory (or a part of it is not)" if what else e.message,
        "is_a_directory": f"{what} is a directory" if what else e.message,
    }.get(e.code, f"{what}: {e.message}" if what else e.message)
    return FsError(kind, text, e.code)


@contextlib.contextmanager
def _refused(what: str = "") -> Iterator[None]:
    try:
        yield
    except OpError as e:
        raise fs_error(e, what) from None


def _path_name(path: str) -> str:
    return f"path '{path}'"


class SandboxOps:
    """What the envd services need of one sandbox's guest, blocking (called from worker threads): the
    agent's ops with E2B's errors. `read_file`/`write_file` keep the signatures app.py's handlers use."""

    def __init__(self, ops: Any, vm: Any = None, manager: Manager | None = None) -> None:
        self.ops = ops  # a herovm.guest.ops.GuestOps (or a stand-in with its API)
        self.vm = vm
        self.manager = manager

    @classmethod
    def of(cls, manager: Manager, vm_name: str) -> SandboxOps:
        vm = manager.attach(vm_name)
        return cls(vm.ops, vm, manager)

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()

    # ----------------------------------------------------------------------------------- processes

    def start(
        self,
        argv: list[str],
        *,
        user: str,
        env: dict[str, str],
        cwd: str | None,
        tag: str,
        stdin: bool,
    ) -> ProcessHandle:
        with _refused(f"command '{argv[0]}'" if argv else ""):
            return self.ops.start_process(argv, env=env, cwd=cwd, user=user, tag=tag, stdin=stdin)

    def connect(self, process: int | str) -> ProcessHandle:
        with _refused(f"process {process!r}"):
            return self.ops.connect(process)

    def processes(self) -> list[ProcessInfo]:
        with _refused():
            return self.ops.list_processes()

    def send_stdin(self, process: int | str, data: bytes) -> None:
        with _refused(f"process {process!r}"):
            self.ops.send_stdin(process, data)

    def close_stdin(self, process: int | str) -> None:
        with _refused(f"process {process!r}"):
            self.ops.close_stdin(process)

    def signal(self, process: int | str, sig: str) -> None:
        with _refused(f"process {process!r}"):
            self.ops.signal(process, sig)

    # --------------------------------------------------------------------------------------- files

    def read_chunks(self, path: str, user: str) -> Iterator[bytes]:
        """The file's chunks; FsError at once (before this returns) when it cannot be read."""
        chunks = self.ops.read_file_chunks(path, user=user)
        with _refused(_path_name(path)):
            try:
                first = next(chunks)
            except StopIteration:
                return iter(())
        return _then(first, chunks, path)

    def read_file(self, path: str, user: str) -> bytes:
        return b"".join(self.read_chunks(path, user))

    def write_file(self, path: str, data: bytes | Iterable[bytes], user: str) -> EntryInfo:
        with _refused(_path_name(path)):
            return self.ops.write_file(path, data, user=user)

    def stat(self, path: str, user: str) -> EntryInfo:
        with _refused(_path_name(path)):
            return self.ops.stat(path, user=user)

    def list_dir(self, path: str, depth: int, user: str) -> list[EntryInfo]:
        with _refused(_path_name(path)):
            return self.ops.list_dir(path, depth=max(1, depth), user=user)

    def make_dir(self, path: str, user: str) -> EntryInfo:
        """E2B's MakeDir: parents made; a directory already there is `exists`."""
        with _refused(_path_name(path)):
            if not self.ops.make_dir(path, user=user, parents=True):
                raise FsError("exists", f"directory '{path}' already exists", "exists")
            return self.ops.stat(path, user=user)

    def move(self, source: str, destination: str, user: str) -> EntryInfo:
        with _refused(_path_name(source)):
            return self.ops.move(source, destination, user=user)

    def remove(self, path: str, user: str) -> None:
        """E2B's Remove: a directory with everything in it."""
        with _refused(_path_name(path)):
            self.ops.remove(path, user=user, recursive=True)

    def watch(self, path: str, recursive: bool, user: str) -> Watcher:
        with _refused(_path_name(path)):
            return self.ops.watch(path, recursive=recursive, user=user)


def _then(first: bytes, rest: Iterator[bytes], path: str) -> Iterator[bytes]:
    yield first
    with _refused(_path_name(path)):
        yield from rest


_HANDLES: dict[str, SandboxOps] = {}
_HANDLES_LOCK = threading.Lock()


def ops_for(manager: Manager, sb: Sandbox) -> SandboxOps:
    """The guest operations of sandbox `sb`: one per sandbox (its agent connections are kept for the next
    call); those of sandboxes whose VM is gone are dropped."""
    with _HANDLES_LOCK:
        ops = _HANDLES.get(sb.vm)
        if ops is not None and ops.manager is manager:
            return ops
        for name in [n for n in _HANDLES if n != sb.vm and not state.VMDir(n).exists()]:
            _HANDLES.pop(name).close()
        ops = _HANDLES[sb.vm] = SandboxOps.of(manager, sb.vm)
        return ops


def resolve_path(path: str, user: str) -> str:
    """E2B resolves a relative path against the user's home; `~` too."""
    if not path:
        raise FsError("invalid", "path is empty")
    if "\0" in path:
        raise FsError("invalid", "path holds a NUL byte")
    if path == "~" or path.startswith("~/"):
        path = home_of(user) + path[1:]
    if not path.startswith("/"):
        path = f"{home_of(user)}/{path}"
    return path


def check_user(user: str) -> str:
    if not USER_RE.match(user):
        raise FsError("invalid", f"invalid user name {user[:40]!r}")
    return user


def parse_size(text: str) -> int:
    """'1073741824', '512M', '1G' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 1G, 512M)")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2) or " "))


# ------------------------------------------------------------------------------ threads and streams


class _Pipe:
    """Items from a worker thread to a coroutine, at most `size` waiting: the thread blocks when the
    reader is slow, and gives up (put returns False) once the reader stopped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = PIPE_CHUNKS) -> None:
        self.loop = loop
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.credits = threading.Semaphore(size)
        self.stopped = threading.Event()

    def put(self, item: Any, *, last: bool = False) -> bool:
        """From the thread; `last` items (an end, an error) take no credit."""
        while not last and not self.credits.acquire(timeout=0.5):
            if self.stopped.is_set():
                return False
        if self.stopped.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is going away
            return False
        return True

    async def get(self, timeout: float | None = None) -> Any:
        item = await asyncio.wait_for(self.items.get(), timeout)
        self.credits.release()
        return item

    def stop(self) -> None:
        self.stopped.set()


_EOS = object()  # a pumped iterator ended


def _pump(items: Iterable[Any], pipe: _Pipe) -> None:
    """In a worker thread: everything `items` yields into `pipe`, then _EOS (or the exception)."""
    try:
        for item in items:
            if not pipe.put(item):
                return
    except Exception as e:  # handed to the reader, which raises it in its own context
        pipe.put(e, last=True)
    else:
        pipe.put(_EOS, last=True)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


# ------------------------------------------------------------------------------------------- Connect


class _Service(ConnectASGIApplication):
    """One Connect service, its endpoints made here rather than by generated code."""

    def __init__(self, name: str, endpoints: dict[str, Endpoint]) -> None:
        super().__init__(service=object(), endpoints=lambda _svc: endpoints)
        self._path = f"/{name}"

    @property
    def path(self) -> str:
        return self._path


def _method(service: str, name: str, inp: str, out: str) -> MethodInfo:
    pkg = service.split(".")[0]
    return MethodInfo(
        name=name,
        service_name=service,
        input=envd_pb.message(f"{pkg}.{inp}"),
        output=envd_pb.message(f"{pkg}.{out}"),
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )


_FS_CODES = {
    "not_found": Code.NOT_FOUND,
    "exists": Code.ALREADY_EXISTS,
    "invalid": Code.INVALID_ARGUMENT,
    "denied": Code.PERMISSION_DENIED,
}
_FS_STATUS = {"not_found": 404, "exists": 409, "invalid": 400, "denied": 403}


def connect_error(e: BaseException) -> ConnectError:
    """The Connect error a failure answers with (E2B's codes: the SDK maps them to its exceptions)."""
    if isinstance(e, ConnectError):
        return e
    if isinstance(e, FsError):
        if e.code == "other" and "No space left" in e.message:
            return ConnectError(Code.RESOURCE_EXHAUSTED, e.message)
        return ConnectError(_FS_CODES[e.kind], e.message)
    if isinstance(e, HeroVMError):
        return ConnectError(Code.UNAVAILABLE, f"the sandbox did not answer: {e.message}")
    if isinstance(e, ValueError | TypeError):
        return ConnectError(Code.INVALID_ARGUMENT, str(e))
    return ConnectError(Code.INTERNAL, f"{type(e).__name__}: {e}")


def http_status(e: FsError) -> int:
    if e.code == "other" and "No space left" in e.message:
        return 507  # the SDK's NotEnoughSpaceException
    return _FS_STATUS[e.kind]


def end_event(end: End) -> Any:
    """A process's end as envd (Go's os.ProcessState) reports it: killed by a signal is exit code -1,
    `exited` false, status "signal: killed"; an exit is "exit status N"; `error` is the status unless 0."""
    EE = envd_pb.message("process.ProcessEvent.EndEvent")
    if end.signal is not None:
        status = f"signal: {_SIGNAL_NAMES.get(end.signal, f'signal {end.signal}')}"
        return EE(exit_code=-1, exited=False, status=status, error=status)
    status = f"exit status {end.exit_code}"
    if end.exit_code == 0:
        return EE(exit_code=0, exited=True, status=status)
    return EE(exit_code=end.exit_code, exited=True, status=status, error=status)


def process_info(p: ProcessInfo) -> Any:
    PI, PC = envd_pb.message("process.ProcessInfo"), envd_pb.message("process.ProcessConfig")
    config = PC(cmd=p.argv[0] if p.argv else "", args=p.argv[1:], envs=dict(p.env), cwd=p.cwd)
    if p.tag is not None and not p.tag.startswith(INTERNAL_TAG):
        return PI(pid=p.pid, config=config, tag=p.tag)
    return PI(pid=p.pid, config=config)


def selector(request: Any) -> int | str:
    """A ProcessSelector's pid or tag."""
    sel = request.process.selector if request.process is not None else None
    if sel is None or (sel.field == "pid" and not sel.value) or (sel.field == "tag" and not sel.value):
        raise ConnectError(Code.INVALID_ARGUMENT, "process: a pid or a tag is required")
    return int(sel.value) if sel.field == "pid" else str(sel.value)


_SIGNALS = {9: "KILL", 15: "TERM"}

_EVENT_TYPES = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
}


def fs_event(name: str, kind: str) -> Any:
    return envd_pb.message("filesystem.FilesystemEvent")(
        name=name, type=envd_pb.enum_value("filesystem.EventType", _EVENT_TYPES[kind])
    )


def entry_info(e: EntryInfo) -> Any:
    """An agent's entry as envd's EntryInfo (a symlink is itself: type SYMLINK and is_symlink, which the
    SDK reads as FileType.SYMLINK; other kinds of file read as files)."""
    EI = envd_pb.message("filesystem.EntryInfo")
    ftype = {"dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}.get(e.type, "FILE_TYPE_FILE")
    kind_bits = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(e.type, stat.S_IFREG)
    seconds = int(e.mtime)
    kw: dict[str, Any] = {}
    if e.symlink_target is not None:
        kw["symlink_target"] = e.symlink_target
    return EI(
        name=e.name,
        type=envd_pb.enum_value("filesystem.FileType", ftype),
        path=e.path,
        size=e.size,
        mode=e.mode,
        permissions=e.permissions or stat.filemode(kind_bits | e.mode),
        owner=e.owner,
        group=e.group,
        modified_time=Ts(seconds=seconds, nanos=int((e.mtime - seconds) * 1e9)),
        is_symlink=e.type == "symlink",
        **kw,
    )


def keepalive_of(ctx: RequestContext) -> float:
    """The client's Keepalive-Ping-Interval (seconds), within 1 s .. 5 min; else KEEPALIVE_S."""
    try:
        value = float(ctx.request_headers.get("keepalive-ping-interval", ""))
    except ValueError:
        return KEEPALIVE_S
    return min(300.0, max(1.0, value))


@dataclass
class _PolledWatch:
    """A watcher of the CreateWatcher/GetWatcherEvents form: its events gathered by a worker thread."""

    sandbox_id: str
    watcher: Watcher
    events: deque = field(default_factory=lambda: deque(maxlen=WATCH_EVENTS_KEPT))
    error: BaseException | None = None
    ended: bool = False
    polled: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gather(self) -> None:
        try:
            for event in self.watcher:
                with self.lock:
                    self.events.append(event)
        except Exception as e:
            self.error = e
        finally:
            self.ended = True

    def take(self) -> list:
        with self.lock:
            self.polled = time.monotonic()
            events = list(self.events)
            self.events.clear()
        return events


class Envd:
    """The envd services of every sandbox; the sandbox of a call is named by its E2b-Sandbox-Id header
    (checked, with its access token, by the router before the call gets here)."""

    def __init__(
        self, sandboxes: Sandboxes, executor: ThreadPoolExecutor, *, max_upload: int | None = None
    ) -> None:
        self.sandboxes = sandboxes
        self.executor = executor
        if max_upload is None:
            configured = os.environ.get("HEROVM_SERVE_MAX_UPLOAD")
            max_upload = parse_size(configured) if configured else MAX_UPLOAD
        self.max_upload = max_upload
        self.watchers: dict[str, _PolledWatch] = {}
        self.deadlines: dict[tuple[str, str], asyncio.TimerHandle] = {}
        P, FS = "process.Process", "filesystem.Filesystem"

        def unary(service: str, name: str, fn: Callable[..., Any]) -> tuple[str, Endpoint]:
            info = _method(service, name, f"{name}Request", f"{name}Response")
            return f"/{service}/{name}", Endpoint.unary(method=info, function=fn)

        def stream(service: str, name: str, fn: Callable[..., Any]) -> tuple[str, Endpoint]:
            info = _method(service, name, f"{name}Request", f"{name}Response")
            return f"/{service}/{name}", Endpoint.server_stream(method=info, function=fn)

        stream_input = _method(P, "StreamInput", "StreamInputRequest", "StreamInputResponse")
        self.process_app = _Service(
            P,
            dict(
                [
                    stream(P, "Start", self.start),
                    stream(P, "Connect", self.connect),
                    unary(P, "List", self.list),
                    unary(P, "SendInput", self.send_input),
                    unary(P, "CloseStdin", self.close_stdin),
                    unary(P, "SendSignal", self.send_signal),
                    unary(P, "Update", self._unimplemented),
                    (
                        f"/{P}/StreamInput",
                        Endpoint.client_stream(method=stream_input, function=self.stream_input),
                    ),
                ]
            ),
        )
        self.filesystem_app = _Service(
            FS,
            dict(
                [
                    unary(FS, "Stat", self.stat),
                    unary(FS, "MakeDir", self.make_dir),
                    unary(FS, "Move", self.move),
                    unary(FS, "ListDir", self.list_dir),
                    unary(FS, "Remove", self.remove),
                    stream(FS, "WatchDir", self.watch_dir),
                    unary(FS, "CreateWatcher", self.create_watcher),
                    unary(FS, "GetWatcherEvents", self.get_watcher_events),
                    unary(FS, "RemoveWatcher", self.remove_watcher),
                ]
            ),
        )

    # ------------------------------------------------------------------------------------ helpers

    def _context(self, ctx: RequestContext) -> tuple[Sandbox, SandboxOps, str]:
        sb = self.sandboxes.find(ctx.request_headers.get("e2b-sandbox-id", ""))
        if sb is None:
            raise ConnectError(Code.NOT_FOUND, "sandbox not found")
        if sb.state != "running":
            raise ConnectError(Code.UNAVAILABLE, f"sandbox {sb.id} is {sb.state}")
        try:
            user = check_user(basic_user(ctx.request_headers.get("authorization"), DEFAULT_USER))
        except (FsError, HeroVMError) as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None
        try:
            ops = ops_for(self.sandboxes.manager, sb)
        except HeroVMError as e:
            raise connect_error(e) from None
        return sb, ops, user

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, lambda: fn(*args))
        except Exception as e:
            raise connect_error(e) from None

    async def _unimplemented(self, request: Any, ctx: RequestContext) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, f"{ctx.method.name} is not supported by herovm serve yet")

    async def _follow(
        self, handle: Any, keepalive: float, wrap: Callable[..., Any], on_item: Callable[[Any], Any]
    ) -> AsyncIterator[Any]:
        """Stream what `handle` (a ProcessHandle or Watcher) yields: `on_item` turns an item into a
        response (None: skip; an item it returns with `last` ends the stream). Keepalives in quiet
        times. Leaving early (the client went away) only stops following."""
        loop = asyncio.get_running_loop()
        pipe = _Pipe(loop)
        loop.run_in_executor(self.executor, _pump, handle, pipe)
        try:
            while True:
                try:
                    item = await pipe.get(keepalive)
                except TimeoutError:
                    yield wrap(keepalive=True)
                    continue
                if item is _EOS:
                    return
                if isinstance(item, BaseException):
                    raise connect_error(item)
                response, last = on_item(item)
                if response is not None:
                    yield response
                if last:
                    return
        finally:
            pipe.stop()
            self.executor.submit(handle.close)  # stops following (a process runs on)

    # ------------------------------------------------------------------------------------ process

    def _process_stream(self, out: str, sb: Sandbox, handle: ProcessHandle, tag: str | None, ctx: Any) -> Any:
        PE = envd_pb.message("process.ProcessEvent")
        DE = envd_pb.message("process.ProcessEvent.DataEvent")
        response = envd_pb.message(f"process.{out}")

        def wrap(keepalive: bool = False) -> Any:
            return response(
                event=PE(event=Oneof("keepalive", envd_pb.message("process.ProcessEvent.KeepAlive")()))
            )

        def on_item(item: Any) -> tuple[Any, bool]:
            if isinstance(item, Output):
                return response(
                    event=PE(event=Oneof("data", DE(output=Oneof(item.stream, item.data))))
                ), False
            if isinstance(item, End):
                if tag is not None:
                    self._disarm(sb.id, tag)
                return response(event=PE(event=Oneof("end", end_event(item)))), True
            return None, False  # Dropped: output the guest could not keep; envd has no event for it

        return self._follow(handle, keepalive_of(ctx), wrap, on_item)

    def _start_event(self, out: str, pid: int) -> Any:
        PE = envd_pb.message("process.ProcessEvent")
        start = envd_pb.message("process.ProcessEvent.StartEvent")(pid=pid)
        return envd_pb.message(f"process.{out}")(event=PE(event=Oneof("start", start)))

    def _arm(self, sb: Sandbox, ops: SandboxOps, tag: str, seconds: float) -> None:
        """Kill the process tagged `tag` at its deadline (envd's: the Start call's timeout), unless it
        ended before (a follower saw its end, or the agent says it is not running)."""
        loop = asyncio.get_running_loop()

        def kill() -> None:
            with contextlib.suppress(FsError, HeroVMError):
                running = [p for p in ops.processes() if p.tag == tag and p.running]
                if running:
                    ops.signal(running[0].pid, "KILL")

        def fire() -> None:
            self.deadlines.pop((sb.id, tag), None)
            if self.sandboxes.find(sb.id) is not None:
                loop.run_in_executor(self.executor, kill)

        self.deadlines[(sb.id, tag)] = loop.call_later(seconds, fire)

    def _disarm(self, sandbox_id: str, tag: str) -> None:
        timer = self.deadlines.pop((sandbox_id, tag), None)
        if timer is not None:
            timer.cancel()

    async def start(self, request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        sb, ops, user = self._context(ctx)
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, "PTY is not supported by herovm serve yet")
        cfg = request.process
        if cfg is None or not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        try:
            cwd = resolve_path(cfg.cwd, user) if cfg.has_field("cwd") and cfg.cwd else None
        except FsError as e:
            raise connect_error(e) from None
        tag = request.tag if request.has_field("tag") and request.tag else INTERNAL_TAG + secrets.token_hex(8)
        # envd >= 0.3 takes `stdin` as asked; a client that does not say gets it open, as before 0.3
        stdin = request.stdin if request.has_field("stdin") else True
        handle = await self._blocking(
            lambda: ops.start(
                [cfg.cmd, *cfg.args],
                user=user,
                env={**sb.envs, **dict(cfg.envs)},
                cwd=cwd,
                tag=tag,
                stdin=stdin,
            )
        )
        timeout = ctx.timeout_ms
        if timeout is not None:
            self._arm(sb, ops, tag, max(0.0, timeout / 1000))
        yield self._start_event("StartResponse", handle.pid)
        async for response in self._process_stream("StartResponse", sb, handle, handle.tag or tag, ctx):
            yield response

    async def connect(self, request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        sb, ops, _user = self._context(ctx)
        target = selector(request)
        handle = await self._blocking(ops.connect, target)
        yield self._start_event("ConnectResponse", handle.pid)
        async for response in self._process_stream("ConnectResponse", sb, handle, handle.tag, ctx):
            yield response

    async def list(self, request: Any, ctx: RequestContext) -> Any:
        _sb, ops, _user = self._context(ctx)
        procs = await self._blocking(ops.processes)
        return envd_pb.message("process.ListResponse")(
            processes=[process_info(p) for p in procs if p.running]
        )

    async def send_input(self, request: Any, ctx: RequestContext) -> Any:
        _sb, ops, _user = self._context(ctx)
        target = selector(request)
        data = request.input.input if request.input is not None else None
        if data is None or data.field != "stdin":
            raise ConnectError(Code.UNIMPLEMENTED, "only stdin input is supported (no PTY)")
        await self._blocking(ops.send_stdin, target, bytes(data.value))
        return envd_pb.message("process.SendInputResponse")()

    async def stream_input(self, requests: AsyncIterator[Any], ctx: RequestContext) -> Any:
        _sb, ops, _user = self._context(ctx)
        target: int | str | None = None
        async for message in requests:
            event = message.event
            if event is None or event.field == "keepalive":
                continue
            if event.field == "start":
                target = selector(event.value)
                continue
            if target is None:
                raise ConnectError(Code.INVALID_ARGUMENT, "the stream must start with a start event")
            data = event.value.input.input if event.value.input is not None else None
            if data is None or data.field != "stdin":
                raise ConnectError(Code.UNIMPLEMENTED, "only stdin input is supported (no PTY)")
            await self._blocking(ops.send_stdin, target, bytes(data.value))
        return envd_pb.message("process.StreamInputResponse")()

    async def close_stdin(self, request: Any, ctx: RequestContext) -> Any:
        _sb, ops, _user = self._context(ctx)
        await self._blocking(ops.close_stdin, selector(request))
        return envd_pb.message("process.CloseStdinResponse")()

    async def send_signal(self, request: Any, ctx: RequestContext) -> Any:
        _sb, ops, _user = self._context(ctx)
        target = selector(request)
        sig = _SIGNALS.get(int(request.signal))
        if sig is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGTERM or SIGKILL")
        await self._blocking(ops.signal, target, sig)
        return envd_pb.message("process.SendSignalResponse")()

    # --------------------------------------------------------------------------------- filesystem

    async def _fs(self, ctx: RequestContext, call: Callable[[SandboxOps, str], Any]) -> Any:
        _sb, ops, user = self._context(ctx)
        return await self._blocking(call, ops, user)

    async def stat(self, request: Any, ctx: RequestContext) -> Any:
        e = await self._fs(ctx, lambda ops, u: ops.stat(resolve_path(request.path, u), u))
        return envd_pb.message("filesystem.StatResponse")(entry=entry_info(e))

    async def make_dir(self, request: Any, ctx: RequestContext) -> Any:
        e = await self._fs(ctx, lambda ops, u: ops.make_dir(resolve_path(request.path, u), u))
        return envd_pb.message("filesystem.MakeDirResponse")(entry=entry_info(e))

    async def move(self, request: Any, ctx: RequestContext) -> Any:
        e = await self._fs(
            ctx,
            lambda ops, u: ops.move(resolve_path(request.source, u), resolve_path(request.destination, u), u),
        )
        return envd_pb.message("filesystem.MoveResponse")(entry=entry_info(e))

    async def list_dir(self, request: Any, ctx: RequestContext) -> Any:
        rows = await self._fs(
            ctx, lambda ops, u: ops.list_dir(resolve_path(request.path, u), request.depth or 1, u)
        )
        return envd_pb.message("filesystem.ListDirResponse")(entries=[entry_info(e) for e in rows])

    async def remove(self, request: Any, ctx: RequestContext) -> Any:
        await self._fs(ctx, lambda ops, u: ops.remove(resolve_path(request.path, u), u))
        return envd_pb.message("filesystem.RemoveResponse")()

    async def _watch(self, request: Any, ctx: RequestContext) -> tuple[Sandbox, Watcher]:
        sb, ops, user = self._context(ctx)
        try:
            path = resolve_path(request.path, user)
        except FsError as e:
            raise connect_error(e) from None
        return sb, await self._blocking(ops.watch, path, bool(request.recursive), user)

    async def watch_dir(self, request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        _sb, watcher = await self._watch(request, ctx)
        WR = envd_pb.message("filesystem.WatchDirResponse")

        def wrap(keepalive: bool = False) -> Any:
            return WR(event=Oneof("keepalive", envd_pb.message("filesystem.WatchDirResponse.KeepAlive")()))

        def on_item(event: Any) -> tuple[Any, bool]:
            return WR(event=Oneof("filesystem", fs_event(event.name, event.type))), False

        yield WR(event=Oneof("start", envd_pb.message("filesystem.WatchDirResponse.StartEvent")()))
        async for response in self._follow(watcher, keepalive_of(ctx), wrap, on_item):
            yield response

    def _prune_watchers(self) -> None:
        now = time.monotonic()
        for wid, w in list(self.watchers.items()):
            if self.sandboxes.find(w.sandbox_id) is None or now - w.polled > WATCHER_IDLE_S:
                self.watchers.pop(wid, None)
                self.executor.submit(w.watcher.close)

    async def create_watcher(self, request: Any, ctx: RequestContext) -> Any:
        self._prune_watchers()
        sb, watcher = await self._watch(request, ctx)
        polled = _PolledWatch(sb.id, watcher)
        wid = secrets.token_hex(12)
        self.watchers[wid] = polled
        asyncio.get_running_loop().run_in_executor(self.executor, polled.gather)
        return envd_pb.message("filesystem.CreateWatcherResponse")(watcher_id=wid)

    def _watcher(self, request: Any, ctx: RequestContext) -> tuple[str, _PolledWatch]:
        sb, _ops, _user = self._context(ctx)
        w = self.watchers.get(request.watcher_id)
        if w is None or w.sandbox_id != sb.id:
            raise ConnectError(Code.NOT_FOUND, f"watcher '{request.watcher_id[:40]}' not found")
        return request.watcher_id, w

    async def get_watcher_events(self, request: Any, ctx: RequestContext) -> Any:
        _wid, w = self._watcher(request, ctx)
        events = w.take()
        if not events and w.ended and w.error is not None:
            raise connect_error(w.error)
        return envd_pb.message("filesystem.GetWatcherEventsResponse")(
            events=[fs_event(e.name, e.type) for e in events]
        )

    async def remove_watcher(self, request: Any, ctx: RequestContext) -> Any:
        wid, w = self._watcher(request, ctx)
        self.watchers.pop(wid, None)
        await self._blocking(w.watcher.close)
        return envd_pb.message("filesystem.RemoveWatcherResponse")()

    # ------------------------------------------------------------------------ HTTP: /files streamed

    def file_routes(self) -> list[Route]:
        """`GET /files` (download), `POST /files` (upload: multipart or octet-stream, gzip too) and
        `GET /health`, streamed: what ServeApp mounts for requests that are not Connect calls."""
        return [
            Route("/files", self.download, methods=["GET"]),
            Route("/files", self.upload, methods=["POST"]),
            Route("/health", lambda _r: Response(status_code=204), methods=["GET"]),
        ]

    def _file_context(self, request: Request) -> tuple[SandboxOps, str]:
        sb = self.sandboxes.find(request.headers.get("e2b-sandbox-id", ""))
        if sb is None:
            raise FsError("not_found", "sandbox not found")
        user = request.query_params.get("username") or basic_user(
            request.headers.get("authorization"), DEFAULT_USER
        )
        return ops_for(self.sandboxes.manager, sb), check_user(user)

    @staticmethod
    def _error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"code": status, "message": message}, status_code=status)

    async def download(self, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        try:
            ops, user = self._file_context(request)
            path = resolve_path(request.query_params.get("path", ""), user)
            chunks = await loop.run_in_executor(self.executor, ops.read_chunks, path, user)
        except FsError as e:
            return self._error(http_status(e), e.message)
        except HeroVMError as e:
            return self._error(502, f"the sandbox did not answer: {e.message}")

        async def body() -> AsyncIterator[bytes]:
            pipe = _Pipe(loop)
            loop.run_in_executor(self.executor, _pump, chunks, pipe)
            try:
                while (item := await pipe.get()) is not _EOS:
                    if isinstance(item, BaseException):
                        raise item  # the response has begun: the connection is cut, the client sees it
                    yield item
            finally:
                pipe.stop()

        name = path.rstrip("/").rsplit("/", 1)[-1]
        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f"attachment; filename*=UTF-8''{_quote(name)}"},
        )

    async def upload(self, request: Request) -> Response:
        try:
            ops, user = self._file_context(request)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_upload + (1 << 20):
                return self._too_large()
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                written = await self._upload_multipart(request, ops, user)
            else:
                path = resolve_path(request.query_params.get("path", ""), user)
                written = [await self._upload_body(request, ops, user, path)]
        except _TooLarge:
            return self._too_large()
        except FsError as e:
            return self._error(http_status(e), e.message)
        except HeroVMError as e:
            return self._error(502, f"the sandbox did not answer: {e.message}")
        if not written:
            return self._error(400, "no file in the upload")
        return JSONResponse(
            [{"name": e.name, "type": "dir" if e.type == "dir" else "file", "path": e.path} for e in written]
        )

    def _too_large(self) -> JSONResponse:
        return self._error(
            413,
            f"the upload is larger than this server's limit of {self.max_upload} bytes "
            "(HEROVM_SERVE_MAX_UPLOAD)",
        )

    async def _upload_body(self, request: Request, ops: SandboxOps, user: str, path: str) -> EntryInfo:
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", "", "gzip"):
            raise FsError("invalid", f"content encoding {encoding[:20]!r} is not supported (gzip is)")
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        writer = _Writer(self, ops, path, user)
        try:
            async for chunk in request.stream():
                if inflate is not None:
                    try:
                        chunk = inflate.decompress(chunk, 1 << 20)
                        while chunk and await writer.feed(chunk):
                            chunk = inflate.decompress(inflate.unconsumed_tail, 1 << 20)
                    except zlib.error as e:
                        raise FsError("invalid", f"the gzip body is malformed: {e}") from None
                    if chunk:  # the guest refused the write: finish() says why
                        break
                elif chunk and not await writer.feed(chunk):
                    break
            return await writer.finish()
        finally:
            writer.abandon()

    async def _upload_multipart(self, request: Request, ops: SandboxOps, user: str) -> list[EntryInfo]:
        from python_multipart.multipart import MultipartParser, parse_options_header

        _ctype, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if not boundary:
            raise FsError("invalid", "a multipart upload without a boundary")
        events: list[tuple[str, bytes]] = []
        header: list[bytes] = [b"", b""]

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header[0] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            header[1] += data[start:end]

        def on_header_end() -> None:
            events.append(("header", header[0].lower() + b"\0" + header[1]))
            header[0] = header[1] = b""

        callbacks = {
            "on_part_begin": lambda: events.append(("begin", b"")),
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": lambda: events.append(("headers", b"")),
            "on_part_data": lambda data, start, end: events.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: events.append(("end", b"")),
        }
        parser = MultipartParser(boundary, callbacks, max_header_count=16, max_header_size=8192)
        written: list[EntryInfo] = []
        writer: _Writer | None = None
        filename: str | None = None
        try:
            async for chunk in request.stream():
                try:
                    parser.write(chunk)
                except Exception as e:
                    raise FsError("invalid", f"the multipart body is malformed: {e}") from None
                for kind, value in events:
                    if kind == "begin":
                        filename = None
                    elif kind == "header":
                        name, _, text = value.partition(b"\0")
                        if name == b"content-disposition":
                            _d, disp = parse_options_header(text)
                            raw = disp.get(b"filename")
                            filename = raw.decode(errors="surrogateescape") if raw is not None else None
                    elif kind == "headers" and filename is not None:
                        target = filename or request.query_params.get("path", "")
                        writer = _Writer(self, ops, resolve_path(target, user), user)
                    elif kind == "data" and writer is not None:
                        await writer.feed(value)
                    elif kind == "end" and writer is not None:
                        written.append(await writer.finish())
                        writer = None
                events.clear()
            parser.finalize()
            if writer is not None:
                raise FsError("invalid", "the multipart body ended inside a file")
            return written
        finally:
            if writer is not None:
                writer.abandon()


class _TooLarge(Exception):
    """An upload past Envd.max_upload."""


class _Abandoned(Exception):
    """The upload failed on the host's side: the guest's write is dropped (its temporary file too)."""


class _Writer:
    """One file being uploaded: chunks fed from the request, written by a worker thread through the
    agent as they come (at most PIPE_CHUNKS waiting)."""

    def __init__(self, envd: Envd, ops: SandboxOps, path: str, user: str) -> None:
        self.limit = envd.max_upload
        self.path = path
        self.size = 0
        self.abandoned = False
        self.chunks: queue.Queue[bytes | None] = queue.Queue(PIPE_CHUNKS)
        self.future = asyncio.get_running_loop().run_in_executor(
            envd.executor, lambda: ops.write_file(path, self._iter(), user)
        )

    def _iter(self) -> Iterator[bytes]:
        while True:
            try:
                chunk = self.chunks.get(timeout=0.5)
            except queue.Empty:
                if self.abandoned:
                    raise _Abandoned() from None
                continue
            if self.abandoned:
                raise _Abandoned()
            if chunk is None:
                return
            yield chunk

    async def _put(self, item: bytes | None) -> bool:
        while not self.future.done():
            try:
                self.chunks.put_nowait(item)
                return True
            except queue.Full:
                await asyncio.sleep(0.002)
        return False

    async def feed(self, chunk: bytes) -> bool:
        """False: the guest's write ended early (refused); finish() says why."""
        self.size += len(chunk)
        if self.size > self.limit:
            raise _TooLarge()
        for start in range(0, len(chunk), CHUNK):
            if not await self._put(chunk[start : start + CHUNK]):
                return False
        return True

    async def finish(self) -> EntryInfo:
        await self._put(None)
        return await self.future

    def abandon(self) -> None:
        if not self.future.done():
            self.abandoned = True


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
