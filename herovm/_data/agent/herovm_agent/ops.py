"""Ops: what an E2B-style server needs of a sandbox, over an authenticated exec connection (docs/protocol.md,
"Ops"). A request with `op` comes here from exec_server's Session; each op ends in exactly one RESULT or
FAILED frame, a streamed op (proc.start, proc.connect, file.watch) runs in a thread of its own while the
session keeps reading the connection (KILL stops the stream, PING is answered).

Every field is checked against herovm.protocol's OP_FIELDS before anything runs; a wrong one is FAILED
`invalid`, and the connection stays usable. Imported on the first op, long after `ready`.

File ops run as the guest user the request names, with that user's *filesystem credentials on this thread
only* (`AsUser`: setfsuid, setfsgid and setgroups as raw system calls, which apply to the calling thread;
glibc's wrappers of setgroups and setuid would change every thread of PID 1). The kernel then checks every
path as it would for the user (modes, ACLs, sticky directories, read-only mounts) and files the op creates
belong to the user, with no window between a check and the use (os.access would check the real uid, and
race), and without forking PID 1, which has threads (a fork per op would also cost milliseconds under TCG).
Changing the filesystem uid from 0 drops the thread's filesystem capabilities (CAP_DAC_OVERRIDE and the
like) until it is 0 again, which `AsUser` restores when the op ends.
"""

from __future__ import annotations

import contextlib
import os
import threading

