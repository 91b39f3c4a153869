"""libvirt domains for the cloud-init and floor guests, and the host-side probes every variant shares.

The domains copy herovm's device model (herovm/_data/templates/libvirt-domain.xml.j2): direct kernel boot,
virtio disk plus a read-only virtio disk for the seed, serial console to a file, virtio-rng, ACPI, no USB or
balloon, QEMU user-mode networking with one forward 127.0.0.1:PORT -> guest:22 on a NIC in slot 0x10. The one
difference: `restrict=on`, so these guests reach nothing but their forward and QEMU's DHCP.

Names start with `bench-`. A domain is always destroyed, undefined and its directory removed on the way out
of `BenchDomain` (errors and Ctrl-C included); `cleanup_all()` sweeps whatever a signal left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from herovm import state

libvirt.registerErrorHandler(lambda *_: None, None)

URI = "qemu:///system"
_live: dict[str, Path] = {}  # domain name -> its directory, until removed
_live_lock = threading.Lock()


def runs_dir() -> Path:
    # 0711 like herovm's VM directories: QEMU (libvirt-qemu) must reach the disk, seed and console files.
    return state.ensure_dir(state.home() / "bench-runs", 0o711)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def domain_xml(
    name: str,
    *,
    accel: str,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    console: Path,
    ssh_port: int,
    disk: Path | None = None,
    seed: Path | None = None,
    memory_mib: int = 1024,
) -> str:
    disks = ""
    if disk is not None:
        disks += (
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>"
            f"<source file='{escape(str(disk))}'/><target dev='vda' bus='virtio'/></disk>\n"
        )
    if seed is not None:
        disks += (
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{escape(str(seed))}'/><target dev='vdb' bus='virtio'/><readonly/></disk>\n"
        )
    return f"""<domain type='{"kvm" if accel == "kvm" else "qemu"}'
        xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(name)}</name>
  <title>herovm benchmark {escape(name)}</title>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {disks}
    <serial type='file'><source path='{escape(str(console))}' append='on'/><target port='0'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=hostnet0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=hostnet0,addr=0x10'/>
  </qemu:commandline>
</domain>
"""


class BenchDomain:
    """One transient guest: a directory, a defined domain; removed on exit whatever happened.

    with BenchDomain("bench-x-floor-0") as d:
        d.define(xml); t0 = d.start(); ...
    """

    def __init__(self, name: str) -> None:
        if not re.fullmatch(r"bench-[a-z0-9-]{1,50}", name):
            raise ValueError(f"benchmark domain names start with bench-: {name!r}")
        self.name = name
        self.dir = runs_dir() / name
        self.conn: libvirt.virConnect | None = None
        self.dom: libvirt.virDomain | None = None

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    def __enter__(self) -> BenchDomain:
        self.conn = libvirt.open(URI)
        with _live_lock:
            _live[self.name] = self.dir
        shutil.rmtree(self.dir, ignore_errors=True)
        state.ensure_dir(self.dir, 0o711)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            remove_domain(self.name, self.conn)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            with _live_lock:
                _live.pop(self.name, None)
            if self.conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.close()

    def define(self, xml: str) -> None:
        assert self.conn is not None
        self.dom = self.conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)

    def start(self) -> float:
        """Start the domain; returns the monotonic time taken just before asking libvirt."""
        assert self.dom is not None
        t0 = time.monotonic()
        self.dom.create()
        return t0

    def is_active(self) -> bool:
        try:
            return bool(self.dom and self.dom.isActive())
        except libvirt.libvirtError:
            return False

    def qemu_pid(self) -> int | None:
        return qemu_pid(self.name)


def remove_domain(name: str, conn: libvirt.virConnect | None = None) -> None:
    own = conn is None
    conn = conn or libvirt.open(URI)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        for flags in (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE, 0):
            try:
                dom.undefineFlags(flags)
                return
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
    finally:
        if own:
            conn.close()


def cleanup_all() -> None:
    """Remove every benchmark domain this process defined and has not removed yet."""
    with _live_lock:
        left = dict(_live)
    for name, path in left.items():
        with contextlib.suppress(Exception):
            remove_domain(name)
        shutil.rmtree(path, ignore_errors=True)
        with _live_lock:
            _live.pop(name, None)


def machine_load(run_id: str) -> dict:
    """What else this machine is doing: the 1-minute load average and the running domains that are not
    this run's (other engineers' tests share the 2 cores, and TCG guests are CPU-bound)."""
    others = []
    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(URI)
        try:
            others = [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        finally:
            conn.close()
    return {"load1": os.getloadavg()[0], "other_guests": [n for n in others if f"bench-{run_id}" not in n]}


def qemu_pid(domain: str) -> int | None:
    try:
        return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------ probes


class ConsoleWatcher:
    """Follows a console file as it grows (every 10 ms) and timestamps each line as it appears."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0 = path, t0
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"console {path.parent.name}")
        self._thread.start()

    def _run(self) -> None:
        offset, partial = 0, b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                now = time.monotonic() - self.t0
                offset += len(chunk)
                partial += chunk
                *done, partial = re.split(rb"\r?\n", partial)
                with self._cond:
                    for raw in done:
                        text = raw.decode("utf-8", "replace").strip()
                        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).strip()
                        if text:
                            self.lines.append((now, text))
                    self._cond.notify_all()
            else:
                time.sleep(0.01)

    def first_line(self) -> tuple[float, str] | None:
        with self._cond:
            return self.lines[0] if self.lines else None

    def wait_for(self, pattern: str, deadline: float) -> tuple[float, re.Match] | None:
        """The first line matching `pattern` (seconds since t0 and the match), waiting until `deadline`."""
        rx = re.compile(pattern)
        seen = 0
        with self._cond:
            while True:
                for t, text in self.lines[seen:]:
                    if m := rx.search(text):
                        return t, m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class SSHBannerProbe:
    """Records when a TCP connect to 127.0.0.1:PORT first yields an SSH banner (a try every 100 ms)."""

    def __init__(self, port: int, t0: float, deadline: float) -> None:
        self.port, self.t0, self.deadline = port, t0, deadline
        self.at: float | None = None
        self.banner = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"ssh-probe {port}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(3)
                    # Both sides of SSH send their version line at once; sending ours first also gets an
                    # answer through forwarders that connect to the guest only when the client speaks
                    # (passt does: a silent client there waits forever for the banner).
                    s.sendall(b"SSH-2.0-herovm-bench-probe\r\n")
                    data = s.recv(256)
                    if data.startswith(b"SSH-"):
                        self.at = time.monotonic() - self.t0
                        self.banner = data.decode("ascii", "replace").strip()
                        return
            except OSError:
                pass
            self._stop.wait(0.1)

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        return self.at

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def versions() -> dict:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            return out.splitlines()[0].strip() if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    conn = libvirt.open(URI)
    try:
        lv = conn.getLibVersion()
        qv = conn.getVersion()
    finally:
        conn.close()
    return {
        "libvirt": f"{lv // 1000000}.{lv // 1000 % 1000}.{lv % 1000}",
        "qemu": f"{qv // 1000000}.{qv // 1000 % 1000}.{qv % 1000}",
        "qemu_binary": first_line(["qemu-system-x86_64", "--version"]),
    }
