"""herovm.Manager over libvirt's test driver (test:///default): input checks, cleanup after failures, ls,
down, status and logs, and whole `up`s against a fake agent answering on the agent socket as the guest would.

The test driver runs no guest, so the image is faked (real files, a real qcow2 base) and, where a test
needs a boot, a thread plays the agent: it waits until libvirt says the domain runs, reads the nonce from the
config drive the manager wrote, and serves the agent socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from specs import define_in_vmdir, spec

from herovm import images, state
from herovm.backends.libvirt import PREFIX, LibvirtBackend
from herovm.bootstrap import Bootstrap, load_bootstrap
from herovm.errors import AlreadyExists, BootFailed, HeroVMError, InvalidInput, NotFound
from herovm.guest import configdrive
from herovm.guest.events import CONSOLE_PREFIX
from herovm.manager import Manager
from herovm.progress import Progress
from herovm.protocol import BOOTSTRAP_LIMIT
from herovm.protocol_host import describe_event
from herovm.record import VMRecord

URI = "test:///default"
_counter = itertools.count()
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def unique(prefix: str = "m") -> str:
    return f"{prefix}{next(_counter)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home  # short: the agent socket path must fit in a sockaddr_un


@pytest.fixture
def no_image(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """images.ensure that records calls and refuses: input errors must come before any image work."""
    calls: list[str] = []

    def ensure(name: str = "default", progress=None) -> images.Image:
        calls.append(name)
        raise AssertionError("images.ensure reached: the input should have been rejected first")

    monkeypatch.setattr(images, "ensure", ensure)
    return calls


@pytest.fixture
def progress() -> list[Progress]:
    return []


@pytest.fixture
def manager(backend, progress) -> Manager:
    return Manager(backend, progress=progress.append)


def make_image(root: Path, cmdline: str = "console=ttyS0 root=/dev/vda rw") -> images.Image:
    path = root / "image"
    path.mkdir(parents=True)
    (path / "vmlinuz").write_bytes(b"kernel")
    (path / "initrd.img").write_bytes(b"initrd")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "base.qcow2"), "1G"], check=True)
    return images.Image("default", "fakeid000001", path, {"cmdline": cmdline, "root_size": 1 << 30})


@pytest.fixture
def fake_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> images.Image:
    img = make_image(tmp_path)
    monkeypatch.setattr(images, "ensure", lambda name="default", progress=None: img)
    return img


def assert_nothing_left(backend: LibvirtBackend, name: str) -> None:
    assert backend.get(name) is None
    c = libvirt.open(URI)
    try:
        assert PREFIX + name not in [d.name() for d in c.listAllDomains()]
    finally:
        c.close()
    assert not state.VMDir(name).path.exists()
    assert state.list_vm_dirs() == []
    assert not (state.home() / "locks" / f"vm-{name}.lock").exists()


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"memory": "1X"}, "memory: '1X' is not a size; give a unit"),
        ({"memory": "12"}, "memory: '12' is not a size; give a unit"),
        ({"memory": "64MB"}, "memory 64MB is below the minimum of 128 MiB"),
        ({"memory": 1 << 20}, "below the minimum"),
        ({"disk": "lots"}, "disk: 'lots' is not a size"),
        ({"disk": "512MB"}, "disk 512MB is below the minimum of 1024 MiB"),
        ({"disk": "99999999TB"}, "disk 99999999TB is above the maximum of 64 TiB"),
        ({"memory": "2TB"}, "memory 2TB is above the maximum of 1 TiB"),
        ({"cpus": 0}, "cpus 0 must be a whole number from 1 to 64"),
        ({"cpus": 65}, "cpus 65"),
        ({"cpus": "2"}, "cpus '2'"),
        ({"timeout": "soon"}, "timeout: 'soon' is not a duration"),
        ({"timeout": "10"}, "timeout: '10' is not a duration; give a unit"),
        ({"accel": "hvf"}, "unknown accelerator 'hvf'"),
    ],
)
def test_up_rejects_bad_settings(manager: Manager, backend, no_image, kwargs: dict, match: str) -> None:
    name = unique()
    with pytest.raises(InvalidInput, match=match) as info:
        manager.up(name, **kwargs)
    assert info.value.exit_code == 2
    assert no_image == []
    assert_nothing_left(backend, name)


@pytest.mark.parametrize("name", ["Bad Name", "../x", "", "a" * 41, "a;b"])
def test_up_rejects_bad_names(manager: Manager, no_image, name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid VM name"):
        manager.up(name)
    assert no_image == []
    assert state.list_vm_dirs() == []


def test_up_rejects_missing_bootstrap_file(manager: Manager, backend, no_image, tmp_path: Path) -> None:
    name = unique()
    with pytest.raises(InvalidInput, match="cannot read bootstrap .*nope.hero: No such file") as info:
        manager.up(name, bootstrap=str(tmp_path / "nope.hero"))
    assert info.value.hint == "give a .hero file or a URL"
    assert_nothing_left(backend, name)


def test_up_rejects_a_typo_in_an_action(manager: Manager, backend, no_image, tmp_path: Path) -> None:
    script = tmp_path / "setup.hero"
    script.write_text("!!file.write path:/x content:y\n\n!!file.wrte path:/x\n")
    name = unique()
    with pytest.raises(InvalidInput) as info:
        manager.up(name, bootstrap=str(script))
    assert "setup.hero:3:1: unknown action 'file.wrte'" in info.value.message
    assert "did you mean file.write" in info.value.message
    assert_nothing_left(backend, name)


def test_up_rejects_an_unknown_parameter(manager: Manager, backend, no_image) -> None:
    name = unique()
    with pytest.raises(InvalidInput, match=r"bootstrap.hero:1:\d+: file.write: unknown parameter 'colour'"):
        manager.up(name, bootstrap="!!file.write path:/x content:y colour:red\n")
    assert_nothing_left(backend, name)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("!!file.write path:/root/.ssh/authorized_keys mode:600x", "setup.hero:3:46: mode: '600x' is not"),
        ("!!file.write path:/srv/x owner:'web admin'", "setup.hero:3:26: owner: 'web admin' is not a"),
        ("!!dir.create path:srv/app", "setup.hero:3:14: path: 'srv/app' must be absolute"),
        ("!!service.start name:web cmd:true restart:allways", "setup.hero:3:35: restart: 'allways' is not a"),
        ("!!system.hostname name:web.example", "setup.hero:3:19: name: 'web.example' is not a hostname"),
        ("!!service.start name:api cmd:false", "setup.hero:3:17: service.start: name 'api' is already given"),
    ],
)  # fmt: skip
def test_up_refuses_a_value_of_the_wrong_form_before_any_vm_exists(
    manager: Manager, backend, no_image, tmp_path: Path, line: str, error: str
) -> None:
    """What would fail only when the action runs in the guest, after the actions above it ran, is refused on
    the host at FILE:LINE:COL, with nothing made."""
    script = tmp_path / "setup.hero"
    script.write_text(
        f"!!service.start name:api cmd:'sleep 1'\n!!file.write path:/etc/motd content:hi\n{line}\n"
    )
    name = unique()
    with pytest.raises(InvalidInput) as info:
        manager.up(name, bootstrap=str(script))
    assert info.value.message.startswith("bootstrap is invalid:\n" + error), info.value.message
    assert no_image == []
    assert_nothing_left(backend, name)


def test_up_refuses_an_include_in_a_bootstrap(
    manager: Manager, backend, no_image, tmp_path: Path, monkeypatch
) -> None:
    """A bootstrap goes to the guest as one script: an include is refused on the host, in one line, without
    reading the file it names (here one that exists in the current directory)."""
    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true\n\n   !!play.include path:more.hero\n")
    (tmp_path / "more.hero").write_text("!!cmd.run cmd:true\n")
    monkeypatch.chdir(tmp_path)
    name = unique()
    with pytest.raises(InvalidInput) as info:
        manager.up(name, bootstrap=str(tmp_path / "setup.hero"))
    why = "!!play.include in a bootstrap: the guest gets this one script, not the files it includes"
    assert (info.value.message, info.value.hint) == (
        f"setup.hero:3:4: {why}",
        "includes work in playbooks; inline the file",
    )
    assert no_image == []
    assert_nothing_left(backend, name)
    with pytest.raises(InvalidInput) as info:  # inline too, and a variable in its path changes nothing
        load_bootstrap("!!play.include path:${F}\n", variables={"F": "more.hero"})
    assert info.value.message == f"bootstrap.hero:1:1: {why}"


def test_up_rejects_a_url_without_sha256(manager: Manager, backend, no_image) -> None:
    name = unique()
    with pytest.raises(InvalidInput, match="needs --bootstrap-sha256") as info:
        manager.up(name, bootstrap="https://127.0.0.1:9/setup.hero")
    assert "never runs unpinned content" in (info.value.hint or "")
    assert_nothing_left(backend, name)


def test_up_rejects_a_mismatching_sha256(manager: Manager, backend, no_image, tmp_path: Path) -> None:
    script = tmp_path / "setup.hero"
    script.write_text("!!file.write path:/x content:y\n")
    name = unique()
    with pytest.raises(InvalidInput, match="bootstrap sha256 is [0-9a-f]{64}, not the 0000"):
        manager.up(name, bootstrap=str(script), bootstrap_sha256="0" * 64)
    assert_nothing_left(backend, name)


# -------------------------------------------------------------------------------- load_bootstrap


def test_load_bootstrap_none() -> None:
    for empty in (None, ""):
        b = load_bootstrap(empty)
        assert b == Bootstrap()
        assert b.digest is None and b.drive_entry() is None


def test_load_bootstrap_inline() -> None:
    b = load_bootstrap("!!dir.create path:/srv/app")
    assert b.script == "!!dir.create path:/srv/app" and b.name == "bootstrap.hero"
    assert b.digest == hashlib.sha256(b.script.encode()).hexdigest()
    assert b.drive_entry() == {"script": b.script, "name": "bootstrap.hero"}
    multi = load_bootstrap("// a comment\n!!dir.create path:/srv/app\n")
    assert multi.script.startswith("// a comment")


def test_load_bootstrap_file_with_sha256(tmp_path: Path) -> None:
    path = tmp_path / "web.hero"
    path.write_text("!!cmd.run cmd:'echo ${GREETING}'\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    b = load_bootstrap(str(path), digest.upper(), variables={"GREETING": "hi"})
    assert b.name == "web.hero" and b.digest == digest
    assert b.drive_entry() == {"script": path.read_text(), "name": "web.hero"}
    assert load_bootstrap(path).name == "web.hero"  # os.PathLike is fine too


def test_load_bootstrap_url() -> None:
    sha = "AB" * 32
    b = load_bootstrap("https://127.0.0.1:9/dir/setup.hero?x=1", sha)
    assert b.url == "https://127.0.0.1:9/dir/setup.hero?x=1"
    assert b.name == "setup.hero"
    assert b.sha256 == sha.lower() and b.digest == sha.lower()
    assert b.drive_entry() == {"url": b.url, "sha256": sha.lower(), "name": "setup.hero"}
    assert load_bootstrap("http://127.0.0.1:9/", sha).name == "bootstrap.hero"


@pytest.mark.parametrize("sha", [None, "", "abc", "g" * 64, "a" * 63, "a" * 65])
def test_load_bootstrap_url_needs_a_good_sha256(sha: str | None) -> None:
    with pytest.raises(InvalidInput, match="needs --bootstrap-sha256 with its 64-hex-digit sha256"):
        load_bootstrap("https://127.0.0.1:9/setup.hero", sha)


def test_load_bootstrap_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.hero"
    path.write_bytes(b"// x\n" * (BOOTSTRAP_LIMIT // 5 + 1))
    with pytest.raises(InvalidInput, match=f"larger than {BOOTSTRAP_LIMIT} bytes"):
        load_bootstrap(str(path))


@pytest.fixture
def fifo(tmp_path: Path):
    """A real FIFO. Should a reader block on it, a writer opened after 10 s ends that (the test then fails
    instead of hanging)."""
    path = tmp_path / "pipe.hero"
    os.mkfifo(path)
    timer = threading.Timer(10, _unblock, (path,))
    timer.start()
    yield path
    timer.cancel()


def _unblock(path: Path) -> None:
    with contextlib.suppress(OSError):  # no reader (any more): nothing to end
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize(
    "kind, make",
    [
        ("a directory", lambda tmp, fifo: tmp),
        ("a FIFO", lambda tmp, fifo: fifo),
        ("a character device", lambda tmp, fifo: Path("/dev/zero")),
        ("a character device", lambda tmp, fifo: Path("/dev/null")),
    ],
)
def test_load_bootstrap_refuses_what_is_not_a_regular_file(tmp_path: Path, fifo: Path, kind, make) -> None:
    """Looked at before it is opened: a FIFO would block `up` for ever, /dev/zero would fill the memory."""
    path = make(tmp_path, fifo)
    t0 = time.monotonic()
    with pytest.raises(InvalidInput) as info:
        load_bootstrap(str(path))
    assert time.monotonic() - t0 < 5
    assert info.value.message == f"bootstrap {path} is {kind}, not a regular file"
    assert info.value.exit_code == 2


def test_load_bootstrap_through_a_symlink_to_a_device(tmp_path: Path) -> None:
    link = tmp_path / "setup.hero"
    link.symlink_to("/dev/zero")
    with pytest.raises(InvalidInput, match="is a character device, not a regular file"):
        load_bootstrap(str(link))


def test_load_bootstrap_of_a_huge_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.hero"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: reading it would cost a GiB of memory
    t0 = time.monotonic()
    with pytest.raises(InvalidInput, match=f"larger than {BOOTSTRAP_LIMIT} bytes"):
        load_bootstrap(str(path))
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize(
    "content",
    ["#!/bin/sh\necho hello\n", "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n", "\n", "// x\n"],
)
def test_load_bootstrap_without_actions_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(InvalidInput) as info:
        load_bootstrap(str(path))
    assert info.value.message == (
        "bootstrap notes.txt has no actions (no `!!actor.name` line): is it a HeroScript file?"
    )
    assert "--allow-empty" in (info.value.hint or "")
    assert load_bootstrap(str(path), allow_empty=True).script == content


def test_load_bootstrap_inline_without_actions() -> None:
    with pytest.raises(InvalidInput, match="has no actions"):
        load_bootstrap("// only a comment\n")
    assert load_bootstrap("// only a comment\n", allow_empty=True).script == "// only a comment\n"
    assert load_bootstrap(None) == Bootstrap() and load_bootstrap("") == Bootstrap()  # no bootstrap at all


HOSTILE = "a'\n!!file.write path:/root/.ssh/authorized_keys content:'ssh-ed25519 AAAA evil'\n"


def test_a_variable_cannot_add_an_action_to_the_bootstrap() -> None:
    from herovm.heroscript import parse

    script = "!!cmd.run cmd:'echo ${X}'\n"
    boot = load_bootstrap(script, variables={"X": HOSTILE})
    assert boot.script == script  # the guest gets the text as written, and the value apart from it
    pb = parse(script, variables={"X": HOSTILE})
    assert [a.fullname for a in pb] == ["cmd.run"]
    assert pb[0].params.to_dict() == {"cmd": "echo " + HOSTILE}


def test_a_secret_is_never_in_a_bootstrap_error() -> None:
    secret = "hunter2-Zq9"
    with pytest.raises(InvalidInput) as info:
        load_bootstrap("!!cmd.run cmd:true timeout:${T}\n", secrets={"T": secret})
    assert secret not in str(info.value)
    assert "timeout: '[secret T]' is not a duration" in info.value.message


# ------------------------------------------------------------------------- URL fetch on the host


BODY = b"!!dir.create path:/srv\n"
BODY_SHA = hashlib.sha256(BODY).hexdigest()


def test_fetch_on_host_reads_a_prompt_server() -> None:
    from trickle import http_server

    from herovm.bootstrap import fetch_on_host

    with http_server(BODY) as base:
        boot = fetch_on_host(load_bootstrap(base + "/b.hero", BODY_SHA), None, 5)
    assert boot.script == BODY.decode() and boot.url is None


@pytest.mark.parametrize("trickle", ["body", "headers"])
def test_fetch_on_host_has_one_deadline_for_a_trickling_server(trickle: str) -> None:
    """Each read returns a byte in time, so a socket timeout never fires; the fetch as a whole has one."""
    from trickle import elapsed, http_server

    from herovm.bootstrap import fetch_on_host

    with http_server(BODY, trickle=trickle, every=0.3) as base:  # ~7 s for the whole answer
        took, err = elapsed(fetch_on_host, load_bootstrap(base + "/b.hero", BODY_SHA), None, 1.0)
    assert isinstance(err, InvalidInput), err
    assert err.message == f"cannot fetch bootstrap {base}/b.hero: no complete answer within 1s"
    assert 0.9 < took < 2.5


def test_up_fetch_is_bounded_by_its_timeout(manager: Manager, backend, no_image) -> None:
    """`up --net restricted --timeout 2s` with a trickling server: refused within the 2 s, nothing made."""
    from trickle import elapsed, http_server

    name = unique("fetch")
    with http_server(BODY, trickle="body", every=0.5) as base:
        took, err = elapsed(
            manager.up,
            name,
            bootstrap=base + "/b.hero",
            bootstrap_sha256=BODY_SHA,
            net="restricted",
            timeout="2s",
        )
    assert isinstance(err, InvalidInput) and "no complete answer within 2s" in err.message, err
    assert took < 3.5
    assert no_image == []
    assert_nothing_left(backend, name)


def test_load_bootstrap_syntax_error() -> None:
    with pytest.raises(InvalidInput, match=r"bootstrap does not parse: bootstrap.hero:1:\d+: unclosed quote"):
        load_bootstrap('!!file.write path:"/x\n')


# ---------------------------------------------------------------------------- create: cleanup paths


@needs_qemu_img
def test_define_failure_leaves_nothing(manager: Manager, backend, monkeypatch, tmp_path: Path) -> None:
    """libvirt's schema really rejects the domain (a relative kernel path): the half-made VM is removed."""
    good = make_image(tmp_path)

    class RelativeKernel(images.Image):
        @property
        def kernel(self) -> Path:
            return Path("relative/vmlinuz")

    bad = RelativeKernel(good.recipe, good.id, good.path, good.manifest)
    monkeypatch.setattr(images, "ensure", lambda name="default", progress=None: bad)
    name = unique()
    with pytest.raises(HeroVMError, match=f"libvirt failed while defining {name}: .*validate against schema"):
        manager.up(name, timeout="5s")
    assert_nothing_left(backend, name)


