"""herovm.hosts: host URIs, the ssh wrapper libvirt runs, the registry (HEROVM_HOME/hosts), pinned host keys,
room and placement, facts_of; and `herovm host` through typer's CliRunner. No sshd: `add` is either refused
before it connects, or given a stub RemoteLibvirtBackend.

(Not test_hosts.py: tests/integration/test_hosts.py has that basename, and tests/ has no __init__.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from typer.testing import CliRunner

from herovm import hosts, state
from herovm.backends import remote as remote_mod
from herovm.backends.base import Machine
from herovm.backends.libvirt import LibvirtBackend
from herovm.cli import app
from herovm.errors import AlreadyExists, BackendUnavailable, Busy, HeroVMError, InvalidInput, NotFound
from herovm.hosts import RESERVE, Host, HostFacts, parse_uri, place

URI = "test:///default"
GiB = 1 << 30
MiB = 1 << 20
EXAMPLE = "qemu+ssh://user@node2/system"


@pytest.fixture(autouse=True)
def home(isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HEROVM_HOME, and a HOME of the test's own: no ~/.ssh/known_hosts, no ~/.ssh/id_ed25519."""
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setenv("HOME", str(user))
    return isolated_home


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two ed25519 public keys, an RSA one, and a private key (ssh-keygen: paramiko makes no ed25519 keys)."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen")
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name, kind in (("a", "ed25519"), ("b", "ed25519"), ("r", "rsa")):
        extra = ["-b", "2048"] if kind == "rsa" else []
        subprocess.run(
            ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", "c@x", "-f", str(d / name)], check=True
        )
        out[name] = (d / f"{name}.pub").read_text().strip()  # "ssh-ed25519 AAAA... c@x"
    out["private"] = str(d / "a")
    return out


def b64(pub: str) -> str:
    return pub.split()[1]


def register(entries: dict[str, dict]) -> None:
    """hosts.json as `herovm host add` writes it (no connection)."""
    state.write_private(hosts.hosts_dir() / "hosts.json", json.dumps(entries))


def entry(uri: str = "qemu+ssh://u@node2.example/system", **extra) -> dict:
    return {"uri": uri, "identity": "/k/id", "pool": "/var/lib/herovm/pool", "accel": "tcg", **extra}


