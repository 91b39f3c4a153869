"""Processes that outlive the connection that started them (docs/protocol.md, "Ops: processes").

Each process is started from PID 1 through the agent's reaper (processes.Processes), in its own process
group, as the user the request names. Its stdout and stderr are always drained, whether anyone follows it
or not, into one bounded buffer (PROCESS_OUTPUT_BUFFER bytes, counting 64 bytes per chunk as well, so that
many tiny writes are bounded too): the oldest output is dropped first, and a follower that was behind is
told how many bytes it missed (an EVENT `dropped`). A follower holds a cursor into that buffer, so a slow
host never slows the process nor the other followers. Stdin is queued (PROCESS_STDIN_BUFFER bytes at most)
and written by a thread of its own. After its exit, output still comes for AFTER_EXIT_S from what the
process left running; then the process has ended, and is kept (for connect and list) for ENDED_KEEP_S. At
most MAX_PROCESSES are kept; an ended one makes room first.
"""

from __future__ import annotations

import _signal
import contextlib
import itertools
import os
import subprocess
import threading
import time
from collections import deque

from herovm.protocol import (
    AFTER_EXIT_S,
    ENDED_KEEP_S,
    EXEC_ENV,
    MAX_CHUNK,
    MAX_PROCESSES,
    PROCESS_OUTPUT_BUFFER,
    PROCESS_STDIN_BUFFER,
    Frame,
    Op,
    OpError,
)

from .ops import OpFailure, User, user_of

CHUNK_OVERHEAD = 64  # what one buffered chunk counts for besides its bytes


class Proc:
    def __init__(self, popen: subprocess.Popen, request: dict, user: User, argv: list[str], cwd: str) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.tag: str | None = request.get("tag")
        self.argv, self.cwd, self.user = argv, cwd, user.name
        self.env = dict(request.get("env") or {})
        self.started = time.time()
        self.cond = threading.Condition()
        self.chunks: deque[tuple[bytes, bytes]] = deque()
        self.first = 0  # the sequence number of chunks[0]
        self.size = 0  # bytes buffered, with CHUNK_OVERHEAD per chunk
        self.start_offset = 0  # output bytes before chunks[0]: those dropped
        self.total = 0  # output bytes ever appended
        self.ended = False
        self.ended_at = 0.0
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.stdin_open = popen.stdin is not None
        self.stdin_pending = bytearray()
        self.stdin_closing = False

    @property
    def next_seq(self) -> int:
        return self.first + len(self.chunks)

    def append(self, kind: bytes, data: bytes) -> None:
        with self.cond:
            if self.ended:
                return  # after the end: dropped (docs/protocol.md)
            self.chunks.append((kind, data))
            self.total += len(data)
            self.size += len(data) + CHUNK_OVERHEAD
            while self.size > PROCESS_OUTPUT_BUFFER and len(self.chunks) > 1:
                _, old = self.chunks.popleft()
                self.first += 1
                self.size -= len(old) + CHUNK_OVERHEAD
                self.start_offset += len(old)
            self.cond.notify_all()

    def info(self) -> dict:
        return {
            "pid": self.pid,
            "tag": self.tag,
            "argv": self.argv,
            "env": self.env,
            "cwd": self.cwd,
            "user": self.user,
            "started": self.started,
            "running": not self.ended,
            "stdin": self.stdin_open and not self.stdin_closing,
            **(self.end() if self.ended else {}),
        }

    def end(self) -> dict:
        return {"event": "end", "exit_code": self.exit_code, "signal": self.signal}


