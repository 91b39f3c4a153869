"""passt, the user-mode network stack behind herovm's default network mode.

Unlike QEMU's built-in user networking, passt can refuse to map the gateway address to the host
(`--no-map-gw`); it runs in the group `herovm-net`, whose new flows to any address of this host an nftables
rule refuses (herovm/backends/hostguard.py), so a guest reaches the outside but never the host's own services,
on loopback or any other address. One passt process per
running VM: started just before QEMU, `--one-off` so it exits by itself when QEMU disconnects, and killed by
its pid file when the domain is destroyed (checked to be our passt first: pids get reused).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import BackendUnavailable, HeroVMError
from .base import GUEST_NET


def socket_path(net_dir: Path) -> Path:
    return net_dir / "passt.sock"


def _pid_path(net_dir: Path) -> Path:
    return net_dir / "passt.pid"


def start(net_dir: Path, ssh_port: int, runas: str | None, ports: Iterable[tuple[int, int]] = ()) -> None:
    """Start passt for one VM, forwarding 127.0.0.1:ssh_port to the guest's SSH and each (host, guest) of
    `ports` (published guest ports) likewise; returns once its socket accepts QEMU."""
    binary = shutil.which("passt")
    if binary is None:
        raise BackendUnavailable(
            "passt is not installed (it gives the default network mode)",
            hint="apt-get install passt (scripts/setup does), or use --net nat",
        )
    stop(net_dir)
    from . import hostguard  # only starting a VM needs it, not every CLI call

    gid = hostguard.install()
    net_dir.mkdir(mode=0o700, exist_ok=True)
    pw = pwd.getpwnam(runas) if runas else None
    if pw is not None:
        os.chown(net_dir, pw.pw_uid, gid)
    sock = socket_path(net_dir)
    sock.unlink(missing_ok=True)
    address, _, netmask = GUEST_NET["address"].partition("/")
    cmd = [
        binary,
        "--quiet",
        "--one-off",
        "--socket",
        str(sock),
        "--pid",
        str(_pid_path(net_dir)),
        "--no-map-gw",
        "--address",
        address,
        "--netmask",
        netmask,
        "--gateway",
        GUEST_NET["gateway"],
        "--dns-forward",
        GUEST_NET["dns"][0],
        "--no-dhcpv6",
        "--tcp-ports",
        f"127.0.0.1/{ssh_port}:22",
        *(arg for host, guest in ports for arg in ("--tcp-ports", f"127.0.0.1/{host}:{guest}")),
        "--udp-ports",
        "none",
    ]
    if pw is not None:
        cmd += ["--runas", f"{pw.pw_uid}:{gid}"]
    # passt daemonizes once its socket is bound: when this returns, QEMU can connect.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or not sock.exists():
        lines = [line for line in (result.stderr + result.stdout).splitlines() if "syslog" not in line]
        raise HeroVMError(f"passt did not start: {lines[-1] if lines else f'exit {result.returncode}'}")


def stop(net_dir: Path | None) -> None:
    """Stop the VM's passt if it still runs (it normally exits with QEMU)."""
    if net_dir is None:
        return
    pid = _our_pid(net_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.02)
    _pid_path(net_dir).unlink(missing_ok=True)
    socket_path(net_dir).unlink(missing_ok=True)


def _our_pid(net_dir: Path) -> int | None:
    try:
        pid = int(_pid_path(net_dir).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"passt" in cmdline and str(socket_path(net_dir)).encode() in cmdline else None
