"""Machine setup done by the agent as PID 1: the config drive, network, hostname, SSH, power-off.

Everything up to `ready` uses only the interpreter's C modules (_socket, _thread, fcntl, and _struct through
the thin `struct`) and herovm.protocol, which imports nothing: the pure-Python `socket`, `threading` and
`ctypes` cost ~0.1 s each at boot under emulation, mostly in what they import (enum, collections,
functools). System calls are made directly where a fork of a tool would cost tens of milliseconds. The
initramfs has mounted /proc, /sys, /dev, /dev/pts, /dev/shm and /run.
"""

from __future__ import annotations

import _socket
import _thread
import fcntl
import os
import struct
import time

from herovm.protocol import (
    DRIVE_FILE,
    DRIVE_FILE_ISO9660,
    DRIVE_LABEL,
    DRIVE_MAX_BYTES,
    EXEC_MAGIC,
    SSH,
    DriveConfig,
    Network,
)

from . import jsonio

SECTOR = 2048


def make_runtime_dirs() -> None:
    os.makedirs("/run/herovm", exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    os.makedirs("/var/log/herovm", exist_ok=True)
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        if not os.path.lexists(f"/dev/{name}"):
            os.symlink(target, f"/dev/{name}")


def find_drive() -> str | None:
    """The block device holding an ISO9660 volume labelled DRIVE_LABEL (its primary volume descriptor)."""
    for dev in sorted(os.listdir("/sys/block")):
        if dev.startswith(("loop", "ram")):
            continue
        try:
            with open(f"/dev/{dev}", "rb") as f:
                f.seek(32768)
                pvd = f.read(72)
        except OSError:
            continue
        if pvd[:6] == b"\x01CD001" and pvd[40:72].rstrip(b" ") == DRIVE_LABEL.encode():
            return f"/dev/{dev}"
    return None


def read_drive() -> DriveConfig:
    dev = find_drive()
    if dev is None:
        raise RuntimeError(f"no config drive (ISO9660 volume labelled {DRIVE_LABEL}) attached")
    with open(dev, "rb") as f:
        return parse_config(read_iso_file(f, DRIVE_FILE_ISO9660.encode(), DRIVE_MAX_BYTES + 1))


def read_iso_file(f, name: bytes, limit: int) -> bytes:
    """The first `limit` bytes of the file called `name` in the root directory of the ISO9660 volume `f`
    (ECMA-119: the primary volume descriptor at sector 16; directory records in the root's extent). Read
    in place: mounting would need the cdrom and isofs modules loaded at boot, and the mount() call."""
    f.seek(16 * SECTOR)
    pvd = f.read(SECTOR)
    if pvd[:6] != b"\x01CD001":
        raise ValueError("config drive: no ISO9660 primary volume descriptor")
    block = int.from_bytes(pvd[128:130], "little")
    root = pvd[156:190]
    extent, size = int.from_bytes(root[2:6], "little"), int.from_bytes(root[10:14], "little")
    f.seek(extent * block)
    directory = f.read(min(size, 1 << 20))
    pos = 0
    while pos < len(directory):
        length = directory[pos]
        if length == 0:  # records do not cross a sector: the rest of this one is padding
            pos = (pos // SECTOR + 1) * SECTOR
            continue
        record = directory[pos : pos + length]
        name_len = record[32]
        if record[33 : 33 + name_len].upper() == name and not record[25] & 0x02:  # 0x02: a directory
            f.seek(int.from_bytes(record[2:6], "little") * block)
            return f.read(min(int.from_bytes(record[10:14], "little"), limit))
        pos += length
    raise ValueError(f"config drive: no {name.decode()} in its root directory")


def parse_config(data: bytes) -> DriveConfig:
    """config.json as bytes -> the config, checked whole (DriveConfig, which the host checks with before it
    writes the drive); ValueError else. The agent reads only what this lets through, so a damaged drive is a
    clear `failed`, not a crash."""
    if len(data) > DRIVE_MAX_BYTES:
        raise ValueError(f"config drive: {DRIVE_FILE} is too large")
    try:
        config = jsonio.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"config drive: {DRIVE_FILE} is not JSON: {e}") from None
    return DriveConfig.from_json(config)


EXT4_IOC_RESIZE_FS = 0x40086610  # _IOW('f', 16, __u64)


def grow_root_filesystem() -> tuple[int, int] | None:
    """Grow the root file system to fill its disk, online; (old, new) size in bytes, or None when it fills
    it already. The image's file system is root_size and the host makes each VM's disk as large as asked
    (root_size at least): the first boot of a larger disk grows it, later boots find nothing to do."""
    st = os.stat("/")
    sysfs = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    with open(f"{sysfs}/size") as f:
        disk_bytes = int(f.read()) * 512
    with open(f"{sysfs}/uevent") as f:
        devname = next(line.split("=", 1)[1].strip() for line in f if line.startswith("DEVNAME="))
    with open(f"/dev/{devname}", "rb") as f:
        f.seek(1024)
        sb = f.read(1024)  # the ext4 superblock
    if int.from_bytes(sb[0x38:0x3A], "little") != 0xEF53:
        return None  # not ext4
    block = 1024 << int.from_bytes(sb[0x18:0x1C], "little")
    blocks = int.from_bytes(sb[0x04:0x08], "little")
    if int.from_bytes(sb[0x60:0x64], "little") & 0x80:  # INCOMPAT_64BIT
        blocks |= int.from_bytes(sb[0x150:0x154], "little") << 32
    want = disk_bytes // block
    if want <= blocks:
        return None
    fd = os.open("/", os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("Q", want))
    finally:
        os.close(fd)
    return blocks * block, want * block


class Socket(_socket.socket):
    """The conveniences of `socket.socket` the agent uses (with, accept), without importing `socket`."""

    __slots__ = ()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def accept(self) -> tuple[Socket, object]:
        fd, address = self._accept()
        return Socket(self.family, self.type, self.proto, fileno=fd), address


def setup_network(net: Network | None) -> None:
    """Loopback up; with `net`, the first NIC gets its MTU, IPv4 address and default route. Plain ioctls:
    `ip` is a ~0.1 s start under emulation (it links half a dozen libraries), these take a millisecond."""
    with Socket(_socket.AF_INET, _socket.SOCK_DGRAM) as sock:
        _link_up(sock, "lo")
        if not net:
            return
        ifaces = sorted(i for i in os.listdir("/sys/class/net") if i != "lo")
        if not ifaces:
            raise RuntimeError("no network interface found")
        dev = ifaces[0]
        address, _, prefix = net.address.partition("/")
        mask = ((0xFFFFFFFF << (32 - int(prefix or 32))) & 0xFFFFFFFF).to_bytes(4, "big")
        fcntl.ioctl(sock, SIOCSIFMTU, _ifreq(dev, struct.pack("i", net.mtu)))
        fcntl.ioctl(sock, SIOCSIFADDR, _ifreq(dev, _sockaddr_in(address)))
        fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq(dev, _sockaddr_in(_socket.inet_ntoa(mask))))
        _link_up(sock, dev)
        any_address = _sockaddr_in("0.0.0.0")
        route = struct.pack(
            "@L16s16s16sHhLPhPLLH",
            0,
            any_address,  # destination: default
            _sockaddr_in(net.gateway),
            any_address,  # netmask
            RTF_UP | RTF_GATEWAY,
            *(0,) * 8,
        )
        fcntl.ioctl(sock, SIOCADDRT, route.ljust(RTENTRY_SIZE, b"\0"))
    _announce(dev, address)
    with open("/etc/resolv.conf", "w") as f:
        f.writelines(f"nameserver {ns}\n" for ns in net.dns)


