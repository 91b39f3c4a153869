"""Fleet (herovm.backends.fleet) over libvirt's test:///default driver, with stub backends for the other hosts
(no sshd, no guest), and the helpers of herovm.backends.remote: bridge, _in_thread, _image_volume,
_virtual_size, _digest.

(Named test_fleet.py: module basenames are unique across tests/, which has no __init__.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from specs import spec, unique

from herovm import hosts, state
from herovm.backends import get_backend
from herovm.backends.base import UNREACHABLE, Machine
from herovm.backends.fleet import LOCAL_ONLY, Fleet, local_backend_of
from herovm.backends.libvirt import LibvirtBackend
from herovm.backends.remote import (
    RemoteLibvirtBackend,
    _digest,
    _image_volume,
    _in_thread,
    _virtual_size,
    bridge,
)
from herovm.errors import BackendUnavailable, Busy, HeroVMError, InvalidInput, NotFound
from herovm.manager import Manager
from herovm.progress import Progress
from herovm.settings import VMSettings

URI = "test:///default"
GiB = 1 << 30


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


def node(name: str = "node2", **extra) -> hosts.Host:
    return hosts.Host(name, f"qemu+ssh://u@{name}.example/system", "/nonexistent/key", "/p", **extra)


def register(*added: hosts.Host) -> None:
    """hosts.json as `herovm host add` writes it (no connection)."""
    entries = {h.name: {k: v for k, v in h.__dict__.items() if k != "name"} for h in added}
    d = hosts.hosts_dir()
    state.write_private(d / "hosts.json", json.dumps(entries))


def vm_on(name: str, host: str | None, **meta) -> None:
    """A VM directory of this home, its vm.json recording `host` (as Manager.up writes it)."""
    vmdir = state.VMDir(name)
    vmdir.create()
    vmdir.write_meta({**({"host": host} if host else {}), **meta})


class StubRemote(RemoteLibvirtBackend):
    """Another host's backend: records calls, answers what it is told; never connects."""

    def __init__(
        self,
        host: hosts.Host,
        machines: list[Machine] | None = None,
        *,
        memory_free: int = 8 * GiB,
        list_error: Exception | None = None,
        list_sleep: float = 0.0,
    ) -> None:  # no super().__init__: no URI, no connection
        self.host = host
        self.uri = "stub://"
        self._conn = None
        self.machines = machines or []
        self.memory_free = memory_free
        self.list_error = list_error
        self.list_sleep = list_sleep
        self.calls: list[tuple] = []

    def _record(self, *call) -> None:
        self.calls.append(call)

    def define(self, spec_) -> None:
        self._record("define", spec_.name)

    def start(self, name: str) -> None:
        self._record("start", name)

    def destroy(self, name: str) -> None:
        self._record("destroy", name)

    def undefine(self, name: str) -> None:
        self._record("undefine", name)

    def get(self, name: str) -> Machine | None:
        self._record("get", name)
        return Machine(name, "running", {"on": self.host.name})

    def set_metadata(self, name: str, metadata: dict) -> None:
        self._record("set_metadata", name)

    def pause(self, name: str) -> None:
        self._record("pause", name)

    def resume(self, name: str) -> None:
        self._record("resume", name)

    def copy_console(self, name: str, dest: Path) -> None:
        self._record("copy_console", name)
        dest.write_text("remote console\n")

    def prepare(self, spec_, progress=None) -> None:
        self._record("prepare", spec_.name)

    def list(self) -> list[Machine]:
        self._record("list")
        if self.list_sleep:
            time.sleep(self.list_sleep)
        if self.list_error is not None:
            raise self.list_error
        return list(self.machines)

    def node_facts(self) -> dict:
        self._record("node_facts")
        return {"cpus": 4, "memory_free": self.memory_free, "images": []}

    def close(self) -> None:
        self._record("close")


@pytest.fixture
def fleet(backend: LibvirtBackend):
    """A Fleet over the test driver (the conftest `backend`, which cleans up its domains) and host node2."""
    h = node()
    register(h)
    f = Fleet(backend, {"node2": h}, timeout=0.5)
    f._remote["node2"] = StubRemote(h)
    return f