# ------------------------------------------------------------------------------------------ parse_uri


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("qemu+ssh://u@h/system", ("u", "h", 22, "/system")),
        ("qemu+ssh://u@h:2222/system", ("u", "h", 2222, "/system")),
        (
            "qemu+ssh://deploy-user@node-2.example.lan/session",
            ("deploy-user", "node-2.example.lan", 22, "/session"),
        ),
        ("qemu+ssh://u_1@10.0.0.7:22/session", ("u_1", "10.0.0.7", 22, "/session")),
        ("qemu+libssh://u@h:2200/system", ("u", "h", 2200, "/system")),
    ],
)
def test_parse_uri_accepts(uri: str, parsed: tuple) -> None:
    assert parse_uri(uri) == parsed


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        (
            "qemu:///system",
            "herovm reaches other hosts through libvirt over SSH (qemu+ssh or qemu+libssh://)",
        ),
        ("qemu+tcp://u@h/system", "through libvirt over SSH"),
        ("ssh://u@h/system", "through libvirt over SSH"),
        ("test:///default", "through libvirt over SSH"),
        ("node2", "through libvirt over SSH"),
        ("qemu+ssh://h/system", "names no user and host"),
        ("qemu+ssh://u@/system", "names no user and host"),
        ("qemu+ssh://u@h", "must end in /system or /session"),
        ("qemu+ssh://u@h/", "must end in /system or /session"),
        ("qemu+ssh://u@h/system/", "must end in /system or /session"),
        ("qemu+ssh://u@h/systemd", "must end in /system or /session"),
        ("qemu+ssh://u@h/embed", "must end in /system or /session"),
        ("qemu+ssh://u@h/system?keyfile=/tmp/k", "must end in /system or /session"),
        ("qemu+ssh://u@h/system?command=/bin/sh", "must end in /system or /session"),
        ("qemu+ssh://u@h/system#x", "must end in /system or /session"),
        ("qemu+ssh://u@h:99999/system", "is not a URI"),
        ("qemu+ssh://u@h:x/system", "is not a URI"),
        ("qemu+ssh://u;x@h/system", "'u;x' is not a user or host name"),
        ("qemu+ssh://u%20x@h/system", "is not a user or host name"),
        ("qemu+ssh://u@h$(id)/system", "is not a user or host name"),
        ("qemu+ssh://u@h`id`/system", "is not a user or host name"),
        ("qemu+ssh://u@h,x/system", "is not a user or host name"),
    ],
)
def test_parse_uri_refuses(uri: str, says: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_uri(uri)
    assert says in e.value.message
    assert repr(uri) in e.value.message  # the error names what was given
    assert EXAMPLE in (e.value.hint or "")


def test_parse_uri_refuses_a_password() -> None:
    with pytest.raises(InvalidInput):
        parse_uri("qemu+ssh://u:hunter2@h/system")


# ------------------------------------------------------------------------------ Host, the ssh wrapper


def test_known_hosts_name() -> None:
    assert Host("n", "qemu+ssh://u@h/system", "/k").known_hosts_name() == "h"
    assert Host("n", "qemu+ssh://u@h:22/system", "/k").known_hosts_name() == "h"
    assert Host("n", "qemu+ssh://u@h:2222/system", "/k").known_hosts_name() == "[h]:2222"
    v4 = Host("n", "qemu+ssh://u@10.1.2.3:2200/session", "/k")
    assert v4.address == ("u", "10.1.2.3", 2200, "/session")


def test_libvirt_uri_runs_the_wrapper_with_the_key(home: Path) -> None:
    h = Host("node2", "qemu+ssh://u@h:2222/session", "/keys/my key+1")
    uri = h.libvirt_uri()
    parts = urlsplit(uri)
    assert (parts.scheme, parts.username, parts.hostname, parts.port, parts.path) == (
        "qemu+ssh",
        "u",
        "h",
        2222,
        "/session",
    )
    query = parse_qs(parts.query, strict_parsing=True)
    assert query == {
        "keyfile": ["/keys/my key+1"],
        "command": [str(home / "hosts" / "node2.ssh")],
        "no_tty": ["1"],
    }
    assert "my%20key%2B1" in uri  # escaped in the URI, not a second parameter
    port22 = Host("node3", "qemu+ssh://u@h/system", "/k").libvirt_uri()
    assert port22.startswith("qemu+ssh://u@h:22/system?keyfile=/k&command=")
    local = hosts.local_host()
    assert local.local and local.libvirt_uri() == local.uri


def test_libvirt_uri_of_an_ipv6_host() -> None:
    h = Host("v6", "qemu+ssh://u@[fd00::7]:2222/system", "/k")
    assert h.known_hosts_name() == "[fd00::7]:2222"
    parts = urlsplit(h.libvirt_uri())
    assert (parts.hostname, parts.port) == ("fd00::7", 2222)


def test_ssh_command_writes_a_private_wrapper_and_config(home: Path) -> None:
    wrapper = hosts.ssh_command("node2")
    d = home / "hosts"
    assert wrapper == d / "node2.ssh"
    assert mode(d) == 0o700
    assert mode(wrapper) == 0o700
    config = d / "node2.ssh_config"
    assert mode(config) == 0o600
    assert wrapper.read_text() == f'#!/bin/sh\nexec ssh -F {config} "$@"\n'
    lines = config.read_text().splitlines()
    assert lines[0] == f'UserKnownHostsFile "{d / "node2.known_hosts"}"'
    assert hosts.known_hosts_file("node2") == d / "node2.known_hosts"
    for line in ("StrictHostKeyChecking yes", "GlobalKnownHostsFile /dev/null", "BatchMode yes"):
        assert line in lines
    assert hosts.ssh_command("node3") == d / "node3.ssh"  # each host its own
    assert (d / "node3.ssh_config").read_text().splitlines()[0].endswith('node3.known_hosts"')
    assert hosts.ssh_command("node2") == wrapper and mode(wrapper) == 0o700  # again: the same


def effective_ssh_config(wrapper: Path) -> dict[str, str]:
    """What OpenSSH makes of the wrapper's config (`ssh -G`: no connection)."""
    got = subprocess.run(
        [str(wrapper), "-G", "-p", "2222", "u@h.example"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return dict(line.split(" ", 1) for line in got.stdout.splitlines() if " " in line)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh")
def test_the_wrapper_runs_ssh_with_the_pinned_known_hosts(home: Path) -> None:
    seen = effective_ssh_config(hosts.ssh_command("node2"))
    assert seen["userknownhostsfile"] == str(home / "hosts" / "node2.known_hosts")
    assert seen["globalknownhostsfile"] == "/dev/null"
    assert seen["stricthostkeychecking"] == "true"
    assert seen["batchmode"] == "yes"
    assert seen["identitiesonly"] == "yes"
    assert seen["serveraliveinterval"] == "2"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh")
def test_the_wrapper_in_a_home_with_a_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spaced = tmp_path / "my  home"  # two spaces: `ssh -G` shows two files joined by one
    monkeypatch.setenv("HEROVM_HOME", str(spaced))
    seen = effective_ssh_config(hosts.ssh_command("node2"))
    assert seen["userknownhostsfile"] == str(spaced / "hosts" / "node2.known_hosts")


# ------------------------------------------------------------------------------------ pinned host keys


def test_pinned_line_from_a_given_key(keys: dict[str, str]) -> None:
    h = Host("n", "qemu+ssh://u@h.example/system", "/k")
    assert hosts._pinned_line(h, keys["a"]) == f"h.example ssh-ed25519 {b64(keys['a'])}"  # comment dropped
    assert hosts._pinned_line(h, f"ssh-ed25519 {b64(keys['a'])}") == f"h.example ssh-ed25519 {b64(keys['a'])}"
    line = f"other.example,10.0.0.9 ssh-ed25519 {b64(keys['b'])}"  # a known_hosts line: its names dropped
    assert hosts._pinned_line(h, line) == f"h.example ssh-ed25519 {b64(keys['b'])}"
    off22 = Host("n", "qemu+ssh://u@h.example:2222/system", "/k")
    assert hosts._pinned_line(off22, keys["r"]) == f"[h.example]:2222 ssh-rsa {b64(keys['r'])}"


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "ssh-ed25519",
        "ssh-ed25519 not-base64!!",
        "ssh-ed25519 AAAA",
        "ssh-unknown AAAAC3NzaC1lZDI1NTE5AAAAIN7pPKHU5RIWrzg17jE/SCNK7RJF+S9wk68a+6SqBq7x",
    ],
)
def test_pinned_line_refuses_what_is_not_a_key(bad: str) -> None:
    h = Host("n", "qemu+ssh://u@h/system", "/k")
    with pytest.raises(InvalidInput, match="--host-key is not an SSH public key") as e:
        hosts._pinned_line(h, bad)
    assert "ssh-ed25519 AAAA" in (e.value.hint or "")


def test_pinned_line_refuses_a_key_of_another_kind_than_it_says(keys: dict[str, str]) -> None:
    h = Host("n", "qemu+ssh://u@h/system", "/k")
    with pytest.raises(InvalidInput, match="not an SSH public key"):
        hosts._pinned_line(h, f"ssh-rsa {b64(keys['a'])}")  # an ed25519 blob called rsa


def test_pinned_line_from_the_users_known_hosts(home: Path, keys: dict[str, str]) -> None:
    ssh_dir = Path(os.environ["HOME"]) / ".ssh"
    ssh_dir.mkdir()
    known = ssh_dir / "known_hosts"
    known.write_text(
        f"h.example {keys['r'].rsplit(' ', 1)[0]}\n"
        f"h.example {keys['a'].rsplit(' ', 1)[0]}\n"
        f"[h.example]:2222 {keys['b'].rsplit(' ', 1)[0]}\n"
    )
    plain = Host("n", "qemu+ssh://u@h.example/system", "/k")
    off22 = Host("n", "qemu+ssh://u@h.example:2222/system", "/k")
    assert hosts._pinned_line(plain, None) == f"h.example ssh-ed25519 {b64(keys['a'])}"  # ed25519 preferred
    assert hosts._pinned_line(off22, None) == f"[h.example]:2222 ssh-ed25519 {b64(keys['b'])}"
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)  # hashed
    assert "h.example" not in known.read_text()
    assert hosts._pinned_line(plain, None) == f"h.example ssh-ed25519 {b64(keys['a'])}"
    with pytest.raises(InvalidInput, match="no host key of other.example is known"):
        hosts._pinned_line(Host("n", "qemu+ssh://u@other.example/system", "/k"), None)


