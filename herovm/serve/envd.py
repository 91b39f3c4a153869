"""The in-sandbox API ("envd"): the Connect services process.Process and filesystem.Filesystem, and the
HTTP file endpoints (`GET/POST /files`, `GET /health`), for one sandbox at a time.

Everything that touches the guest goes through `GuestOps`, a small blocking interface over herovm's VM
handle (exec with streamed output, stdin). When the guest agent grows its own process and file operations
(background processes, signals, inotify), `ops_for` is the one place that changes.

Users: E2B's `user` (home /home/user) unless the request names another; `root` on request. A command runs
as its user in the guest (`runuser -u USER --`), and so does every file operation: the guest's own
permissions decide what a user may touch.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import stat
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp as Ts

from ..errors import HeroVMError
from ..manager import Manager
from . import envd_pb
from .auth import basic_user
from .sandboxes import DEFAULT_USER, Sandbox, Sandboxes

USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
KEEPALIVE_S = 30.0


def home_of(user: str) -> str:
    return "/root" if user == "root" else f"/home/{user}"


class FsError(Exception):
    """A file operation the guest refused: kind is not_found, exists, invalid or denied."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Entry:
    name: str
    type: str  # file | dir | symlink (what a symlink points to is in `target_type`)
    path: str
    size: int
    mode: int
    owner: str
    group: str
    mtime: float
    symlink_target: str | None = None
    target_type: str | None = None


# find -printf: %y its type, %Y what it leads to, size, mode (octal), owner, group, mtime, link target, path
_FIND_FORMAT = r"%y\0%Y\0%s\0%m\0%u\0%g\0%T@\0%l\0%p\0"
_TYPES = {"f": "file", "d": "dir", "l": "symlink"}
# Exit codes the file scripts use to say why: the errno's number
_ENOENT, _EEXIST, _ENOTDIR, _EISDIR, _EACCES = 2, 17, 20, 21, 13