from herovm.protocol import (
    DEFAULT_USER,
    MAX_LIST_DEPTH,
    MAX_PATH,
    MAX_TAG,
    OP_FIELDS,
    PROCESS_STDIN_BUFFER,
    SIGNALS,
    Frame,
    Op,
    OpError,
    Type,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .exec_server import Session


class OpFailure(Exception):
    """An op failed: `code` from OpError, `message` one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = " ".join(message.split())[:300]

    def json(self) -> dict:
        return {"error": self.code, "message": self.message}


_ERRNO_CODES = {
    "ENOENT": OpError.NOT_FOUND,
    "EEXIST": OpError.EXISTS,
    "ENOTEMPTY": OpError.EXISTS,
    "EACCES": OpError.PERMISSION,
    "EPERM": OpError.PERMISSION,
    "EROFS": OpError.PERMISSION,
    "ENOTDIR": OpError.NOT_A_DIRECTORY,
    "EISDIR": OpError.IS_A_DIRECTORY,
    "EINVAL": OpError.INVALID,
    "ENAMETOOLONG": OpError.INVALID,
    "ELOOP": OpError.INVALID,
}


def os_failure(e: OSError, path: str | None = None) -> OpFailure:
    """An OSError as an OpFailure: its errno mapped onto the closed set, its message one line."""
    import errno

    code = _ERRNO_CODES.get(errno.errorcode.get(e.errno or 0, ""), OpError.OTHER)
    where = path if path is not None else e.filename
    return OpFailure(code, f"{e.strerror or e}: {where}" if where else str(e.strerror or e))


# ----------------------------------------------------------------------------------------- validation

_TYPES = {
    Type.STR: lambda v: isinstance(v, str),
    Type.INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    Type.COUNT: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    Type.BOOL: lambda v: isinstance(v, bool),
    Type.OBJECT: lambda v: isinstance(v, dict),
    Type.STRINGS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def invalid(message: str) -> OpFailure:
    return OpFailure(OpError.INVALID, message)


def check_string(value: str, field: str) -> None:
    if "\0" in value:
        raise invalid(f"a NUL character in {field}")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise invalid(f"{field} does not encode (a lone surrogate)") from None


def parse(request: dict) -> dict:
    """The op request checked whole (OP_FIELDS, then each op's own rules); OpFailure `invalid` otherwise."""
    op = request.get("op")
    fields = OP_FIELDS.get(op) if isinstance(op, str) else None
    if fields is None:
        raise invalid(f"unknown op {str(op)[:40]!r}")
    known = {f.name: f for f in fields}
    for name, value in request.items():
        if name == "op":
            continue
        f = known.get(name)
        if f is None:
            raise invalid(f"{op}: unknown field {name[:40]!r}")
        if value is None and not f.required:
            continue
        if not any(_TYPES[t](value) for t in f.types):
            raise invalid(f"{op}: {name} must be {' or '.join(f.types)}")
        if isinstance(value, str) and name != "data":
            check_string(value, name)
    for f in fields:
        if f.required and request.get(f.name) is None:
            raise invalid(f"{op}: {f.name} is missing")
    for name in ("path", "to", "cwd"):
        value = request.get(name)
        if value is not None and (not value or len(os.fsencode(value)) > MAX_PATH):
            raise invalid(f"{op}: {name} must be a path of 1 to {MAX_PATH} bytes")
    user = request.get("user")
    if user is not None and (not user or len(user) > 32 or not set(user) <= _USER_CHARS or user[0] == "-"):
        raise invalid(f"{op}: {user[:40]!r} is not a user name")
    if "pid" in known and (request.get("pid") is None) == (request.get("tag") is None):
        raise invalid(f"{op}: it needs exactly one of pid and tag")
    tag = request.get("tag")
    if tag is not None and not 0 < len(tag) <= MAX_TAG:
        raise invalid(f"{op}: tag must be 1 to {MAX_TAG} characters")
    if op == Op.PROC_START:
        argv, shell = request.get("argv"), request.get("shell")
        if (argv is None) == (shell is None):
            raise invalid(f"{op}: it needs exactly one of argv and shell")
        if argv is not None:
            if not argv or not argv[0]:
                raise invalid(f"{op}: argv must be a list of strings, the first not empty")
            for arg in argv:
                check_string(arg, "argv")
        for key, value in (request.get("env") or {}).items():
            if not isinstance(value, str):
                raise invalid(f"{op}: env must be an object of strings")
            if not key or "=" in key:
                raise invalid(f"{op}: {key[:40]!r} cannot be an environment variable's name")
            check_string(key, "env")
            check_string(value, "env")
    if op == Op.PROC_SIGNAL:
        sig = request["signal"]
        if not (sig in SIGNALS or (isinstance(sig, int) and 1 <= sig <= 64)):
            raise invalid(f"{op}: signal must be one of {', '.join(SIGNALS)} or a number from 1 to 64")
    if op == Op.PROC_INPUT:
        import binascii

        try:
            request["data"] = binascii.a2b_base64(request["data"].encode("ascii"), strict_mode=True)
        except (ValueError, UnicodeEncodeError):
            raise invalid(f"{op}: data must be base64") from None
        if len(request["data"]) > PROCESS_STDIN_BUFFER:
            raise invalid(f"{op}: data is over {PROCESS_STDIN_BUFFER} bytes")
    depth = request.get("depth")
    if depth is not None and not 1 <= depth <= MAX_LIST_DEPTH:
        raise invalid(f"{op}: depth must be from 1 to {MAX_LIST_DEPTH}")
    if request.get("mode") is not None and request["mode"] > 0o7777:
        raise invalid(f"{op}: mode must be from 0 to 0o7777")
    return request


# ------------------------------------------------------------------------------------------ the user


class User:
    """A guest user, looked up in the guest's passwd: its uid, gid, groups and home."""

    def __init__(self, name: str) -> None:
        import pwd

        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise invalid(f"no such user: {name}") from None
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.home = entry.pw_dir or "/"
        self.shell = entry.pw_shell or "/bin/sh"
        try:
            self.groups = os.getgrouplist(name, self.gid)
        except OSError:
            self.groups = [self.gid]

    def path(self, path: str) -> str:
        """`path` made absolute: a relative one is relative to the user's home (as E2B's are)."""
        return os.path.normpath(os.path.join(self.home, path))


_SYSCALLS = {  # setgroups, setfsuid, setfsgid: per thread when called raw
    "x86_64": (116, 122, 123),
    "aarch64": (159, 151, 152),
}
_libc: list = []


def _syscall(number: int, *args) -> int:
    if not _libc:
        import ctypes

        _libc.append(ctypes.CDLL(None, use_errno=True))
        _libc.append(ctypes)
    libc, ctypes = _libc
    result = libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class AsUser:
    """This thread's filesystem credentials (fsuid, fsgid, supplementary groups) are `user`'s inside the
    `with`, and root's again after it. Root is the identity: nothing changes."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.active = user.uid != 0 or user.gid != 0

    def __enter__(self) -> AsUser:
        if not self.active:
            return self
        setgroups, setfsuid, setfsgid = _numbers()
        import ctypes

        groups = (ctypes.c_uint * max(1, len(self.user.groups)))(*self.user.groups)
        _syscall(setgroups, len(self.user.groups), groups)
        _syscall(setfsgid, self.user.gid)
        _syscall(setfsuid, self.user.uid)
        # setfsuid returns the previous value, never an error: ask again to know it took
        if _syscall(setfsuid, -1 & 0xFFFFFFFF) != self.user.uid or _syscall(setfsgid, -1 & 0xFFFFFFFF) != (
            self.user.gid
        ):
            self.__exit__()
            raise OpFailure(OpError.OTHER, f"cannot act as {self.user.name}")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        setgroups, setfsuid, setfsgid = _numbers()
        import ctypes

        _syscall(setfsuid, 0)  # first: the capabilities to do the rest come back with it
        _syscall(setfsgid, 0)
        root_groups = _ROOT_GROUPS or [0]
        _syscall(setgroups, len(root_groups), (ctypes.c_uint * len(root_groups))(*root_groups))


_ROOT_GROUPS = os.getgroups()  # what this process had (PID 1: none, or root's)


def _numbers() -> tuple[int, int, int]:
    numbers = _SYSCALLS.get(os.uname().machine)
    if numbers is None:
        raise OpFailure(OpError.OTHER, f"acting as a user is not supported on {os.uname().machine}")
    return numbers


# ------------------------------------------------------------------------------------------ dispatch

STREAMED = frozenset((Op.PROC_START, Op.PROC_CONNECT, Op.FILE_WATCH))


def handle(session: Session, request: dict) -> None:
    """Serve one op request on `session`: a RESULT or FAILED frame ends it (a streamed op's from its own
    thread, after its EVENTs)."""
    try:
        request = parse(request)
        op = request["op"]
        if op.startswith("proc."):
            from . import ops_procs

            follow = ops_procs.serve(session, request)
        else:
            from . import ops_files

            follow = ops_files.serve(session, request)
    except OpFailure as e:
        session.send_json(Frame.FAILED, e.json())
        return
    except OSError as e:
        if isinstance(e, ConnectionError | BrokenPipeError):
            raise
        session.send_json(Frame.FAILED, os_failure(e).json())
        return
    if isinstance(follow, dict):  # done: its result
        session.send_json(Frame.RESULT, follow)
    elif follow is not None:
        start_stream(session, follow)


def start_stream(session: Session, follow) -> None:
    """Run `follow(stopped)` in a thread: it sends its stream's frames and returns the op's result (or
    raises OpFailure). The session takes no other request meanwhile; KILL or the host hanging up sets
    `stopped`."""
    stop = threading.Event()
    session.stream = stop

    def run() -> None:
        try:
            kind, reply = Frame.RESULT, follow(stop.is_set)
        except OpFailure as e:
            kind, reply = Frame.FAILED, e.json()
        except OSError as e:
            kind, reply = Frame.FAILED, os_failure(e).json()
        except Exception as e:  # noqa: BLE001 - a thread of PID 1: said to the host, never a traceback
            kind, reply = (
                Frame.FAILED,
                OpFailure(OpError.OTHER, f"internal error: {type(e).__name__}: {e}").json(),
            )
        session.stream = None  # before the last frame: the host may send its next request at once
        with contextlib.suppress(OSError):
            session.send_json(kind, reply)

    threading.Thread(target=run, name="herovm-op", daemon=True).start()


def user_of(request: dict) -> User:
    return User(request.get("user") or DEFAULT_USER)
