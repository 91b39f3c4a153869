"""envd's mapping onto the guest agent's ops (herovm/serve/envd.py), without guests: a stand-in with the API
of herovm.guest.ops.GuestOps behind the real ASGI app, Connect calls in JSON as the SDK makes them, and the
streamed /files handlers (Envd.file_routes) on their own."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

pytest.importorskip("connectrpc", reason="the serve extra is not installed")
pytest.importorskip("starlette")
from starlette.applications import Starlette  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from herovm.guest.ops import End, EntryInfo, OpError, Output, ProcessInfo, WatchEvent  # noqa: E402
from herovm.serve import envd  # noqa: E402
from herovm.serve.app import ServeApp  # noqa: E402
from herovm.serve.sandboxes import Sandbox, Sandboxes  # noqa: E402

KEY = "e2b_" + "k" * 40


def _entry(path: str, kind: str = "file", size: int = 0, owner: str = "user") -> EntryInfo:
    return EntryInfo(
        name=path.rsplit("/", 1)[-1],
        path=path,
        type=kind,
        size=size,
        mode=0o755 if kind == "dir" else 0o644,
        permissions=("drwxr-xr-x" if kind == "dir" else "-rw-r--r--"),
        owner=owner,
        group=owner,
        mtime=1.5,
        symlink_target="/t" if kind == "symlink" else None,
    )


class FakeHandle:
    """A followed process: its scripted events, then (when `running`) blocks until close()."""

    def __init__(self, ops: FakeOps, pid: int, tag: str | None, events: list, running: bool) -> None:
        self.ops, self.pid, self.tag, self.events, self.running = ops, pid, tag, events, running
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        yield from self.events
        if self.running:
            self.closed.wait(10)

    def close(self) -> None:
        self.ops.calls.append(("close", self.pid))
        self.closed.set()


class FakeWatcher(FakeHandle):
    pass


class FakeOps:
    """What herovm.guest.ops.GuestOps offers, answering as an agent would."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.files: dict[str, bytes] = {}
        self.procs: dict[int, ProcessInfo] = {}
        self.handles: list[FakeHandle] = []
        self.script: list = [Output("stdout", b"out\n"), Output("stderr", b"err\n"), End(3, None)]
        self.running = False
        self.refuse: dict[str, OpError] = {}

    def _check(self, op: str) -> None:
        if op in self.refuse:
            raise self.refuse[op]

    def start_process(self, command, *, env=None, cwd=None, user="root", tag=None, stdin=False):  # noqa: ANN001, ANN201
        self._check("start")
        pid = 100 + len(self.procs)
        self.calls.append(("start", command, env, cwd, user, tag, stdin))
        self.procs[pid] = ProcessInfo(
            pid, tag, list(command), dict(env or {}), cwd or "/", user, 0.0, True, stdin
        )
        h = FakeHandle(self, pid, tag, list(self.script), self.running)
        self.handles.append(h)
        return h

    def connect(self, process, *, replay=False):  # noqa: ANN001, ANN201
        self._check("connect")
        pid = (
            process
            if isinstance(process, int)
            else next(p for p, i in self.procs.items() if i.tag == process)
        )
        return FakeHandle(self, pid, self.procs[pid].tag, [Output("stdout", b"later\n"), End(0, None)], False)

    def list_processes(self) -> list[ProcessInfo]:
        return list(self.procs.values())

    def send_stdin(self, process, data: bytes) -> None:  # noqa: ANN001
        self._check("stdin")
        self.calls.append(("stdin", process, data))

    def close_stdin(self, process) -> None:  # noqa: ANN001
        self.calls.append(("close_stdin", process))

    def signal(self, process, sig="TERM") -> None:  # noqa: ANN001
        self._check("signal")
        self.calls.append(("signal", process, sig))

    def read_file_chunks(self, path, *, user="root", offset=0, limit=None):  # noqa: ANN001, ANN201
        self._check("read")
        if path not in self.files:
            raise OpError("not_found", f"no such file: {path}")
        data = self.files[path]
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    def write_file(self, path, data: Iterable[bytes], *, user="root", mode=None) -> EntryInfo:  # noqa: ANN001
        self._check("write")
        chunks = [data] if isinstance(data, bytes) else list(data)
        self.calls.append(("write", path, user, len(chunks)))
        self.files[path] = b"".join(chunks)
        return _entry(path, size=len(self.files[path]), owner=user)

    def stat(self, path, *, user="root") -> EntryInfo:  # noqa: ANN001
        self._check("stat")
        if path.endswith("link"):
            return _entry(path, "symlink")
        if path not in self.files:
            raise OpError("not_found", "no such file")
        return _entry(path, size=len(self.files[path]), owner=user)

    def list_dir(self, path, *, depth=1, user="root"):  # noqa: ANN001, ANN201
        self._check("list")
        self.calls.append(("list", path, depth, user))
        return [_entry(path + "/d", "dir"), _entry(path + "/f")]

    def make_dir(self, path, *, user="root", parents=True) -> bool:  # noqa: ANN001
        self._check("mkdir")
        made = path not in self.files
        self.files[path] = b""
        return made

    def move(self, path, to, *, user="root") -> EntryInfo:  # noqa: ANN001
        self._check("move")
        self.files[to] = self.files.pop(path)
        return _entry(to)

    def remove(self, path, *, user="root", recursive=False) -> None:  # noqa: ANN001
        self._check("remove")
        self.calls.append(("remove", path, recursive))

    def watch(self, path, *, recursive=False, user="root"):  # noqa: ANN001, ANN201
        self._check("watch")
        events = [
            WatchEvent("create", "a.txt", path + "/a.txt"),
            WatchEvent("remove", "a.txt", path + "/a.txt"),
        ]
        return FakeWatcher(self, 0, None, events, True)