# ----------------------------------------------------------------------------------------- dispatch


def test_on_picks_the_backend_of_each_host(fleet: Fleet) -> None:
    assert fleet.on(None) is fleet.local
    assert fleet.on("local") is fleet.local
    assert fleet.on("node2") is fleet._remote["node2"]
    with pytest.raises(NotFound, match="no host 'nope'") as e:
        fleet.on("nope")
    assert "host ls" in (e.value.hint or "")
    assert local_backend_of(fleet) is fleet.local
    assert local_backend_of(fleet.local) is fleet.local


def test_on_makes_a_remote_backend_once_without_connecting(backend: LibvirtBackend) -> None:
    f = Fleet(backend, {"node2": node()}, timeout=0.5)
    b = f.on("node2")
    assert isinstance(b, RemoteLibvirtBackend) and b._conn is None  # opened at first use only
    assert f.on("node2") is b
    assert b.uri.startswith("qemu+ssh://u@node2.example:22/system?")


def test_calls_go_to_the_host_the_vm_directory_records(fleet: Fleet, tmp_path: Path) -> None:
    stub = fleet._remote["node2"]
    far = unique("far")
    vm_on(far, "node2")
    assert fleet.host_of(far) == "node2"
    fleet.start(far)
    fleet.pause(far)
    fleet.resume(far)
    fleet.destroy(far)
    fleet.set_metadata(far, {})
    assert fleet.get(far) == Machine(far, "running", {"on": "node2"})
    fleet.undefine(far)
    assert stub.calls == [
        ("start", far),
        ("pause", far),
        ("resume", far),
        ("destroy", far),
        ("set_metadata", far),
        ("get", far),
        ("undefine", far),
    ]
    assert fleet.local.get(far) is None  # nothing of it on the local libvirt


def test_a_local_vm_stays_on_the_local_libvirt(fleet: Fleet, tmp_path: Path) -> None:
    stub = fleet._remote["node2"]
    near = unique("near")
    vm_on(near, None)  # no host recorded: local
    fleet.define(spec(tmp_path, near))
    assert fleet.host_of(near) == "local"
    got = fleet.get(near)
    assert got is not None and got.name == near and got.state == "stopped"
    fleet.start(near)
    assert fleet.local.get(near).state == "running"
    dest = tmp_path / "console.copy"
    fleet.copy_console(near, dest)  # a local VM's console is where it is already
    assert not dest.exists()
    fleet.destroy(near)
    fleet.undefine(near)
    assert fleet.local.get(near) is None
    assert stub.calls == []


def test_define_prepare_and_console_follow_the_spec_and_record(fleet: Fleet, tmp_path: Path) -> None:
    stub = fleet._remote["node2"]
    far = unique("far")
    s = spec(tmp_path, far, metadata={"host": "node2"})
    fleet.prepare(s)
    fleet.define(s)
    assert stub.calls == [("prepare", far), ("define", far)]
    assert fleet.local.get(far) is None
    vm_on(far, "node2")
    dest = tmp_path / "console.copy"
    fleet.copy_console(far, dest)
    assert dest.read_text() == "remote console\n"
    with pytest.raises(NotFound):
        fleet.define(spec(tmp_path, unique("x"), metadata={"host": "nope"}))


def test_a_vm_recorded_on_a_host_that_was_removed_is_not_found(fleet: Fleet) -> None:
    gone = unique("gone")
    vm_on(gone, "removed-host")
    with pytest.raises(NotFound, match="no host 'removed-host'"):
        fleet.start(gone)


def test_close_closes_every_backend(fleet: Fleet) -> None:
    stub = fleet._remote["node2"]
    fleet.close()
    assert stub.calls == [("close",)]
    assert fleet.local._conn is None


# --------------------------------------------------------------------------------------------- list