def test_disk_creation_failure_leaves_nothing(manager: Manager, backend, monkeypatch, tmp_path: Path) -> None:
    img = images.Image("default", "gone", tmp_path / "no-image", {"cmdline": "x", "root_size": 1 << 30})
    monkeypatch.setattr(images, "ensure", lambda name="default", progress=None: img)
    name = unique()
    with pytest.raises(HeroVMError, match=f"cannot create the disk of {name}: .*no-image/base.qcow2"):
        manager.up(name)
    assert_nothing_left(backend, name)


def test_image_failure_leaves_nothing(manager: Manager, backend, monkeypatch) -> None:
    def ensure(name="default", progress=None):
        raise images.ImageError("mmdebstrap failed: E: network")

    monkeypatch.setattr(images, "ensure", ensure)
    name = unique()
    with pytest.raises(images.ImageError):
        manager.up(name)
    assert_nothing_left(backend, name)


def test_stale_vm_dir_is_replaced(manager: Manager, backend, fake_image, home: Path) -> None:
    name = unique()
    stale = state.VMDir(name)
    stale.create()
    (stale.path / "junk").write_text("from a crashed herovm")
    with pytest.raises(BootFailed, match="agent channel never appeared"):
        manager.up(name, timeout=0.3, keep_failed=True)
    assert not (stale.path / "junk").exists()
    assert stale.meta_file.exists()
    manager.down(name)
    assert_nothing_left(backend, name)


