"""herovm serve without guests: envd's schema against E2B's SDK, Connect framing through the ASGI app, auth,
and the REST API's error shapes. The guest side is a fake GuestOps."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("connectrpc", reason="the serve extra is not installed")
pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from herovm.guest.ops import End, EntryInfo, OpError, Output  # noqa: E402
from herovm.serve import api, auth, envd, envd_pb  # noqa: E402
from herovm.serve.app import ServeApp  # noqa: E402
from herovm.serve.sandboxes import ApiError, Sandbox, Sandboxes  # noqa: E402

KEY = "e2b_" + "k" * 40


# ------------------------------------------------------------------------------------ schema


def test_schema_encodes_as_the_sdk_does() -> None:
    """Our declared schema and the SDK's generated classes agree on the wire, both encodings."""
    process_pb = pytest.importorskip("e2b.envd.process.process_pb")
    filesystem_pb = pytest.importorskip("e2b.envd.filesystem.filesystem_pb")
    theirs = process_pb.StartRequest(
        process=process_pb.ProcessConfig(
            cmd="/bin/bash", args=["-l", "-c", "x"], envs={"A": "1"}, cwd="/tmp"
        ),
        stdin=False,
        tag="t",
    )
    ours = envd_pb.message("process.StartRequest").from_binary(theirs.to_binary())
    assert ours.to_binary() == theirs.to_binary()
    assert json.loads(ours.to_json()) == json.loads(theirs.to_json())
    assert ours.process.has_field("cwd") and ours.stdin is False

    entry = envd_pb.message("filesystem.EntryInfo")(
        name="a",
        type=envd_pb.enum_value("filesystem.FileType", "FILE_TYPE_DIRECTORY"),
        size=5,
        metadata={"k": "v"},
    )
    back = filesystem_pb.EntryInfo.from_binary(entry.to_binary())
    assert (back.name, back.size, back.metadata, back.type) == (
        "a",
        5,
        {"k": "v"},
        filesystem_pb.FileType.DIRECTORY,
    )
    for full in ("process.ProcessEvent", "filesystem.WatchDirResponse", "process.StreamInputRequest"):
        ours_desc = envd_pb.message(full)._desc  # type: ignore[attr-defined]
        pkg, name = full.split(".", 1)
        mod = process_pb if pkg == "process" else filesystem_pb
        theirs_cls = mod
        for part in name.split("."):
            theirs_cls = getattr(theirs_cls, part)
        assert [(f.name, f.number) for f in ours_desc.fields] == [
            (f.name, f.number)
            for f in theirs_cls._desc.fields  # type: ignore[attr-defined]
        ]


# -------------------------------------------------------------------------------------- auth


def test_api_keys_from_env_file_and_first_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEROVM_HOME", str(tmp_path))
    assert auth.load_keys({"HEROVM_API_KEY": "abc"}) == (["abc"], None)
    keys, made = auth.load_keys({})
    assert made and keys == [made]
    path = tmp_path / "api-keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_keys({}) == ([made], None)  # made once
    os.chmod(path, 0o644)
    with pytest.raises(Exception, match="readable by others"):
        auth.load_keys({})


def test_key_matching_and_basic_user() -> None:
    assert auth.matches("a", ["b", "a"])
    assert not auth.matches("", ["a"]) and not auth.matches(None, ["a"]) and not auth.matches("ab", ["a"])
    assert auth.basic_user("Basic cm9vdDo=", "user") == "root"  # base64("root:")
    assert auth.basic_user(None, "user") == "user"


# --------------------------------------------------------------------------------- the app


class _Handle:
    def __init__(self, events: list) -> None:
        self.pid, self.tag, self.events = 1000, None, events

    def __iter__(self):  # noqa: ANN204
        return iter(self.events)

    def close(self) -> None:
        pass