def test_pinned_line_with_no_known_hosts_at_all() -> None:
    with pytest.raises(InvalidInput) as e:
        hosts._pinned_line(Host("n", "qemu+ssh://u@h.example:2222/system", "/k"), None)
    assert e.value.message.startswith("no host key of [h.example]:2222 is known: herovm never trusts")
    assert "--host-key 'ssh-ed25519 AAAA...'" in (e.value.hint or "")


# -------------------------------------------------------------------------------------- add (no sshd)


class NoConnection:
    """What `add` must not reach when it refuses: a RemoteLibvirtBackend."""

    def __init__(self, *a, **k) -> None:
        raise AssertionError("add connected before refusing")


class FakeRemote:
    """A RemoteLibvirtBackend that answers without a host (remembers what it was asked)."""

    made: list[Host] = []
    asked: list[str] = []
    fail: Exception | None = None

    def __init__(self, host: Host, timeout: float = 10.0) -> None:
        self.host = host
        FakeRemote.made.append(host)
        host.libvirt_uri()  # as the real one does: writes the wrapper

    def default_pool_path(self) -> str:
        FakeRemote.asked.append("default_pool_path")
        return hosts.default_pool(self.host.address[3], "/home/u")

    def ensure_pool(self) -> None:
        FakeRemote.asked.append(f"ensure_pool {self.host.pool}")
        if FakeRemote.fail is not None:
            raise FakeRemote.fail

    def accel(self) -> str:
        FakeRemote.asked.append("accel")
        return "kvm"

    def close(self) -> None:
        FakeRemote.asked.append("close")