def test_list_merges_every_host_sorted(fleet: Fleet, tmp_path: Path) -> None:
    near = "b" + unique("near")
    fleet.define(spec(tmp_path, near))
    fleet._remote["node2"].machines = [Machine("a-far", "running", {}), Machine("z-far", "stopped", {})]
    names = [m.name for m in fleet.list()]
    assert names == sorted(names)
    assert {"a-far", "z-far", near} <= set(names)
    assert {m.name: m.state for m in fleet.list()}["z-far"] == "stopped"


@pytest.mark.parametrize(
    "stub_kw",
    [
        {"list_error": BackendUnavailable("host node2 cannot be reached: gone")},
        {"list_sleep": 5.0},
    ],
    ids=["unavailable", "hangs"],
)
def test_list_marks_the_vms_of_a_host_that_does_not_answer(fleet: Fleet, stub_kw: dict) -> None:
    h = fleet.hosts["node2"]
    fleet._remote["node2"] = StubRemote(h, [Machine("never-seen", "running", {})], **stub_kw)
    far, near = unique("far"), unique("near")
    vm_on(far, "node2", ssh_port=2222)
    vm_on(near, None)
    t0 = time.monotonic()
    machines = {m.name: m for m in fleet.list()}
    took = time.monotonic() - t0
    assert took < 2.0, f"list waited {took:.1f}s for a host that does not answer"
    assert machines[far] == Machine(far, UNREACHABLE, {"host": "node2", "ssh_port": 2222})
    assert "never-seen" not in machines
    assert near not in machines  # a local VM directory is not the silent host's


def test_list_with_a_hanging_host_keeps_to_the_timeout_each_time(fleet: Fleet) -> None:
    fleet._remote["node2"] = StubRemote(fleet.hosts["node2"], list_sleep=5.0)
    fleet.timeout = 0.2
    t0 = time.monotonic()
    fleet.list()
    fleet.list()
    assert time.monotonic() - t0 < 1.5


# ----------------------------------------------------------------------------------------- placement


def test_place_a_named_host(fleet: Fleet) -> None:
    stub = fleet._remote["node2"]
    assert fleet.place("node2", GiB) == "node2"
    assert fleet.place("local", GiB) == "local"
    assert fleet.place("local", GiB, LOCAL_ONLY["net"]) == "local"
    with pytest.raises(NotFound, match="no host 'nope'"):
        fleet.place("nope", GiB)
    with pytest.raises(InvalidInput) as e:
        fleet.place("node2", GiB, LOCAL_ONLY["publish"])
    assert e.value.message == f"host node2: {LOCAL_ONLY['publish']}"
    assert stub.calls == []  # a named host is taken as named: nobody is asked


def test_place_local_only_asks_no_host(fleet: Fleet) -> None:
    stub = fleet._remote["node2"]
    seen: list[Progress] = []
    assert fleet.place(None, 64 * GiB, LOCAL_ONLY["net"], seen.append) == "local"
    assert stub.calls == [] and seen == []


def test_place_by_room(fleet: Fleet) -> None:
    stub = fleet._remote["node2"]
    seen: list[Progress] = []
    # the test driver's host has a few MiB free: node2 (8 GiB) has the most room
    assert fleet.place(None, GiB, None, seen.append) == "node2"
    assert ("node_facts",) in stub.calls
    assert len(seen) == 1 and seen[0].stage == "place"
    assert seen[0].message.startswith("placed on node2 (room: local 0 MiB, node2 7936 MiB;")


def test_place_with_no_room_names_each_host(fleet: Fleet) -> None:
    # (1 s, not more: facts_of's worker threads are joined when the process exits)
    fleet._remote["node2"] = StubRemote(fleet.hosts["node2"], list_sleep=1.0)
    t0 = time.monotonic()
    with pytest.raises(HeroVMError) as e:
        fleet.place(None, 64 * GiB)
    assert time.monotonic() - t0 < 2.0
    assert e.value.message.startswith("no host has room for a VM of 65536 MiB (local: room for 0 MiB; ")
    assert "node2: unreachable (no answer in 0.5s)" in e.value.message


def test_facts_of_some_hosts(fleet: Fleet) -> None:
    facts = fleet.facts(["node2"])
    assert [(f.name, f.reachable, f.cpus, f.memory_free) for f in facts] == [("node2", True, 4, 8 * GiB)]
    assert [f.name for f in fleet.facts()] == ["local", "node2"]