def test_up_refuses_an_existing_vm_and_leaves_it_alone(manager: Manager, backend, no_image, tmp_path) -> None:
    name = unique()
    s = spec(tmp_path, name, ssh_port=None, metadata={"settings": {"other": 1}})
    backend.define(s)
    with pytest.raises(AlreadyExists, match=f"VM {name} already exists \\(stopped\\)") as info:
        manager.up(name)
    assert f"herovm down {name}" in (info.value.hint or "")
    assert no_image == []
    m = backend.get(name)
    assert m is not None and m.metadata == {"settings": {"other": 1}}


@needs_qemu_img
def test_define_race_does_not_remove_the_other_domain(
    manager: Manager, backend, monkeypatch, tmp_path: Path
) -> None:
    img = make_image(tmp_path)
    name = unique()
    other = spec(tmp_path, name, ssh_port=None, metadata={"owner": "someone else"})

    def ensure(name_="default", progress=None):
        backend.define(other)  # e.g. `virsh define` by hand, after up's existence check
        return img

    monkeypatch.setattr(images, "ensure", ensure)
    with pytest.raises(AlreadyExists):
        manager.up(name)
    m = backend.get(name)
    assert m is not None and m.metadata == {"owner": "someone else"}


# ------------------------------------------------------------------------------ a fake agent boots


