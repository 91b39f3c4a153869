"""`herovm serve` driven through E2B's own Python SDK (pinned in the dev extra), with its default settings:
only E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY point it at a server on a free loopback port.

Sandboxes are real guests (VMs named e2b-<id> in the default home); at most three run at once. The server
runs as a subprocess, so a test can restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

e2b = pytest.importorskip("e2b", reason="the e2b SDK (dev extra) is not installed")
httpx = pytest.importorskip("httpx")
from e2b import Sandbox  # noqa: E402
from e2b.envd.process import process_pb  # noqa: E402
from e2b.sandbox.sandbox_api import SandboxQuery  # noqa: E402
from guests import e2b_sdk_at  # noqa: E402
from protobuf import Oneof  # noqa: E402

from herovm.serve.app import ServeApp  # noqa: E402

HEROVM = str(Path(sys.executable).with_name("herovm"))
pytestmark = pytest.mark.usefixtures("serve_alone")  # conftest: the serve test files take turns


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, key: str, log: Path) -> None:
        self.port, self.key, self.log = port, key, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "HEROVM_API_KEY": self.key}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [HEROVM, "serve", "--listen", f"127.0.0.1:{self.port}", "--max-sandboxes", "3"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"herovm serve exited: {self.log.read_text()[-2000:]}"
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"herovm serve did not listen: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, image) -> Iterator[Server]:
    srv = Server(_free_port(), "e2b_" + secrets.token_hex(16), tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        with e2b_sdk_at(srv.url, srv.key):
            srv.start()
            yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sandbox(server: Server) -> Iterator[Sandbox]:
    """One sandbox for the tests that only run commands and touch files in it."""
    started = time.monotonic()
    sb = Sandbox.create(
        timeout=900, metadata={"suite": "serve", "run": server.key[-6:]}, envs={"FROM_CREATE": "c1"}
    )
    first = sb.commands.run("echo ready")
    took = time.monotonic() - started
    print(f"create to first command: {took:.2f}s")  # noqa: T201 (shown with -s)
    assert first.stdout == "ready\n"
    yield sb
    with contextlib.suppress(Exception):
        sb.kill()


def test_commands_output_exit_codes_envs_cwd_users(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)

    with pytest.raises(e2b.CommandExitException) as exc:
        sandbox.commands.run("echo partial; exit 7")
    assert exc.value.exit_code == 7
    assert exc.value.stdout == "partial\n"

    r = sandbox.commands.run('echo "$FROM_CREATE $PER_RUN"', envs={"PER_RUN": "r1"})
    assert r.stdout == "c1 r1\n"

    r = sandbox.commands.run("pwd", cwd="/tmp")
    assert r.stdout == "/tmp\n"

    r = sandbox.commands.run("whoami; pwd; echo $HOME")
    assert r.stdout == "user\n/home/user\n/home/user\n"
    r = sandbox.commands.run("whoami; pwd", user="root")
    assert r.stdout == "root\n/root\n"

    # the user's rights are the guest's: `user` cannot write where only root may
    with pytest.raises(e2b.CommandExitException):
        sandbox.commands.run("touch /etc/herovm-serve-test")
    sandbox.commands.run("touch /etc/herovm-serve-test && rm /etc/herovm-serve-test", user="root")


def test_streamed_output_reaches_callbacks(sandbox: Sandbox) -> None:
    seen: list[str] = []
    r = sandbox.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=seen.append)
    assert "".join(seen) == "line1\nline2\nline3\n" == r.stdout


def test_files_text_bytes_and_directory_operations(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/notes/a.txt", "hello\n")
    assert sandbox.files.read("/home/user/notes/a.txt") == "hello\n"
    blob = bytes(range(256)) * 64
    sandbox.files.write("data.bin", blob)  # relative: the user's home
    assert bytes(sandbox.files.read("/home/user/data.bin", format="bytes")) == blob
    assert sandbox.commands.run("stat -c %U /home/user/notes/a.txt").stdout == "user\n"

    names = {e.name for e in sandbox.files.list("/home/user/notes")}
    assert names == {"a.txt"}
    assert sandbox.files.exists("/home/user/notes/a.txt")
    assert not sandbox.files.exists("/home/user/notes/missing")
    info = sandbox.files.get_info("/home/user/notes/a.txt")
    assert (info.name, info.size, info.type.value) == ("a.txt", 6, "file")

    assert sandbox.files.make_dir("/home/user/notes/sub") is True
    assert sandbox.files.make_dir("/home/user/notes/sub") is False  # exists already
    moved = sandbox.files.rename("/home/user/notes/a.txt", "/home/user/notes/sub/b.txt")
    assert moved.path == "/home/user/notes/sub/b.txt"
    sandbox.files.remove("/home/user/notes")
    assert not sandbox.files.exists("/home/user/notes")

    with pytest.raises(e2b.NotFoundException):
        sandbox.files.read("/home/user/nope.txt")
    with pytest.raises(e2b.SandboxException):  # root's file, read as `user`
        sandbox.files.read("/etc/shadow")
    assert "root:" in sandbox.files.read("/etc/shadow", user="root")


def test_list_with_metadata_filter_and_get_info(server: Server, sandbox: Sandbox) -> None:
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "serve"})).next_items()
    assert sandbox.sandbox_id in {s.sandbox_id for s in listed}
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items() == []
    info = sandbox.get_info()
    assert info.metadata["suite"] == "serve"
    assert info.state.value == "running"
    assert info.template_id == "base"


def test_wrong_api_key_is_refused(server: Server) -> None:
    with pytest.raises(e2b.AuthenticationException):
        Sandbox.list(api_key="e2b_wrong").next_items()
    with pytest.raises(e2b.AuthenticationException):
        Sandbox.create(api_key="e2b_wrong")


def test_unknown_template_and_bad_input(server: Server) -> None:
    with pytest.raises(e2b.SandboxException, match="not found"):
        Sandbox.create(template="no-such-template")
    r = httpx.post(f"{server.url}/sandboxes", headers={"X-API-KEY": server.key}, content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == 400
    r = httpx.post(
        f"{server.url}/sandboxes", headers={"X-API-KEY": server.key}, json={"templateID": "base", "bogus": 1}
    )
    assert r.status_code == 400 and "bogus" in r.json()["message"]
    with pytest.raises(e2b.SandboxException):
        Sandbox.get_info("doesnotexist")


def _start_json(server: Server, sandbox_id: str, token: str) -> httpx.Response:
    """One envd Process/Start call, as the SDK makes it (Connect, JSON envelopes)."""
    body = b'{"process":{"cmd":"/bin/echo","args":["reached"]}}'
    return httpx.post(
        f"{server.url}/process.Process/Start",
        headers={
            "E2b-Sandbox-Id": sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": token,
            "Content-Type": "application/connect+json",
        },
        content=b"\0" + len(body).to_bytes(4, "big") + body,
    )


def test_timeout_kills_and_one_token_opens_one_sandbox(server: Server, sandbox: Sandbox) -> None:
    other = Sandbox.create(timeout=600)
    try:
        # the other sandbox's own token works; the first one's token does not open it
        reached = b'"stdout":"cmVhY2hlZAo="'  # base64("reached\n") in a JSON data event
        assert reached in _start_json(server, other.sandbox_id, other._envd_access_token).content
        refused = _start_json(server, other.sandbox_id, sandbox._envd_access_token)
        assert refused.status_code == 401
        assert reached not in refused.content

        other.set_timeout(2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and other.sandbox_id in {
            s.sandbox_id for s in Sandbox.list().next_items()
        }:
            time.sleep(0.5)
        assert other.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()}
        names = subprocess.run([HEROVM, "ls", "--json"], capture_output=True, text=True).stdout
        assert f"e2b-{other.sandbox_id}" not in names
    finally:
        with contextlib.suppress(Exception):
            other.kill()


def test_pause_and_connect_keep_files_then_kill(server: Server) -> None:
    sb = Sandbox.create(timeout=600)
    try:
        sb.files.write("/home/user/kept.txt", "still here")
        sb.commands.run("sleep 1000 >/dev/null 2>&1 &")
        assert sb.pause() is True
        assert Sandbox.get_info(sb.sandbox_id).state.value == "paused"
        resumed = Sandbox.connect(sb.sandbox_id)
        assert resumed.files.read("/home/user/kept.txt") == "still here"
        assert resumed.commands.run("pgrep -f 'sleep 1000' >/dev/null && echo alive").stdout == "alive\n"
    finally:
        assert Sandbox.kill(sb.sandbox_id) is True
    assert sb.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()}
    assert Sandbox.kill(sb.sandbox_id) is False  # gone: E2B's answer for an unknown sandbox


def test_restarted_server_keeps_a_running_sandbox_usable(server: Server, sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/before-restart.txt", "1")
    server.stop()
    server.start()
    assert sandbox.commands.run("cat /home/user/before-restart.txt").stdout == "1"
    assert sandbox.sandbox_id in {s.sandbox_id for s in Sandbox.list().next_items()}


def _first_output(handle: object, deadline_s: float = 30) -> tuple[str | None, str | None]:
    """The next stdout or stderr chunk a background command's handle gets."""
    for stdout, stderr, _pty in handle:  # type: ignore[attr-defined]
        if stdout or stderr:
            return stdout, stderr
    raise AssertionError("the command ended without output")