# ------------------------------------------------------------------ the Manager's placement, get_backend


def test_manager_without_hosts_refuses_an_unknown_host(backend: LibvirtBackend) -> None:
    m = Manager(backend)
    with pytest.raises(NotFound, match="no host 'nope'"):
        m._place("x", VMSettings(host="nope", net="restricted"))
    assert m._place("x", VMSettings(net="restricted")).name == "local"
    assert m._place("x", VMSettings(host="local", net="restricted")).local


def test_manager_on_a_connect_uri_refuses_an_added_host(backend: LibvirtBackend) -> None:
    register(node())
    with pytest.raises(InvalidInput, match="^host node2 is not used with --connect"):
        Manager(backend)._place("x", VMSettings(host="node2", net="restricted"))


def test_manager_over_a_fleet(fleet: Fleet) -> None:
    m = Manager(fleet)
    stub = fleet._remote["node2"]
    assert m._place("x", VMSettings(memory="1GB")).name == "local"  # passt: local only, nobody asked
    assert stub.calls == []
    with pytest.raises(InvalidInput, match="host node2: the default network mode"):
        m._place("x", VMSettings(host="node2"))
    with pytest.raises(InvalidInput, match="host node2: published ports"):
        m._place("x", VMSettings(host="node2", net="restricted", publish="8080"))
    chosen = m._place("x", VMSettings(host="node2", net="restricted"))
    assert chosen == hosts.get("node2") and chosen.uri == "qemu+ssh://u@node2.example/system"
    assert m._place("x", VMSettings(net="restricted", memory="1GB")).name == "node2"


def test_get_backend_is_a_fleet_once_hosts_are_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEROVM_LIBVIRT_URI", URI)
    plain = get_backend("libvirt")
    assert type(plain) is LibvirtBackend
    register(node(), node("node3"))
    fleet = get_backend("libvirt")
    assert isinstance(fleet, Fleet)
    assert fleet.local.uri == URI and sorted(fleet.hosts) == ["node2", "node3"]
    assert type(get_backend("libvirt", uri=URI)) is LibvirtBackend  # --connect: that libvirt alone


# ------------------------------------------------------------------------------------ remote helpers


def fake_stream():
    """A stream as libvirt's or paramiko's would be, backed by a socketpair: (read, write, close, far end)."""
    mine, far = socket.socketpair()
    closed = threading.Event()

    def close() -> None:
        closed.set()
        with contextlib.suppress(OSError):
            mine.shutdown(socket.SHUT_RDWR)
        mine.close()

    return (lambda: mine.recv(65536)), mine.sendall, close, far, closed


def recv_all(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_bridge_carries_bytes_both_ways() -> None:
    read, write, close, far, _ = fake_stream()
    outer = bridge(read, write, close, "t")
    outer.settimeout(2)
    far.settimeout(2)
    big = bytes(range(256)) * 4096  # 1 MiB, more than one chunk
    outer.sendall(b"to the guest")
    assert recv_all(far, 12) == b"to the guest"
    far.sendall(b"from the guest")
    assert recv_all(outer, 14) == b"from the guest"
    sender = threading.Thread(target=far.sendall, args=(big,))
    sender.start()
    assert recv_all(outer, len(big)) == big
    sender.join(2)
    outer.close()
    far.close()


def test_bridge_eof_from_the_stream_closes_the_socket() -> None:
    read, write, close, far, closed = fake_stream()
    outer = bridge(read, write, close, "t")
    outer.settimeout(2)
    far.sendall(b"last words")
    far.close()  # the stream ends
    assert recv_all(outer, 100) == b"last words"
    assert outer.recv(10) == b""
    assert closed.wait(2)
    outer.close()


def test_bridge_closing_the_socket_closes_the_stream() -> None:
    read, write, close, far, closed = fake_stream()
    outer = bridge(read, write, close, "t")
    far.settimeout(2)
    outer.sendall(b"bye")
    outer.close()
    assert closed.wait(2), "the stream was not closed when the socket was"
    assert recv_all(far, 100) == b"bye"
    assert far.recv(10) == b""
    far.close()


def test_bridge_a_failing_stream_ends_the_socket() -> None:
    def read() -> bytes:
        raise OSError("stream broke")

    closed = threading.Event()
    outer = bridge(read, lambda data: None, closed.set, "t")
    outer.settimeout(2)
    assert outer.recv(10) == b""
    assert closed.wait(2)
    outer.close()


def test_in_thread_result_exception_and_timeout() -> None:
    assert _in_thread(lambda: 42, 1.0, "answer") == 42
    assert _in_thread(lambda: None, 1.0, "none") is None

    def fail() -> None:
        raise BackendUnavailable("host gone")

    with pytest.raises(BackendUnavailable, match="host gone"):
        _in_thread(fail, 1.0, "fails")
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"slow-call: no answer in 0\.2s"):
        _in_thread(lambda: release.wait(5), 0.2, "slow-call")
    assert time.monotonic() - t0 < 1.0
    left = [t for t in threading.enumerate() if t.name == "host-slow-call"]
    assert left and all(t.daemon for t in left)  # left behind, never holding the process up
    release.set()


