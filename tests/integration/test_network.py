"""Issue 6: what a guest can reach, per --net mode, tested from inside real guests against a server on the
host's loopback. Egress to the outside cannot be tested here (no internet); docs/faults.md says so."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from herovm import state
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