def test_background_command_stdin_list_kill(sandbox: Sandbox) -> None:
    started = time.monotonic()
    h = sandbox.commands.run("echo started; exec cat", background=True, stdin=True, timeout=0)
    assert _first_output(h) == ("started\n", None)
    print(f"background start to first output: {time.monotonic() - started:.2f}s")  # noqa: T201
    assert h.pid in {p.pid for p in sandbox.commands.list()}
    listed = next(p for p in sandbox.commands.list() if p.pid == h.pid)
    assert (listed.cmd, listed.args[-1]) == ("/bin/bash", "echo started; exec cat")

    h.send_stdin("hello\n")
    assert _first_output(h) == ("hello\n", None)
    sandbox.commands.send_stdin(h.pid, b"bytes too\n")
    assert _first_output(h) == ("bytes too\n", None)

    assert h.kill() is True  # SIGKILL, as E2B's kill
    with pytest.raises(e2b.CommandExitException) as exc:
        h.wait()
    assert exc.value.exit_code == -1 and exc.value.error == "signal: killed"
    assert h.pid not in {p.pid for p in sandbox.commands.list()}

    # stdin closed: the command sees its end
    h = sandbox.commands.run("cat; echo done", background=True, stdin=True)
    h.send_stdin("x")
    h.close_stdin()
    assert h.wait().stdout == "xdone\n"

    # without stdin=True a reader gets EOF at once; SIGTERM through the Connect API ends a command too
    assert sandbox.commands.run("cat; echo eof").stdout == "eof\n"
    h = sandbox.commands.run("sleep 60", background=True)
    assert sandbox.commands.kill(12345678) is False  # no such process
    # the SDK kills with SIGKILL only; envd takes SIGTERM too (its own Connect client sends it here)
    sandbox.commands._rpc.send_signal(
        process_pb.SendSignalRequest(
            process=process_pb.ProcessSelector(selector=Oneof("pid", h.pid)),
            signal=process_pb.Signal.SIGTERM,
        )
    )
    with pytest.raises(e2b.CommandExitException) as exc:
        h.wait()
    assert exc.value.error == "signal: terminated"