@pytest.fixture
def fake_remote(monkeypatch: pytest.MonkeyPatch):
    FakeRemote.made, FakeRemote.asked, FakeRemote.fail = [], [], None
    monkeypatch.setattr(remote_mod, "RemoteLibvirtBackend", FakeRemote)
    return FakeRemote


@pytest.fixture
def no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_mod, "RemoteLibvirtBackend", NoConnection)


def hosts_files(home: Path) -> list[str]:
    d = home / "hosts"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.usefixtures("no_connection")
def test_add_refuses_before_connecting(home: Path, keys: dict[str, str]) -> None:
    key, hk = keys["private"], keys["a"]
    cases = [
        (InvalidInput, "`local` is this machine's libvirt", ("local", "qemu+ssh://u@h/system"), {}),
        (InvalidInput, "invalid host name 'Node_2'", ("Node_2", "qemu+ssh://u@h/system"), {}),
        (InvalidInput, "invalid host name '../x'", ("../x", "qemu+ssh://u@h/system"), {}),
        (InvalidInput, "through libvirt over SSH", ("node2", "qemu:///system"), {}),
        (InvalidInput, "SSH key /nonexistent/id does not exist", ("node2", "qemu+ssh://u@h/system"),
         {"identity": "/nonexistent/id"}),
        (InvalidInput, "id_ed25519 does not exist", ("node2", "qemu+ssh://u@h/system"), {}),  # ~ has no key
        (InvalidInput, "unknown accelerator 'hvf'", ("node2", "qemu+ssh://u@h/system"),
         {"identity": key, "accel": "hvf"}),
        (InvalidInput, "no host key of h is known", ("node2", "qemu+ssh://u@h/system"), {"identity": key}),
        (InvalidInput, "--host-key is not an SSH public key", ("node2", "qemu+ssh://u@h/system"),
         {"identity": key, "host_key": "ssh-ed25519 nope"}),
    ]  # fmt: skip
    for kind, says, args, kw in cases:
        with pytest.raises(kind) as e:
            hosts.add(*args, host_key=kw.pop("host_key", None), **kw)
        assert says in e.value.message, (args, kw)
    assert hosts_files(home) == []  # nothing recorded, no key pinned, no wrapper
    register({"node2": entry()})
    with pytest.raises(AlreadyExists, match="host node2 exists already"):
        hosts.add("node2", "qemu+ssh://u@h/system", identity=key, host_key=hk)
    assert hosts_files(home) == ["hosts.json"]