class FakeOps:
    """Stands in for the guest agent's ops (herovm.guest.ops.GuestOps): runs nothing, answers as a guest
    would."""

    files: dict[str, bytes] = {}

    def start_process(self, command, *, env=None, cwd=None, user="root", tag=None, stdin=False):  # noqa: ANN001, ANN201
        home = "/root" if user == "root" else f"/home/{user}"
        line = f"{user} {cwd or home} {(env or {}).get('X', '')}\n".encode()
        return _Handle([Output("stdout", line), Output("stderr", b"warn\n"), End(3, None)])

    def read_file_chunks(self, path, *, user="root", offset=0, limit=None):  # noqa: ANN001, ANN201
        if path not in self.files:
            raise OpError("not_found", "no such file")
        yield self.files[path]

    def write_file(self, path, data, *, user="root", mode=None) -> EntryInfo:  # noqa: ANN001
        self.files[path] = data if isinstance(data, bytes) else b"".join(data)
        return self.stat(path, user=user)

    def stat(self, path, *, user="root") -> EntryInfo:  # noqa: ANN001
        if path not in self.files:
            raise OpError("not_found", "no such file")
        name = path.rsplit("/", 1)[-1]
        return EntryInfo(name, path, "file", len(self.files[path]), 0o644, "-rw-r--r--", user, user, 1.5)


class FakeSandboxes(Sandboxes):
    def __init__(self) -> None:
        super().__init__(manager=None, max_sandboxes=1)  # type: ignore[arg-type]
        self.made: list[dict] = []

    def create(self, **kw: object) -> Sandbox:  # type: ignore[override]
        self.made.append(kw)
        if len(self._by_id) >= 1:
            raise ApiError(429, "the limit of 1 sandboxes is reached")
        sb = Sandbox(
            id="sbx1",
            template=str(kw["template"]),
            token="tok1",
            started_at=0,
            end_at=9e9,
            metadata=kw["metadata"],  # type: ignore[arg-type]
        )
        self._by_id[sb.id] = sb
        return sb


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setattr(envd, "ops_for", lambda manager, sb: envd.SandboxOps(FakeOps()))
    FakeOps.files = {}
    app = ServeApp(FakeSandboxes(), [KEY], log=lambda line: None)
    return TestClient(app)


