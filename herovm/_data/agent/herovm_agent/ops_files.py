"""File ops as a guest user (docs/protocol.md, "Ops: files"): read, write, stat, list, mkdir, move, remove
and watch. Each runs with the user's filesystem credentials on its thread (ops.AsUser), so the kernel checks
every access as it would for the user, and what the op creates is the user's.

A write goes to a temporary file beside its target (created exclusively, not following links), which is
renamed over the target once all its bytes have come: a reader never sees half a file, and a failed write
leaves the target as it was. An existing target keeps its mode (and, when root writes, its owner).
"""

from __future__ import annotations

import contextlib
import os
import stat as _stat

from herovm.protocol import (
    AUTHENTICATED_LIMITS,
    MAX_CHUNK,
    MAX_LIST_DEPTH,
    MAX_LIST_ENTRIES,
    MAX_READ,
    EntryType,
    Frame,
    Op,
    OpError,
)

from .ops import AsUser, OpFailure, os_failure, user_of

LIST_BATCH_BYTES = 256 << 10  # entries per EVENT frame of a file.list, by their JSON's size


class Names:
    """uid and gid to names, looked up once per op."""

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self.users:
            import pwd

            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = str(uid)
        return self.users[uid]

    def group(self, gid: int) -> str:
        if gid not in self.groups:
            import grp

            try:
                self.groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self.groups[gid] = str(gid)
        return self.groups[gid]


def entry(path: str, names: Names, st: os.stat_result | None = None) -> dict:
    """What file.stat says of `path` (lstat: a symlink is itself, with its target)."""
    if st is None:
        st = os.lstat(path)
    mode = st.st_mode
    kind = (
        EntryType.DIR
        if _stat.S_ISDIR(mode)
        else EntryType.FILE
        if _stat.S_ISREG(mode)
        else EntryType.SYMLINK
        if _stat.S_ISLNK(mode)
        else EntryType.OTHER
    )
    target = None
    if kind == EntryType.SYMLINK:
        try:
            target = os.readlink(path)
        except OSError:
            target = None
    return {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": _stat.S_IMODE(mode),
        "permissions": _stat.filemode(mode),
        "owner": names.user(st.st_uid),
        "group": names.group(st.st_gid),
        "mtime": st.st_mtime,
        "symlink_target": target,
    }


def serve(session, request: dict):
    op = request["op"]
    user = user_of(request)
    path = user.path(request["path"])
    if op == Op.FILE_WATCH:
        from . import ops_watch

        return ops_watch.start(session, path, user, bool(request.get("recursive")))
    with AsUser(user):
        try:
            if op == Op.FILE_READ:
                return read(session, path, request.get("offset") or 0, request.get("limit"))
            if op == Op.FILE_WRITE:
                return write(session, path, request.get("mode"), root=user.uid == 0)
            if op == Op.FILE_STAT:
                return entry(path, Names())
            if op == Op.FILE_LIST:
                return list_dir(session, path, request.get("depth") or 1)
            if op == Op.FILE_MKDIR:
                return make_dir(path, request.get("parents", True) is not False)
            if op == Op.FILE_MOVE:
                return move(path, user.path(request["to"]))
            if op == Op.FILE_REMOVE:
                return remove(path, bool(request.get("recursive")))
        except OSError as e:
            if isinstance(e, ConnectionError):
                raise
            raise os_failure(e, path) from None
    raise OpFailure(OpError.INVALID, f"unknown op {op!r}")


def read(session, path: str, offset: int, limit: int | None) -> dict:
    limit = MAX_READ if limit is None else limit
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if _stat.S_ISDIR(st.st_mode):
            raise OpFailure(OpError.IS_A_DIRECTORY, f"is a directory: {path}")
        if not _stat.S_ISREG(st.st_mode):
            raise OpFailure(OpError.INVALID, f"not a regular file: {path}")
        os.set_blocking(fd, True)
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        sent = 0
        while sent < limit:
            try:
                data = os.read(fd, min(MAX_CHUNK, limit - sent))
            except OSError as e:
                raise os_failure(e, path) from None
            if not data:
                break
            session.send(Frame.STDOUT, data)
            sent += len(data)
        truncated = sent >= limit and bool(os.read(fd, 1))
    finally:
        os.close(fd)
    return {"size": sent, "truncated": truncated}