def test_add_records_the_host(home: Path, keys: dict[str, str], fake_remote) -> None:
    added = hosts.add(
        "node2", "qemu+ssh://u@h.example:2222/session", identity=keys["private"], host_key=keys["a"],
        max_memory=4 * GiB,
    )  # fmt: skip
    assert added.name == "node2" and added.identity == keys["private"]
    assert added.pool == "/home/u/.local/share/herovm/pool"
    assert added.accel == "kvm" and added.max_memory == 4 * GiB
    assert fake_remote.asked == ["default_pool_path", "close", f"ensure_pool {added.pool}", "accel", "close"]
    d = home / "hosts"
    assert mode(d) == 0o700 and mode(d / "hosts.json") == 0o600
    assert mode(d / "node2.known_hosts") == 0o600
    assert (d / "node2.known_hosts").read_text() == f"[h.example]:2222 ssh-ed25519 {b64(keys['a'])}\n"
    saved = json.loads((d / "hosts.json").read_text())
    assert set(saved) == {"node2"}
    assert saved["node2"]["uri"] == "qemu+ssh://u@h.example:2222/session"
    assert "name" not in saved["node2"]
    assert hosts.get("node2") == added
    assert added.row() == {
        "name": "node2",
        "uri": "qemu+ssh://u@h.example:2222/session",
        "accel": "kvm",
        "max_memory": 4 * GiB,
    }


def test_add_with_pool_and_accel_given_asks_for_neither(keys: dict[str, str], fake_remote) -> None:
    added = hosts.add(
        "node3", "qemu+ssh://u@h/system", identity=keys["private"], host_key=keys["a"], pool="/srv/p",
        accel="tcg",
    )  # fmt: skip
    assert (added.pool, added.accel) == ("/srv/p", "tcg")
    assert "default_pool_path" not in fake_remote.asked and "accel" not in fake_remote.asked


def test_add_that_cannot_connect_leaves_nothing(home: Path, keys: dict[str, str], fake_remote) -> None:
    register({"node1": entry("qemu+ssh://u@h/session")})
    hosts.known_hosts_file("node1").write_text(f"h ssh-ed25519 {b64(keys['a'])}\n")
    before = hosts_files(home)
    fake_remote.fail = BackendUnavailable("host node2 cannot be reached: refused")
    with pytest.raises(BackendUnavailable):
        hosts.add("node2", "qemu+ssh://u@h/system", identity=keys["private"], host_key=keys["b"])
    assert hosts_files(home) == before  # no node2 files left
    assert list(hosts.remote_hosts()) == ["node1"]
    # the other host at the same address keeps its key
    assert hosts.known_hosts_file("node1").read_text() == f"h ssh-ed25519 {b64(keys['a'])}\n"


# ------------------------------------------------------------------------------------------ registry


def test_no_hosts_json_means_local_only(home: Path) -> None:
    assert hosts.remote_hosts() == {}
    assert list(hosts.every_host()) == ["local"]
    assert not (home / "hosts").exists()  # reading makes nothing


def test_registry_order_and_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEROVM_LIBVIRT_URI", URI)
    register(
        {
            "zeta": entry("qemu+ssh://u@z/system"),
            "alpha": entry("qemu+ssh://u@a:2222/session", accel="kvm", max_memory=GiB, future_field=1),
            "local": {"max_memory": 2 * GiB},
            "broken": "not an entry",
        }
    )
    assert sorted(hosts.remote_hosts()) == ["alpha", "zeta"]
    every = hosts.every_host()
    assert list(every) == ["local", "alpha", "zeta"]
    assert every["local"] == Host("local", URI, max_memory=2 * GiB)
    alpha = hosts.get("alpha")
    assert (alpha.uri, alpha.accel, alpha.max_memory, alpha.identity) == (
        "qemu+ssh://u@a:2222/session",
        "kvm",
        GiB,
        "/k/id",
    )
    with pytest.raises(NotFound, match="no host 'nope'") as e:
        hosts.get("nope")
    assert "herovm host ls" in (e.value.hint or "")