def test_image_volume_names() -> None:
    assert _image_volume(Path("/var/lib/herovm/images/default/0123abcd/vmlinuz")) == "img.0123abcd.vmlinuz"
    assert _image_volume(Path("/c/id-1_x/base.qcow2")) == "img.id-1_x.base.qcow2"
    for odd in ("/c/ab cd/vmlinuz", "/c/abc/x;rm", "/c/abc/x'y", "/c/abc/<x>", "/c/abc/a\nb"):
        with pytest.raises(HeroVMError, match="unexpected image file name"):
            _image_volume(Path(odd))


def test_virtual_size_of_a_qcow2(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("no qemu-img")
    disk = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "3G"], check=True)
    assert _virtual_size(disk) == 3 * GiB
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(HeroVMError, match="is not a qcow2 file"):
        _virtual_size(raw)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(HeroVMError, match="is not a qcow2 file"):
        _virtual_size(empty)


def test_virtual_size_of_a_truncated_qcow2(tmp_path: Path) -> None:
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(b"QFI\xfb\0\0\0\3")  # the magic, then cut short: no struct.error
    with pytest.raises(HeroVMError, match="is not a qcow2 file"):
        _virtual_size(cut)


def test_digest_is_the_one_the_images_manifest_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sha256 an upload is checked against comes from the image's manifest (herovm.images wrote it at
    build): the base disk is not hashed again for every host."""
    from herovm import images as images_mod

    f = tmp_path / "base.qcow2"
    data = b"disk" * 300_000  # more than one CHUNK
    f.write_bytes(data)
    recorded = hashlib.sha256(data).hexdigest()
    (tmp_path / "manifest.json").write_text(
        json.dumps({"files": {"base.qcow2": {"sha256": recorded, "bytes": len(data)}}})
    )

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(images_mod, "file_sha256", no_hashing)
    assert _digest(f) == recorded


def test_digest_of_a_file_no_manifest_names_is_its_own(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_bytes(b"kernel")
    assert _digest(f) == hashlib.sha256(b"kernel").hexdigest()  # no manifest
    (tmp_path / "manifest.json").write_text("{not json")
    assert _digest(f) == hashlib.sha256(b"kernel").hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"k": {"sha256": "short"}}}))
    assert _digest(f) == hashlib.sha256(b"kernel").hexdigest()


class _GoneRemote(StubRemote):
    """A host that does not answer: every call into its libvirt fails as a dead connection's does."""

    def get(self, name: str) -> Machine | None:
        self._record("get", name)
        raise BackendUnavailable(f"host {self.host.name} (stub://) cannot be reached: no answer in 0.5s")