class FakeGuest:
    """Plays the guest agent for one boot of `name`: waits until libvirt runs the domain, reads the nonce
    from the config drive, serves the agent socket and sends what `events(nonce)` returns."""

    def __init__(self, name: str, events: Callable[[str], list[dict]], console: bool = True) -> None:
        self.name = name
        self.events = events
        self.console = console
        self.config: dict = {}
        self.hello: bytes = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn = libvirt.open(URI)
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        if conn.lookupByName(PREFIX + self.name).isActive():
                            break
                    except libvirt.libvirtError:
                        pass
                    assert time.monotonic() < deadline, "the domain never started"
                    time.sleep(0.01)
            finally:
                conn.close()
            vmdir = state.VMDir(self.name)
            self.config = configdrive.read(vmdir.drive)
            events = self.events(self.config["nonce"])
            if self.console:
                with open(vmdir.console_log, "a") as f:
                    f.writelines(f"[  1.0] {CONSOLE_PREFIX}{json.dumps(e)}\n" for e in events)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(vmdir.agent_socket))
            server.listen(1)
            server.settimeout(10)
            c, _ = server.accept()
            with c, server:
                c.settimeout(10)
                while not self.hello.endswith(b"\n"):
                    self.hello += c.recv(100)
                c.sendall(b"".join(json.dumps(e).encode() + b"\n" for e in events))
                time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def join(self) -> None:
        self.thread.join(15)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def ready_boot(nonce: str) -> list[dict]:
    return [
        {"event": "boot", "seq": 0, "t": 1.0, "nonce": "an-older-boot"},  # the replay of a stale boot
        {"event": "boot", "seq": 1, "t": 1.1, "nonce": nonce, "agent": "1", "kernel": "6.1"},
        {"event": "setup", "seq": 2, "t": 1.2, "step": "drive", "ok": True, "seconds": 0.01},
        {"event": "bootstrap", "seq": 3, "t": 1.3, "source": "drive", "actions": 1, "sha256": "x"},
        {
            "event": "action.start",
            "seq": 4,
            "t": 1.4,
            "index": 0,
            "action": "dir.create",
            "file": "b",
            "line": 1,
        },
        {
            "event": "action.end",
            "seq": 5,
            "t": 1.5,
            "index": 0,
            "action": "dir.create",
            "line": 1,
            "ok": True,
            "seconds": 0.1,
            "exit_code": 0,
            "output": "",
        },
        {"event": "ready", "seq": 6, "t": 1.6, "actions": 1, "seconds": 0.5},
    ]