def test_a_damaged_hosts_json_is_an_error(home: Path) -> None:
    (home / "hosts").mkdir(parents=True)
    (home / "hosts" / "hosts.json").write_text("{not json")
    with pytest.raises(HeroVMError, match="cannot read .*hosts.json") as e:
        hosts.remote_hosts()
    assert "host add" in (e.value.hint or "")


def test_set_limit(home: Path) -> None:
    register({"node2": entry()})
    assert hosts.set_limit("local", 2 * GiB).max_memory == 2 * GiB
    assert hosts.local_host().max_memory == 2 * GiB
    assert hosts.set_limit("node2", GiB) == hosts.get("node2")
    assert hosts.get("node2").max_memory == GiB
    assert hosts.get("node2").uri == entry()["uri"]  # the rest kept
    assert hosts.set_limit("node2", None).max_memory is None
    assert list(hosts.remote_hosts()) == ["node2"]  # `local` in hosts.json is no remote host
    with pytest.raises(NotFound):
        hosts.set_limit("nope", GiB)
    assert "nope" not in json.loads((home / "hosts" / "hosts.json").read_text())
    assert mode(home / "hosts" / "hosts.json") == 0o600


def test_host_of_vm_and_vms_on() -> None:
    for name, meta in (("a1", {"host": "node2"}), ("a2", {}), ("a3", {"host": "node3"}), ("a4", {"host": 7})):
        vmdir = state.VMDir(name)
        vmdir.create()
        vmdir.write_meta(meta)
    state.VMDir("a5").create()
    state.VMDir("a5").meta_file.write_text("{damaged")
    assert [hosts.host_of_vm(n) for n in ("a1", "a2", "a3", "a4", "a5", "never")] == [
        "node2",
        "local",
        "node3",
        "local",
        "local",
        "local",
    ]
    assert hosts.vms_on("node2") == ["a1"]
    assert hosts.vms_on("local") == ["a2", "a4", "a5"]


def test_remove(home: Path) -> None:
    register({"node2": entry("qemu+ssh://u@h/system"), "node3": entry("qemu+ssh://u@h/session")})
    for name in ("node2", "node3"):
        hosts.known_hosts_file(name).write_text("h ssh-ed25519 AAAA\n")
        hosts.ssh_command(name)
    with pytest.raises(InvalidInput, match="cannot be removed"):
        hosts.remove("local")
    with pytest.raises(NotFound, match="no host 'nope'"):
        hosts.remove("nope")
    vmdir = state.VMDir("busy1")
    vmdir.create()
    vmdir.write_meta({"host": "node2"})
    with pytest.raises(Busy) as e:
        hosts.remove("node2")
    assert e.value.message == "host node2 holds VMs of this home: busy1"
    assert "herovm down busy1" in (e.value.hint or "")
    assert sorted(hosts.remote_hosts()) == ["node2", "node3"]
    vmdir.remove()
    hosts.remove("node2")
    assert list(hosts.remote_hosts()) == ["node3"]
    assert hosts_files(home) == ["hosts.json", "node3.known_hosts", "node3.ssh", "node3.ssh_config"]
    assert hosts.known_hosts_file("node3").read_text() == "h ssh-ed25519 AAAA\n"
    with pytest.raises(NotFound):
        hosts.remove("node2")


# ------------------------------------------------------------------------------------ room, placement


def facts(name: str, free: int | None = 8 * GiB, *, reachable: bool = True, **kw) -> HostFacts:
    return HostFacts(name, f"uri-{name}", reachable, memory_free=free, **kw)