def test_down_of_a_vm_on_a_host_that_does_not_answer_is_refused_unless_forced(
    backend: LibvirtBackend,
) -> None:
    """`down` cannot remove what lies on a host that does not answer; `down --force` forgets the VM here
    (its directory) and says its machine stays there, so `host rm` is possible again. A local VM is never
    forgotten that way (its domain would outlive the disk)."""
    from herovm.manager import Manager

    h = node()
    register(h)
    f = Fleet(backend, {"node2": h}, timeout=0.5)
    f._remote["node2"] = _GoneRemote(h)
    vm_on("far1", "node2")
    said: list[str] = []
    m = Manager(f, progress=lambda p: said.append(p.message))
    with pytest.raises(BackendUnavailable, match="cannot be reached"):
        m.down("far1")
    assert state.VMDir("far1").exists()
    with pytest.raises(Busy):
        hosts.remove("node2")
    m.down("far1", forget_unreachable=True)
    assert not state.VMDir("far1").exists()
    assert any("forgetting far1" in s and "its machine there stays" in s for s in said), said
    hosts.remove("node2")  # nothing recorded on it now
    assert "node2" not in hosts.remote_hosts()


def test_down_force_never_forgets_a_local_vm_whose_libvirt_is_down(tmp_path: Path) -> None:
    from herovm.manager import Manager

    vm_on("near1", None)
    m = Manager(LibvirtBackend(f"qemu+unix:///system?socket={tmp_path}/none"))
    with pytest.raises(BackendUnavailable):
        m.down("near1", forget_unreachable=True)
    assert state.VMDir("near1").exists()


def test_a_machine_no_directory_records_is_reached_on_the_host_list_found_it_on(
    backend: LibvirtBackend,
) -> None:
    """A VM forgotten with `down --force` (or whose directory was lost) is listed again once its host
    answers; `down` and `gc` then reach it there, not on the local host."""
    from herovm.manager import Manager

    h = node()
    register(h)
    f = Fleet(backend, {"node2": h}, timeout=0.5)
    far = StubRemote(h, [Machine("lost1", "stopped", {"home": str(state.home()), "host": "node2"})])
    f._remote["node2"] = far
    m = Manager(f)
    assert [r["name"] for r in m.ls()] == ["lost1"]
    m.down("lost1")
    assert ("undefine", "lost1") in far.calls
    fresh = Fleet(backend, {"node2": h}, timeout=0.5)
    fresh._remote["node2"] = far
    Manager(fresh).down("lost1")  # a new process: it looks on the hosts itself
    assert far.calls.count(("undefine", "lost1")) == 2


def test_a_remote_vms_ssh_port_is_free_on_its_host_too(backend: LibvirtBackend) -> None:
    """A port free on this machine may be taken on the VM's host: allocation asks the host, and moves on."""
    from herovm import ports

    class Busy2(StubRemote):
        def __init__(self, h: hosts.Host) -> None:
            super().__init__(h)
            self.asked: list[int] = []

        def port_in_use(self, port: int) -> bool:
            self.asked.append(port)
            return len(self.asked) <= 2  # the first two it is offered are taken there

    far = Busy2(node())
    ssh, forwards = ports.allocate(far, "restricted", ())
    assert len(far.asked) == 3 and ssh == far.asked[-1] and len(set(far.asked)) == 3
    assert forwards == ()
    assert ports.allocate(backend, "restricted", ())[0]  # the local backend is asked nothing of the kind
    assert not isinstance(backend, ports.RemotePorts)


# ------------------------------------------------------------- templates across hosts, serve's pools


def test_place_among_some_hosts(fleet: Fleet) -> None:
    stub = fleet._remote["node2"]
    assert fleet.place(None, GiB, None, among=["node2"]) == "node2"  # one candidate: nothing asked
    assert stub.calls == []
    assert fleet.place(None, GiB, None, among=["local", "node2"]) == "node2"  # the most room
    with pytest.raises(InvalidInput, match="host local is not one of node2"):
        fleet.place("local", GiB, None, among=["node2"])
    with pytest.raises(InvalidInput, match="no host can take it: the default network mode"):
        fleet.place(None, GiB, LOCAL_ONLY["net"], among=["node2"])