class FakeSandboxes(Sandboxes):
    def __init__(self) -> None:
        super().__init__(manager=None, max_sandboxes=1)  # type: ignore[arg-type]
        self._by_id["sbx1"] = Sandbox(
            id="sbx1", template="base", token="tok1", started_at=0, end_at=9e9, envs={"FROM_CREATE": "c"}
        )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeOps:
    ops = FakeOps()
    adapter = envd.SandboxOps(ops)
    monkeypatch.setattr(envd, "ops_for", lambda manager, sb: adapter)
    return ops


@pytest.fixture
def client(fake: FakeOps) -> Iterator[TestClient]:
    with TestClient(ServeApp(FakeSandboxes(), [KEY], log=lambda line: None)) as c:  # one event loop
        yield c


def _headers(user: str | None = None, **extra: str) -> dict[str, str]:
    h = {"E2b-Sandbox-Id": "sbx1", "E2b-Sandbox-Port": "49983", "X-Access-Token": "tok1", **extra}
    if user is not None:
        import base64

        h["Authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
    return h


def _stream(client: TestClient, method: str, body: dict, **headers: str) -> list[dict]:
    raw = json.dumps(body).encode()
    r = client.post(
        f"/process.Process/{method}",
        headers=_headers(**{"Content-Type": "application/connect+json", **headers}),
        content=b"\0" + len(raw).to_bytes(4, "big") + raw,
    )
    assert r.status_code == 200, r.text
    out, i, body_bytes = [], 0, r.content
    while i < len(body_bytes):
        size = int.from_bytes(body_bytes[i + 1 : i + 5], "big")
        out.append(json.loads(body_bytes[i + 5 : i + 5 + size]))
        i += 5 + size
    return out


def _unary(client: TestClient, service: str, method: str, body: dict, user: str | None = None) -> Any:
    return client.post(
        f"/{service}/{method}", headers=_headers(user, **{"Content-Type": "application/json"}), json=body
    )


# ------------------------------------------------------------------------------------ processes


def test_start_streams_events_and_ends_as_envd_does(client: TestClient, fake: FakeOps) -> None:
    frames = _stream(
        client,
        "Start",
        {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "x"], "envs": {"A": "1"}, "cwd": "/tmp"}},
    )
    assert frames[0]["event"]["start"]["pid"] == 100
    assert {"stdout": "b3V0Cg=="} in [f["event"].get("data") for f in frames[1:-1] if "event" in f]
    end = frames[-2]["event"]["end"]
    assert end == {"exitCode": 3, "exited": True, "status": "exit status 3", "error": "exit status 3"}
    assert frames[-1] == {}  # the end of the stream, no error
    _op, argv, env, cwd, user, tag, stdin = fake.calls[0]
    assert argv == ["/bin/bash", "-l", "-c", "x"] and env == {"FROM_CREATE": "c", "A": "1"}
    assert (cwd, user, stdin) == ("/tmp", "user", True)  # default user; stdin open when not said
    assert tag.startswith(envd.INTERNAL_TAG)  # the server's own tag, for the deadline


def test_end_events_of_signals_and_success() -> None:
    killed = envd.end_event(End(137, 9))
    assert (killed.exit_code, killed.exited, killed.status, killed.error) == (
        -1,
        False,
        "signal: killed",
        "signal: killed",
    )
    ok = envd.end_event(End(0, None))
    assert (ok.exit_code, ok.exited, ok.status, ok.has_field("error")) == (0, True, "exit status 0", False)
    assert envd.end_event(End(143, 15)).status == "signal: terminated"