def write(session, path: str, mode: int | None, *, root: bool) -> dict:
    """Take the file's bytes (STDIN frames, an empty one last) into a temporary file, then rename it over
    `path`. On failure: FAILED at once, the temporary file removed, the remaining bytes dropped."""
    from .exec_server import read_frame

    parent, base = os.path.split(path)
    if not base:
        raise OpFailure(OpError.INVALID, f"not a file name: {path}")
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    if old is not None and _stat.S_ISDIR(old.st_mode):
        raise OpFailure(OpError.IS_A_DIRECTORY, f"is a directory: {path}")
    os.makedirs(parent, exist_ok=True)
    if mode is None:
        mode = _stat.S_IMODE(old.st_mode) if old is not None else 0o644
    tmp = os.path.join(parent, f".{base[:200]}.herovm-{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    done = False
    try:
        if old is not None and root:
            os.fchown(fd, old.st_uid, old.st_gid)
        size = 0
        while True:
            kind, data = read_frame(session.conn, AUTHENTICATED_LIMITS)
            if kind == Frame.PING:
                session.send(Frame.PONG)
                continue
            if kind == Frame.KILL:
                raise OpFailure(OpError.OTHER, f"the write of {path} was cancelled")
            if kind != Frame.STDIN:
                from .exec_server import ProtocolError

                raise ProtocolError(f"a {kind!r} frame during a file write")
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            size += len(data)
        os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
        done = True
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return {"size": size, "entry": entry(path, Names())}


def list_dir(session, path: str, depth: int) -> dict:
    """Entries under `path` down to `depth` levels (1: its own), breadth first, not into symlinks; sent in
    EVENTs of at most LIST_BATCH_BYTES; a subdirectory the user cannot read is skipped."""
    from . import jsonio

    st = os.stat(path)
    if not _stat.S_ISDIR(st.st_mode):
        raise OpFailure(OpError.NOT_A_DIRECTORY, f"not a directory: {path}")
    names = Names()
    count, truncated = 0, False
    batch: list[dict] = []
    batch_bytes = 0
    level = [path]
    for d in range(1, min(depth, MAX_LIST_DEPTH) + 1):
        below: list[str] = []
        for directory in level:
            try:
                with os.scandir(directory) as it:
                    items = sorted(it, key=lambda e: e.name)
            except OSError as e:
                if directory == path:
                    raise os_failure(e, path) from None
                continue
            for item in items:
                if count >= MAX_LIST_ENTRIES:
                    truncated = True
                    break
                try:
                    info = entry(item.path, names, item.stat(follow_symlinks=False))
                except OSError:
                    continue
                count += 1
                batch.append(info)
                batch_bytes += len(jsonio.dumps(info)) + 1
                if batch_bytes >= LIST_BATCH_BYTES:
                    session.send_json(Frame.EVENT, {"entries": batch})
                    batch, batch_bytes = [], 0
                if info["type"] == EntryType.DIR and d < depth:
                    below.append(item.path)
            if truncated:
                break
        if truncated:
            break
        level = below
    if batch:
        session.send_json(Frame.EVENT, {"entries": batch})
    return {"count": count, "truncated": truncated}


def make_dir(path: str, parents: bool) -> dict:
    try:
        if parents:
            os.makedirs(path)
        else:
            os.mkdir(path)
    except FileExistsError:
        if os.path.isdir(path):
            return {"created": False, "entry": entry(path, Names())}
        raise OpFailure(OpError.EXISTS, f"exists and is not a directory: {path}") from None
    return {"created": True, "entry": entry(path, Names())}


def move(path: str, to: str) -> dict:
    os.lstat(path)  # its own error first (not_found names the source)
    try:
        os.makedirs(os.path.dirname(to), exist_ok=True)
        os.rename(path, to)
    except OSError as e:
        raise os_failure(e, to) from None
    return {"entry": entry(to, Names())}


def remove(path: str, recursive: bool) -> dict:
    st = os.lstat(path)
    if not _stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return {}
    if not recursive:
        raise OpFailure(OpError.IS_A_DIRECTORY, f"is a directory (and recursive is not set): {path}")
    import shutil

    failures: list[OSError] = []
    shutil.rmtree(path, onerror=lambda _fn, _p, exc: failures.append(exc[1]))  # fd-based: no symlink race
    if failures:
        e = failures[0]
        raise os_failure(e, e.filename if isinstance(e, OSError) and e.filename else path)
    return {}