def test_a_template_builder_goes_where_host_says(fleet: Fleet) -> None:
    from herovm.templates import BUILDER_MARK

    m = Manager(fleet)
    marks = {BUILDER_MARK: "t"}
    assert m._place("b", VMSettings(net="restricted", memory="1GB"), marks).name == "local"
    assert m._place("b", VMSettings(host="node2", net="restricted"), marks).name == "node2"
    m.allowed_hosts = ["node2"]  # herovm serve --host node2
    assert m._place("x", VMSettings(net="restricted", memory="1GB")).name == "node2"


def _template(home: Path, name: str, facts: dict) -> None:
    d = state.ensure_dir(home / "templates" / name, 0o711)
    (d / "template.json").write_text(json.dumps(facts))


def _copy(host: str) -> dict:
    base = {"record": {"name": "b", "image": "default"}, "memory_bytes": 10, "disk_bytes": 20}
    if host == "local":
        return {**base, "memory": "memory.save"}
    return {**base, "tag": "t-1", "memory": "/p/tpl.t-1.memory.save", "disk": "/p/tpl.t-1.disk.qcow2"}


def test_template_copies_old_and_new(isolated_home: Path) -> None:
    from herovm import templates

    _template(isolated_home, "old", _copy("local"))  # written before copies: one local copy
    _template(
        isolated_home, "two", {"name": "two", "copies": {"node2": _copy("node2"), "local": _copy("local")}}
    )
    _template(isolated_home, "away", {"name": "away", "copies": {"node2": _copy("node2")}})
    old, two, away = templates.load("old"), templates.load("two"), templates.load("away")
    assert old.hosts == ["local"] and old.disk == old.path / "disk.qcow2"
    assert two.hosts == ["local", "node2"]  # local first, as host ls
    remote = two.copy("node2")
    assert remote.memory == Path("/p/tpl.t-1.memory.save") and remote.disk == Path("/p/tpl.t-1.disk.qcow2")
    remote.check_files()  # another host's volumes are checked by the clone that uses them
    assert away.disk is None and away.first.host == "node2"
    with pytest.raises(NotFound, match="template away has no copy on host local"):
        away.copy("local")
    for bad in (
        {"copies": {}},
        {"copies": {"node2": {**_copy("node2"), "tag": None}}},
        {"copies": {"local": {**_copy("local"), "memory": "../x"}}},
        {"copies": {"node2": {**_copy("node2"), "memory_bytes": "10"}}},
    ):
        _template(isolated_home, "bad", bad)
        with pytest.raises(HeroVMError, match="is damaged"):
            templates.load("bad")


def test_host_rm_is_refused_while_a_template_is_there(isolated_home: Path) -> None:
    register(node())
    _template(isolated_home, "away", {"name": "away", "copies": {"node2": _copy("node2")}})
    with pytest.raises(Busy, match="host node2 holds templates of this home: away"):
        hosts.remove("node2")


def test_template_tags_and_save_image_heads() -> None:
    from herovm.backends.remote import _template_tag
    from herovm.backends.save_image import HEADER, MAGIC, SaveImage

    assert _template_tag(Path("/pool/tpl.py-1a2b3c4d.memory.save")) == "py-1a2b3c4d"
    for bad in ("vm.x.memory.save", "tpl.a.b.memory.save", "tpl.x.disk.qcow2"):
        with pytest.raises(HeroVMError):
            _template_tag(Path(bad))
    xml = b"<domain/>"
    data = xml + b"\0" + b"\0" * 100
    head = HEADER.pack(MAGIC, 2, len(data), 1, 0, 0) + data
    image = SaveImage.parse(Path("x"), len(head) + 50, _reader_of(head))
    assert image.xml == "<domain/>" and image.stream_offset == len(head)
    assert len(image.header_for("<domain><name>a-longer-one</name></domain>")) == len(head)  # fits in place
    with pytest.raises(HeroVMError, match="truncated"):
        SaveImage.parse(Path("x"), len(head) - 1, _reader_of(head))
    with pytest.raises(HeroVMError, match="not a memory snapshot libvirt wrote"):
        SaveImage.parse(Path("x"), 999, _reader_of(b"X" * len(head)))


def _reader_of(data: bytes):
    from herovm.backends.remote import _reader

    return _reader(data)


