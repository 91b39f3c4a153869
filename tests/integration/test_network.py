"""Issue 6: what a guest can reach, per --net mode, tested from inside real guests against a server on the
host's loopback. Egress to the outside cannot be tested here (no internet); docs/faults.md says so."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import threading
import uuid

import pytest

from herovm import state
from herovm.backends import hostguard
from herovm.errors import GuestError

PROBE = """
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=4).read()
    print("reached")
except Exception as e:
    print("blocked", type(e).__name__)
"""


def probe(vm, url: str) -> str:
    r = vm.exec(["python3", "-c", PROBE, url], timeout=60)
    assert r.exit_code == 0, r
    return r.stdout.decode().split()[0]


@pytest.fixture
def host_url(http_server) -> str:
    (http_server.root / "index.html").write_text("host loopback service")
    return f"http://10.0.2.2:{http_server.server_address[1]}/index.html"


def test_default_mode_reaches_no_host_service(vm_factory, unique_name, host_url):
    vm = vm_factory(unique_name("net-default"))
    assert probe(vm, host_url) == "blocked"
    name = vm.name
    passt_pid = (state.VMDir(name).net_dir / "passt.pid").read_text().strip()
    vm.close()
    vm_factory.manager.down(name)
    alive = subprocess.run(["ps", "-p", passt_pid], capture_output=True).returncode == 0
    assert not alive, "passt ends with its VM"


CONNECT = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.settimeout(4)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("reached", s.recv(16).decode())
except Exception as e:
    print("blocked", type(e).__name__)
"""


@contextlib.contextmanager
def listeners(addresses: list[str]):
    """A TCP listener on each address, same port, answering "host"; yields the port."""
    socks = []
    port = 0
    try:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            port = sock.getsockname()[1]
            sock.listen()
            socks.append(sock)

            def serve(s=sock):
                with contextlib.suppress(OSError):
                    while True:
                        conn, _ = s.accept()
                        conn.sendall(b"host")
                        conn.close()

            threading.Thread(target=serve, daemon=True).start()
        yield port
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def extra_host_address():
    """Another address of this host (both families), on one end of a veth pair whose other end lies in a
    network namespace this test makes; both go away at the end."""
    tag = uuid.uuid4().hex[:8]
    link, peer, netns = f"hvt{tag}", f"hvp{tag}", f"herovm-test-{tag}"
    v4, v6 = "198.51.100.77", "2001:db8:77::1"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", peer], check=True)
        subprocess.run(["ip", "link", "set", peer, "netns", netns], check=True)
        subprocess.run(["ip", "addr", "add", f"{v4}/32", "dev", link], check=True)
        subprocess.run(["ip", "-6", "addr", "add", f"{v6}/128", "dev", link, "nodad"], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        yield v4, v6
    finally:
        subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_default_mode_reaches_no_host_address_at_all(vm_factory, unique_name, extra_host_address):
    """--no-map-gw alone let a guest reach a listener on the host's other addresses; the nftables rule on
    passt's group refuses them all."""
    v4, v6 = extra_host_address
    vm = vm_factory(unique_name("net-hostaddr"))
    with listeners(["127.0.0.1", v4, "::1", v6]) as port:
        # The host itself reaches all four: the listeners are real.
        for address in ("127.0.0.1", v4, "::1", v6):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.create_connection((address, port), timeout=4) as c:
                assert c.recv(16) == b"host", address
            del family
        for address in (v4, "127.0.0.1", "10.0.2.2"):
            r = vm.exec(["python3", "-c", CONNECT, address, str(port)], timeout=60)
            assert r.stdout.decode().split()[0] == "blocked", (address, r)
        has_v6 = vm.exec("ip -6 route show default | grep -q . ", timeout=30).exit_code == 0
        if has_v6:
            r = vm.exec(["python3", "-c", CONNECT, v6, str(port)], timeout=60)
            assert r.stdout.decode().split()[0] == "blocked", r
    vm.close()


def test_passt_group_cannot_open_new_flows_to_any_host_address(extra_host_address):
    """The rule itself, both families, without a guest: a process in passt's group is refused every
    address of this host, while the same process in another group is not."""
    v4, v6 = extra_host_address
    hostguard.install()
    probe = (
        "import socket,sys\n"
        "for a in sys.argv[2:]:\n"
        "    s=socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET); s.settimeout(3)\n"
        "    try: s.connect((a,int(sys.argv[1]))); print(a,'reached')\n"
        "    except OSError as e: print(a,'blocked')\n"
    )
    addresses = ["127.0.0.1", v4, "::1", v6]
    with listeners(addresses) as port:
        for group, want in ((hostguard.GROUP, "blocked"), ("nogroup", "reached")):
            r = subprocess.run(
                [
                    "setpriv",
                    "--reuid=nobody",
                    f"--regid={group}",
                    "--clear-groups",
                    "/usr/bin/python3",
                    "-c",
                    probe,
                    str(port),
                    *addresses,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [w for a in addresses for w in (a, want)], (group, r.stdout)


def test_nat_mode_reaches_the_host_and_warns(vm_factory, unique_name, host_url, recorder):
    vm = vm_factory(unique_name("net-nat"), net="nat")
    assert probe(vm, host_url) == "reached"
    # What the agent set up with ioctls: MTU, address with its prefix, default route, resolver.
    r = vm.exec(
        "cat /sys/class/net/eth0/mtu; ip -4 -o addr show eth0; ip route show default; cat /etc/resolv.conf"
    )
    assert r.stdout.split(b"\n")[0] == b"1500"
    assert b"inet 10.0.2.15/24" in r.stdout and b"default via 10.0.2.2 dev eth0" in r.stdout
    assert b"nameserver 10.0.2.3" in r.stdout
    assert any("warning: --net nat" in p.message for p in recorder.events)
    vm.close()


def test_restricted_mode_has_no_egress_but_gets_its_bootstrap_from_the_host(
    vm_factory, unique_name, http_server, host_url
):
    script = b"!!file.write path:/root/fetched content:'by the host'\n"
    (http_server.root / "boot.hero").write_bytes(script)
    url = f"http://127.0.0.1:{http_server.server_address[1]}/boot.hero"  # as the host sees it
    vm = vm_factory(
        unique_name("net-restricted"),
        net="restricted",
        bootstrap=url,
        bootstrap_sha256=hashlib.sha256(script).hexdigest(),
    )
    assert vm.exec(["cat", "/root/fetched"]).stdout == b"by the host"
    assert probe(vm, host_url) == "blocked"
    vm.close()


def test_none_mode_has_no_nic_and_still_runs_its_bootstrap(vm_factory, unique_name):
    name = unique_name("net-none")
    vm = vm_factory(name, net="none", bootstrap="!!cmd.run cmd:'ls /sys/class/net'\n")
    assert vm.ssh_port is None
    with pytest.raises(GuestError, match="no network"):
        vm.exec(["true"])
    ends = [e for e in vm_factory.manager.logs(name) if e["event"] == "action.end"]
    assert ends and ends[0]["ok"] and ends[0]["output"] == "lo\n"
