"""Where herovm keeps things on the host: image cache, per-VM directories, locks and forwarded ports.

libvirt is the source of truth for which VMs exist; a VM directory holds what libvirt cannot: the SSH keys,
the overlay disk, the config drive, the console log and the agent socket.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .errors import Busy, HeroVMError, InvalidInput

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
NAME_RULE = "1-40 characters: lower-case letters, digits and '-', starting and ending with a letter or digit"


def validate_name(name: str, what: str = "VM", example: str = "box1") -> str:
    """Return `name` if it is a valid VM name; it becomes a path, a hostname and a libvirt domain name."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = name if isinstance(name, str) and len(name) <= 60 and name.isprintable() else repr(name)[:60]
        raise InvalidInput(f"invalid {what} name {shown!r}", hint=f"use {NAME_RULE}, e.g. {example}")
    return name


def validate_snapshot_name(name: str) -> str:
    """Return `name` if it is a valid snapshot name: the rule of VM names (it becomes a directory name)."""
    return validate_name(name, "snapshot", "clean1")


def write_private(path: Path, text: str) -> None:
    """Write `path` (0600) whole: through a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def footprint(path: Path) -> int | None:
    """What a file, or a directory's files, take on the disk (qcow2 files are sparse; a memory snapshot is
    a file for libvirt, a directory for Cloud Hypervisor); None if it is gone."""
    try:
        if not path.is_dir():
            return path.stat().st_blocks * 512
        return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())
    except OSError:
        return None


SYSTEM_HOME = Path("/var/lib/herovm")  # root's: its image cache is the one every user reads


def home() -> Path:
    """herovm's data directory: $HEROVM_HOME, else /var/lib/herovm for root, else ~/.local/share/herovm."""
    if env := os.environ.get("HEROVM_HOME"):
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_HOME
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "herovm"