def failed_boot(nonce: str) -> list[dict]:
    return [
        {"event": "boot", "seq": 0, "t": 1.0, "nonce": nonce, "agent": "1", "kernel": "6.1"},
        {
            "event": "action.end",
            "seq": 1,
            "t": 1.5,
            "index": 0,
            "action": "cmd.run",
            "line": 2,
            "ok": False,
            "seconds": 0.1,
            "exit_code": 3,
            "output": "boom\n",
            "error": "exit 3",
        },
        {
            "event": "failed",
            "seq": 2,
            "t": 1.6,
            "stage": "action",
            "action": "cmd.run",
            "line": 2,
            "file": "setup.hero",
            "error": "exit 3",
            "output": "boom\n",
        },
    ]


@needs_qemu_img
def test_up_with_a_fake_agent(manager: Manager, backend, fake_image, progress, home: Path) -> None:
    name = unique("up")
    guest = FakeGuest(name, ready_boot)
    vm = manager.up(
        name, bootstrap="!!dir.create path:/srv\n", memory="256MB", cpus=2, timeout="10s", accel="tcg"
    )
    guest.join()
    assert guest.hello == b'{"op": "hello"}\n'
    cfg = guest.config
    assert cfg["v"] == 1 and cfg["name"] == name and cfg["hostname"] == name
    assert cfg["bootstrap"] == {"script": "!!dir.create path:/srv\n", "name": "bootstrap.hero"}
    assert cfg["network"]["address"] == "10.0.2.15/24"
    assert cfg["ssh"]["authorized_keys"] == [vm.meta["client_key"]]
    assert "PRIVATE KEY" in cfg["ssh"]["host_key"]

    assert vm.name == name and vm.ssh_port and vm.meta["last_boot"]["outcome"] == "ready"
    assert vm.meta["last_boot"]["nonce"] == cfg["nonce"]
    m = backend.get(name)
    assert m.state == "running" and m.metadata["last_boot"]["outcome"] == "ready"
    assert m.metadata["settings"]["memory"] == 256 << 20 and m.metadata["settings"]["cpus"] == 2
    vmdir = state.VMDir(name)
    assert oct(vmdir.client_key.stat().st_mode & 0o777) == "0o600"
    assert vmdir.disk.is_file() and vmdir.drive.is_file()
    # the stale boot's event was dropped; the rest reported in order
    agent_msgs = [p.message for p in progress if p.stage == "agent"]
    assert agent_msgs[0].startswith("agent 1 started at 1.10s")
    assert agent_msgs[-1] == "ready at 1.60s guest time"
    assert [p.stage for p in progress][:2] == ["define", "boot"]

    [row] = [r for r in manager.ls() if r["name"] == name]
    assert row == {
        "name": name,
        "state": "running",
        "host": "local",
        "image": "default",
        "accel": "tcg",
        "cpus": 2,
        "memory": 256 << 20,
        "ports": [],
        "ssh_port": vm.ssh_port,
        "ready": True,
    }
    st = manager.status(name)
    assert st["agent"] == "ready" and st["state"] == "running" and st["failure"] is None
    assert st["steps"] == [
        {
            "index": 0,
            "action": "dir.create",
            "line": 1,
            "ok": True,
            "seconds": 0.1,
            "exit_code": 0,
            "error": None,
        }
    ]

    # the same settings again: the running VM is returned as it is, nothing booted
    again = manager.up(name, bootstrap="!!dir.create path:/srv\n", memory="256MB", cpus=2, accel="tcg")
    assert again.meta["last_boot"] == vm.meta["last_boot"]
    with pytest.raises(AlreadyExists, match="with other settings"):
        manager.up(name, bootstrap="!!dir.create path:/srv\n", memory="512MB", cpus=2, accel="tcg")
    assert backend.get(name).state == "running"

    manager.down(name)
    assert_nothing_left(backend, name)


@needs_qemu_img
def test_two_vms_get_different_ports(manager: Manager, backend, fake_image) -> None:
    ports = []
    for _ in range(2):
        name = unique("port")
        guest = FakeGuest(name, ready_boot, console=False)
        ports.append(manager.up(name, timeout="10s").ssh_port)
        guest.join()
    assert len(set(ports)) == 2