def test_a_command_outlives_its_client_and_is_reconnected(server: Server, sandbox: Sandbox) -> None:
    h = sandbox.commands.run(
        "for i in $(seq 1 40); do echo tick$i; sleep 0.1; done; exit 3", background=True, timeout=0
    )
    assert _first_output(h)[0].startswith("tick1\n")
    h.disconnect()  # E2B: the command runs on
    time.sleep(1)
    other = Sandbox.connect(sandbox.sandbox_id)  # a second client, from the id alone
    assert h.pid in {p.pid for p in other.commands.list()}
    again = other.commands.connect(h.pid)
    with pytest.raises(e2b.CommandExitException) as exc:
        again.wait()
    assert exc.value.exit_code == 3 and "tick40\n" in exc.value.stdout
    assert "tick1\n" not in exc.value.stdout  # what came while nobody followed is not replayed


def test_a_command_is_killed_at_its_timeout(sandbox: Sandbox) -> None:
    """envd's deadline: the call's timeout is the command's, followed or not."""
    started = time.monotonic()
    with pytest.raises(e2b.TimeoutException):
        sandbox.commands.run("sleep 30; echo never", timeout=2)
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
        p.args[-1:] == ["sleep 30; echo never"] for p in sandbox.commands.list()
    ):
        time.sleep(0.5)
    assert not any(p.args[-1:] == ["sleep 30; echo never"] for p in sandbox.commands.list())
    h = sandbox.commands.run("sleep 30", background=True, timeout=2)
    h.disconnect()
    time.sleep(4)
    assert h.pid not in {p.pid for p in sandbox.commands.list()}


