"""Issue 6: faults produced for real. Nothing lost, nothing leaked, nobody in."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import libvirt
import pytest
from guests import HEROVM, assert_nothing_left, cli, qemu_running

from herovm import state
from herovm.backends.libvirt import PREFIX
from herovm.errors import BootFailed, GuestError
from herovm.guest.ssh import HostKeyMismatch
from herovm.manager import Manager

ROOT = Path(__file__).resolve().parents[2]


def ls_entry(name: str) -> dict | None:
    out = cli("ls", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    return next((r for r in json.loads(out.stdout) if r["name"] == name), None)


# ------------------------------------------------------------------------------------------ crash safety


def test_up_killed_at_many_points_leaves_a_truthful_state_that_down_removes(unique_name, image):
    """SIGKILL `herovm up` before define, after define, while the guest boots and around the bootstrap."""
    conn = libvirt.open("qemu:///system")
    seen_states = set()
    made: list[str] = []
    try:
        for delay in (0.05, 0.4, 0.9, 1.6, 3.0, 5.0, 6.5):
            name = unique_name("kill")
            made.append(name)
            proc = subprocess.Popen(
                [
                    *HEROVM,
                    "up",
                    name,
                    "--bootstrap",
                    str(ROOT / "tests/integration/data/full.hero"),
                    "--var",
                    "WHO=kill",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _settle(conn, name)
            entry = ls_entry(name)
            try:
                dom = conn.lookupByName(PREFIX + name)
                libvirt_state = "running" if dom.isActive() else "stopped"
            except libvirt.libvirtError:
                libvirt_state = None
            # ls tells the truth: it shows exactly what libvirt and the disk hold.
            if libvirt_state is None:
                expected = "orphaned" if state.VMDir(name).exists() else None
                assert (entry["state"] if entry else None) == expected, (delay, entry)
            else:
                assert entry is not None and entry["state"] == libvirt_state, (delay, entry)
            seen_states.add(entry["state"] if entry else "absent")
            down = cli("down", name, "--force", timeout=120)
            assert down.returncode == 0, (delay, down.stderr)
            assert_nothing_left(name)
    finally:
        conn.close()
        for name in made:  # a failed check above must not leave its guest behind
            cli("down", name, "--force", timeout=120)
    assert "running" in seen_states, f"no kill landed while the guest ran: {seen_states}"


def _settle(conn: libvirt.virConnect, name: str, wait_s: float = 15.0) -> None:
    """Let libvirt finish a start the killed `up` asked for: QEMU starts paused ("starting up") and is
    resumed by libvirtd itself, client or no client. ls is compared with libvirt after that."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            current, reason = conn.lookupByName(PREFIX + name).state()
        except libvirt.libvirtError:
            return
        if (current, reason) != (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP):
            return
        time.sleep(0.05)