@needs_qemu_img
def test_up_without_network(manager: Manager, backend, fake_image) -> None:
    name = unique("nonet")
    guest = FakeGuest(name, ready_boot, console=False)
    vm = manager.up(name, timeout="10s", net="none")
    guest.join()
    assert vm.ssh_port is None
    assert guest.config["network"] is None


@needs_qemu_img
def test_up_bootstrap_failure_keeps_the_vm(manager: Manager, backend, fake_image) -> None:
    name = unique("fail")
    guest = FakeGuest(name, failed_boot)
    with pytest.raises(BootFailed) as info:
        manager.up(name, timeout="10s")
    guest.join()
    err = info.value
    assert err.message == f"bootstrap of {name} failed at setup.hero:2 (cmd.run): exit 3"
    assert err.details == {"stage": "action", "action": "cmd.run", "line": 2, "output": "boom\n"}
    assert f"herovm down {name}" in (err.hint or "")
    assert err.exit_code == 7
    assert backend.get(name).metadata["last_boot"]["outcome"] == "failed"
    st = manager.status(name)
    assert st["agent"] == "failed"
    assert st["failure"]["stage"] == "action" and st["steps"][0]["ok"] is False
    manager.down(name)
    assert_nothing_left(backend, name)


SECRET = "s3cr3t-Pa55, with comma"


def echoing_boot(nonce: str) -> list[dict]:
    """A guest whose agent (an old one, or a hostile one) echoes the secret: the host still shows none."""
    events = ready_boot(nonce)
    events[5] = {**events[5], "output": f"token is {SECRET}\n"}
    return events


@needs_qemu_img
def test_up_with_a_secret(manager: Manager, backend, fake_image, progress, home: Path) -> None:
    name = unique("sec")
    guest = FakeGuest(name, echoing_boot)
    script = "!!env.set TOKEN=${TOKEN} WHO=${WHO}\n"
    vm = manager.up(
        name, bootstrap=script, variables={"WHO": "tests"}, secrets={"TOKEN": SECRET}, timeout="10s"
    )
    guest.join()
    # the guest gets it: the drive holds the script as written, the variables and the secret apart
    assert guest.config["bootstrap"]["script"] == script
    assert guest.config["vars"] == {"WHO": "tests"} and guest.config["secrets"] == {"TOKEN": SECRET}
    vmdir = state.VMDir(name)
    kept = vmdir.secrets / "vars.json"
    assert json.loads(kept.read_text()) == {"TOKEN": SECRET}
    assert (
        oct(kept.stat().st_mode & 0o777) == "0o600" and oct(vmdir.secrets.stat().st_mode & 0o777) == "0o700"
    )
    # ... and nothing the host keeps or shows has it
    m = backend.get(name)
    assert m.metadata["settings"]["secrets"] == ["TOKEN"] and m.metadata["settings"]["vars"] == {
        "WHO": "tests"
    }
    xml = backend.conn.lookupByName(PREFIX + name).XMLDesc()
    for where in (xml, vmdir.meta_file.read_text(), json.dumps(vm.meta), json.dumps(manager.status(name))):
        assert "s3cr3t" not in where
    shown = [p.message for p in progress] + [json.dumps(p.data) for p in progress]
    assert not [x for x in shown if "s3cr3t" in x]
    assert any("token is [secret TOKEN]" in json.dumps(p.data) for p in progress)
    # the same secret again: the running VM as it is; another value: other settings
    assert (
        manager.up(name, bootstrap=script, variables={"WHO": "tests"}, secrets={"TOKEN": SECRET}).name == name
    )
    with pytest.raises(AlreadyExists, match="with other settings"):
        manager.up(name, bootstrap=script, variables={"WHO": "tests"}, secrets={"TOKEN": "an0ther-Value"})
    # a later boot gets it again from the VM's secrets/, for env.set and the other re-applied actions
    backend.destroy(name)
    guest = FakeGuest(name, ready_boot, console=False)
    manager.start(name, timeout="10s")
    guest.join()
    assert guest.config["secrets"] == {"TOKEN": SECRET}
    manager.down(name)
    assert_nothing_left(backend, name)


@needs_qemu_img
def test_a_failed_boot_shows_no_secret(manager: Manager, backend, fake_image, progress) -> None:
    name = unique("secf")

    def boot(nonce: str) -> list[dict]:
        events = failed_boot(nonce)
        for e in events[1:]:
            e["output"] = e["error"] = f"curl: bad token {SECRET}"
        return events

    guest = FakeGuest(name, boot)
    with pytest.raises(BootFailed) as info:
        manager.up(name, bootstrap="!!env.set T=${T}\n", secrets={"T": SECRET}, timeout="10s")
    guest.join()
    err = info.value
    assert "s3cr3t" not in json.dumps(err.to_json()) and "s3cr3t" not in str(err)
    assert err.details["output"] == "curl: bad token [secret T]"
    assert not [p for p in progress if "s3cr3t" in p.message or "s3cr3t" in json.dumps(p.data)]
    manager.down(name)


def test_up_refuses_a_name_given_as_variable_and_secret(manager: Manager, no_image) -> None:
    with pytest.raises(InvalidInput, match="T: given both as a variable and as a secret"):
        manager.up(unique(), variables={"T": "a"}, secrets={"T": "b"})


@needs_qemu_img
def test_up_without_agent_times_out_and_removes_the_vm(manager: Manager, backend, fake_image) -> None:
    """Nothing ran in the guest, so nothing is there to inspect: the half-made VM goes."""
    name = unique("mute")
    t0 = time.monotonic()
    with pytest.raises(BootFailed) as info:
        manager.up(name, timeout=0.3)
    assert time.monotonic() - t0 < 10
    assert "its agent channel never appeared (state running)" in info.value.message
    assert "last console line: (none)" in info.value.message
    assert info.value.details["stage"] == "boot"
    assert "--keep-failed" in (info.value.hint or "")
    assert_nothing_left(backend, name)


