"""GuestConnection against a real, private OpenSSH server on 127.0.0.1 (see conftest.py). No mocks."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import socket
import stat
import struct
import sys
import termios
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from herovm.errors import GuestError, NotFound
from herovm.guest.ssh import (
    ExecResult,
    GuestAuthError,
    GuestConnection,
    GuestConnectTimeout,
    HostKeyMismatch,
    RemotePathNotFound,
    UnsafeGuestPath,
    build_remote_command,
)

from .conftest import ClientKeys, LocalSshd, free_port, sshd_unavailable_reason

MB = 1000 * 1000


def connection(server: LocalSshd, keys: ClientKeys | None = None) -> GuestConnection:
    keys = keys or server.keys
    return GuestConnection(
        port=server.port, client_key=keys.client_key, host_key=keys.host_public, user=server.user
    )


@pytest.fixture(scope="module")
def conn(sshd: LocalSshd) -> Iterator[GuestConnection]:
    with connection(sshd).connect(deadline_s=10) as c:
        yield c


def alive(conn: GuestConnection, pid: int, settle_s: float = 3.0) -> bool:
    """Whether ``pid`` still runs on the guest (a zombie waiting to be reaped counts as dead).

    SIGKILL is delivered asynchronously, so give a dying process a moment before calling it alive.
    """
    check = f"kill -0 {pid} 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' /proc/{pid}/status"
    deadline = time.monotonic() + settle_s
    while conn.exec(check).exit_code == 0:
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return False


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


# -- exec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_codes(conn: GuestConnection, code: int) -> None:
    result = conn.exec(f"exit {code}")
    assert isinstance(result, ExecResult)
    assert result.exit_code == code
    assert not result.timed_out
    assert result.ok == (code == 0)


def test_stdout_and_stderr_are_separate(conn: GuestConnection) -> None:
    result = conn.exec("echo out; echo err >&2; echo out2")
    assert result.stdout == b"out\nout2\n"
    assert result.stderr == b"err\n"
    assert result.seconds > 0


def test_pid_line_is_not_part_of_stdout(conn: GuestConnection) -> None:
    assert conn.exec(["true"]).stdout == b""
    assert conn.exec(["printf", "no newline"]).stdout == b"no newline"


def test_list_arguments_reach_the_program_literally(conn: GuestConnection) -> None:
    args = [
        "a b",
        "it's",
        '"dq"',
        "$HOME",
        "`id`",
        "$(id)",
        "*",
        "x;y|z&",
        "back\\slash",
        "",
        "new\nline",
        "ü",
    ]
    result = conn.exec(["printf", "%s\\0", *args])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split(b"\0")[:-1] == [a.encode() for a in args]


def test_string_command_is_a_shell_line(conn: GuestConnection) -> None:
    assert conn.exec("echo $((1 + 2)) | tr 3 4").stdout == b"4\n"
    assert conn.exec("false || echo fallback; exit 4").exit_code == 4


def test_env_and_cwd(conn: GuestConnection, tmp_path: Path) -> None:
    env = {"FOO": "a b", "BAR": "$x 'q' \"d\"", "EMPTY": ""}
    result = conn.exec(
        ["sh", "-c", 'printf "%s|%s|%s|" "$FOO" "$BAR" "$EMPTY"; pwd'], env=env, cwd=str(tmp_path)
    )
    assert result.stdout.decode() == f"a b|$x 'q' \"d\"||{tmp_path}\n"
    # A string command sees the env in every part of the line, not just the first command.
    assert conn.exec("true; echo $FOO", env={"FOO": "all"}).stdout == b"all\n"


def test_cwd_that_does_not_exist_fails_without_running(conn: GuestConnection, tmp_path: Path) -> None:
    result = conn.exec(["touch", "ran"], cwd=str(tmp_path / "missing"))
    assert result.exit_code != 0
    assert b"missing" in result.stderr
    assert not (tmp_path / "missing").exists()


def test_invalid_env_name_is_refused() -> None:
    with pytest.raises(ValueError):
        build_remote_command(["true"], env={"A; rm -rf /": "x"})
    with pytest.raises(ValueError):
        build_remote_command([])


def test_stdin_bytes(conn: GuestConnection) -> None:
    assert conn.exec(["cat"], stdin=b"hello\nworld").stdout == b"hello\nworld"


def test_stdin_stream_larger_than_windows(conn: GuestConnection) -> None:
    data = os.urandom(3 * MB) * 4  # 12 MB: more than the SSH windows in both directions
    result = conn.exec(["cat"], stdin=io.BytesIO(data), timeout=60)
    assert not result.timed_out
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    big = conn.exec(["wc", "-c"], stdin=data, timeout=60)
    assert big.stdout.strip() == str(len(data)).encode()


def test_without_stdin_the_command_sees_eof(conn: GuestConnection) -> None:
    result = conn.exec(["cat"], timeout=20)
    assert not result.timed_out
    assert result.exit_code == 0
    assert result.stdout == b""


@pytest.mark.timeout(60)
def test_100mb_stdout_through_a_callback_is_streamed(conn: GuestConnection) -> None:
    count = 0
    chunks = 0

    def on_stdout(data: bytes) -> None:
        nonlocal count, chunks
        count += len(data)
        chunks += 1

    tracemalloc.start()
    try:
        result = conn.exec(["head", "-c", str(100 * MB), "/dev/zero"], on_stdout=on_stdout)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0
    assert count == 100 * MB
    assert chunks > 1
    assert result.stdout == b""
    assert peak < 40 * MB, f"peak {peak} bytes: output was held in memory"


@pytest.mark.timeout(60)
def test_100mb_stdout_captured(conn: GuestConnection) -> None:
    result = conn.exec(["head", "-c", str(100 * MB), "/dev/zero"])
    assert result.exit_code == 0
    assert len(result.stdout) == 100 * MB


@pytest.mark.timeout(60)
def test_slow_reader_does_not_deadlock(conn: GuestConnection) -> None:
    """stderr floods past the window while the stdout callback is slow: both must come through."""
    got: list[int] = []

    def slow(data: bytes) -> None:
        got.append(len(data))
        time.sleep(0.02)

    script = f"head -c {20 * MB} /dev/zero >&2; head -c {6 * MB} /dev/zero; head -c {1 * MB} /dev/zero >&2"
    result = conn.exec(script, on_stdout=slow)
    assert result.exit_code == 0
    assert sum(got) == 6 * MB
    assert len(result.stderr) == 21 * MB


def test_callbacks_for_both_streams(conn: GuestConnection) -> None:
    out: list[bytes] = []
    err: list[bytes] = []
    result = conn.exec("echo o; echo e >&2", on_stdout=out.append, on_stderr=err.append)
    assert (b"".join(out), b"".join(err)) == (b"o\n", b"e\n")
    assert (result.stdout, result.stderr) == (b"", b"")


def test_concurrent_execs_on_one_connection(conn: GuestConnection) -> None:
    """Many short commands at once: each one's channel closes while others open. This used to lose
    the whole connection now and then (an EOF sent after the channel's CLOSE, see ssh._send_eof)."""
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        for j in range(10):
            results[i * 100 + j] = conn.exec(["echo", str(i * 100 + j)]).stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: f"{k}\n".encode() for k in results} and len(results) == 80


