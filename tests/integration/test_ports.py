"""Guest ports on real guests (herovm.ports, docs/ports.md): a guest serves HTTP (`python3 -m http.server`,
a bootstrap service) and the host fetches it from the 127.0.0.1:PORT that `--publish` forwarded, in each
network mode (QEMU user networking's hostfwd: nat, restricted; passt's -t: default); `herovm port` prints
that address; `port add` publishes another port on a running VM (user networking: at once) and on a stopped
one (every mode: from its next start), and both survive a snapshot's restore (user networking) and a stop
and start; the default mode refuses `port add` while the VM runs; the errors' exit codes; clones of a
template each get their own host port for its published guest port, and ports of their own."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from herovm.manager import Manager

HEROVM = [sys.executable, "-m", "herovm"]


def serve(*ports: int) -> str:
    """A bootstrap that serves /srv on each of `ports` (restarted if it dies)."""
    lines = ["!!file.write path:/srv/index.html content:'hello from the guest'"]
    lines += [
        f"!!service.start name:web{p} cmd:'python3 -m http.server {p} --directory /srv' restart:always"
        for p in ports
    ]
    return "\n".join(lines) + "\n"


def herovm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HEROVM, *args], capture_output=True, text=True, timeout=300)


def fetch(address: str, timeout: float = 60.0) -> str:
    """GET /index.html from `address` (HOST:PORT), retrying while the guest's server starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/index.html", timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def port_of(name: str, guest: int) -> str:
    r = herovm("port", name, str(guest))
    assert r.returncode == 0, r.stderr
    address = r.stdout.strip()
    assert address.startswith("127.0.0.1:")
    return address


@pytest.mark.parametrize("net", ["nat", "restricted", "default"])
def test_a_published_port_serves_the_host(net: str, unique_name, tmp_path) -> None:
    name = unique_name(net)
    boot = tmp_path / "serve.hero"
    boot.write_text(serve(8080, 9090))
    r = herovm("up", name, "--net", net, "--bootstrap", str(boot), "--publish", "8080", "--json")
    try:
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        [published] = status["ports"]
        assert published["guest_port"] == 8080 and published["host"] == "127.0.0.1"
        address = port_of(name, 8080)
        assert address == published["address"]
        assert fetch(address) == "hello from the guest"
        listing = json.loads(herovm("ls", "--json").stdout)
        assert [row["ports"] for row in listing if row["name"] == name] == [status["ports"]]
        assert f"port 8080 published on {address}" in herovm("status", name).stdout

        # not published: exit 3, and the hint says how
        r = herovm("port", name, "9090")
        assert r.returncode == 3 and f"herovm port add {name} 9090" in r.stderr

        # port add while it runs: QEMU user networking at once; passt refuses (exit 2) and says why
        if net != "default":  # taken before 9090 is published: a restore keeps the forwards the VM has now
            assert herovm("snapshot", "create", name, "s1").returncode == 0
        r = herovm("port", "add", name, "9090", "--json")
        if net == "default":
            assert r.returncode == 2, r.stdout + r.stderr
            assert "fixed while it runs" in r.stdout
            assert herovm("stop", name).returncode == 0
            r = herovm("port", "add", name, "9090", "--json")  # stopped: for its next start
            assert r.returncode == 0, r.stdout + r.stderr
            added = json.loads(r.stdout)["address"]
            assert herovm("start", name).returncode == 0
        else:
            assert r.returncode == 0, r.stderr
            added = json.loads(r.stdout)["address"]
            assert fetch(added) == "hello from the guest"
            assert herovm("snapshot", "restore", name, "s1").returncode == 0
            assert fetch(added) == "hello from the guest"
            # both forwards are in the definition: they survive a stop and start
            assert herovm("stop", name).returncode == 0
            assert herovm("start", name).returncode == 0
        assert port_of(name, 9090) == added
        assert fetch(added) == "hello from the guest"
        assert fetch(address) == "hello from the guest"
        assert herovm("port", "add", name, "9090", "--json").stdout == r.stdout  # published already: as is
    finally:
        herovm("down", name, "--force")


def test_port_errors(unique_name) -> None:
    r = herovm("port", unique_name("nope"), "8080")
    assert r.returncode == 3 and "not found" in r.stderr
    r = herovm("port", "add", unique_name("nope"), "8080")
    assert r.returncode == 3
    r = herovm("up", unique_name("none"), "--net", "none", "--publish", "8080")
    assert r.returncode == 2 and "--net none has no network" in r.stderr
    assert "hint:" in r.stderr


@pytest.fixture
def template(image, run_id: str, tmp_path) -> Iterator[str]:
    name = f"it-{run_id}-ports-tpl"
    boot = tmp_path / "serve.hero"
    boot.write_text(serve(8080, 9090))
    with Manager() as m:
        m.create_template(name, bootstrap=str(boot), net="restricted", publish=["8080"])
        try:
            yield name
        finally:
            for row in m.templates():
                for user in row["used_by"] if row["name"] == name else []:
                    with contextlib.suppress(Exception):
                        m.down(user)
            with contextlib.suppress(Exception):
                m.remove_template(name)


def test_clones_of_a_template_get_their_own_host_ports(template: str, unique_name) -> None:
    a, b = unique_name("clone"), unique_name("clone")
    r = herovm("up", a, "--template", template, "--json")
    assert r.returncode == 0, r.stderr
    r = herovm("up", b, "--template", template, "--publish", "9090", "--json")
    assert r.returncode == 0, r.stderr
    a_8080, b_8080 = port_of(a, 8080), port_of(b, 8080)
    assert a_8080 != b_8080  # the template's guest port, on a host port of each clone's own
    assert fetch(a_8080) == fetch(b_8080) == "hello from the guest"
    assert fetch(port_of(b, 9090)) == "hello from the guest"  # and a port of b's own
    assert herovm("port", a, "9090").returncode == 3
    with Manager() as m:
        assert m.get(a).port(8080) == ("127.0.0.1", int(a_8080.split(":")[1]))