def test_a_10_mb_file_round_trip_streamed(sandbox: Sandbox) -> None:
    blob = os.urandom(10 << 20)
    digest = hashlib.sha256(blob).hexdigest()
    t0 = time.monotonic()
    info = sandbox.files.write("/home/user/big.bin", blob)  # multipart
    t1 = time.monotonic()
    back = bytes(sandbox.files.read("/home/user/big.bin", format="bytes"))
    t2 = time.monotonic()
    print(f"10 MB upload {t1 - t0:.2f}s, download {t2 - t1:.2f}s")  # noqa: T201
    assert info.path == "/home/user/big.bin"
    assert hashlib.sha256(back).hexdigest() == digest
    assert sandbox.commands.run("sha256sum /home/user/big.bin").stdout.split()[0] == digest

    # a file object goes as octet-stream (gzip too, once app.py serves envd's streamed /files); a stream
    # comes back in chunks
    sandbox.files.write("/home/user/big2.bin", io.BytesIO(blob))
    names = ["big2.bin"]
    if not hasattr(ServeApp, "write_file"):
        sandbox.files.write("/home/user/big3.bin", blob, gzip=True)
        names.append("big3.bin")
    for name in names:
        chunks = sandbox.files.read(f"/home/user/{name}", format="stream")
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk)
        assert h.hexdigest() == digest
    sandbox.commands.run("rm -f /home/user/big.bin /home/user/big2.bin /home/user/big3.bin")