# <linux/sockios.h>, <linux/route.h>, <net/if.h>
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFMTU, SIOCADDRT = (
    0x8913,
    0x8914,
    0x8916,
    0x891C,
    0x8922,
    0x890B,
)
IFF_UP, RTF_UP, RTF_GATEWAY = 0x1, 0x1, 0x2
IFREQ_SIZE, RTENTRY_SIZE = 40, 120  # x86_64


def _ifreq(dev: str, data: bytes) -> bytes:
    return (struct.pack("16s", dev.encode()) + data).ljust(IFREQ_SIZE, b"\0")


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("HH4s8x", _socket.AF_INET, 0, _socket.inet_aton(address))


def _announce(dev: str, address: str) -> None:
    """Send a gratuitous ARP. A user-mode network (passt) learns the guest's MAC from the guest's first
    frame; a guest that has said nothing yet got the host's first connection only after a SYN retry
    (seen: 1 in 10 boots, 5 s). The frame stays on the link to the user-mode stack."""
    with open(f"/sys/class/net/{dev}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    ip = _socket.inet_aton(address)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\0" * 6 + ip  # request: who has ip
    with Socket(_socket.AF_PACKET, _socket.SOCK_RAW) as raw:
        raw.bind((dev, 0))
        raw.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)


def _link_up(sock: Socket, dev: str) -> None:
    flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(dev, b"")), 16)[0]
    fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(dev, struct.pack("H", flags | IFF_UP)))


def set_hostname(name: str) -> None:
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)
    with open("/etc/hostname", "w") as f:
        f.write(name + "\n")
    with open("/etc/hosts", "w") as f:
        f.write(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n")


def write_private(path: str, content: str, mode: int = 0o600) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(path, mode)


def install_ssh_keys(ssh: SSH) -> None:
    write_private("/etc/ssh/ssh_host_ed25519_key", ssh.host_key.rstrip("\n") + "\n")
    os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)
    write_private("/root/.ssh/authorized_keys", "".join(k.strip() + "\n" for k in ssh.authorized_keys))


def remove_ssh_keys() -> None:
    for path in ("/etc/ssh/ssh_host_ed25519_key", "/root/.ssh/authorized_keys"):
        try:  # noqa: SIM105 - contextlib is not imported at boot (its imports cost under emulation)
            os.unlink(path)
        except FileNotFoundError:
            pass


RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07), linux/random.h