def test_room() -> None:
    assert facts("a", 4 * GiB).room() == 4 * GiB - RESERVE
    assert facts("a", 4 * GiB, max_memory=2 * GiB).room() == 2 * GiB
    assert facts("a", 4 * GiB, max_memory=2 * GiB, used_memory=GiB + 512 * MiB).room() == 512 * MiB
    assert facts("a", 4 * GiB, max_memory=GiB, used_memory=3 * GiB).room() == 0  # over its limit already
    assert facts("a", 1 * GiB, max_memory=16 * GiB).room() == GiB - RESERVE  # free memory still bounds it
    assert facts("a", RESERVE // 2).room() == 0
    assert facts("a", None).room() == 0
    assert facts("a", 8 * GiB, reachable=False, error="gone").room() == 0
    assert facts("a", 4 * GiB).to_json()["room"] == 4 * GiB - RESERVE


def test_place_most_room_wins() -> None:
    got = [facts("local", 2 * GiB), facts("node2", 6 * GiB), facts("node3", 4 * GiB)]
    assert place(got, GiB) == "node2"
    assert place(got, 5 * GiB) == "node2"
    limited = [facts("local", 2 * GiB), facts("node2", 6 * GiB, max_memory=GiB), facts("node3", 4 * GiB)]
    assert place(limited, GiB) == "node3"


def test_place_ties_go_to_the_first() -> None:
    assert place([facts("local"), facts("node2"), facts("node3")], GiB) == "local"
    assert place([facts("node3"), facts("node2")], GiB) == "node3"


def test_place_skips_unreachable_and_disallowed() -> None:
    got = [
        facts("local", 2 * GiB),
        facts("node2", 64 * GiB, reachable=False, error="x"),
        facts("node3", 32 * GiB),
    ]
    assert place(got, GiB) == "node3"
    assert place(got, GiB, lambda n: "not allowed" if n == "node3" else None) == "local"


def test_place_when_no_host_has_room_says_why_for_each() -> None:
    got = [
        facts("local", 2 * GiB),
        facts("node2", reachable=False, error="no answer in 10s"),
        facts("node3", 64 * GiB),
    ]
    with pytest.raises(HeroVMError) as e:
        place(got, 4 * GiB, lambda n: "net default is local only" if n == "node3" else None)
    assert e.value.message == (
        f"no host has room for a VM of 4096 MiB (local: room for {(2 * GiB - RESERVE) >> 20} MiB; "
        "node2: unreachable (no answer in 10s); node3: net default is local only)"
    )
    assert "--host" in (e.value.hint or "")


def test_place_needs_the_whole_vm_to_fit() -> None:
    exact = 3 * GiB
    assert place([facts("local", exact + RESERVE)], exact) == "local"
    with pytest.raises(HeroVMError, match="no host has room"):
        place([facts("local", exact + RESERVE - 1)], exact)


class StubBackend:
    def __init__(self, *, free: int = 8 * GiB, machines=(), sleep: float = 0.0, error=None) -> None:
        self.free, self.machines, self.sleep, self.error = free, list(machines), sleep, error

    def node_facts(self) -> dict:
        time.sleep(self.sleep)
        if self.error is not None:
            raise self.error
        return {"cpus": 8, "memory_free": self.free, "images": ["abc"], "accel": "ignored"}

    def list(self):
        return self.machines


def test_facts_of(monkeypatch: pytest.MonkeyPatch, backend: LibvirtBackend) -> None:
    monkeypatch.setenv("HEROVM_LIBVIRT_URI", URI)
    register({"node2": entry(accel="kvm", max_memory=4 * GiB), "node3": entry(), "node4": entry()})
    running = [
        Machine("r1", "running", {"settings": {"memory": GiB}}),
        Machine("r2", "paused", {"settings": {"memory": 512 * MiB}}),
        Machine("r3", "stopped", {"settings": {"memory": 4 * GiB}}),
        Machine("r4", "running", {}),
    ]
    t0 = time.monotonic()
    got = hosts.facts_of(
        {
            "local": backend,
            "node2": StubBackend(machines=running),
            "node3": StubBackend(error=BackendUnavailable("host node3 cannot be reached: refused")),
            "node4": StubBackend(sleep=0.8),
        },
        timeout=0.3,
    )
    assert time.monotonic() - t0 < 0.7
    by = {f.name: f for f in got}
    assert [f.name for f in got] == ["local", "node2", "node3", "node4"]
    assert by["local"].reachable and by["local"].uri == URI and by["local"].cpus
    n2 = by["node2"]
    assert (n2.reachable, n2.cpus, n2.images) == (True, 8, ["abc"])
    assert n2.accel == "kvm"  # the accelerator recorded for the host, not what it says
    assert (n2.used_memory, n2.vms_running, n2.max_memory) == (GiB + 512 * MiB, 3, 4 * GiB)
    assert n2.room() == 4 * GiB - (GiB + 512 * MiB)
    assert not by["node3"].reachable and by["node3"].error == "host node3 cannot be reached: refused"
    assert not by["node4"].reachable and by["node4"].error == "no answer in 0.3s"
    assert by["node4"].to_json()["room"] == 0


def test_facts_of_a_host_that_fails_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    monkeypatch.setenv("HEROVM_LIBVIRT_URI", URI)
    register({"node2": entry()})
    err = libvirt.libvirtError("connection reset")
    got = hosts.facts_of({"local": StubBackend(), "node2": StubBackend(error=err)}, timeout=1)
    assert [(f.name, f.reachable) for f in got] == [("local", True), ("node2", False)]


def test_facts_of_does_not_hold_the_process_at_exit(home: Path) -> None:
    register({"node2": entry()})
    script = (
        "import time\n"
        "from herovm import hosts\n"
        "class Hung:\n"
        "    def node_facts(self): time.sleep(2); return {}\n"
        "    def list(self): return []\n"
        "f = hosts.facts_of({'node2': Hung()}, timeout=0.1)\n"
        "assert [x.reachable for x in f] == [False], f\n"
    )
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert time.monotonic() - t0 < 1.5


def test_default_pool() -> None:
    assert hosts.default_pool("/system", None) == "/var/lib/herovm/pool"
    assert hosts.default_pool("/session", "/home/u") == "/home/u/.local/share/herovm/pool"
    for bad in (None, "", "relative"):
        with pytest.raises(HeroVMError, match="home directory"):
            hosts.default_pool("/session", bad)


# ----------------------------------------------------------------------------------------------- CLI


def cli(*args: str, connect: str | None = URI):
    return CliRunner().invoke(app, [*(["--connect", connect] if connect else []), *args])


def test_cli_host_ls_json_lists_local() -> None:
    result = cli("host", "ls", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["local"]
    assert rows[0]["reachable"] is True and rows[0]["error"] is None
    assert isinstance(rows[0]["cpus"], int) and rows[0]["cpus"] > 0
    assert rows[0]["room"] == max(0, rows[0]["memory_free"] - RESERVE)


def test_cli_host_ls_text() -> None:
    result = cli("host", "ls")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "ACCEL", "CPUS", "FREE", "ROOM", "VMS", "IMAGES"]
    assert lines[1].split()[:2] == ["local", "ok"]


def test_cli_host_add_local_is_refused() -> None:
    result = cli("host", "add", "local", "qemu+ssh://u@h/system", connect=None)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "herovm: error: `local` is this machine's libvirt, always there",
        "  hint: pick another name",
    ]
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.usefixtures("no_connection")
def test_cli_host_add_refusals(keys: dict[str, str]) -> None:
    result = cli("host", "add", "node2", "qemu:///system", connect=None)
    assert result.exit_code == 2
    assert result.stderr.startswith("herovm: error: host URI 'qemu:///system': herovm reaches other hosts")
    result = cli("host", "add", "node2", "qemu+ssh://u@h/system", "--identity", keys["private"], "--json")
    assert result.exit_code == 2
    err = json.loads(result.stdout)
    assert err["error"] == "InvalidInput" and err["message"].startswith("no host key of h is known")
    result = cli("host", "add", "node2", "qemu+ssh://u@h/system", "--max-memory", "lots", connect=None)
    assert result.exit_code == 2 and "max-memory" in result.stderr


def test_cli_host_set_and_rm() -> None:
    result = cli("host", "set", "local", "--max-memory", "2GB", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_memory"] == 2 * GiB
    result = cli("host", "set", "local", "--max-memory", "none")
    assert result.exit_code == 0 and result.stdout == "host local: no limit\n"
    assert cli("host", "set", "nope", "--max-memory", "1GB").exit_code == 3
    result = cli("host", "rm", "nope")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[0] == "herovm: error: no host 'nope'"
    assert cli("host", "rm", "local").exit_code == 2
    register({"node2": entry()})
    result = cli("host", "rm", "node2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"removed": "node2"}
    assert hosts.remote_hosts() == {}


def test_cli_up_on_an_unknown_host() -> None:
    result = cli("up", "x1", "--host", "nope", "--net", "restricted")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[0] == "herovm: error: no host 'nope'"
    assert state.list_vm_dirs() == []
    result = cli("up", "x1", "--host", "Bad_Host")
    assert result.exit_code == 2 and "invalid host name 'Bad_Host'" in result.stderr