def ensure_dir(path: Path, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def images_dir() -> Path:
    # QEMU (as libvirt-qemu under qemu:///system) must traverse to the image files, hence 0755.
    return ensure_dir(home() / "images", 0o755)


def shared_images_dir() -> Path | None:
    """The system-wide image cache (root's, /var/lib/herovm/images: 0755, files 0644), where a user who is
    not root finds the images root built; None where it is this herovm's own cache, or there is none."""
    shared = SYSTEM_HOME / "images"
    if os.geteuid() == 0 or shared == images_dir() or not shared.is_dir():
        return None
    return shared


def vms_dir() -> Path:
    root = ensure_dir(home(), 0o711)
    return ensure_dir(root / "vms", 0o711)


class VMDir:
    """The per-VM directory. The VM's own top directory is traversable (0711) so QEMU, and passt in its own
    group, can reach the disk, drive, socket and log; nobody else can list it, and every file in it is 0600
    (the disk holds the guest's SSH host key and whatever the guest wrote) or a socket only its owner may
    connect to. The keys live in `secrets/` (0700, files 0600)."""

    def __init__(self, name: str) -> None:
        self.name = validate_name(name)
        self.path = vms_dir() / name

    @property
    def secrets(self) -> Path:
        return self.path / "secrets"

    @property
    def client_key(self) -> Path:
        return self.secrets / "id_ed25519"

    @property
    def host_key(self) -> Path:
        return self.secrets / "ssh_host_ed25519_key"

    @property
    def exec_token(self) -> Path:
        return self.secrets / "exec_token"

    @property
    def secrets_file(self) -> Path:
        """The VM's `--secret` values (JSON), kept for every boot's config drive and nowhere else."""
        return self.secrets / "vars.json"

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def drive(self) -> Path:
        return self.path / "config.iso"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def agent_socket(self) -> Path:
        return self.path / "agent.sock"

    @property
    def net_dir(self) -> Path:
        return self.path / "net"

    @property
    def meta_file(self) -> Path:
        return self.path / "vm.json"

    @property
    def snapshots(self) -> Path:
        """The VM's snapshots (0700): one directory each, SNAP/ (snapshot.json, memory.save), made as
        .SNAP.partial/ and renamed when complete. Their frozen disks are overlays in the VM's directory,
        where QEMU reaches them (herovm.disks)."""
        return self.path / "snapshots"

    def snapshot_names(self) -> list[str]:
        """The VM's complete snapshots."""
        if not self.snapshots.is_dir():
            return []
        return sorted(p.name for p in self.snapshots.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    @property
    def paused_file(self) -> Path:
        """Present while herovm has the VM paused (it holds the time it was paused): `exec` asks the
        backend for the VM's state only when it is there, so it fails at once instead of waiting for a
        frozen guest."""
        return self.path / "paused"

    def paused_since(self) -> str | None:
        """When herovm paused the VM (UTC, ISO 8601), None if it did not."""
        try:
            return self.paused_file.read_text().strip() or None
        except OSError:
            return None

    def mark_paused(self, paused: bool) -> None:
        if not paused:
            self.paused_file.unlink(missing_ok=True)
            return
        fd = os.open(self.paused_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> None:
        ensure_dir(self.path, 0o711)
        ensure_dir(self.secrets, 0o700)

    def read_meta(self) -> dict:
        try:
            return json.loads(self.meta_file.read_text())
        except (OSError, ValueError):
            return {}

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.chmod(tmp, 0o600)
        tmp.replace(self.meta_file)

    def write_secrets(self, values: Mapping[str, str]) -> None:
        from .guest import keys

        keys.write_secret(self.secrets_file, json.dumps(dict(values)).encode())

    def read_secrets(self) -> dict[str, str]:
        """The VM's `--secret` values, {} when it has none."""
        try:
            found = json.loads(self.secrets_file.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise HeroVMError(f"cannot read the secrets of {self.name}: {e}") from e
        if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
            raise HeroVMError(f"the secrets file of {self.name} is damaged")
        return found

    def holds_secrets(self, values: Mapping[str, str]) -> bool:
        """Whether the VM was made with these secret values, compared without a timing leak."""
        import hmac

        try:
            kept = self.read_secrets()
        except HeroVMError:
            return False
        mine = json.dumps(dict(sorted(values.items()))).encode()
        return hmac.compare_digest(json.dumps(dict(sorted(kept.items()))).encode(), mine)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def lock(self, wait: float | None = None) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock on this VM name, held across create/boot/remove by one herovm process.
        `wait`: seconds to wait for another holder (None: as long as it takes; 0: fail at once)."""
        return named_lock(
            f"vm-{self.name}", wait=wait, what=f"VM {self.name}", discard_if=lambda: not self.exists()
        )


@contextlib.contextmanager
def named_lock(
    name: str,
    wait: float | None = None,
    what: str | None = None,
    discard_if: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """A lock file under HEROVM_HOME/locks. The kernel drops it when its holder dies, even by SIGKILL, so a
    crashed herovm never leaves a VM locked. The holder's PID is written into it for the error message.

    `discard_if`: checked on release, while still held; true removes the lock file (a removed VM leaves no
    lock). A waiter that opened the file before it was removed finds, once it holds the lock, that the path
    is gone or names a newer file, and starts over on that one: two holders can never hold two files of one
    name."""
    locks = ensure_dir(home() / "locks", 0o700)
    path = locks / f"{name}.lock"
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _flock(fd, deadline, what or name)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the holder before us removed this file: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            if discard_if is not None and discard_if():
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _flock(fd: int, deadline: float | None, what: str) -> None:
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise Busy(
                    f"{what} is busy: another herovm process (pid {holder}) is working on it",
                    hint="wait for it to finish, or stop that process",
                ) from None
            time.sleep(0.05)


def stale_vm_locks() -> list[str]:
    """Names whose lock file outlived their VM (herovm before 0.1 left one for every name ever used)."""
    locks = home() / "locks"
    if not locks.is_dir():
        return []
    names = (p.name[3:-5] for p in locks.glob("vm-*.lock"))
    return sorted(n for n in names if NAME_RE.match(n) and not VMDir(n).exists())


def list_vm_dirs() -> list[str]:
    root = home() / "vms"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def allocate_port(taken: set[int]) -> int:
    """A free TCP port on 127.0.0.1 that no other herovm VM has recorded. Call under the `ports` lock and
    record the port before releasing it, so concurrent `up`s never share one."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise InvalidInput("no free port on 127.0.0.1", hint="free some ports or stop other VMs")