def test_pools_per_host() -> None:
    from herovm.serve.pool import parse_pools, per_host

    assert parse_pools(["py=2", "py@node2=4"]) == {"py": 2, "py@node2": 4}
    with pytest.raises(InvalidInput, match="invalid host name"):
        parse_pools(["py@no thing=1"])
    copies = {"py": ["local", "node2"], "go": ["node2"]}
    assert per_host({"py": 2}, copies, None) == {"py@local": 2, "py@node2": 2}
    assert per_host({"py": 2}, copies, ["node2"]) == {"py@node2": 2}  # serve --host node2
    assert per_host({"py@local": 1, "go": 3}, copies, None) == {"py@local": 1, "go@node2": 3}
    with pytest.raises(ValueError, match="no copy on host local"):
        per_host({"go@local": 1}, copies, None)
    with pytest.raises(ValueError, match="no herovm template nope"):
        per_host({"nope": 1}, copies, None)
    with pytest.raises(ValueError, match="none of its templates"):
        per_host({"go": 1}, copies, ["local"])


def test_image_rm_is_refused_while_a_template_elsewhere_boots_it(isolated_home: Path) -> None:
    from herovm import images

    image_id = "0123456789ab"
    cached = isolated_home / "images" / "default" / image_id
    cached.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(cached / "base.qcow2"), "1M"], check=True)
    copy = {**_copy("node2"), "record": {"name": "b", "image": "default", "image_id": image_id}}
    _template(isolated_home, "away", {"name": "away", "copies": {"node2": copy}})
    with pytest.raises(Busy, match="template away"):
        images.remove("default")
    assert (cached / "base.qcow2").exists()


def test_template_rm_of_a_copy_on_a_host_that_does_not_answer(fleet: Fleet, isolated_home: Path) -> None:
    from herovm import templates

    class Gone(StubRemote):
        def remove_template(self, tag: str) -> list[str]:
            raise self._unreachable("no answer in 0.5s")

    class Here(StubRemote):
        removed: list[str] = []

        def remove_template(self, tag: str) -> list[str]:
            self.removed.append(tag)
            return [f"tpl.{tag}.memory.save"]

    register(node(), node("node3"))
    fleet.hosts["node3"] = node("node3")
    fleet._remote["node2"] = Gone(fleet.hosts["node2"])
    fleet._remote["node3"] = here = Here(fleet.hosts["node3"])
    copies = {"node2": _copy("node2"), "node3": {**_copy("node3"), "tag": "t-3"}}
    _template(isolated_home, "away", {"name": "away", "copies": copies})
    m = Manager(fleet)
    with pytest.raises(BackendUnavailable, match="node2") as e:
        m.remove_template("away")
    assert "template rm away --force" in (e.value.hint or "")
    assert templates.load("away").hosts == ["node2", "node3"]  # node2 comes first: nothing was removed
    assert m.remove_template("away", force=True) == ["node2"]
    assert here.removed == ["t-3"]
    with pytest.raises(NotFound):
        templates.load("away")


def test_gc_removes_what_a_killed_template_create_made_elsewhere(fleet: Fleet, isolated_home: Path) -> None:
    from herovm import templates

    removed: list[str] = []

    class Gone(StubRemote):
        def remove_template(self, tag: str) -> list[str]:
            raise self._unreachable("no answer in 0.5s")

    class Here(StubRemote):
        def remove_template(self, tag: str) -> list[str]:
            removed.append(tag)
            return []

    partial = state.ensure_dir(isolated_home / "templates" / ".t.partial", 0o700)
    state.write_private(partial / "copy.node2.json", json.dumps({"tag": "t-1"}))
    m = Manager(fleet)
    fleet._remote["node2"] = Gone(fleet.hosts["node2"])
    assert templates.leftovers(m) == []  # the host does not answer: kept, for a later gc
    assert (partial / "copy.node2.json").exists()
    fleet._remote["node2"] = Here(fleet.hosts["node2"])
    assert templates.leftovers(m) == ["partial template t"]
    assert removed == ["t-1"] and not partial.exists()