# -- timeouts kill -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_timeout_kills_the_remote_command_and_its_children(conn: GuestConnection, tmp_path: Path) -> None:
    pidfile, childfile = tmp_path / "pid", tmp_path / "child"
    script = f"echo $$ > {pidfile}; sleep 300 & echo $! > {childfile}; echo started; wait"
    result = conn.exec(["sh", "-c", script], timeout=1.0)
    assert result.timed_out
    assert result.exit_code == 124
    assert result.stdout == b"started\n"
    pid, child = int(pidfile.read_text()), int(childfile.read_text())
    assert not alive(conn, pid)
    assert not alive(conn, child)


@pytest.mark.timeout(30)
def test_timeout_kills_a_command_that_keeps_writing(conn: GuestConnection, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    seen = 0

    def count(data: bytes) -> None:
        nonlocal seen
        seen += len(data)

    result = conn.exec(f"echo $$ > {pidfile}; exec yes", timeout=0.5, on_stdout=count)
    assert result.timed_out and result.exit_code == 124
    assert seen > 0
    assert not alive(conn, int(pidfile.read_text()))


@pytest.mark.timeout(30)
def test_timeout_kills_a_command_with_its_outputs_closed(conn: GuestConnection, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    result = conn.exec(f"echo $$ > {pidfile}; exec sleep 300 >/dev/null 2>&1 </dev/null", timeout=0.5)
    assert result.timed_out and result.exit_code == 124
    assert not alive(conn, int(pidfile.read_text()))


@pytest.mark.timeout(30)
def test_a_raising_callback_kills_the_remote_command(conn: GuestConnection, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    def boom(data: bytes) -> None:
        raise RuntimeError("reader gave up")

    with pytest.raises(RuntimeError, match="reader gave up"):
        conn.exec(f"echo $$ > {pidfile}; sleep 0.2; exec yes", on_stdout=boom)
    assert not alive(conn, int(wait_for_file(pidfile)))


def test_command_finishing_in_time_is_not_timed_out(conn: GuestConnection) -> None:
    result = conn.exec(["sh", "-c", "echo ok"], timeout=20)
    assert (result.exit_code, result.stdout, result.timed_out) == (0, b"ok\n", False)


def test_command_killed_by_a_signal_reports_128_plus_n(conn: GuestConnection) -> None:
    assert conn.exec("sh -c 'kill -TERM $$'").exit_code == 128 + 15


# -- connecting -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_wrong_host_key_fails_at_once(tmp_path: Path, session_keys: ClientKeys) -> None:
    impostor_keys = ClientKeys(tmp_path / "impostor")
    impostor_keys.client_public = session_keys.client_public  # we could even log in: still refused
    with LocalSshd(tmp_path / "sshd", impostor_keys).start() as impostor:
        conn = GuestConnection(
            port=impostor.port,
            client_key=session_keys.client_key,
            host_key=session_keys.host_public,
            user=impostor.user,
        )
        started = time.monotonic()
        with pytest.raises(HostKeyMismatch) as info:
            conn.connect(deadline_s=20)
        elapsed = time.monotonic() - started
    message = str(info.value)
    assert "host key mismatch" in message and str(impostor.port) in message and "refusing" in message
    assert "\n" not in message
    assert isinstance(info.value, GuestError)
    assert elapsed < 10, "a host key mismatch must not be retried until the deadline"
    assert not conn.connected


@pytest.mark.timeout(30)
def test_refused_client_key_fails_at_once(sshd: LocalSshd, tmp_path: Path) -> None:
    stranger = ClientKeys(tmp_path / "stranger")
    conn = GuestConnection(
        port=sshd.port, client_key=stranger.client_key, host_key=sshd.keys.host_public, user=sshd.user
    )
    started = time.monotonic()
    with pytest.raises(GuestAuthError, match="refused the client key"):
        conn.connect(deadline_s=20)
    assert time.monotonic() - started < 10


@pytest.mark.timeout(30)
def test_connect_retries_until_the_server_appears(tmp_path: Path, session_keys: ClientKeys) -> None:
    server = LocalSshd(tmp_path / "late", session_keys)
    starter = threading.Timer(1.0, lambda: server.start(wait=False))
    starter.start()
    try:
        with connection(server) as conn:
            conn.connect(deadline_s=20)
            assert conn.connected
            assert conn.exec(["echo", "up"]).stdout == b"up\n"
    finally:
        starter.join()
        server.stop()


@pytest.mark.timeout(30)
def test_connect_times_out_when_nothing_listens(session_keys: ClientKeys) -> None:
    port = free_port()
    conn = GuestConnection(port=port, client_key=session_keys.client_key, host_key=session_keys.host_public)
    started = time.monotonic()
    with pytest.raises(GuestConnectTimeout) as info:
        conn.connect(deadline_s=1.0)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "ConnectionRefused" in message
    assert "\n" not in message


@pytest.mark.timeout(30)
def test_connect_retries_when_the_port_accepts_and_hangs_up(session_keys: ClientKeys) -> None:
    """What QEMU's user-mode port forward does while the guest's sshd is not up yet."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    accepted = 0
    stop = threading.Event()

    def hang_up() -> None:
        nonlocal accepted
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            accepted += 1
            client.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        conn = GuestConnection(
            port=port, client_key=session_keys.client_key, host_key=session_keys.host_public
        )
        with pytest.raises(GuestConnectTimeout, match=f"127.0.0.1:{port}"):
            conn.connect(deadline_s=1.0)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert accepted > 1


def test_malformed_pinned_key_or_missing_client_key(session_keys: ClientKeys, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="pinned host key .* is malformed"):
        GuestConnection(port=22, client_key=session_keys.client_key, host_key="ssh-ed25519 AAAA")
    with pytest.raises(GuestError, match="cannot load the client key"):
        GuestConnection(port=22, client_key=tmp_path / "nope", host_key=session_keys.host_public)


def test_using_a_connection_before_connect_or_after_close(sshd: LocalSshd) -> None:
    conn = connection(sshd)
    with pytest.raises(GuestError, match="not connected"):
        conn.exec(["true"])
    conn.connect(10)
    assert conn.connect(10) is conn  # already connected: no-op
    conn.close()
    conn.close()
    with pytest.raises(GuestError, match="call connect"):
        conn.exec(["true"])


def test_reconnects_after_the_connection_dropped(sshd: LocalSshd) -> None:
    with connection(sshd).connect(10) as conn:
        conn._client.get_transport().close()  # type: ignore[union-attr]
        with pytest.raises(GuestError, match="lost"):
            conn.exec(["true"])
        conn.connect(10)
        assert conn.exec(["true"]).exit_code == 0


@pytest.mark.timeout(30)
def test_connection_lost_during_exec_is_an_error(sshd: LocalSshd, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with connection(sshd).connect(10) as conn:
        transport = conn._client.get_transport()  # type: ignore[union-attr]
        timer = threading.Timer(0.5, transport.close)  # type: ignore[union-attr]
        timer.start()
        try:
            with pytest.raises(GuestError, match="lost while a command ran"):
                conn.exec(f"echo $$ > {pidfile}; exec sleep 30")
        finally:
            timer.join()
        # Without a pty, a dropped connection leaves the command running; clean up after ourselves.
        conn.connect(10)
        conn.exec(["kill", "-9", wait_for_file(pidfile)])


# -- files ----------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = (0, os.readlink(path))
        elif path.is_dir():
            out[rel] = (stat.S_IMODE(st.st_mode), None)
        else:
            out[rel] = (stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def test_put_and_get_a_file_keep_its_mode(conn: GuestConnection, tmp_path: Path) -> None:
    src = tmp_path / "tool.sh"
    src.write_bytes(b"#!/bin/sh\necho hi\n" + os.urandom(300_000))
    src.chmod(0o750)
    remote = tmp_path / "remote" / "tool.sh"
    remote.parent.mkdir()
    conn.put(src, str(remote))
    assert remote.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(remote.stat().st_mode) == 0o750
    back = tmp_path / "back.sh"
    conn.get(str(remote), back)
    assert back.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(back.stat().st_mode) == 0o750


def test_put_and_get_a_directory_tree(conn: GuestConnection, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "top.txt").write_text("top")
    (src / "a" / "run").write_bytes(b"\x00\x01binary")
    (src / "a" / "run").chmod(0o755)
    (src / "a" / "b" / "secret").write_text("s")
    (src / "a" / "b" / "secret").chmod(0o600)
    (src / "a" / "link").symlink_to("run")
    (src / "a" / "b").chmod(0o555)  # read-only directory: must still be filled, then get its mode
    (src / "empty").chmod(0o711)
    try:
        remote = tmp_path / "remote-copy"
        conn.put(src, str(remote))
        assert tree(remote) == tree(src)
        back = tmp_path / "back"
        conn.get(str(remote), back)
        assert tree(back) == tree(src)
    finally:
        for d in (src, tmp_path / "remote-copy", tmp_path / "back"):
            for p in [d, *d.rglob("*")] if d.exists() else []:
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)


def test_get_of_a_missing_remote_path(conn: GuestConnection, tmp_path: Path) -> None:
    with pytest.raises(RemotePathNotFound) as info:
        conn.get(str(tmp_path / "nope"), tmp_path / "local")
    assert isinstance(info.value, GuestError) and isinstance(info.value, NotFound)
    assert "does not exist on the guest" in str(info.value)
    assert not (tmp_path / "local").exists()


def test_put_of_a_missing_local_path(conn: GuestConnection, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        conn.put(tmp_path / "nope", str(tmp_path / "remote"))


def test_put_into_a_missing_remote_directory_is_a_clear_error(conn: GuestConnection, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(GuestError, match="failed"):
        conn.put(src, str(tmp_path / "no" / "such" / "dir" / "f"))


# -- get: everything the guest sends is hostile ----------------------------------------------------
# The "guest" of the private sshd is this machine's file system, so a guest-side symlink is a real one.

STOCK_SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
HOSTILE_SFTP = Path(__file__).with_name("hostile_sftp.py")


def snapshot(root: Path, *, besides: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``root`` but ``besides`` and what is below it, links not followed."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == besides or besides in path.parents:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content: bytes | str = os.readlink(path)
            else:
                content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(path.relative_to(root))] = (st.st_mode, content)
    return out


def masked(mode: int) -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & 0o777 & ~umask


@pytest.fixture(scope="module")
def stock_conn(
    tmp_path_factory: pytest.TempPathFactory, session_keys: ClientKeys
) -> Iterator[GuestConnection]:
    """Like the guest's sshd: OpenSSH's sftp-server program rather than internal-sftp."""
    reason = sshd_unavailable_reason()
    if reason or not STOCK_SFTP_SERVER.exists():
        pytest.skip(reason or f"{STOCK_SFTP_SERVER} is not installed")
    workdir = tmp_path_factory.mktemp("stock-sftp-sshd")
    with (
        LocalSshd(workdir, session_keys, sftp=str(STOCK_SFTP_SERVER)).start() as server,
        connection(server).connect(deadline_s=10) as c,
    ):
        yield c


def test_get_symlink_swap_attack_never_writes_through_a_link(
    stock_conn: GuestConnection, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_text("precious\n")
    target_dir = tmp_path / "target-dir"
    target_dir.mkdir()
    guest = tmp_path / "guest" / "d"
    guest.mkdir(parents=True)
    (guest / "f").symlink_to(target)  # ln -sfn /tmp/target /root/d/f
    (guest / "sub").symlink_to(target_dir)
    out = tmp_path / "out"

    skipped = stock_conn.get(str(guest), out)
    assert len(skipped) == 2 and all("\n" not in line for line in skipped)
    assert f"guest:{guest / 'f'} -> '{target}'" in skipped[0] and "absolute" in skipped[0]
    assert not os.path.lexists(out / "f") and not os.path.lexists(out / "sub")

    # The guest swaps its links for a file and a directory. Host links at those places (from an older
    # herovm, which kept links verbatim) are replaced, not followed.
    (guest / "f").unlink()
    (guest / "f").write_text("from the guest\n")
    (guest / "sub").unlink()
    (guest / "sub").mkdir()
    (guest / "sub" / "x").write_text("from the guest\n")
    (out / "f").symlink_to(target)
    (out / "sub").symlink_to(target_dir)
    before = snapshot(tmp_path, besides=out)

    assert stock_conn.get(str(guest), out) == []
    assert snapshot(tmp_path, besides=out) == before
    assert target.read_text() == "precious\n" and list(target_dir.iterdir()) == []
    assert not (out / "f").is_symlink() and (out / "f").read_text() == "from the guest\n"
    assert not (out / "sub").is_symlink() and (out / "sub" / "x").read_text() == "from the guest\n"


def test_get_drops_setuid_setgid_sticky_and_guest_owners(conn: GuestConnection, tmp_path: Path) -> None:
    guest = tmp_path / "guest"
    (guest / "shared").mkdir(parents=True)
    modes = {"suid": 0o4755, "sgid": 0o2775, "both": 0o6777, "shared": 0o3777}
    for name in ("suid", "sgid", "both"):
        (guest / name).write_text(name)
    for name, mode in modes.items():
        os.chmod(guest / name, mode)
        if os.geteuid() == 0:
            os.chown(guest / name, 12345, 12345)
    out = tmp_path / "out"
    out.mkdir(mode=0o700)  # a directory the user chose keeps its mode

    assert conn.get(str(guest), out) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name, mode in modes.items():
        st = (out / name).lstat()
        assert stat.S_IMODE(st.st_mode) == masked(mode), name
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), name
    conn.get(str(guest / "suid"), tmp_path / "one")
    assert stat.S_IMODE((tmp_path / "one").stat().st_mode) == masked(0o755)


def test_get_keeps_links_inside_the_tree_and_skips_escaping_ones(
    conn: GuestConnection, tmp_path: Path
) -> None:
    guest = tmp_path / "guest"
    (guest / "sub" / "deeper").mkdir(parents=True)
    (guest / "a.txt").write_text("a")
    (guest / "sub" / "b").write_text("b")
    kept = {
        "sub/up": "../a.txt",
        "sub/deeper/x": "../../a.txt",
        "self": ".",
        "rel": "sub/b",
        "dangling": "not-there",
        "sub/top": "..",
    }
    escaping = {
        "abs": "/etc/passwd",
        "out": "../outside",
        "sub/out2": "../../outside",
        "sub/deeper/out3": "../../../../outside",
        "climb": "sub/../../outside",
        "sneaky": "self/../outside",  # normalises to "outside", resolves to guest/../outside
    }
    for rel, target in {**kept, **escaping}.items():
        (guest / rel).symlink_to(target)
    out = tmp_path / "out"

    skipped = conn.get(str(guest), out)
    assert sorted(
        line.split(" -> ")[0].removeprefix(f"skipped the symlink guest:{guest}/") for line in skipped
    ) == (sorted(escaping))
    assert all("\n" not in line for line in skipped)
    assert {rel: os.readlink(out / rel) for rel in kept} == kept
    assert not any(os.path.lexists(out / rel) for rel in escaping)
    assert (out / "sub" / "up").read_text() == "a" and (out / "self" / "rel").read_text() == "b"
    assert (out / "sub" / "b").read_text() == "b"


def test_get_of_one_file_follows_the_guest_link_and_replaces_a_host_link(
    conn: GuestConnection, tmp_path: Path
) -> None:
    guest = tmp_path / "guest"
    (guest / "dir").mkdir(parents=True)
    (guest / "real.txt").write_text("guest data\n")
    (guest / "dir" / "inner").write_text("inner\n")
    (guest / "link").symlink_to("real.txt")
    (guest / "dirlink").symlink_to("dir")
    target = tmp_path / "target"
    target.write_text("precious\n")
    local = tmp_path / "copy"
    local.symlink_to(target)  # LOCAL is an existing host symlink

    assert conn.get(str(guest / "link"), local) == []
    assert target.read_text() == "precious\n"
    assert not local.is_symlink() and local.read_text() == "guest data\n"
    conn.get(str(guest / "dirlink"), tmp_path / "dircopy")
    assert (tmp_path / "dircopy" / "inner").read_text() == "inner\n"

    with pytest.raises(GuestError, match="is a directory") as info:
        conn.get(str(guest / "real.txt"), tmp_path / "dircopy")
    assert sorted(os.listdir(tmp_path / "dircopy")) == ["inner"] and "\n" not in str(info.value)


@dataclass
class Hostile:
    conn: GuestConnection
    scenario: Path

    def serve(self, tree: dict) -> None:
        self.scenario.write_text(json.dumps(tree))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, session_keys: ClientKeys) -> Iterator[Hostile]:
    """An sshd whose sftp subsystem is tests/unit/guest/hostile_sftp.py: a guest root that lies."""
    reason = sshd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("hostile-sshd")
    scenario = workdir / "scenario.json"
    scenario.write_text("{}")
    command = f"{sys.executable} -I {HOSTILE_SFTP} {scenario}"
    with (
        LocalSshd(workdir, session_keys, sftp=command).start() as server,
        connection(server).connect(deadline_s=10) as c,
    ):
        yield Hostile(c, scenario)


def file(data: str = "evil", mode: int = 0o4755) -> dict:
    return {"kind": "file", "mode": mode, "data": data}


@pytest.mark.parametrize(
    "name",
    [
        "../../escaped",
        "../../../escaped",
        "{tmp}/abs-escaped",
        "a/b",
        "sub/../../../escaped",
        "",
        "x\x00y",
        "hex:2e2e2fff",  # "../" and a byte that is not UTF-8
    ],
)
def test_hostile_names_are_refused_and_nothing_is_written(
    hostile: Hostile, tmp_path: Path, name: str
) -> None:
    name = name.replace("{tmp}", str(tmp_path))
    hostile.serve(
        {
            "d": {
                "kind": "dir",
                "mode": 0o755,
                "entries": {"a-first": file("fine"), name: file(), "sub": {"kind": "dir"}},
            }
        }
    )
    dest = tmp_path / "o" / "i" / "dest"
    dest.parent.mkdir(parents=True)
    before = snapshot(tmp_path, besides=dest)
    with pytest.raises(UnsafeGuestPath) as info:
        hostile.conn.get("/d", dest)
    message = str(info.value)
    assert "\n" not in message and "refusing to copy" in message and "nothing was copied" in message
    assert isinstance(info.value, GuestError)
    assert not os.path.lexists(dest)
    assert snapshot(tmp_path, besides=dest) == before


def test_hostile_duplicate_names_deep_trees_and_top_links_are_refused(
    hostile: Hostile, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    cases = {
        "twice": {
            "kind": "dir",
            "entries": [["a", file()], ["a", {"kind": "dir", "entries": {"b": file()}}]],
        },
        "loop": {"kind": "dir", "mode": 0o755, "entries": {"again": "@loop"}},
        "top": {"kind": "link", "target": "x"},
    }
    hostile.serve(cases)
    for path, expected in [("/twice", "'a' twice"), ("/loop", "over 128"), ("/top", "is a symlink")]:
        with pytest.raises(UnsafeGuestPath, match=expected) as info:
            hostile.conn.get(path, dest)
        assert "\n" not in str(info.value)
        assert not os.path.lexists(dest)


def test_hostile_dot_names_modes_and_link_targets(hostile: Hostile, tmp_path: Path) -> None:
    hostile.serve(
        {
            "d": {
                "kind": "dir",
                "mode": 0o7777,
                "entries": {
                    "..": file(),  # paramiko drops "." and ".." from listings
                    ".": file(),
                    "suid": file("s", 0o4755),
                    "all": file("a", 0o7777),
                    "sub": {"kind": "dir", "mode": 0o3777, "entries": {"x": file("x", 0o2755)}},
                    "ok": {"kind": "link", "target": "suid"},
                    "abs": {"kind": "link", "target": str(tmp_path / "escaped")},
                    "nul": {"kind": "link", "target": "a\x00b"},
                    "newline": {"kind": "link", "target": "a\nb/../../.."},
                    "binary": {"kind": "link", "target": "hex:ff"},
                },
            }
        }
    )
    dest = tmp_path / "dest"
    skipped = hostile.conn.get("/d", dest)
    assert [line.split(" -> ")[0] for line in skipped] == [
        f"skipped the symlink guest:/d/{name}" for name in ("abs", "binary", "newline", "nul")
    ]
    assert all("\n" not in line for line in skipped)
    assert sorted(os.listdir(dest)) == ["all", "ok", "sub", "suid"]
    assert os.readlink(dest / "ok") == "suid"
    for rel, mode in {".": 0o7777, "suid": 0o4755, "all": 0o7777, "sub": 0o3777, "sub/x": 0o2755}.items():
        assert stat.S_IMODE((dest / rel).stat().st_mode) == masked(mode), rel
    assert (dest / "sub" / "x").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["dest"]


# -- shell ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_shell_without_a_tty_pumps_stdin_and_stdout(conn: GuestConnection, tmp_path: Path) -> None:
    script = tmp_path / "in"
    script.write_bytes(b"echo from-shell\necho to-stderr >&2\nexit 7\n")
    out, err = tmp_path / "out", tmp_path / "err"
    with script.open("rb") as fin, out.open("wb") as fout, err.open("wb") as ferr:
        code = conn.shell(stdin_fd=fin.fileno(), stdout_fd=fout.fileno(), stderr_fd=ferr.fileno())
    assert code == 7
    assert out.read_bytes() == b"from-shell\n"
    assert err.read_bytes() == b"to-stderr\n"


@pytest.mark.timeout(30)
def test_shell_with_a_tty_uses_a_pty_and_restores_the_terminal(conn: GuestConnection) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    before = termios.tcgetattr(slave)
    seen = bytearray()
    done = threading.Event()

    def drive() -> None:
        os.write(master, b"stty size; tty; exit 5\n")
        while not done.is_set():
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            seen.extend(data)

    os.set_blocking(master, True)
    reader = threading.Thread(target=drive, daemon=True)
    reader.start()
    try:
        code = conn.shell(stdin_fd=slave, stdout_fd=slave, stderr_fd=slave, term="dumb")
        assert termios.tcgetattr(slave) == before
    finally:
        done.set()
        os.close(slave)
        os.close(master)
        reader.join(5)
    assert code == 5
    assert b"/dev/pts/" in seen  # the remote side had a real terminal...
    assert b"33 101" in seen  # ...of our size