def test_a_stream_left_early_only_stops_following(client: TestClient, fake: FakeOps) -> None:
    """The process outlives its client: leaving the stream closes the handle, sends no signal."""
    fake.script = [Output("stdout", b"first\n")]
    fake.running = True
    raw = json.dumps({"process": {"cmd": "sleep"}, "stdin": False}).encode()
    with client.stream(
        "POST",
        "/process.Process/Start",
        headers=_headers(**{"Content-Type": "application/connect+json"}),
        content=b"\0" + len(raw).to_bytes(4, "big") + raw,
    ) as r:
        for chunk in r.iter_bytes():
            if b"Zmlyc3QK" in chunk:  # base64("first\n")
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ("close", 100) not in fake.calls:
        time.sleep(0.05)
    assert ("close", 100) in fake.calls
    assert not [c for c in fake.calls if c[0] == "signal"]
    assert fake.calls[0][6] is False  # stdin as asked


def test_the_deadline_kills_a_running_process(client: TestClient, fake: FakeOps) -> None:
    fake.script = [End(0, None)]
    _stream(client, "Start", {"process": {"cmd": "sleep"}, "tag": "mine"}, **{"Connect-Timeout-Ms": "300"})
    time.sleep(0.6)
    assert not [c for c in fake.calls if c[0] == "signal"]  # it ended: its deadline was dropped

    fake.script = []
    _stream(client, "Start", {"process": {"cmd": "sleep"}, "tag": "t2"}, **{"Connect-Timeout-Ms": "200"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [c for c in fake.calls if c[0] == "signal"]:
        time.sleep(0.05)
    assert ("signal", 101, "KILL") in fake.calls


def test_connect_list_input_signals(client: TestClient, fake: FakeOps) -> None:
    fake.script = []
    _stream(client, "Start", {"process": {"cmd": "a"}, "tag": "web"})
    _stream(client, "Start", {"process": {"cmd": "b", "args": ["x"]}})
    fake.procs[102] = ProcessInfo(102, None, ["gone"], {}, "/", "user", 0.0, False, False)
    listed = _unary(client, "process.Process", "List", {}).json()["processes"]
    assert [(p["pid"], p.get("tag"), p["config"]["cmd"]) for p in listed] == [
        (100, "web", "a"),
        (101, None, "b"),
    ]
    assert listed[1]["config"]["args"] == [
        "x"
    ]  # the server's own tag is not shown; ended ones are not listed

    frames = _stream(client, "Connect", {"process": {"tag": "web"}})
    assert frames[0]["event"]["start"]["pid"] == 100
    assert frames[-2]["event"]["end"] == {"exited": True, "status": "exit status 0"}  # exit code 0: unset

    sel = {"process": {"pid": 100}}
    assert (
        _unary(client, "process.Process", "SendInput", {**sel, "input": {"stdin": "aGkK"}}).status_code == 200
    )
    assert _unary(client, "process.Process", "CloseStdin", sel).status_code == 200
    assert (
        _unary(client, "process.Process", "SendSignal", {**sel, "signal": "SIGNAL_SIGKILL"}).status_code
        == 200
    )
    assert (
        _unary(client, "process.Process", "SendSignal", {**sel, "signal": "SIGNAL_SIGTERM"}).status_code
        == 200
    )
    assert ("stdin", 100, b"hi\n") in fake.calls and ("close_stdin", 100) in fake.calls
    assert ("signal", 100, "KILL") in fake.calls and ("signal", 100, "TERM") in fake.calls

    r = _unary(client, "process.Process", "SendSignal", {**sel, "signal": "SIGNAL_UNSPECIFIED"})
    assert r.json()["code"] == "invalid_argument"
    fake.refuse["signal"] = OpError("not_found", "no process 7")
    r = _unary(client, "process.Process", "SendSignal", {"process": {"pid": 7}, "signal": "SIGNAL_SIGKILL"})
    assert r.json()["code"] == "not_found"  # the SDK's kill() answers False
    fake.refuse["stdin"] = OpError("invalid", "its stdin is closed")
    r = _unary(client, "process.Process", "SendInput", {**sel, "input": {"stdin": "aGkK"}})
    assert r.json()["code"] == "invalid_argument"
    r = _unary(client, "process.Process", "SendInput", {"process": {}, "input": {"stdin": "aGkK"}})
    assert r.json()["code"] == "invalid_argument"


def test_a_start_the_agent_refuses(client: TestClient, fake: FakeOps) -> None:
    fake.refuse["start"] = OpError("invalid", "unknown user 'nobody2'")
    raw = json.dumps({"process": {"cmd": "x"}}).encode()
    r = client.post(
        "/process.Process/Start",
        headers=_headers("nobody2", **{"Content-Type": "application/connect+json"}),
        content=b"\0" + len(raw).to_bytes(4, "big") + raw,
    )
    assert b"invalid_argument" in r.content and b"unknown user" in r.content


# ------------------------------------------------------------------------------------- filesystem


@pytest.mark.parametrize(
    ("code", "connect_code"),
    [
        ("not_found", "not_found"),
        ("exists", "already_exists"),
        ("permission", "permission_denied"),
        ("not_a_directory", "invalid_argument"),
        ("is_a_directory", "invalid_argument"),
        ("invalid", "invalid_argument"),
        ("other", "invalid_argument"),
    ],
)
def test_agent_errors_map_to_e2b_codes(
    client: TestClient, fake: FakeOps, code: str, connect_code: str
) -> None:
    fake.refuse["list"] = OpError(code, "why")
    r = _unary(client, "filesystem.Filesystem", "ListDir", {"path": "x"})
    assert r.json()["code"] == connect_code
    assert "/home/user/x" in r.json()["message"]


def test_no_space_is_resource_exhausted_and_507() -> None:
    e = envd.fs_error(OpError("other", "[Errno 28] No space left on device"), "path '/a'")
    assert envd.connect_error(e).code.value == "resource_exhausted" and envd.http_status(e) == 507


def test_stat_list_mkdir_move_remove(client: TestClient, fake: FakeOps) -> None:
    fake.files["/home/user/a.txt"] = b"hello"
    e = _unary(client, "filesystem.Filesystem", "Stat", {"path": "a.txt"}).json()["entry"]
    assert (e["path"], e["size"], e["type"], e["permissions"]) == (
        "/home/user/a.txt",
        "5",
        "FILE_TYPE_FILE",
        "-rw-r--r--",
    )
    link = _unary(client, "filesystem.Filesystem", "Stat", {"path": "/x/link"}).json()["entry"]
    assert link["isSymlink"] is True and link["symlinkTarget"] == "/t" and link["type"] == "FILE_TYPE_SYMLINK"

    rows = _unary(
        client, "filesystem.Filesystem", "ListDir", {"path": "/srv", "depth": 3}, user="root"
    ).json()
    assert [r["type"] for r in rows["entries"]] == ["FILE_TYPE_DIRECTORY", "FILE_TYPE_FILE"]
    assert ("list", "/srv", 3, "root") in fake.calls
    _unary(client, "filesystem.Filesystem", "ListDir", {"path": "/srv"})
    assert ("list", "/srv", 1, "user") in fake.calls  # depth 0: 1

    r = _unary(client, "filesystem.Filesystem", "MakeDir", {"path": "/home/user/d"})
    assert r.status_code == 200
    r = _unary(client, "filesystem.Filesystem", "MakeDir", {"path": "/home/user/d"})
    assert r.json()["code"] == "already_exists"  # the SDK's make_dir answers False

    r = _unary(client, "filesystem.Filesystem", "Move", {"source": "a.txt", "destination": "b.txt"})
    assert r.json()["entry"]["path"] == "/home/user/b.txt"
    assert _unary(client, "filesystem.Filesystem", "Remove", {"path": "~/d"}).status_code == 200
    assert ("remove", "/home/user/d", True) in fake.calls  # recursive, as envd's


def test_polled_watcher(client: TestClient, fake: FakeOps) -> None:
    r = _unary(client, "filesystem.Filesystem", "CreateWatcher", {"path": "w"})
    wid = r.json()["watcherId"]
    events: list[dict] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(events) < 2:
        events += (
            _unary(client, "filesystem.Filesystem", "GetWatcherEvents", {"watcherId": wid})
            .json()
            .get("events", [])
        )
    assert [(e["name"], e["type"]) for e in events] == [
        ("a.txt", "EVENT_TYPE_CREATE"),
        ("a.txt", "EVENT_TYPE_REMOVE"),
    ]
    assert _unary(client, "filesystem.Filesystem", "RemoveWatcher", {"watcherId": wid}).status_code == 200
    r = _unary(client, "filesystem.Filesystem", "GetWatcherEvents", {"watcherId": wid})
    assert r.json()["code"] == "not_found"
    fake.refuse["watch"] = OpError("not_found", "no such directory")
    assert (
        _unary(client, "filesystem.Filesystem", "CreateWatcher", {"path": "nope"}).json()["code"]
        == "not_found"
    )


def test_watch_dir_stream(client: TestClient, fake: FakeOps) -> None:
    raw = json.dumps({"path": "/w"}).encode()
    with client.stream(
        "POST",
        "/filesystem.Filesystem/WatchDir",
        headers=_headers(**{"Content-Type": "application/connect+json"}),
        content=b"\0" + len(raw).to_bytes(4, "big") + raw,
    ) as r:
        got = b""
        for chunk in r.iter_bytes():
            got += chunk
            if b"EVENT_TYPE_REMOVE" in got:
                break
    assert b'"start":{}' in got and b"EVENT_TYPE_CREATE" in got


# ------------------------------------------------------------------------------ /files, streamed


@pytest.fixture
def files(fake: FakeOps) -> TestClient:
    app = Starlette(routes=envd.Envd(FakeSandboxes(), _executor(), max_upload=3 << 20).file_routes())
    return TestClient(app)


def _executor():  # noqa: ANN202
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(8)


def test_upload_multipart_streams_each_file(files: TestClient, fake: FakeOps) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    r = files.post(
        "/files",
        headers=_headers(),
        files=[("file", ("/home/user/a.bin", big)), ("file", ("b.txt", b"b"))],
    )
    assert r.status_code == 200, r.text
    assert r.json() == [
        {"name": "a.bin", "type": "file", "path": "/home/user/a.bin"},
        {"name": "b.txt", "type": "file", "path": "/home/user/b.txt"},
    ]
    assert fake.files["/home/user/a.bin"] == big and fake.files["/home/user/b.txt"] == b"b"
    writes = [c for c in fake.calls if c[0] == "write"]
    assert writes[0][3] > 1  # in chunks, not one buffer


def test_upload_octet_stream_gzip_and_limits(files: TestClient, fake: FakeOps) -> None:
    data = b"x" * 100_000
    r = files.post(
        "/files",
        headers=_headers("root", **{"Content-Type": "application/octet-stream"}),
        params={"path": "/root/o.bin"},
        content=data,
    )
    assert r.status_code == 200 and fake.files["/root/o.bin"] == data
    assert fake.calls[-1][:3] == ("write", "/root/o.bin", "root")
    r = files.post(
        "/files",
        headers=_headers(**{"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}),
        params={"path": "g.txt"},
        content=gzip.compress(data),
    )
    assert r.status_code == 200 and fake.files["/home/user/g.txt"] == data

    bomb = gzip.compress(b"\0" * (4 << 20))  # 4 MiB inflated, past the 3 MiB limit
    r = files.post(
        "/files",
        headers=_headers(**{"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}),
        params={"path": "bomb"},
        content=bomb,
    )
    assert r.status_code == 413 and "limit" in r.json()["message"]
    r = files.post(
        "/files",
        headers=_headers(**{"Content-Type": "application/octet-stream"}),
        params={"path": "big"},
        content=b"\0" * (4 << 20),
    )
    assert r.status_code == 413
    r = files.post(
        "/files",
        headers=_headers(**{"Content-Type": "application/octet-stream", "Content-Encoding": "br"}),
        params={"path": "x"},
        content=b"x",
    )
    assert r.status_code == 400

    fake.refuse["write"] = OpError("permission", "EACCES")
    r = files.post("/files", headers=_headers(), params={"path": "/etc/x"}, content=b"no")
    assert (r.status_code, r.json()["code"]) == (403, 403)


def test_download_streams_and_errors(files: TestClient, fake: FakeOps) -> None:
    fake.files["/home/user/d.bin"] = b"y" * 300_000
    r = files.get("/files", headers=_headers(), params={"path": "d.bin"})
    assert r.status_code == 200 and r.content == b"y" * 300_000
    r = files.get("/files", headers=_headers(), params={"path": "/nope"})
    assert (r.status_code, r.json()["code"]) == (404, 404)
    fake.refuse["read"] = OpError("is_a_directory", "a directory")
    r = files.get("/files", headers=_headers(), params={"path": "/tmp"})
    assert r.status_code == 400 and "is a directory" in r.json()["message"]
    assert files.get("/health", headers=_headers()).status_code == 204


def test_helpers() -> None:
    assert envd.parse_size("1G") == 1 << 30 and envd.parse_size("512M") == 512 << 20
    assert envd.parse_size("1000") == 1000
    with pytest.raises(ValueError):
        envd.parse_size("lots")
    assert envd.resolve_path("~", "user") == "/home/user"
    assert envd.resolve_path("x", "root") == "/root/x"
    with pytest.raises(envd.FsError):
        envd.check_user("Robert'); drop")