@needs_qemu_img
def test_up_without_agent_keep_failed_keeps_the_vm(manager: Manager, backend, fake_image) -> None:
    name = unique("mutekeep")
    with pytest.raises(BootFailed, match="its agent channel never appeared"):
        manager.up(name, timeout=0.3, keep_failed=True)
    assert backend.get(name) is not None and state.VMDir(name).exists()
    manager.down(name)
    assert_nothing_left(backend, name)


@needs_qemu_img
def test_guest_that_stops_before_ready(manager: Manager, backend, fake_image) -> None:
    name = unique("quit")
    guest = FakeGuest(
        name, lambda nonce: [{"event": "boot", "seq": 0, "t": 1.0, "nonce": nonce}], console=False
    )
    with pytest.raises(BootFailed, match="the guest stopped before it was ready"):
        manager.up(name, timeout="10s")
    guest.join()
    assert_nothing_left(backend, name)


# ------------------------------------------------------------------------------ down, ls, stop, start


def test_down_unknown_is_not_found(manager: Manager) -> None:
    with pytest.raises(NotFound, match="VM nope-x not found") as info:
        manager.down("nope-x")
    assert info.value.hint == "see `herovm ls`"


def test_down_invalid_name(manager: Manager) -> None:
    with pytest.raises(InvalidInput):
        manager.down("../etc")


def test_orphaned_vm_dir_is_listed_and_removable(manager: Manager, backend) -> None:
    name = unique("orph")
    state.VMDir(name).create()
    rows = [r for r in manager.ls() if r["name"] == name]
    assert rows == [
        {
            "name": name,
            "state": "orphaned",
            "host": None,
            "image": None,
            "accel": None,
            "cpus": None,
            "memory": None,
            "ports": [],
            "ssh_port": None,
            "ready": False,
        }
    ]
    manager.down(name)
    assert_nothing_left(backend, name)


def test_ls_empty(manager: Manager) -> None:
    assert [r for r in manager.ls() if r["state"] == "orphaned"] == []
    assert state.list_vm_dirs() == []


define_plain = define_in_vmdir


def test_down_all(manager: Manager, backend, tmp_path: Path) -> None:
    a, b = unique("all"), unique("all")
    define_plain(backend, tmp_path, a, {})
    state.VMDir(b).create()
    removed = manager.down_all()
    assert a in removed and b in removed
    assert_nothing_left(backend, a)
    assert_nothing_left(backend, b)


