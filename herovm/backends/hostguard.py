"""Keeps guests of the default network mode off this host's own services, on every address it has.

passt's `--no-map-gw` only stops the gateway address (10.0.2.2) from meaning the host. A guest that
connects to one of the host's real addresses (its LAN address, its IPv6 address) is connected by passt like
any outside address: a probe reached a listener on the host's LAN address that way. So passt runs with a
group of its own, `herovm-net`, and one nftables rule refuses every new flow that a socket of that group
opens to an address of this host (`fib daddr type local`: IPv4 and IPv6, all interfaces, addresses added
later included). QEMU's own user networking (`--net nat`) runs under another group and is untouched.

The one exception is DNS: passt forwards the guest's resolver (10.0.2.3) to the host's first nameserver.
When that nameserver is an address of this host (a loopback stub resolver such as 127.0.0.53), port 53 of
that address stays reachable, so names still resolve. docs/security.md says so.
"""

from __future__ import annotations

import grp
import ipaddress
import subprocess
from pathlib import Path

from ..errors import BackendUnavailable
from ..tools import which

GROUP = "herovm-net"
TABLE = "herovm"


def group_id() -> int:
    """The gid passt runs with, the group made (as a system group) on first use."""
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        pass
    groupadd = which("groupadd") or "groupadd"
    result = subprocess.run([groupadd, "--system", GROUP], capture_output=True, text=True)
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        raise BackendUnavailable(
            f"cannot create the group {GROUP} that passt runs with: {result.stderr.strip()}",
            hint="run scripts/setup as root, or use --net restricted",
        ) from None


def ruleset(gid: int, resolvers: list[str]) -> str:
    """The nftables table, replaced whole (the first two lines make `nft -f` idempotent)."""
    dns = []
    for address in resolvers:
        family = "ip6" if ipaddress.ip_address(address).version == 6 else "ip"
        for proto in ("udp", "tcp"):
            dns.append(f"    meta skgid {gid} {family} daddr {address} {proto} dport 53 accept")
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        *dns,
        f"    meta skgid {gid} ct state new fib daddr type local reject",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def local_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's first nameserver (the one passt forwards to), if it is an address of this host."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = ipaddress.ip_address(words[1].split("%")[0])
            except ValueError:
                return []
            return [str(address)] if _is_local(address) else []
    return []


def _is_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if address.is_loopback:
        return True
    ip = which("ip") or "ip"
    result = subprocess.run([ip, "route", "get", str(address)], capture_output=True, text=True, check=False)
    return result.stdout.startswith("local ")


def install() -> int:
    """Make sure the rule is in place (after a reboot nothing is); returns passt's gid. ~10 ms."""
    nft = which("nft")
    if nft is None:
        raise BackendUnavailable(
            "nftables is not installed: the default network mode needs it to keep guests off this "
            "host's own addresses",
            hint="apt-get install nftables (scripts/setup does), or use --net restricted",
        )
    gid = group_id()
    result = subprocess.run(
        [nft, "-f", "-"], input=ruleset(gid, local_resolvers()), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise BackendUnavailable(
            f"cannot install the nftables rule that keeps guests off this host: {result.stderr.strip()}",
            hint="herovm needs root (CAP_NET_ADMIN) for --net default; or use --net restricted",
        )
    return gid
