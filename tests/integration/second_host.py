"""A second libvirt host for integration tests, reached only through SSH on loopback.

`second_host(tmp_dir)` makes a throwaway user (`hvh` + 8 hex) and runs an sshd of its own on a free
127.0.0.1 port that lets in only that user, with a fresh client key and a fresh host key pinned in a
known_hosts file. Through it, `qemu+ssh://USER@127.0.0.1:PORT/session` (what herovm is given; the test's own
checks open the `qemu+libssh://` form, `SecondHost.libvirt_uri`) reaches the user's session
libvirtd (virt-ssh-helper on the "remote" side starts it). `SecondHost.unreachable()` drops every packet
to and from that port, so connections hang as they would when a real host goes away.

Everything is removed afterwards, also when the test fails: the nftables tables, the sshd and every
process it forked for a connection, every process of the user (its session libvirtd), and the user."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

SSHD = Path("/usr/sbin/sshd")
ADDRESS = "127.0.0.1"


def end_processes_of(name: str) -> None:
    """Every process of the test's own user was started by this test (its session libvirtd, virtlogd, QEMU):
    ended by PID, TERM then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = subprocess.run(["pgrep", "-u", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), sig)
        if not pids:
            return
        time.sleep(1)


def libssh_uri(user: str, port: int, identity: Path, known_hosts: Path) -> str:
    """The URI the tests' own checks open: libvirt's own libssh client (herovm uses OpenSSH), key only, the
    host key checked against `known_hosts` (no prompt, no ssh binary, no agent)."""
    return (
        f"qemu+libssh://{user}@{ADDRESS}:{port}/session?keyfile={quote(str(identity))}"
        f"&known_hosts={quote(str(known_hosts))}&known_hosts_verify=normal&sshauth=privkey"
    )


def known_hosts_line(port: int, host_key: str) -> str:
    return f"[{ADDRESS}]:{port} {host_key}\n"


@dataclass
class SecondHost:
    user: str
    home: Path
    port: int
    identity: Path  # the client's private key (root's, 0600)
    host_key: str  # "ssh-ed25519 AAAA...", the public part of sshd's host key
    known_hosts: Path  # pins host_key for [127.0.0.1]:port
    ssh_uri: str  # what a user would type: qemu+ssh://USER@127.0.0.1:PORT/session
    libvirt_uri: str  # the qemu+libssh:// form the tests' own checks open (single-threaded)
    _tables: set[str] = field(default_factory=set, repr=False)

    @contextlib.contextmanager
    def unreachable(self) -> Iterator[None]:
        """Packets to and from the port are dropped on loopback while inside: a new connection hangs in
        its SYN retries and an open one stops hearing back, nothing is refused. The input hook alone is
        enough: on loopback both directions come back in through it."""
        table = f"herovm_test_{uuid.uuid4().hex[:8]}"
        rules = (
            f"table inet {table} {{\n"
            "  chain input {\n"
            "    type filter hook input priority filter - 10; policy accept;\n"
            f'    iif "lo" tcp dport {self.port} drop\n'
            f'    iif "lo" tcp sport {self.port} drop\n'
            "  }\n"
            "}\n"
        )
        self._tables.add(table)
        try:
            subprocess.run(["nft", "-f", "-"], input=rules, text=True, capture_output=True, check=True)
            yield
        finally:
            _delete_table(table)
            self._tables.discard(table)


def _delete_table(table: str) -> None:
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("a second host needs a user and an sshd of its own: needs root")
    missing = [
        name
        for name, there in (
            (str(SSHD), SSHD.exists()),
            ("nft", shutil.which("nft")),
            ("virt-ssh-helper", shutil.which("virt-ssh-helper")),
        )
        if not there
    ]
    if missing:
        pytest.skip(f"a second host needs {', '.join(missing)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", path], check=True)
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    found = [int(c) for c in children]
    for child in list(found):
        found += _descendants(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _sshd_pid(pid_file: Path, config: Path) -> int | None:
    """The listener's PID, only while that PID is still our sshd (a PID read late may have been reused)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(config).encode() in cmdline else None


def _stop_sshd(pid_file: Path, config: Path) -> None:
    """The listener and what it forked for each connection (root's monitor, the user's session), by PID;
    the children first collected, since once the listener is gone they belong to init."""
    pid = _sshd_pid(pid_file, config)
    if pid is None:
        return
    pids = [pid, *_descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _remove_user(name: str) -> None:
    """Its processes first: userdel refuses a user who still runs one (its session libvirtd)."""
    for _ in range(3):
        end_processes_of(name)
        removed = subprocess.run(["userdel", "--remove", name], capture_output=True, text=True)
        if removed.returncode in (0, 6):  # 6: no such user
            return
    raise RuntimeError(f"userdel {name}: {removed.stderr.strip()}")


def _start_sshd(directory: Path, user: str, pid_file: Path) -> tuple[int, Path]:
    """sshd on a free port; another port when one picked was taken meanwhile."""
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # its privilege-separation directory
    for _ in range(5):
        port = _free_port()
        config = directory / f"sshd_config.{port}"
        config.write_text(
            f"Port {port}\n"
            f"ListenAddress {ADDRESS}\n"
            f"HostKey {directory / 'hostkey'}\n"
            f"PidFile {pid_file}\n"
            "AuthorizedKeysFile .ssh/authorized_keys\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            f"AllowUsers {user}\n"
            "StrictModes yes\n"
        )
        log = directory / "sshd.log"
        subprocess.run([SSHD, "-f", config, "-E", log], check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _sshd_pid(pid_file, config) is not None:
                with contextlib.suppress(OSError), socket.create_connection((ADDRESS, port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return port, config
            elif pid_file.exists():
                break  # the pid file of an sshd that has already exited (its port was taken)
            time.sleep(0.05)
        _stop_sshd(pid_file, config)
        pid_file.unlink(missing_ok=True)
    raise RuntimeError(f"sshd did not start: {log.read_text() if log.exists() else 'no log'}")


@contextlib.contextmanager
def second_host(tmp_dir: Path) -> Iterator[SecondHost]:
    """A second libvirt host on loopback, removed (user, sshd, processes, nft tables) on the way out."""
    _require()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    user = f"hvh{uuid.uuid4().hex[:8]}"
    pid_file = tmp_dir / "sshd.pid"
    with contextlib.ExitStack() as cleanup:
        # '*' rather than useradd's '!': sshd without PAM refuses a locked account; '*' has no password
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", user],
            check=True,
            capture_output=True,
        )
        cleanup.callback(_remove_user, user)
        entry = pwd.getpwnam(user)
        home = Path(entry.pw_dir)
        host_key = _keygen(tmp_dir / "hostkey")
        identity = tmp_dir / "client"
        _keygen(identity)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        shutil.copy(identity.with_name("client.pub"), ssh_dir / "authorized_keys")
        for path in (ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        port, config = _start_sshd(tmp_dir, user, pid_file)
        cleanup.callback(_stop_sshd, pid_file, config)
        known_hosts = tmp_dir / "known_hosts"
        known_hosts.write_text(known_hosts_line(port, host_key))
        host = SecondHost(
            user=user,
            home=home,
            port=port,
            identity=identity,
            host_key=host_key,
            known_hosts=known_hosts,
            ssh_uri=f"qemu+ssh://{user}@{ADDRESS}:{port}/session",
            libvirt_uri=libssh_uri(user, port, identity, known_hosts),
        )

        @cleanup.callback
        def _tables() -> None:
            for table in list(host._tables):
                _delete_table(table)

        yield host