def _sandbox_headers(token: str = "tok1", **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": "sbx1", "E2b-Sandbox-Port": "49983", "X-Access-Token": token, **extra}


def _envelopes(body: bytes) -> list[tuple[int, dict]]:
    out, i = [], 0
    while i < len(body):
        flags, size = body[i], int.from_bytes(body[i + 1 : i + 5], "big")
        out.append((flags, json.loads(body[i + 5 : i + 5 + size])))
        i += 5 + size
    return out


def test_rest_errors_have_e2bs_shape(client: TestClient) -> None:
    r = client.get("/v2/sandboxes")
    assert (r.status_code, r.json()) == (401, {"code": 401, "message": "invalid API key"})
    h = {"X-API-KEY": KEY}
    r = client.post("/v2/sandboxes", headers=h, content=b"{")
    assert r.status_code == 400 and r.json()["code"] == 400 and "malformed JSON" in r.json()["message"]
    r = client.post("/v2/sandboxes", headers=h, json={"templateID": "base", "surprise": True})
    assert r.status_code == 400 and "surprise" in r.json()["message"]
    r = client.post("/v2/sandboxes", headers=h, json={"templateID": "base", "timeout": -1})
    assert r.status_code == 400
    r = client.post("/v2/sandboxes", headers=h, json={"templateID": "base", "mcp": {"x": {}}})
    assert r.status_code == 400 and "mcp" in r.json()["message"]
    r = client.get("/sandboxes/nope", headers=h)
    assert (r.status_code, r.json()["code"]) == (404, 404)
    r = client.post("/v2/sandboxes", headers=h, json={"templateID": "base", "metadata": {"a": "b"}})
    assert r.status_code == 201
    assert r.json()["sandboxID"] == "sbx1" and r.json()["envdAccessToken"] == "tok1"
    r = client.post("/v2/sandboxes", headers=h, json={"templateID": "base"})
    assert (r.status_code, r.json()["code"]) == (429, 429)
    r = client.get("/v2/sandboxes", headers=h, params={"metadata": "a=b"})
    assert [s["sandboxID"] for s in r.json()] == ["sbx1"]
    r = client.get("/v2/sandboxes", headers=h, params={"metadata": "a=c"})
    assert r.json() == []


def test_connect_server_stream_framing_and_tokens(client: TestClient) -> None:
    client.app.sandboxes._by_id["sbx1"] = Sandbox(  # type: ignore[attr-defined]
        id="sbx1", template="base", token="tok1", started_at=0, end_at=9e9, envs={"X": "e"}
    )
    body = json.dumps({"process": {"cmd": "/bin/true"}}).encode()
    framed = b"\0" + len(body).to_bytes(4, "big") + body
    r = client.post(
        "/process.Process/Start",
        headers=_sandbox_headers(**{"Content-Type": "application/connect+json"}),
        content=framed,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/connect+json"
    frames = _envelopes(r.content)
    assert frames[0][1]["event"]["start"]["pid"] > 0
    data = [f[1]["event"]["data"] for f in frames[1:-2]]
    assert {
        "stdout": "dXNlciAvaG9tZS91c2VyIGUK"
    } in data  # base64("user /home/user e\n"): default user, home, envs
    end = frames[-2][1]["event"]["end"]
    assert end == {"exitCode": 3, "exited": True, "status": "exit status 3", "error": "exit status 3"}
    assert frames[-1][0] == 2 and frames[-1][1] == {}  # the end-of-stream envelope, no error

    root = client.post(
        "/process.Process/Start",
        headers=_sandbox_headers(
            **{"Content-Type": "application/connect+json", "Authorization": "Basic cm9vdDo="}
        ),
        content=framed,
    )
    assert {"stdout": "cm9vdCAvcm9vdCBlCg=="} in [
        f[1].get("event", {}).get("data") for f in _envelopes(root.content)
    ]

    wrong = client.post("/process.Process/Start", headers=_sandbox_headers("tok2"), content=framed)
    assert wrong.status_code == 401
    other = client.post(
        "/process.Process/Start", headers={**_sandbox_headers(), "E2b-Sandbox-Id": "sbx2"}, content=framed
    )
    assert other.status_code == 401


def test_connect_unary_errors_and_file_endpoints(client: TestClient) -> None:
    client.app.sandboxes._by_id["sbx1"] = Sandbox(  # type: ignore[attr-defined]
        id="sbx1", template="base", token="tok1", started_at=0, end_at=9e9
    )
    r = client.post(
        "/filesystem.Filesystem/Stat",
        headers=_sandbox_headers(**{"Content-Type": "application/json"}),
        json={"path": "missing"},
    )
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert "/home/user/missing" in r.json()["message"]  # relative paths are the user's home's

    r = client.post(
        "/files", headers=_sandbox_headers(), params={"path": "a.txt"}, files={"file": ("a.txt", b"hi")}
    )
    assert r.status_code == 200 and r.json() == [
        {"name": "a.txt", "type": "file", "path": "/home/user/a.txt"}
    ]
    r = client.get("/files", headers=_sandbox_headers(), params={"path": "/home/user/a.txt"})
    assert r.content == b"hi"
    r = client.get("/files", headers=_sandbox_headers(), params={"path": "/nope"})
    assert (r.status_code, r.json()["code"]) == (404, 404)

    r = client.post(
        "/filesystem.Filesystem/Stat",
        headers=_sandbox_headers(**{"Content-Type": "application/json"}),
        json={"path": "/home/user/a.txt"},
    )
    assert r.json()["entry"]["size"] == "2" and r.json()["entry"]["permissions"] == "-rw-r--r--"

    r = client.post(
        "/process.Process/Update",
        headers=_sandbox_headers(**{"Content-Type": "application/json"}),
        json={"process": {"pid": 1}},
    )
    assert r.json()["code"] == "unimplemented"


def test_parse_helpers() -> None:
    assert api.parse_metadata_query("a=b&c=d%20e") == {"a": "b", "c": "d e"}
    assert envd.resolve_path("x/y", "user") == "/home/user/x/y"
    assert envd.resolve_path("~/x", "root") == "/root/x"
    with pytest.raises(envd.FsError):
        envd.resolve_path("", "user")
    with pytest.raises(envd.FsError):
        envd.check_user("Robert'); drop")
