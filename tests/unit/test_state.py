"""herovm.state: VM names, the per-VM directory, ports and locks. All real: files, sockets, processes."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from herovm import state
from herovm.errors import Busy, InvalidInput


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "herovm-home"
    monkeypatch.setenv("HEROVM_HOME", str(h))
    return h


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "box1", "a-b", "0", "9x", "web-01", "a" * 40, "a" + "-" * 38 + "z"])
def test_validate_name_accepts(name: str) -> None:
    assert state.validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "x/y",
        ".",
        "..",
        "a" * 41,
        "a" * 300,
        "café",
        "ünï",
        "a;b",
        "$(x)",
        "`id`",
        "a b",
        "a\nb",
        "a\x00b",
        "Box",
        "UPPER",
        "-a",
        "a-",
        "-",
        "a_b",
        "a.b",
        "herovm:x",
    ],
)
def test_validate_name_rejects_with_one_line_message(name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        state.validate_name(name)
    err = info.value
    assert err.exit_code == 2
    assert err.message.startswith("invalid VM name")
    assert "\n" not in str(err)  # one line, even for a name holding a newline
    assert err.hint and "1-40 characters" in err.hint
    assert len(err.message) < 120  # a 300-character name is not echoed in full


def test_validate_name_rejects_non_strings() -> None:
    for bad in (None, 5, b"box"):
        with pytest.raises(InvalidInput):
            state.validate_name(bad)  # type: ignore[arg-type]


def test_name_length_boundary_is_40() -> None:
    assert state.validate_name("b" * 40)
    with pytest.raises(InvalidInput):
        state.validate_name("b" * 41)


# ------------------------------------------------------------------------------------------ home


def test_home_follows_herovm_home(home: Path) -> None:
    assert state.home() == home


def test_home_without_env_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEROVM_HOME")
    if os.geteuid() != 0:
        pytest.skip("the root default needs root")
    assert state.home() == Path("/var/lib/herovm")


def test_home_without_env_as_user(monkeypatch: pytest.MonkeyPatch, mocker, tmp_path: Path) -> None:
    # We run as root; the non-root branch can only be reached by pretending another uid.
    monkeypatch.delenv("HEROVM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    mocker.patch.object(state.os, "geteuid", return_value=1000)
    assert state.home() == tmp_path / "xdg" / "herovm"


# -------------------------------------------------------------------------------------------- VMDir


def test_vmdir_layout_and_permissions(home: Path) -> None:
    vmdir = state.VMDir("perm1")
    assert not vmdir.exists()
    vmdir.create()
    assert vmdir.exists()
    assert vmdir.path == home / "vms" / "perm1"
    assert _mode(home) == 0o711
    assert _mode(home / "vms") == 0o711
    assert _mode(vmdir.path) == 0o711
    assert _mode(vmdir.secrets) == 0o700
    assert vmdir.client_key.parent == vmdir.secrets
    assert vmdir.host_key.parent == vmdir.secrets
    for p in (vmdir.disk, vmdir.drive, vmdir.console_log, vmdir.agent_socket, vmdir.meta_file):
        assert p.parent == vmdir.path


def test_vmdir_create_fixes_loose_modes(home: Path) -> None:
    vmdir = state.VMDir("perm2")
    vmdir.secrets.mkdir(parents=True, mode=0o777)
    os.chmod(vmdir.secrets, 0o777)
    vmdir.create()
    assert _mode(vmdir.secrets) == 0o700


def test_vmdir_rejects_bad_name() -> None:
    with pytest.raises(InvalidInput):
        state.VMDir("../etc")


def test_meta_round_trip_is_private(home: Path) -> None:
    vmdir = state.VMDir("meta1")
    vmdir.create()
    assert vmdir.read_meta() == {}
    vmdir.write_meta({"a": 1, "nested": {"b": [1, 2]}})
    assert vmdir.read_meta() == {"a": 1, "nested": {"b": [1, 2]}}
    assert _mode(vmdir.meta_file) == 0o600
    assert not vmdir.meta_file.with_suffix(".tmp").exists()
    vmdir.meta_file.write_text("{not json")
    assert vmdir.read_meta() == {}


def test_remove_and_list_vm_dirs(home: Path) -> None:
    assert state.list_vm_dirs() == []
    for n in ("lsb", "lsa"):
        state.VMDir(n).create()
    (home / "vms" / "Not-A-Name").mkdir()
    (home / "vms" / "afile").write_text("")
    assert state.list_vm_dirs() == ["lsa", "lsb"]
    state.VMDir("lsa").remove()
    assert state.list_vm_dirs() == ["lsb"]
    state.VMDir("lsa").remove()  # absent: no error


# -------------------------------------------------------------------------------------------- ports


def test_allocate_port_never_returns_a_taken_port() -> None:
    taken: set[int] = set()
    for _ in range(300):
        port = state.allocate_port(set(taken))
        assert port not in taken
        assert 1024 <= port <= 65535
        taken.add(port)
    assert len(taken) == 300


def test_allocated_port_is_bindable() -> None:
    port = state.allocate_port(set())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        assert s.getsockname()[1] == port


def test_allocate_port_gives_up_when_everything_is_taken() -> None:
    with pytest.raises(InvalidInput, match="no free port"):
        state.allocate_port(set(range(65536)))


# -------------------------------------------------------------------------------------------- locks

_HOLDER = textwrap.dedent(
    """
    import sys
    from herovm import state
    with state.named_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def test_named_lock_excludes_another_process(home: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, "ports"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HEROVM_HOME": str(home)},
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        acquired = threading.Event()

        def take() -> None:
            with state.named_lock("ports"):
                acquired.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not acquired.wait(0.5), "got the lock while another process held it"
        released_at = time.monotonic()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert acquired.wait(10), "never got the lock after the other process released it"
        assert time.monotonic() - released_at < 10
        t.join(5)
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()
    assert _mode(home / "locks") == 0o700


def test_named_locks_are_per_name(home: Path) -> None:
    # Two different names never block each other (flock is per open file, so this runs in one thread).
    with state.named_lock("vm-a"), state.named_lock("vm-b"):
        assert (home / "locks" / "vm-a.lock").exists()
        assert (home / "locks" / "vm-b.lock").exists()


def test_named_lock_is_released_on_exception(home: Path) -> None:
    with pytest.raises(RuntimeError), state.named_lock("boom"):
        raise RuntimeError("inside")
    done = threading.Event()

    def take() -> None:
        with state.named_lock("boom"):
            done.set()

    threading.Thread(target=take, daemon=True).start()
    assert done.wait(5)


def test_vmdir_lock_uses_the_vm_name(home: Path) -> None:
    with state.VMDir("lk1").lock():
        assert (home / "locks" / "vm-lk1.lock").exists()


def test_a_removed_vm_leaves_no_lock_file_and_a_live_one_keeps_it(home: Path) -> None:
    vmdir = state.VMDir("lk2")
    with vmdir.lock():
        vmdir.create()
    assert (home / "locks" / "vm-lk2.lock").exists(), "the VM exists: its lock file stays"
    with vmdir.lock():
        vmdir.remove()
    assert not (home / "locks" / "vm-lk2.lock").exists()


def test_removing_a_lock_file_never_lets_two_holders_in(home: Path) -> None:
    """A waiter blocked on the file that its holder then removes must not end up holding a lock of its own
    while a newcomer holds the new file at the same path."""
    first_holds, waiter_holds, let_waiter_go = threading.Event(), threading.Event(), threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with state.named_lock("vm-race", discard_if=lambda: True):
            first_holds.set()
            release_first.wait(10)

    def waiter() -> None:
        with state.named_lock("vm-race"):
            waiter_holds.set()
            let_waiter_go.wait(10)

    a = threading.Thread(target=first, daemon=True)
    a.start()
    assert first_holds.wait(5)
    b = threading.Thread(target=waiter, daemon=True)
    b.start()
    time.sleep(0.3)  # the waiter has opened the file the first holder will remove, and blocks on it
    assert not waiter_holds.is_set()
    release_first.set()
    assert waiter_holds.wait(5), "the waiter never got the lock"
    # the waiter holds the file now at the path, so a newcomer cannot
    with pytest.raises(Busy), state.named_lock("vm-race", wait=0):
        pass
    let_waiter_go.set()
    b.join(5)
    with state.named_lock("vm-race", wait=0):
        pass