class ProcessTable:
    def __init__(self, processes) -> None:
        self.processes = processes  # the agent's reaper
        self.lock = threading.Lock()
        self.procs: dict[int, Proc] = {}

    def _prune(self) -> None:
        """Forget ended processes kept longer than ENDED_KEEP_S; the caller holds the lock."""
        now = time.monotonic()
        for pid, proc in list(self.procs.items()):
            if proc.ended and now - proc.ended_at > ENDED_KEEP_S:
                del self.procs[pid]

    def start(self, request: dict) -> Proc:
        user = user_of(request)
        argv = request.get("argv") or ["/bin/bash", "-c", request["shell"]]
        cwd = user.path(request.get("cwd") or user.home)
        if not request.get("cwd") and not os.path.isdir(cwd):
            cwd = "/"  # a user without a home (nobody) starts in /
        env = dict(EXEC_ENV)
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, PWD=cwd)
        env.update(request.get("env") or {})
        if not os.path.isdir(cwd):
            raise OpFailure(OpError.NOT_FOUND, f"no such directory: {cwd}")
        with self.lock:
            self._prune()
            tag = request.get("tag")
            for pid, proc in list(self.procs.items()):
                if tag is not None and proc.tag == tag:
                    if not proc.ended:
                        raise OpFailure(OpError.EXISTS, f"a running process has the tag {tag!r}: {pid}")
                    del self.procs[pid]
            if len(self.procs) >= MAX_PROCESSES:
                ended = [p for p in self.procs.values() if p.ended]
                if not ended:
                    raise OpFailure(OpError.INVALID, f"too many processes: {MAX_PROCESSES} are running")
                del self.procs[min(ended, key=lambda p: p.ended_at).pid]
            ids = {}
            if user.uid != 0 or user.gid != 0:
                ids = {"user": user.uid, "group": user.gid, "extra_groups": user.groups}
            try:
                popen = self.processes.spawn(
                    argv,
                    stdin=subprocess.PIPE if request.get("stdin") else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    **ids,
                )
            except FileNotFoundError:
                raise OpFailure(OpError.NOT_FOUND, f"no such program: {argv[0]}") from None
            except PermissionError:
                raise OpFailure(OpError.PERMISSION, f"not allowed to run: {argv[0]}") from None
            proc = Proc(popen, request, user, argv, cwd)
            self.procs[proc.pid] = proc
        pumps = [
            threading.Thread(target=_pump, args=(proc, popen.stdout, Frame.STDOUT), daemon=True),
            threading.Thread(target=_pump, args=(proc, popen.stderr, Frame.STDERR), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        if popen.stdin is not None:
            threading.Thread(target=_write_stdin, args=(proc,), daemon=True).start()
        threading.Thread(target=self._finish, args=(proc, pumps), daemon=True).start()
        return proc

    def _finish(self, proc: Proc, pumps: list[threading.Thread]) -> None:
        code = self.processes.wait(proc.popen)
        deadline = time.monotonic() + AFTER_EXIT_S
        for pump in pumps:  # what it left running may still hold its output: wait a little for it
            pump.join(max(0.0, deadline - time.monotonic()))
        with proc.cond:
            if code is not None and code < 0:
                proc.exit_code, proc.signal = 128 - code, -code
            else:
                proc.exit_code = -1 if code is None else code
            proc.ended, proc.ended_at = True, time.monotonic()
            proc.stdin_closing = True
            proc.cond.notify_all()

    def find(self, request: dict) -> Proc:
        pid, tag = request.get("pid"), request.get("tag")
        with self.lock:
            self._prune()
            if pid is not None:
                proc = self.procs.get(pid)
            else:
                proc = next((p for p in self.procs.values() if p.tag == tag), None)
        if proc is None:
            raise OpFailure(OpError.NOT_FOUND, f"no such process: {pid if pid is not None else tag!r}")
        return proc

    def list(self) -> list[dict]:
        with self.lock:
            self._prune()
            procs = list(self.procs.values())
        return [p.info() for p in procs]


def _pump(proc: Proc, pipe, kind: bytes) -> None:
    with contextlib.suppress(OSError):
        while data := os.read(pipe.fileno(), MAX_CHUNK):
            proc.append(kind, data)
    with contextlib.suppress(OSError):
        pipe.close()


def _write_stdin(proc: Proc) -> None:
    fd = proc.popen.stdin.fileno()
    writable = True
    while True:
        with proc.cond:
            while not proc.stdin_pending and not proc.stdin_closing:
                proc.cond.wait()
            data = bytes(proc.stdin_pending)
            proc.stdin_pending.clear()
            closing = proc.stdin_closing
        view = memoryview(data)
        while writable and view:
            try:
                view = view[os.write(fd, view) :]
            except OSError:
                writable = False  # it closed its stdin: the rest is dropped, like EPIPE locally
        if closing:
            break
    with contextlib.suppress(OSError):
        proc.popen.stdin.close()


def follow(session, proc: Proc, *, replay: bool, stopped) -> dict:
    """Send `proc`'s events to the host until it ends (RESULT `end`) or the host stops following
    (RESULT `detached`): its output (all of it kept, with `replay`; else from now on), what was dropped."""
    session.send_json(Frame.EVENT, {"event": "start", "pid": proc.pid, "tag": proc.tag})
    with proc.cond:
        cursor, offset = (proc.first, proc.start_offset) if replay else (proc.next_seq, proc.total)
    while True:
        with proc.cond:
            while cursor >= proc.next_seq and not proc.ended and not stopped():
                proc.cond.wait(0.25)
            if stopped():
                return {"event": "detached"}
            lost = 0
            if cursor < proc.first:  # it was dropped before we sent it
                lost, cursor, offset = proc.start_offset - offset, proc.first, proc.start_offset
            start = cursor - proc.first
            items = list(itertools.islice(proc.chunks, start, start + 64))
            cursor += len(items)
            offset += sum(len(d) for _, d in items)
            done = proc.ended and cursor >= proc.next_seq
            end = proc.end()
        if lost:
            session.send_json(Frame.EVENT, {"event": "dropped", "bytes": lost})
        for kind, data in items:
            session.send(kind, data)
        if done:
            return end


_table: list[ProcessTable] = []
_table_lock = threading.Lock()


def table(processes) -> ProcessTable:
    with _table_lock:
        if not _table:
            _table.append(ProcessTable(processes))
        return _table[0]


def serve(session, request: dict):
    """One proc.* op: a result (dict), or a stream to follow (callable)."""
    procs = table(session.processes)
    op = request["op"]
    if op == Op.PROC_START:
        proc = procs.start(request)
        return lambda stopped: follow(session, proc, replay=True, stopped=stopped)
    if op == Op.PROC_CONNECT:
        proc = procs.find(request)
        return lambda stopped: follow(session, proc, replay=bool(request.get("replay")), stopped=stopped)
    if op == Op.PROC_LIST:
        return {"processes": procs.list()}
    proc = procs.find(request)
    if op == Op.PROC_SIGNAL:
        sig = request["signal"]
        number = sig if isinstance(sig, int) else getattr(_signal, "SIG" + sig)
        if proc.ended or not procs.processes.signal_group(proc.popen, number):
            raise OpFailure(OpError.NOT_FOUND, f"process {proc.pid} has ended")
        return {"pid": proc.pid}
    with proc.cond:
        if proc.ended:
            raise OpFailure(OpError.NOT_FOUND, f"process {proc.pid} has ended")
        if not proc.stdin_open:
            raise OpFailure(OpError.INVALID, f"process {proc.pid} was started without stdin")
        if proc.stdin_closing:
            raise OpFailure(OpError.INVALID, f"the stdin of process {proc.pid} is closed")
        if op == Op.PROC_CLOSE_STDIN:
            proc.stdin_closing = True
        else:
            data = request["data"]
            if len(proc.stdin_pending) + len(data) > PROCESS_STDIN_BUFFER:
                raise OpFailure(
                    OpError.INVALID,
                    f"the stdin of process {proc.pid} is full: {len(proc.stdin_pending)} bytes not read yet",
                )
            proc.stdin_pending += data
        proc.cond.notify_all()
    return {"pid": proc.pid}
