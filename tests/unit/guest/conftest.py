"""A private, real OpenSSH server on 127.0.0.1 for the guest SSH tests (and scripts/bench_exec_local.py).

The launcher lives here once; the bench script imports this module by path.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from herovm.guest.keys import generate_keypair

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (racy, good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sshd_unavailable_reason() -> str | None:
    if not os.path.exists(SSHD):
        return f"{SSHD} is not installed"
    if not PRIVSEP_DIR.is_dir():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(PRIVSEP_DIR, 0o755)
        except OSError as exc:
            return f"sshd needs its privilege separation dir {PRIVSEP_DIR}: {exc}"
    return None


@dataclass
class ClientKeys:
    """A client key pair plus one host key pair, as herovm makes them for a VM."""

    directory: Path
    client_key: Path = field(init=False)
    client_public: str = field(init=False)
    host_key: Path = field(init=False)
    host_public: str = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.client_key = self.directory / "client_ed25519"
        self.client_public = generate_keypair(self.client_key, comment="herovm-test-client")
        self.host_key = self.directory / "host_ed25519"
        self.host_public = generate_keypair(self.host_key, comment="herovm-test-host")


class LocalSshd:
    """``sshd -D -e`` on 127.0.0.1:<port> with its own host key and authorized_keys.

    ``start()`` returns once the server accepts TCP connections; ``stop()`` kills exactly the PID we
    started. Use ``port=`` to bind a port chosen in advance (e.g. to test connect retries), and
    ``sftp=`` for another ``Subsystem sftp`` command line (e.g. a hostile SFTP server; no spaces in paths).
    """

    def __init__(
        self,
        workdir: Path,
        keys: ClientKeys,
        *,
        port: int | None = None,
        clean_home: bool = True,
        sftp: str = "internal-sftp",
    ) -> None:
        self.workdir = workdir
        self.sftp = sftp
        self.clean_home = clean_home
        self.keys = keys
        self.port = port if port is not None else free_port()
        self.user = getpass.getuser()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "sshd.log"
        self.config_path = workdir / "sshd_config"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        authorized = self.workdir / "authorized_keys"
        options = ""
        if self.clean_home:
            # Point HOME at an empty directory for sessions, so the login shell does not source this
            # machine's ~/.bashrc (bash does so for ssh sessions; here that costs ~90 ms per exec).
            home = self.workdir / "home"
            home.mkdir(exist_ok=True)
            options = f'environment="HOME={home}" '
        authorized.write_text(options + self.keys.client_public + "\n")
        self.config_path.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {self.port}",
                    f"HostKey {self.keys.host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    "PidFile none",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UseDNS no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "MaxSessions 64",
                    "MaxStartups 100:30:200",
                    f"Subsystem sftp {self.sftp}",
                    "PermitUserEnvironment HOME",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )

    def start(self, *, wait: bool = True, wait_s: float = 10.0) -> LocalSshd:
        reason = sshd_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        if wait:
            self.wait_listening(wait_s)
        return self

    def wait_listening(self, wait_s: float = 10.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + wait_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    log = self.log_path.read_text()
                    raise RuntimeError(f"sshd did not listen on port {self.port}: {log}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # exactly the PID we started, never by name
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> LocalSshd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> ClientKeys:
    return ClientKeys(tmp_path_factory.mktemp("guest-keys"))


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory, session_keys: ClientKeys) -> Iterator[LocalSshd]:
    reason = sshd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = LocalSshd(tmp_path_factory.mktemp("sshd"), session_keys).start()
    try:
        yield server
    finally:
        server.stop()