class GuestOps:
    """What the envd services need from a guest, blocking (called from worker threads)."""

    def __init__(self, manager: Manager, vm_name: str) -> None:
        self.manager = manager
        self.vm_name = vm_name

    def run(
        self,
        argv: list[str],
        *,
        user: str,
        env: dict[str, str],
        cwd: str | None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run `argv` as `user`; (exit code, stdout, stderr: empty where a callback took the stream)."""
        if user != "root":
            argv = ["runuser", "-u", user, "--", *argv]
        vm = self.manager.attach(self.vm_name)
        try:
            r = vm.exec(
                argv, env=env, cwd=cwd, timeout=timeout, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr
            )
        finally:
            vm.close()
        return r.exit_code, r.stdout, r.stderr

    def _script(self, script: str, args: list[str], user: str, stdin: bytes | None = None) -> bytes:
        code, out, err = self.run(["sh", "-c", script, "sh", *args], user=user, env={}, cwd="/", stdin=stdin)
        if code == 0:
            return out
        text = err.decode(errors="replace").strip()
        what = args[0] if args else ""
        if code == _ENOENT:
            raise FsError("not_found", f"path '{what}' does not exist")
        if code == _EEXIST:
            raise FsError("exists", f"path '{what}' already exists")
        if code == _ENOTDIR:
            raise FsError("invalid", f"path '{what}' is not a directory")
        if code == _EISDIR:
            raise FsError("invalid", f"path '{what}' is a directory")
        if "Permission denied" in text or code == _EACCES:
            raise FsError("denied", f"permission denied: {text[-300:]}")
        raise FsError("invalid", text[-300:] or f"exit code {code}")

    def read_file(self, path: str, user: str) -> bytes:
        return self._script('[ -e "$1" ] || exit 2; [ -d "$1" ] && exit 21; exec cat -- "$1"', [path], user)

    def write_file(self, path: str, data: bytes, user: str) -> Entry:
        self._script(
            '[ -d "$1" ] && exit 21; mkdir -p -- "$(dirname -- "$1")" && cat > "$1"', [path], user, data
        )
        return self.stat(path, user)

    def stat(self, path: str, user: str) -> Entry:
        out = self._script(
            f'[ -e "$1" ] || [ -L "$1" ] || exit 2; exec find "$1" -maxdepth 0 -printf "{_FIND_FORMAT}"',
            [path],
            user,
        )
        entries = _entries(out)
        if not entries:
            raise FsError("not_found", f"path '{path}' does not exist")
        return entries[0]

    def list_dir(self, path: str, depth: int, user: str) -> list[Entry]:
        out = self._script(
            f'[ -e "$1" ] || exit 2; [ -d "$1" ] || exit 20; '
            f'exec find "$1" -mindepth 1 -maxdepth "$2" -printf "{_FIND_FORMAT}"',
            [path, str(max(1, depth))],
            user,
        )
        return _entries(out)

    def make_dir(self, path: str, user: str) -> Entry:
        self._script('[ -e "$1" ] && exit 17; mkdir -p -- "$1"', [path], user)
        return self.stat(path, user)

    def remove(self, path: str, user: str) -> None:
        self._script('[ -e "$1" ] || [ -L "$1" ] || exit 2; rm -rf -- "$1"', [path], user)

    def move(self, source: str, destination: str, user: str) -> Entry:
        self._script(
            '[ -e "$1" ] || [ -L "$1" ] || exit 2; mkdir -p -- "$(dirname -- "$2")" && mv -T -- "$1" "$2"',
            [source, destination],
            user,
        )
        return self.stat(destination, user)


def _entries(out: bytes) -> list[Entry]:
    parts = out.split(b"\0")
    rows = []
    for i in range(0, len(parts) - 8, 9):
        y, big_y, size, mode, owner, group, mtime, link, path = (
            p.decode(errors="replace") for p in parts[i : i + 9]
        )
        kind = _TYPES.get(y, "file")
        rows.append(
            Entry(
                name=path.rstrip("/").rsplit("/", 1)[-1] or "/",
                type=kind,
                path=path,
                size=int(size or 0),
                mode=int(mode or "0", 8),
                owner=owner,
                group=group,
                mtime=float(mtime or 0),
                symlink_target=link if kind == "symlink" else None,
                target_type=_TYPES.get(big_y, "file") if kind == "symlink" else kind,
            )
        )
    return rows


def ops_for(manager: Manager, sb: Sandbox) -> GuestOps:
    """The guest operations of sandbox `sb` (the one place to swap in the agent's own operations)."""
    return GuestOps(manager, sb.vm)


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


def _connect_error(e: BaseException) -> ConnectError:
    if isinstance(e, ConnectError):
        return e
    if isinstance(e, FsError):
        return ConnectError(_FS_CODES[e.kind], e.message)
    if isinstance(e, HeroVMError):
        return ConnectError(Code.UNAVAILABLE, f"the sandbox did not answer: {e.message}")
    return ConnectError(Code.INTERNAL, f"{type(e).__name__}: {e}")


class Envd:
    """The envd services of every sandbox; the sandbox of a call is named by its E2b-Sandbox-Id header
    (checked, with its access token, by the router before the call gets here)."""

    def __init__(self, sandboxes: Sandboxes, executor: ThreadPoolExecutor) -> None:
        self.sandboxes = sandboxes
        self.executor = executor
        self._pids = itertools.count(1000)
        self.running: dict[tuple[str, int], dict[str, Any]] = {}
        P, FS = "process.Process", "filesystem.Filesystem"
        unimplemented = self._unimplemented
        self.process_app = _Service(
            P,
            {
                f"/{P}/Start": Endpoint.server_stream(
                    method=_method(P, "Start", "StartRequest", "StartResponse"), function=self.start
                ),
                f"/{P}/List": Endpoint.unary(
                    method=_method(P, "List", "ListRequest", "ListResponse"), function=self.list
                ),
                f"/{P}/Connect": Endpoint.server_stream(
                    method=_method(P, "Connect", "ConnectRequest", "ConnectResponse"), function=self.connect
                ),
                f"/{P}/Update": Endpoint.unary(
                    method=_method(P, "Update", "UpdateRequest", "UpdateResponse"), function=unimplemented
                ),
                f"/{P}/StreamInput": Endpoint.client_stream(
                    method=_method(P, "StreamInput", "StreamInputRequest", "StreamInputResponse"),
                    function=unimplemented,
                ),
                f"/{P}/SendInput": Endpoint.unary(
                    method=_method(P, "SendInput", "SendInputRequest", "SendInputResponse"),
                    function=unimplemented,
                ),
                f"/{P}/SendSignal": Endpoint.unary(
                    method=_method(P, "SendSignal", "SendSignalRequest", "SendSignalResponse"),
                    function=unimplemented,
                ),
                f"/{P}/CloseStdin": Endpoint.unary(
                    method=_method(P, "CloseStdin", "CloseStdinRequest", "CloseStdinResponse"),
                    function=unimplemented,
                ),
            },
        )
        self.filesystem_app = _Service(
            FS,
            {
                f"/{FS}/Stat": Endpoint.unary(
                    method=_method(FS, "Stat", "StatRequest", "StatResponse"), function=self.stat
                ),
                f"/{FS}/MakeDir": Endpoint.unary(
                    method=_method(FS, "MakeDir", "MakeDirRequest", "MakeDirResponse"), function=self.make_dir
                ),
                f"/{FS}/Move": Endpoint.unary(
                    method=_method(FS, "Move", "MoveRequest", "MoveResponse"), function=self.move
                ),
                f"/{FS}/ListDir": Endpoint.unary(
                    method=_method(FS, "ListDir", "ListDirRequest", "ListDirResponse"), function=self.list_dir
                ),
                f"/{FS}/Remove": Endpoint.unary(
                    method=_method(FS, "Remove", "RemoveRequest", "RemoveResponse"), function=self.remove
                ),
                f"/{FS}/WatchDir": Endpoint.server_stream(
                    method=_method(FS, "WatchDir", "WatchDirRequest", "WatchDirResponse"),
                    function=self._no_stream,
                ),
                f"/{FS}/CreateWatcher": Endpoint.unary(
                    method=_method(FS, "CreateWatcher", "CreateWatcherRequest", "CreateWatcherResponse"),
                    function=unimplemented,
                ),
                f"/{FS}/GetWatcherEvents": Endpoint.unary(
                    method=_method(
                        FS, "GetWatcherEvents", "GetWatcherEventsRequest", "GetWatcherEventsResponse"
                    ),
                    function=unimplemented,
                ),
                f"/{FS}/RemoveWatcher": Endpoint.unary(
                    method=_method(FS, "RemoveWatcher", "RemoveWatcherRequest", "RemoveWatcherResponse"),
                    function=unimplemented,
                ),
            },
        )

    # ------------------------------------------------------------------------------------ helpers

    def _context(self, ctx: RequestContext) -> tuple[Sandbox, GuestOps, str]:
        sb = self.sandboxes.find(ctx.request_headers.get("e2b-sandbox-id", ""))
        if sb is None:
            raise ConnectError(Code.NOT_FOUND, "sandbox not found")
        if sb.state != "running":
            raise ConnectError(Code.UNAVAILABLE, f"sandbox {sb.id} is {sb.state}")
        try:
            user = check_user(basic_user(ctx.request_headers.get("authorization"), DEFAULT_USER))
        except (FsError, HeroVMError) as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None
        return sb, ops_for(self.sandboxes.manager, sb), user

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, lambda: fn(*args))
        except Exception as e:
            raise _connect_error(e) from None

    async def _unimplemented(self, request: Any, ctx: RequestContext) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, f"{ctx.method.name} is not supported by herovm serve yet")

    async def _no_stream(self, request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        raise ConnectError(Code.UNIMPLEMENTED, f"{ctx.method.name} is not supported by herovm serve yet")
        yield  # pragma: no cover  (makes this an async generator)

    # ------------------------------------------------------------------------------------ process

    def _event(self, out: str, **kw: Any) -> Any:
        PE = envd_pb.message("process.ProcessEvent")
        return envd_pb.message(f"process.{out}")(event=PE(**kw))

    async def start(self, request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        sb, ops, user = self._context(ctx)
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, "PTY is not supported by herovm serve yet")
        cfg = request.process
        if cfg is None or not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        argv = [cfg.cmd, *cfg.args]
        env = {**sb.envs, **dict(cfg.envs)}
        try:
            cwd = resolve_path(cfg.cwd, user) if cfg.has_field("cwd") and cfg.cwd else home_of(user)
        except FsError as e:
            raise _connect_error(e) from None
        timeout = ctx.timeout_ms / 1000 if ctx.timeout_ms else None
        pid = next(self._pids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        def put(kind: str) -> Callable[[bytes], None]:
            return lambda data: loop.call_soon_threadsafe(queue.put_nowait, (kind, data))

        info = {"pid": pid, "cmd": cfg.cmd, "args": list(cfg.args), "envs": dict(cfg.envs), "cwd": cwd}
        self.running[(sb.id, pid)] = info
        fut = loop.run_in_executor(
            self.executor,
            lambda: ops.run(
                argv,
                user=user,
                env=env,
                cwd=cwd,
                on_stdout=put("stdout"),
                on_stderr=put("stderr"),
                timeout=timeout,
            ),
        )
        fut.add_done_callback(lambda _f: queue.put_nowait(("end", b"")))
        DE = envd_pb.message("process.ProcessEvent.DataEvent")
        try:
            yield self._event(
                "StartResponse",
                event=Oneof("start", envd_pb.message("process.ProcessEvent.StartEvent")(pid=pid)),
            )
            while True:
                try:
                    kind, data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield self._event(
                        "StartResponse",
                        event=Oneof("keepalive", envd_pb.message("process.ProcessEvent.KeepAlive")()),
                    )
                    continue
                if kind == "end":
                    break
                yield self._event("StartResponse", event=Oneof("data", DE(output=Oneof(kind, data))))
            try:
                code = fut.result()[0]
            except Exception as e:
                raise _connect_error(e) from None
            EE = envd_pb.message("process.ProcessEvent.EndEvent")
            end = EE(exit_code=code, exited=True, status=f"exit status {code}")
            yield self._event("StartResponse", event=Oneof("end", end))
        finally:
            self.running.pop((sb.id, pid), None)

    async def list(self, request: Any, ctx: RequestContext) -> Any:
        sb, _ops, _user = self._context(ctx)
        PI, PC = envd_pb.message("process.ProcessInfo"), envd_pb.message("process.ProcessConfig")
        procs = [
            PI(pid=i["pid"], config=PC(cmd=i["cmd"], args=i["args"], envs=i["envs"], cwd=i["cwd"]))
            for (sid, _pid), i in list(self.running.items())
            if sid == sb.id
        ]
        return envd_pb.message("process.ListResponse")(processes=procs)

    async def connect(self, request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        raise ConnectError(
            Code.UNIMPLEMENTED, "reconnecting to a process is not supported by herovm serve yet"
        )
        yield  # pragma: no cover

    # --------------------------------------------------------------------------------- filesystem

    def _entry(self, e: Entry) -> Any:
        EI = envd_pb.message("filesystem.EntryInfo")
        shown = e.target_type if e.type == "symlink" else e.type
        ftype = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}[
            shown or "file"
        ]
        kind_bits = stat.S_IFDIR if shown == "dir" else stat.S_IFREG
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
            permissions=stat.filemode(kind_bits | e.mode),
            owner=e.owner,
            group=e.group,
            modified_time=Ts(seconds=seconds, nanos=int((e.mtime - seconds) * 1e9)),
            is_symlink=e.type == "symlink",
            **kw,
        )

    async def _fs(self, ctx: RequestContext, call: Callable[[GuestOps, str], Any]) -> Any:
        _sb, ops, user = self._context(ctx)
        return await self._blocking(call, ops, user)

    async def stat(self, request: Any, ctx: RequestContext) -> Any:
        e = await self._fs(ctx, lambda ops, u: ops.stat(resolve_path(request.path, u), u))
        return envd_pb.message("filesystem.StatResponse")(entry=self._entry(e))

    async def make_dir(self, request: Any, ctx: RequestContext) -> Any:
        e = await self._fs(ctx, lambda ops, u: ops.make_dir(resolve_path(request.path, u), u))
        return envd_pb.message("filesystem.MakeDirResponse")(entry=self._entry(e))

    async def move(self, request: Any, ctx: RequestContext) -> Any:
        e = await self._fs(
            ctx,
            lambda ops, u: ops.move(resolve_path(request.source, u), resolve_path(request.destination, u), u),
        )
        return envd_pb.message("filesystem.MoveResponse")(entry=self._entry(e))

    async def list_dir(self, request: Any, ctx: RequestContext) -> Any:
        rows = await self._fs(
            ctx, lambda ops, u: ops.list_dir(resolve_path(request.path, u), request.depth or 1, u)
        )
        return envd_pb.message("filesystem.ListDirResponse")(entries=[self._entry(e) for e in rows])

    async def remove(self, request: Any, ctx: RequestContext) -> Any:
        await self._fs(ctx, lambda ops, u: ops.remove(resolve_path(request.path, u), u))
        return envd_pb.message("filesystem.RemoveResponse")()