def test_directory_operations_through_the_agent(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/home/user/tree/a/b")  # parents made
    sandbox.files.write("/home/user/tree/a/b/f.txt", "f")
    sandbox.files.write("/home/user/tree/top.txt", "top")
    one = {e.path for e in sandbox.files.list("/home/user/tree")}
    assert one == {"/home/user/tree/a", "/home/user/tree/top.txt"}
    two = {e.path for e in sandbox.files.list("/home/user/tree", depth=3)}
    assert "/home/user/tree/a/b/f.txt" in two and "/home/user/tree/a/b" in two
    info = sandbox.files.get_info("/home/user/tree/a")
    assert (info.type.value, info.owner, info.permissions[0]) == ("dir", "user", "d")
    sandbox.commands.run("ln -s /home/user/tree/top.txt /home/user/tree/link")
    link = sandbox.files.get_info("/home/user/tree/link")
    assert (link.type.value, link.symlink_target) == ("symlink", "/home/user/tree/top.txt")
    moved = sandbox.files.rename("/home/user/tree/a", "/home/user/tree/moved")
    assert moved.path == "/home/user/tree/moved" and moved.type.value == "dir"
    assert sandbox.files.exists("/home/user/tree/moved/b/f.txt")
    with pytest.raises(e2b.NotFoundException):
        sandbox.files.rename("/home/user/tree/nope", "/home/user/tree/x")
    with pytest.raises(e2b.NotFoundException):
        sandbox.files.list("/home/user/tree/nope")
    with pytest.raises(e2b.InvalidArgumentException):
        sandbox.files.list("/home/user/tree/top.txt")  # not a directory
    sandbox.files.remove("/home/user/tree")  # with everything in it
    assert not sandbox.files.exists("/home/user/tree")
    with pytest.raises(e2b.NotFoundException):
        sandbox.files.remove("/home/user/tree")


def test_user_and_root_permissions(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/mine.txt", "m")
    assert sandbox.files.get_info("/home/user/mine.txt").owner == "user"
    with pytest.raises(e2b.SandboxException):
        sandbox.files.write("/etc/herovm-serve-user.txt", "no")
    with pytest.raises(e2b.SandboxException):
        sandbox.files.make_dir("/opt/herovm-serve-user")
    with pytest.raises(e2b.SandboxException):
        sandbox.files.list("/root")
    sandbox.files.write("/root/herovm-serve-root.txt", "r", user="root")
    assert sandbox.files.get_info("/root/herovm-serve-root.txt", user="root").owner == "root"
    assert sandbox.files.read("/root/herovm-serve-root.txt", user="root") == "r"
    assert "herovm-serve-root.txt" in {e.name for e in sandbox.files.list("/root", user="root")}
    sandbox.files.remove("/root/herovm-serve-root.txt", user="root")
    with pytest.raises(e2b.SandboxException):
        sandbox.files.remove("/etc/hostname")  # `user` may not
    assert sandbox.files.exists("/etc/hostname")
    r = sandbox.commands.run("id -un; cat /root/.profile >/dev/null 2>&1 || echo denied")
    assert r.stdout == "user\ndenied\n"


def test_watch_dir_sees_create_write_remove(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/home/user/watched")
    handle = sandbox.files.watch_dir("/home/user/watched")
    try:
        sandbox.files.write("/home/user/watched/new.txt", "1")
        sandbox.commands.run("echo more >> /home/user/watched/new.txt")
        sandbox.files.remove("/home/user/watched/new.txt")
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and ("new.txt", "remove") not in seen:
            seen += [(e.name, e.type.value) for e in handle.get_new_events()]
            time.sleep(0.3)
        assert ("new.txt", "create") in seen and ("new.txt", "write") in seen
        assert ("new.txt", "remove") in seen
    finally:
        handle.stop()
    with pytest.raises(e2b.SandboxException):
        handle.get_new_events()  # stopped
    with pytest.raises(e2b.NotFoundException):
        sandbox.files.watch_dir("/home/user/not-there")


def test_watch_dir_stream_of_the_async_sdk(sandbox: Sandbox) -> None:
    """The async SDK watches through WatchDir, a server stream."""

    async def main() -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        asb = await e2b.AsyncSandbox.connect(sandbox.sandbox_id)
        await asb.files.make_dir("/home/user/awatched")
        handle = await asb.files.watch_dir(
            "/home/user/awatched", on_event=lambda e: seen.append((e.name, e.type.value))
        )
        await asb.files.write("/home/user/awatched/x.txt", "x")
        for _ in range(100):
            if ("x.txt", "create") in seen:
                break
            await asyncio.sleep(0.1)
        await handle.stop()
        return seen

    assert ("x.txt", "create") in asyncio.run(main())
