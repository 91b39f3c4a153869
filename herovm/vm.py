"""A handle on one VM: exec (through its agent, or SSH for old images), cp, ssh, and its facts."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from . import state
from .guest.agent_exec import AgentExec
from .guest.execution import ExecResult
from .progress import Progress
from .protocol import SSH_PORT

if TYPE_CHECKING:
    from .guest.ops import GuestOps
    from .guest.ssh import GuestConnection
    from .manager import Manager
    from .record import VMRecord


class VM:
    """A handle on one VM: exec, cp, and its facts (`record`). Keeps one SSH connection for all its calls."""

    def __init__(self, manager: Manager, record: VMRecord) -> None:
        self.manager = manager
        self.name = record.name
        self.record = record
        self._conn: GuestConnection | None = None
        self._agent: AgentExec | None = None

    @property
    def ssh_port(self) -> int | None:
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
        self.manager.resume(self.name)

    def put(self, local: str | os.PathLike, remote: str) -> None:
        self.manager.require_running(self.name)
        self.connection().put(local, remote)

    def get(self, remote: str, local: str | os.PathLike) -> list[str]:
        """Copy from the guest (GuestConnection.get: nothing it sends is trusted); returns the skipped
        entries, each also reported through the manager's progress (the CLI prints them on stderr)."""
        self.manager.require_running(self.name)
        return self.connection().get(
            remote, local, on_skip=lambda line: self.manager.progress(Progress("cp", line))
        )

    def close(self) -> None:
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