def test_gc_removes_what_a_killed_up_left_and_spares_running_vms(unique_name, vm_factory):
    running = vm_factory(unique_name("keep"))
    orphan = state.VMDir(unique_name("orphan"))
    orphan.create()  # what an `up` killed between making the directory and defining the domain leaves
    (orphan.path / "disk.qcow2").write_bytes(b"x")
    out = cli("gc", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    removed = json.loads(out.stdout)["removed"]
    assert any(orphan.name in r for r in removed)
    assert not orphan.path.exists()
    assert running.exec(["true"]).exit_code == 0, "gc never touches a running VM"
    running.close()


# ------------------------------------------------------------------------------------------- concurrency


def test_second_up_of_the_same_name_fails_at_once_and_one_vm_results(unique_name, image):
    name = unique_name("twice")
    first = subprocess.Popen([*HEROVM, "up", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = state.home() / "locks" / f"vm-{name}.lock"
        for _ in range(200):
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.02)
        t = time.monotonic()
        second = cli("up", name, timeout=60)
        assert time.monotonic() - t < 15
        assert second.returncode == 4, second.stderr
        assert f"VM {name} is busy: another herovm process (pid {first.pid})" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()
        entries = [r for r in json.loads(cli("ls", "--json").stdout) if r["name"] == name]
        assert len(entries) == 1 and entries[0]["ready"]
    finally:
        first.kill()
        first.wait()
        cli("down", name, "--force", timeout=120)
    assert_nothing_left(name)


def test_down_during_up_ends_with_nothing(unique_name, image):
    name = unique_name("race")
    up = subprocess.Popen([*HEROVM, "up", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # until the guest is booting
            if qemu_running(name):
                break
            time.sleep(0.02)
        time.sleep(1.0)
        down = cli("down", name, timeout=120)
        assert down.returncode == 0, down.stderr
        code = up.wait(timeout=120)
        assert code != 0, "up must fail: its VM was removed under it"
        assert "herovm: error:" in up.stderr.read()
    finally:
        up.kill()
        up.wait()
    assert_nothing_left(name)


# ------------------------------------------------------------------------------------------ guest faults


def test_guest_that_never_boots_fails_fast_with_console_lines(unique_name, image):
    name = unique_name("noboot")
    t = time.monotonic()
    out = cli("up", name, "--kernel-args", "root=/dev/nonexistent", "--timeout", "2m", timeout=200)
    took = time.monotonic() - t
    assert out.returncode == 7, out.stderr
    assert "root device /dev/nonexistent did not appear" in out.stderr
    assert "console|" in out.stderr
    assert took < 60, f"took {took:.0f}s: the initramfs failure must end the wait, not the timeout"
    assert_nothing_left(name)


def test_kernel_panic_then_exec_fails_fast(vm_factory, unique_name):
    name = unique_name("panic")
    vm = vm_factory(name)
    m = vm_factory.manager
    with pytest.raises(GuestError):
        vm.exec("echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger; sleep 30", timeout=60)
    for _ in range(100):
        if m.backend.get(name).state != "running":
            break
        time.sleep(0.1)
    assert m.backend.get(name).state == "stopped", (
        "a panicking guest ends its domain (panic=-1, on_reboot destroy)"
    )
    t = time.monotonic()
    out = cli("exec", name, "--", "true", timeout=60)
    assert out.returncode == 255 and f"VM {name} is stopped" in out.stderr
    assert time.monotonic() - t < 10


# -------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def hanging_server():
    """Accepts connections on the host's loopback and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    srv.close()


@pytest.mark.parametrize("case", ["404", "oversized", "hangs"])
def test_bad_bootstrap_urls_get_one_line_errors_and_leave_nothing(
    case, unique_name, image, http_server, hanging_server
):
    name = unique_name(f"url-{case}")
    big = b"// padding\n" * (120 * 1024)  # 1.3 MB, over the 1 MiB limit
    (http_server.root / "big.hero").write_bytes(big)
    port = http_server.server_address[1]
    url, digest, expect = {
        "404": (f"http://10.0.2.2:{port}/missing.hero", "0" * 64, "404"),
        "oversized": (
            f"http://10.0.2.2:{port}/big.hero",
            hashlib.sha256(big).hexdigest(),
            "larger than the limit",
        ),
        "hangs": (f"http://10.0.2.2:{hanging_server}/x.hero", "0" * 64, "timed out"),
    }[case]
    with Manager() as m:
        m.fetch_timeout = 3
        with pytest.raises(BootFailed) as info:
            m.up(name, bootstrap=url, bootstrap_sha256=digest, timeout="2m", net="nat")
    assert info.value.details["stage"] == "fetch"
    assert expect in info.value.message and "\n" not in info.value.message
    assert_nothing_left(name)


# ---------------------------------------------------------------------------------- isolation and secrets


def _local_sshd_module():
    path = ROOT / "tests/unit/guest/conftest.py"
    spec = importlib.util.spec_from_file_location("herovm_test_local_sshd", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_a_different_ssh_server_on_the_port_is_refused(vm_factory, unique_name, tmp_path):
    name = unique_name("pin")
    vm = vm_factory(name)
    vm.close()
    m = vm_factory.manager
    m.stop(name)  # frees the forwarded port
    helpers = _local_sshd_module()
    keys = helpers.ClientKeys(tmp_path / "impostor-keys")
    # The impostor would let the VM's own client key in: only the pinned host key stands in its way.
    keys.client_public = keys_public = state.VMDir(name).read_meta()["client_key"]
    impostor = helpers.LocalSshd(tmp_path / "impostor", keys, port=vm.ssh_port).start()
    try:
        assert keys_public in (tmp_path / "impostor" / "authorized_keys").read_text()
        handle = m.get(name)
        t = time.monotonic()
        with pytest.raises(HostKeyMismatch):
            handle.connection(deadline_s=30)
        assert time.monotonic() - t < 5, "a wrong host key is refused at once, never retried"
    finally:
        impostor.stop()


def test_keys_and_secrets_stay_private(vm_factory, unique_name, recorder):
    name = unique_name("secret")
    secret = "s3cr3t-" + os.urandom(6).hex()
    vm = vm_factory(name, bootstrap=f"!!file.write path:/root/token content:'{secret}' mode:0600\n")
    assert vm.exec(["cat", "/root/token"]).stdout.decode() == secret
    vm.close()
    vmdir = state.VMDir(name)
    assert vmdir.secrets.stat().st_mode & 0o777 == 0o700
    for key in (vmdir.client_key, vmdir.host_key, vmdir.meta_file):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert vmdir.drive.stat().st_mode & 0o777 == 0o600, "the drive holds the guest's private host key"
    private = [vmdir.client_key.read_text(), vmdir.host_key.read_text()]
    conn = libvirt.open("qemu:///system")
    try:
        domain_xml = conn.lookupByName(PREFIX + name).XMLDesc()
    finally:
        conn.close()
    seen = {
        "console log": vmdir.console_log.read_text(errors="replace"),
        "status --json": cli("status", name, "--json").stdout,
        "ls --json": cli("ls", "--json").stdout,
        "logs": cli("logs", name).stdout,
        "domain XML": domain_xml,
        "progress events": json.dumps([p.data for p in recorder.events]),
    }
    for where, text in seen.items():
        assert secret not in text, f"bootstrap secret in {where}"
        for key in private:
            body = "".join(key.strip().splitlines()[1:-1])
            assert body[:40] not in text.replace("\n", ""), f"private key in {where}"


def test_port_taken_between_allocation_and_start_fails_cleanly(unique_name, image, monkeypatch):
    """Another program binds the chosen port before QEMU does: up fails with one line, nothing is left."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    monkeypatch.setattr(state, "allocate_port", lambda taken: port)
    name = unique_name("squat")
    try:
        with Manager() as m, pytest.raises(BootFailed) as info:
            m.up(name, timeout="1m")
    finally:
        squatter.close()
    assert info.value.details["stage"] == "start"
    assert "could not start" in info.value.message and str(port) in info.value.message
    assert_nothing_left(name)


def restart_libvirtd() -> None:
    """Restart the libvirtd that scripts/setup started (by its pid file, or through systemd)."""
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True, timeout=60)
    else:
        pid = int(Path("/run/libvirtd.pid").read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        subprocess.run(["libvirtd", "-d"], check=True, timeout=60)
    for _ in range(100):
        if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("libvirtd did not come back")


@pytest.mark.serial  # every other test's guests would lose libvirt under them
def test_libvirtd_restart_while_guests_run(vm_factory, unique_name):
    name = unique_name("restart-libvirtd")
    vm = vm_factory(name)
    vm.exec("echo before > /root/mark")
    m = vm_factory.manager  # a long-lived Manager: its libvirt connection dies with the daemon
    restart_libvirtd()
    assert ls_entry(name)["state"] == "running"
    assert m.backend.get(name).state == "running", "the Manager reconnects by itself"
    assert vm.exec(["cat", "/root/mark"]).stdout == b"before\n"  # the SSH connection never needed libvirt
    out = cli("exec", name, "--", "cat", "/root/mark", timeout=60)
    assert (out.returncode, out.stdout) == (0, "before\n")
    vm.close()
    assert cli("down", name, timeout=120).returncode == 0
    assert_nothing_left(name)


def test_exec_into_a_guest_that_freezes_fails_instead_of_hanging(vm_factory, unique_name, monkeypatch):
    """No deadline given, and the guest freezes mid-command (libvirt suspend): exec still returns."""
    from herovm.guest import execution

    monkeypatch.setattr(execution, "QUIET_PROBE_S", 3.0)  # the real values (20 s, 10 s) only make it slower
    monkeypatch.setattr(execution, "PROBE_ANSWER_S", 3.0)
    name = unique_name("freeze")
    vm = vm_factory(name)
    m = vm_factory.manager
    dom = libvirt.open("qemu:///system").lookupByName(PREFIX + name)
    threading.Timer(2.0, dom.suspend).start()
    t = time.monotonic()
    try:
        with pytest.raises(GuestError, match="stopped answering"):
            vm.exec("sleep 120")
        assert time.monotonic() - t < 30
    finally:
        dom.resume()
    vm.close()
    assert m.get(name).exec(["true"]).exit_code == 0, "after resume, a new connection works"