def reseed(seed: bytes) -> None:
    """Mix `seed` into the kernel's input pool (a write to /dev/urandom) and reseed the CRNG from it at once
    (RNDRESEEDCRNG). A clone's CRNG and pool are its snapshot's, so two clones would otherwise draw the same
    bytes until the kernel reseeds on its own; the cloud kernel has no vmgenid driver to do it."""
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        os.write(fd, seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


class SSHListener:
    """Accepts on the SSH port and hands each connection to `sshd -i` (inetd mode). Bound before the
    bootstrap runs, so connections queue while it does, and no daemon start-up sits on the boot path.

    A connection that opens with the exec magic instead is served by the agent (exec_server): both
    clients speak first (SSH clients send their version line at once), so a peek tells them apart."""

    PEEK_WAIT_S = 2.0  # a client that waits for the server to speak first gets sshd after this
    # Every other connection costs an sshd (two processes, ~1.9 MB measured) until sshd's LoginGraceTime: 150
    # silent connections took 280 MB of a 1 GiB guest. Sessions beyond this many are refused at once.
    MAX_SSH_SESSIONS = 32

    def __init__(self, port: int, processes, exec_token: bytes | None = None, vsock: bool = False) -> None:
        self._processes = processes
        self._exec_token = exec_token
        self._sealed = False  # a template's snapshot is being taken: nothing is served (Command.SEAL)
        self._sessions = 0
        self._sessions_lock = _thread.allocate_lock()
        self.sock = Socket(_socket.AF_INET6, _socket.SOCK_STREAM)
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", port))
        self.sock.listen(64)
        self.log = open("/run/herovm/sshd.log", "ab", buffering=0)  # noqa: SIM115 - lives as long as PID 1
        _thread.start_new_thread(self._serve, (self.sock,))
        if vsock:  # Cloud Hypervisor: the host reaches SSH through vsock port 22, with no NIC at all
            self.vsock = Socket(_socket.AF_VSOCK, _socket.SOCK_STREAM)
            self.vsock.bind((_socket.VMADDR_CID_ANY, port))
            self.vsock.listen(64)
            _thread.start_new_thread(self._serve, (self.vsock,))

    def seal(self) -> None:
        self._sealed = True

    def unseal(self, exec_token: bytes | None) -> None:
        """Serve again, with this exec token: a clone's own (Command.IDENTITY)."""
        self._exec_token = exec_token
        self._sealed = False

    def _serve(self, sock: Socket) -> None:
        while True:
            conn, _ = sock.accept()
            _thread.start_new_thread(self._dispatch, (conn,))

    def _dispatch(self, conn: Socket) -> None:
        try:
            if self._sealed:
                return
            if self._exec_token is not None and self._opens_with_exec_magic(conn):
                from . import exec_server

                conn.recv(len(EXEC_MAGIC))
                exec_server.serve(conn, self._exec_token, self._processes)
                return
            with self._sessions_lock:
                full = self._sessions >= self.MAX_SSH_SESSIONS
                if not full:
                    self._sessions += 1
            if full:
                self.log.write(b"herovm: refused an SSH connection: too many SSH sessions at once\n")
                return
            try:
                self._processes.spawn(  # its exit status is dropped: only the session count needs it
                    ["/usr/sbin/sshd", "-i", "-e"],
                    on_exit=self._session_ended,
                    stdin=conn.fileno(),
                    stdout=conn.fileno(),
                    stderr=self.log,
                )
            except BaseException:
                self._session_ended(None)
                raise
        except OSError as e:
            self.log.write(f"herovm: cannot serve a connection: {e}\n".encode())
        finally:
            conn.close()

    def _session_ended(self, code: int | None) -> None:
        with self._sessions_lock:
            self._sessions -= 1

    def _opens_with_exec_magic(self, conn: Socket) -> bool:
        conn.settimeout(self.PEEK_WAIT_S)
        deadline = time.monotonic() + self.PEEK_WAIT_S
        try:
            seen = b""
            while len(seen) < len(EXEC_MAGIC) and EXEC_MAGIC.startswith(seen):
                if time.monotonic() > deadline:
                    return False
                more = conn.recv(len(EXEC_MAGIC), _socket.MSG_PEEK)  # waits only while nothing is buffered
                if not more:
                    return False
                if more == seen:
                    time.sleep(0.005)
                seen = more
            return seen == EXEC_MAGIC
        except OSError:  # the client said nothing in time: let sshd speak first
            return False
        finally:
            conn.settimeout(None)


VSOCK_MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")


def load_vsock() -> None:
    """Load the virtio vsock modules (not in the initramfs: only Cloud Hypervisor guests need them). Without
    udev nothing loads them for the device; errors show later, when the listener cannot bind."""
    import subprocess

    subprocess.run(["/usr/sbin/modprobe", "-a", "-q", *VSOCK_MODULES], check=False, capture_output=True)


MS_RDONLY, MS_REMOUNT = 1, 32


def power_off() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    os.sync()
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f]
    for target in reversed(mounts):
        if target not in ("/", "/proc", "/sys", "/dev"):
            libc.umount2(target.encode(), 0)
    libc.mount(None, b"/", None, MS_REMOUNT | MS_RDONLY, None)
    os.sync()
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
