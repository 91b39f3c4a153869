"""A handle on one VM: exec (through its agent, or SSH for old images), cp, ssh, files and background
processes (through its agent: `vm.ops`, herovm/guest/ops.py), its facts, and the Manager's verbs for it
(status, stop, start, pause, resume, snapshot, restore, fork, down), typed (herovm.api_types)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from . import state
from .guest.agent_exec import AgentExec
from .guest.execution import ExecResult
from .progress import Progress
from .protocol import SSH_PORT

if TYPE_CHECKING:
    from .api_types import ForkResult, SnapshotInfo, VMStatus
    from .guest.ops import EntryInfo, GuestOps, ProcessHandle
    from .guest.ssh import GuestConnection
    from .manager import Manager
    from .record import VMRecord


class VM:
    """A handle on one VM: exec, cp, files, background processes, and its facts (`record`); made by
    `Manager.up`, `get` or `start`. Keeps its connections (the agent's, and SSH's for cp) for all its calls;
    `close()` (or `with vm:`) lets them go, `down()` removes the VM. Safe to share between threads: concurrent
    `exec`s each take a connection of their own."""

    def __init__(self, manager: Manager, record: VMRecord) -> None:
        """A handle on the VM `record` describes, through `manager` (use `Manager.get` to make one)."""
        self.manager = manager
        self.name = record.name
        self.record = record
        self._conn: GuestConnection | None = None
        self._agent: AgentExec | None = None

    @property
    def ssh_port(self) -> int | None:
        """The host port on 127.0.0.1 forwarded to the guest's SSH (None: no network, or no forward)."""
        return self.record.ssh_port

    @property
    def meta(self) -> dict:
        """The record as it is stored (JSON)."""
        return self.record.to_json()

    def _connect(self, timeout: float) -> socket.socket:
        """A stream to the guest's port 22 (sshd, and the agent's exec), as the backend reaches it."""
        connect = self.manager.backend.guest_connector(self.name, self.ssh_port)
        return connect(SSH_PORT, time.monotonic() + timeout)

    def connection(self, deadline_s: float = 30.0) -> GuestConnection:
        """The SSH connection (ssh, cp, and exec for old images), made at first use."""
        if state.VMDir(self.name).paused_file.exists():  # an SSH handshake would wait on a frozen guest
            self.manager.require_running(self.name)
        if self._conn is None or not self._conn.connected:
            from .guest.ssh import GuestConnection  # paramiko: ~90 ms to import, only SSH needs it

            self._conn = GuestConnection(
                port=self.ssh_port or SSH_PORT,  # what its messages name: the forward, or the guest's port
                client_key=state.VMDir(self.name).client_key,
                host_key=self.record.host_key,
                sock_factory=self._connect,
            )
            self._conn.connect(deadline_s)
        return self._conn

    def exec(
        self,
        command: Sequence[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | BinaryIO | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> ExecResult:
        """Run `command` in the guest as root and wait for it. A list runs as is; a string runs through
        `bash -c`. `env` adds variables, `cwd` sets the directory, `timeout` (seconds) kills it
        (`timed_out`, exit code 124), `stdin` feeds it, `on_stdout`/`on_stderr` get the output as it comes
        (it is then not in the result). The command's own failure is its exit code, not an exception;
        GuestError when the guest cannot be reached (paused, stopped: said at once)."""
        if state.VMDir(self.name).paused_file.exists():
            # A paused guest would take the connection and say nothing: ask the backend (only then).
            self.manager.require_running(self.name)
        agent = self._agent_exec()
        if agent is None:
            self.manager.require_running(self.name)
        runner = agent or self.connection()
        return runner.exec(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr
        )

    def _agent_exec(self) -> AgentExec | None:
        """Exec through the agent (no SSH), for VMs whose image's agent serves it."""
        if not self.record.agent_exec:
            return None
        if self._agent is None:
            token = state.VMDir(self.name).exec_token.read_text().strip()
            self._agent = AgentExec(
                target=self.name,
                token=token,
                connect=self._connect,
                # Asked only when the agent does not answer: a stopped or vanished VM is said at once.
                on_unreachable=lambda: self.manager.require_running(self.name),
            )
        return self._agent

    @property
    def ops(self) -> GuestOps:
        """Processes that outlive a connection, files as a guest user, directory watches: through the agent
        (herovm/guest/ops.py), on the same connections as `exec`. Needs an image whose agent serves exec."""
        agent = self._agent_exec()
        if agent is None:
            from .errors import GuestError

            raise GuestError(f"{self.name}: its image's agent does not serve ops; recreate the VM")
        from .guest.ops import GuestOps

        return GuestOps(agent)

    def port(self, guest_port: int) -> tuple[str, int]:
        """(host, port) on this host that reaches the guest's published `guest_port` (E2B's get_host,
        testcontainers' get_exposed_port); NotFound if it is not published (Manager.publish adds it)."""
        return self.manager.port(self.name, guest_port)

    def pause(self) -> None:
        """Freeze the VM (Manager.pause): no CPU used, everything kept until `resume`."""
        self.manager.pause(self.name)

    def resume(self) -> None:
        """Let the paused VM run on from where it was (Manager.resume); its clock is set to now."""
        self.manager.resume(self.name)

    def put(self, local: str | os.PathLike, remote: str) -> None:
        """Copy the local file or directory `local` to `remote` in the guest (over SSH, as root)."""
        self.manager.require_running(self.name)
        self.connection().put(local, remote)

    def get(self, remote: str, local: str | os.PathLike) -> list[str]:
        """Copy from the guest (GuestConnection.get: nothing it sends is trusted); returns the skipped
        entries, each also reported through the manager's progress (the CLI prints them on stderr)."""
        self.manager.require_running(self.name)
        return self.connection().get(
            remote, local, on_skip=lambda line: self.manager.progress(Progress("cp", line))
        )

    # ------------------------------------------------------------------------ files (through the agent)

    def read_file(self, path: str, *, user: str = "root", offset: int = 0, limit: int | None = None) -> bytes:
        """The guest file's bytes, read as `user` (a relative path is in that user's home); `offset` and
        `limit` read a part. OpError (herovm.guest.ops) with `code` "not_found", "permission", ... when it
        cannot be read."""
        return self.ops.read_file(path, user=user, offset=offset, limit=limit)

    def write_file(
        self,
        path: str,
        data: bytes | bytearray | memoryview | str | BinaryIO | Iterable[bytes],
        *,
        user: str = "root",
        mode: int | None = None,
    ) -> EntryInfo:
        """Write the guest file as `user`, atomically (a file beside it renamed over it), making missing
        parent directories; `data` is bytes, a str (UTF-8), a binary file or an iterable of bytes. An
        existing file keeps its mode unless `mode` (e.g. 0o755) is given. Returns what was written."""
        if isinstance(data, str):
            data = data.encode()
        return self.ops.write_file(path, data, user=user, mode=mode)

    def listdir(self, path: str = ".", *, user: str = "root", depth: int = 1) -> list[EntryInfo]:
        """The entries of the guest directory `path` as `user` sees them (EntryInfo: name, path, type
        "file"/"dir"/"symlink"/"other", size, mode, owner, mtime, ...); `depth` > 1 goes down that many
        levels. `[e.name for e in vm.listdir("/etc")]` is os.listdir's answer."""
        return self.ops.list_dir(path, user=user, depth=depth)

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
        """Start `command` in the background (a list: as is; a string: through `bash -c`) and return at
        once: the ProcessHandle has its `pid` and `tag`; iterate it for Output events and its End,
        `wait()` for the End with the output, `close()` to stop following (the process runs on). It
        outlives this connection: `vm.ops.connect(tag)` follows it again, `vm.ops.signal(tag)` ends it,
        `vm.ops.send_stdin(tag, data)` feeds it when started with `stdin=True`."""
        return self.ops.start_process(command, env=env, cwd=cwd, user=user, tag=tag, stdin=stdin)

    # --------------------------------------------------------------------- the Manager's verbs, for it

    def status(self) -> VMStatus:
        """The VM's facts and what its last boot came to (Manager.info; `herovm status NAME`)."""
        return self.manager.info(self.name)

    def stop(self, timeout: float = 20.0) -> None:
        """Power the guest off (its services get TERM; hard after `timeout` seconds); the disk is kept,
        `start()` boots it again. This handle's connections are closed."""
        self.close()
        self.manager.stop(self.name, timeout)

    def start(self, timeout: str | float = "5m") -> VM:
        """Boot the stopped VM again and return once it answers exec (a running VM: at once). This handle
        then describes the new boot; it is returned."""
        self.close()
        self.record = self.manager.start(self.name, timeout).record
        return self

    def down(self) -> None:
        """Remove the VM: its machine, disk, keys and state (Manager.down). Nothing is left; the handle is
        closed and of no more use."""
        self.close()
        self.manager.down(self.name)

    def snapshot(self, snap: str) -> SnapshotInfo:
        """Snapshot the VM as `snap`: running or paused, its memory and disk (it runs on); stopped, its disk
        (Manager.snapshot)."""
        from .api_types import SnapshotInfo

        return SnapshotInfo.from_json(self.manager.snapshot(self.name, snap))

    def snapshots(self) -> list[SnapshotInfo]:
        """The VM's snapshots, oldest first."""
        return self.manager.snapshot_infos(self.name)

    def restore(self, snap: str) -> SnapshotInfo:
        """Roll the VM back to its snapshot `snap` (Manager.restore); `vm_state` in the answer is the VM's
        state now. This handle's connections are closed (the guest's memory is the snapshot's)."""
        from .api_types import SnapshotInfo

        self.close()
        row = self.manager.restore(self.name, snap)
        self.record = self.manager.record(self.name)
        return SnapshotInfo.from_json(row)

    def remove_snapshot(self, snap: str) -> None:
        """Remove the VM's snapshot `snap`."""
        self.manager.remove_snapshot(self.name, snap)

    def fork(self, *names: str) -> ForkResult:
        """New VMs `names` from this running VM, each with its memory and disk as they are now (Manager.fork);
        this VM runs on. `manager.get(name)` gives a handle on each."""
        from .api_types import ForkResult

        return ForkResult.from_json(self.manager.fork(self.name, list(names)))

    def close(self) -> None:
        """Let this handle's connections go (the VM runs on); a later call makes new ones."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<herovm.VM {self.name}>"