def test_stop_and_start_errors(manager: Manager, backend, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        manager.stop(unique("nostop"))
    with pytest.raises(NotFound):
        manager.start(unique("nostart"))
    name = unique("stp")
    define_plain(backend, tmp_path, name, {})
    manager.stop(name)  # already stopped: nothing to do
    assert backend.get(name).state == "stopped"


def test_stop_without_agent_stops_hard(manager: Manager, backend, tmp_path: Path, progress) -> None:
    name = unique("hard")
    define_plain(backend, tmp_path, name, {})
    backend.start(name)
    t0 = time.monotonic()
    manager.stop(name, timeout=0.2)
    assert time.monotonic() - t0 < 5
    assert backend.get(name).state == "stopped"
    assert any("stopping it hard" in p.message for p in progress)


def test_exec_needs_a_running_vm(manager: Manager, backend, tmp_path: Path) -> None:
    name = unique("ex")
    define_plain(backend, tmp_path, name, {"ssh_port": 1})
    vm = manager.get(name)
    with pytest.raises(HeroVMError, match=f"VM {name} is stopped") as info:
        vm.exec(["true"])
    assert f"herovm start {name}" in (info.value.hint or "")
    with pytest.raises(NotFound):
        manager.get(unique("nothere"))


# ---------------------------------------------------------------------------------- status and logs


def at(event: dict) -> str:
    return f"{CONSOLE_PREFIX}{json.dumps(event)}\n"


def test_status_and_logs_read_the_last_boot(manager: Manager, backend, tmp_path: Path) -> None:
    name = unique("st")
    define_plain(
        backend,
        tmp_path,
        name,
        {
            "settings": {"cpus": 1, "memory": 256 << 20, "accel": "tcg"},
            "image": "default",
            "image_id": "abc",
            "ssh_port": None,
            "bootstrap": "setup.hero",
            "created": "2025-01-01T00:00:00+00:00",
            "last_boot": {"nonce": "B", "outcome": "failed"},
        },
    )
    vmdir = state.VMDir(name)
    vmdir.console_log.write_text(
        "[    0.0] Linux version 6.1\n"
        + at({"event": "boot", "seq": 0, "t": 1.0, "nonce": "A"})
        + at(
            {
                "event": "action.end",
                "seq": 1,
                "t": 1.5,
                "index": 0,
                "action": "cmd.run",
                "line": 1,
                "ok": True,
                "seconds": 0.1,
                "exit_code": 0,
            }
        )
        + at({"event": "ready", "seq": 2, "t": 2.0})
        + "reboot: Power down\n"
        + at({"event": "boot", "seq": 0, "t": 1.0, "nonce": "B"})
        + "[    1.2] "
        + at(
            {
                "event": "action.end",
                "seq": 1,
                "t": 1.2,
                "index": 0,
                "action": "file.write",
                "line": 4,
                "ok": False,
                "seconds": 0.2,
                "exit_code": None,
                "error": "denied",
            }
        )
        + "@herovm {broken json\n"
        + at(
            {
                "event": "failed",
                "seq": 2,
                "t": 2.5,
                "stage": "action",
                "line": 4,
                "action": "file.write",
                "error": "denied",
            }
        )
    )
    st = manager.status(name)
    assert st["name"] == name and st["state"] == "stopped" and st["backend"] == "libvirt"
    assert st["agent"] == "failed"
    assert st["steps"] == [
        {
            "index": 0,
            "action": "file.write",
            "line": 4,
            "ok": False,
            "seconds": 0.2,
            "exit_code": None,
            "error": "denied",
        }
    ]
    assert st["failure"]["error"] == "denied"
    assert st["image_id"] == "abc" and st["bootstrap"] == "setup.hero"

    events = manager.logs(name)
    assert [e["event"] for e in events] == ["boot", "action.end", "failed"]
    assert events[0]["nonce"] == "B"
    assert manager.logs(name, console=True) == vmdir.console_log


def test_status_drops_a_boot_with_another_nonce(manager: Manager, backend, tmp_path: Path) -> None:
    name = unique("nn")
    define_plain(backend, tmp_path, name, {"last_boot": {"nonce": "NEW"}})
    state.VMDir(name).console_log.write_text(
        at({"event": "boot", "seq": 0, "t": 1.0, "nonce": "OLD"}) + at({"event": "ready", "seq": 1, "t": 2.0})
    )
    st = manager.status(name)
    assert st["agent"] == "unknown" and st["steps"] == [] and st["failure"] is None
    assert manager.logs(name) == []


def test_status_while_booting_and_without_log(manager: Manager, backend, tmp_path: Path) -> None:
    name = unique("bt")
    define_plain(backend, tmp_path, name, {"last_boot": {"nonce": "N"}})
    assert manager.status(name)["agent"] == "unknown"
    state.VMDir(name).console_log.write_text(at({"event": "boot", "seq": 0, "t": 1.0, "nonce": "N"}))
    assert manager.status(name)["agent"] == "booting"


def test_status_of_unknown_vm(manager: Manager) -> None:
    with pytest.raises(NotFound):
        manager.status(unique("nost"))
    with pytest.raises(NotFound):
        manager.logs(unique("nolog"))


# ---------------------------------------------------------------------------------- describe_event


@pytest.mark.parametrize(
    "event, text",
    [
        ({"event": "action.start", "index": 0, "action": "cmd.run", "line": 3}, "[1] cmd.run (line 3) ..."),
        (
            {"event": "action.end", "index": 1, "action": "file.write", "ok": True, "seconds": 0.126},
            "[2] file.write ok in 0.13s",
        ),
        (
            {
                "event": "action.end",
                "index": 1,
                "action": "cmd.run",
                "ok": False,
                "seconds": 2,
                "error": "exit 1",
            },
            "[2] cmd.run FAILED: exit 1 in 2.00s",
        ),
        ({"event": "setup", "step": "network", "ok": True}, "setup network ok"),
        ({"event": "setup", "step": "ssh", "ok": False, "error": "no key"}, "setup ssh FAILED: no key"),
        (
            {"event": "boot", "agent": "1", "t": 1.234, "kernel": "6.1.0"},
            "agent 1 started at 1.23s (kernel 6.1.0)",
        ),
        ({"event": "bootstrap", "source": "drive", "actions": 4}, "bootstrap from drive: 4 actions"),
        ({"event": "ready", "t": 3.5}, "ready at 3.50s guest time"),
        (
            {"event": "failed", "stage": "action", "line": 7, "action": "cmd.run", "error": "exit 2"},
            "FAILED in action at line 7 (cmd.run): exit 2",
        ),
        ({"event": "failed", "stage": "drive", "error": "no drive"}, "FAILED in drive: no drive"),
        (
            {"event": "service", "name": "web", "state": "started"},
            "service web started",
        ),
        ({"event": "shutdown", "reason": "poweroff"}, "shutting down: poweroff"),
    ],
)
def test_describe_event(event: dict, text: str) -> None:
    assert describe_event(event) == text


def test_manager_from_a_backend_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with Manager("libvirt", uri=URI) as m:
        assert isinstance(m.backend, LibvirtBackend) and m.backend.uri == URI
    assert os.environ["HEROVM_HOME"]


@pytest.mark.parametrize(
    "accel, expected",
    [
        ("tcg", "console=ttyS0 root=/dev/vda rw norandmaps loglevel=3"),
        ("kvm", "console=ttyS0 root=/dev/vda rw loglevel=3"),
    ],
)
def test_kernel_command_line_turns_address_randomisation_off_only_under_tcg(
    manager: Manager, tmp_path: Path, accel: str, expected: str
) -> None:
    settings = {"cpus": 1, "memory": 1 << 30, "accel": accel, "kernel_args": "loglevel=3", "net": "default"}
    record = VMRecord.from_json("cmdline", {"ssh_port": 2222, "settings": settings})
    spec = manager.machine_spec(state.VMDir("cmdline"), make_image(tmp_path), record)
    assert spec.cmdline == expected


def test_gc_removes_lock_files_left_by_removed_vms_but_not_a_held_one(manager: Manager, home: Path):
    """herovm before the lock fix left locks/vm-NAME.lock for every name ever used."""
    locks = home / "locks"
    locks.mkdir(parents=True)
    for name in ("gone1", "gone2", "held"):
        (locks / f"vm-{name}.lock").write_text("123")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:  # an `up` of that name, before it has made the directory
        with state.VMDir("held").lock():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(5)
    try:
        removed = manager.gc()
        assert sorted(p.name for p in locks.iterdir() if p.name.startswith("vm-")) == ["vm-held.lock"]
    finally:
        release.set()
        holder.join(5)
    assert removed == ["lock file of gone1", "lock file of gone2"]
