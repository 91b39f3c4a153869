"""file.watch: a directory's changes, from inotify (docs/protocol.md, "Ops: watch").

inotify through ctypes (libc's inotify_init1 and inotify_add_watch): the guest has no packages beyond
Python's own. The watch is added as the user (ops.AsUser, on the stream's own thread: the kernel checks
that the user may read each directory). Recursive: every directory below is watched too, and each one
created later as it appears (MAX_WATCHES at most; beyond that, directories are not followed and the
`watching` event says so). Events go out in batches, one EVENT per read of the inotify queue (split to stay
well under MAX_REPLY); the kernel's queue overflowing is said (`overflow`). A file.write's temporary
file is not reported: its rename onto the target is, as `create` then `write` of the target. The watch
ends when the host stops it (KILL), hangs up, or the watched directory itself goes away.
"""

from __future__ import annotations

import os
import select
import struct
import threading

from herovm.protocol import MAX_WATCH_STREAMS, MAX_WATCHES, Frame, OpError, WatchType

from .ops import AsUser, OpFailure, os_failure

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
    | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
)  # fmt: skip
# inotify's events as E2B's (fsnotify's): what each bit says, in this order when one event has several
TYPES = (
    (IN_CREATE | IN_MOVED_TO, WatchType.CREATE),
    (IN_MODIFY, WatchType.WRITE),
    (IN_DELETE | IN_DELETE_SELF, WatchType.REMOVE),
    (IN_MOVED_FROM | IN_MOVE_SELF, WatchType.RENAME),
    (IN_ATTRIB, WatchType.CHMOD),
)
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len
BATCH_BYTES = 256 << 10

_streams = 0
_streams_lock = threading.Lock()
_libc: list = []


def _inotify():
    if not _libc:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        _libc.extend((libc, ctypes))
    return _libc


def start(session, path: str, user, recursive: bool):
    """Check the directory and take a slot now (FAILED at once when it cannot be watched); the stream
    itself runs in the op's thread."""
    global _streams
    with _streams_lock:
        if _streams >= MAX_WATCH_STREAMS:
            raise OpFailure(OpError.INVALID, f"too many watches: {MAX_WATCH_STREAMS} at once")
        _streams += 1
    try:
        watch = Watch(path, user, recursive)
    except BaseException:
        _release()
        raise

    def follow(stopped) -> dict:
        try:
            return watch.run(session, stopped)
        finally:
            watch.close()
            _release()

    return follow


def _is_write_temp(name: bytes) -> bool:
    """`.NAME.herovm-<12 hex>`: what ops_files.write writes before its rename."""
    head, _, tail = name.rpartition(b".herovm-")
    return (
        name.startswith(b".")
        and bool(head)
        and len(tail) == 12
        and all(c in b"0123456789abcdef" for c in tail)
    )


def _release() -> None:
    global _streams
    with _streams_lock:
        _streams -= 1


class Watch:
    def __init__(self, path: str, user, recursive: bool) -> None:
        libc, ctypes = _inotify()
        self.root, self.user, self.recursive = path, user, recursive
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise os_failure(OSError(err, os.strerror(err)), path)
        self.dirs: dict[int, str] = {}  # watch descriptor -> its directory, relative to the root ("" itself)
        self.full = False
        self.temps: dict[int, bool] = {}  # cookies of renames whose source was a file.write's temporary file
        with AsUser(user):
            self._add("")  # the root: its error is the op's
            if recursive:
                self._add_below("")

    def close(self) -> None:
        os.close(self.fd)

    def _add(self, rel: str) -> bool:
        if len(self.dirs) >= MAX_WATCHES:
            self.full = True
            return False
        libc, ctypes = _libc
        path = os.path.join(self.root, rel) if rel else self.root
        wd = libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if not rel:
                raise os_failure(OSError(err, os.strerror(err)), path)
            return False  # a directory below that went away or that the user cannot read
        self.dirs[wd] = rel
        return True

    def _add_below(self, rel: str) -> None:
        top = os.path.join(self.root, rel) if rel else self.root
        for directory, subdirs, _ in os.walk(top):  # not into symlinks
            for sub in subdirs:
                added = self._add(os.path.relpath(os.path.join(directory, sub), self.root))
                if not added and self.full:
                    return

    def run(self, session, stopped) -> dict:
        session.send_json(
            Frame.EVENT,
            {"event": "watching", "path": self.root, "dirs": len(self.dirs), "complete": not self.full},
        )
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        with AsUser(self.user):  # directories added later are the user's to read too
            while not stopped():
                if not poller.poll(250):
                    continue
                try:
                    data = os.read(self.fd, 64 << 10)
                except BlockingIOError:
                    continue
                events, overflow, gone = self._parse(data)
                self._send(session, events, overflow)
                if gone:
                    return {"event": "end", "reason": "removed"}
        return {"event": "end", "reason": "stopped"}

    def _parse(self, data: bytes) -> tuple[list[dict], bool, bool]:
        events: list[dict] = []
        overflow = gone = False
        if len(self.temps) > 1000:
            self.temps.clear()
        at = 0
        while at + EVENT.size <= len(data):
            wd, mask, cookie, length = EVENT.unpack_from(data, at)
            raw = data[at + EVENT.size : at + EVENT.size + length].split(b"\0", 1)[0]
            at += EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            rel = self.dirs.get(wd)
            if rel is None:
                continue
            if mask & IN_IGNORED:
                del self.dirs[wd]
                gone = gone or rel == ""
                continue
            name = os.path.join(rel, os.fsdecode(raw)) if raw else rel
            if _is_write_temp(raw):  # a file.write's temporary file: its rename says `create`, `write`
                if mask & IN_MOVED_FROM:
                    self.temps[cookie] = True
                continue
            if mask & IN_MOVED_TO and self.temps.pop(cookie, False):
                events.extend(
                    ({"type": WatchType.CREATE, "name": name}, {"type": WatchType.WRITE, "name": name})
                )
                continue
            if rel and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                continue  # a directory below: its parent's watch says it (delete, moved_from)
            for bits, kind in TYPES:
                if mask & bits:
                    events.append({"type": kind, "name": name})
                    break
            new_dir = self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO)
            if new_dir and self._add(name):
                self._add_below(name)
        return events, overflow, gone

    def _send(self, session, events: list[dict], overflow: bool) -> None:
        batch: list[dict] = []
        size = 0
        for event in events:
            batch.append(event)
            size += len(event["name"]) * 6 + 40  # JSON escapes a character into at most 6
            if size >= BATCH_BYTES:
                session.send_json(Frame.EVENT, {"events": batch})
                batch, size = [], 0
        if batch or overflow:
            session.send_json(Frame.EVENT, {"events": batch, **({"overflow": True} if overflow else {})})
