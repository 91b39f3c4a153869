"""herovm serve's warm pools, create admission and /metrics without guests: a fake Manager stands in for
libvirt (up from a template, pause, resume, down), so claims, misses, refills, failures and their backoff,
adoption by a restarted server, removal at exit, the --max-sandboxes wait and the Prometheus text are
checked in milliseconds."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from herovm.errors import GuestError, NotFound  # noqa: E402
from herovm.guest.execution import ExecResult  # noqa: E402
from herovm.serve import pool as pool_mod  # noqa: E402
from herovm.serve.app import ServeApp  # noqa: E402
from herovm.serve.metrics import Metrics  # noqa: E402
from herovm.serve.pool import POOL_PREFIX, Pool, parse_pools, per_host  # noqa: E402
from herovm.serve.sandboxes import ApiError, Sandbox, Sandboxes  # noqa: E402

KEY = "e2b_" + "p" * 40


@dataclass
class FakeMachine:
    name: str
    state: str
    template: str | None = None


@dataclass
class FakeRecord:
    origin: dict | None
    settings: Any = None
    host: str | None = None


class FakeVM:
    def __init__(self, name: str, origin: dict | None, execs: list[str] | None = None) -> None:
        self.name = name
        self.record = FakeRecord(origin)
        self.execs = execs if execs is not None else []

    def exec(self, argv: list[str], timeout: float = 0) -> Any:
        self.execs.append(self.name)
        return ExecResult(0, b"present\n", b"", False, 0.01)

    def close(self) -> None:
        pass


@dataclass
class FakeManager:
    machines: dict[str, FakeMachine] = field(default_factory=dict)
    templates_: tuple[str, ...] = ("py", "node")
    fail_up: int = 0  # this many ups fail
    execs: list[str] = field(default_factory=list)
    up_s: float = 0.0
    calls: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def templates(self) -> list[dict]:
        return [{"name": t, "cpus": 2, "memory": 512 << 20, "hosts": ["local"]} for t in self.templates_]

    def set_ttl(self, name: str, ttl: float | None) -> None:
        self.calls.append(("ttl", name))

    def up(
        self, name: str, settings: Any = None, template: str | None = None, host: str | None = None
    ) -> FakeVM:
        time.sleep(self.up_s)
        with self.lock:
            self.calls.append(("up", name))
            if self.fail_up:
                self.fail_up -= 1
                raise GuestError("restore failed")
            self.machines[name] = FakeMachine(name, "running", template)
        return FakeVM(name, {"template": template} if template else None, self.execs)

    def pause(self, name: str) -> None:
        with self.lock:
            self.calls.append(("pause", name))
            self.machines[name].state = "paused"

    def resume(self, name: str) -> None:
        with self.lock:
            self.calls.append(("resume", name))
            if self.machines[name].state != "paused":
                raise GuestError("not paused")
            self.machines[name].state = "running"

    def down(self, name: str) -> None:
        with self.lock:
            self.calls.append(("down", name))
            if self.machines.pop(name, None) is None:
                raise NotFound(f"VM {name} not found")

    def own_machines(self) -> dict[str, FakeMachine]:
        with self.lock:
            return dict(self.machines)

    def record(self, name: str) -> FakeRecord:
        t = self.machines[name].template
        return FakeRecord({"template": t} if t else None)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEROVM_HOME", str(tmp_path / "h"))
    return tmp_path / "h"


def wait_for(cond: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def make_pool(m: FakeManager, targets: dict[str, int], lines: list[str] | None = None) -> Pool:
    readied: list[str] = []
    per = per_host(targets, {t: ["local"] for t in m.templates_}, None)
    p = Pool(m, per, Metrics(), (lines if lines is not None else []).append, ready_vm=readied.append)  # type: ignore[arg-type]
    p.readied = readied  # type: ignore[attr-defined]
    return p


# ------------------------------------------------------------------------------------- parsing


def test_parse_pools() -> None:
    assert parse_pools(["py=2", "node=1"]) == {"py": 2, "node": 1}
    assert parse_pools([]) == {}
    for bad in (["py"], ["py=0"], ["py=x"], ["py=65"], ["py=1", "py=2"], ["Bad_Name=1"]):
        with pytest.raises(Exception):  # noqa: B017, PT011 (ValueError or InvalidInput: both say which)
            parse_pools(bad)


# ------------------------------------------------------------------------------- fill and claim


def test_pool_fills_claims_and_refills(home: Path) -> None:
    m = FakeManager()
    lines: list[str] = []
    p = make_pool(m, {"py": 2}, lines)
    p.start()
    try:
        wait_for(lambda: p.ready("py") == 2)
        members = p.members()
        assert all(mm.vm.startswith(POOL_PREFIX) and m.machines[mm.vm].state == "paused" for mm in members)
        assert sorted(p.readied) == sorted(mm.vm for mm in members)  # type: ignore[attr-defined]
        got = p.claim("py")
        assert got is not None and m.machines[got.vm].state == "running"
        assert ("resume", got.vm) in m.calls
        wait_for(lambda: p.ready("py") == 2)  # refilled in the background
        assert p.claim("node") is None  # not pooled: nothing in it, a miss
    finally:
        removed = p.stop()
    assert len(removed) == 2 and not [n for n in m.machines if n in removed]
    assert p.metrics.value("herovm_serve_pool_claims_total", template="py") == 1
    assert p.metrics.value("herovm_serve_pool_refills_total", template="py") == 3
    assert p.metrics.value("herovm_serve_pool_refill_seconds", template="py") == 3
    assert any("claimed" in line for line in lines) and any("refilled" in line for line in lines)


def test_an_empty_pool_is_a_miss_and_a_member_that_will_not_resume_is_removed(home: Path) -> None:
    m = FakeManager()
    p = make_pool(m, {"py": 1})
    assert p.claim("py") is None
    assert p.metrics.value("herovm_serve_pool_misses_total", template="py") == 1
    # a member whose VM was resumed behind the server's back: removed, and the next one (none) is a miss
    p._ready["py@local"].append(pool_mod.Member("abc", "py", 1, 1024))
    m.machines[POOL_PREFIX + "abc"] = FakeMachine(POOL_PREFIX + "abc", "running", "py")
    assert p.claim("py") is None
    assert POOL_PREFIX + "abc" not in m.machines


def test_failed_refills_back_off_and_are_counted(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "RETRY_S", (0.05, 0.1))
    m = FakeManager(fail_up=2)
    lines: list[str] = []
    p = make_pool(m, {"py": 1}, lines)
    p.start()
    try:
        wait_for(lambda: p.ready("py") == 1)
    finally:
        p.stop()
    assert p.metrics.value("herovm_serve_pool_refill_failures_total", template="py") == 2
    assert sum("could not make a VM" in line for line in lines) == 2
    ups = [n for op, n in m.calls if op == "up"]
    assert len(ups) == 3 and all(("down", n) in m.calls for n in ups[:2])  # nothing half-made is kept


def test_a_restarted_server_adopts_or_removes_pool_vms(home: Path) -> None:
    m = FakeManager()
    for name, st, t in (
        ("e2b-pool-a1", "paused", "py"),  # adopted
        ("e2b-pool-a2", "paused", "py"),  # adopted (py=2)
        ("e2b-pool-a3", "paused", "py"),  # over N: removed
        ("e2b-pool-b1", "paused", "gone"),  # template not pooled: removed
        ("e2b-pool-c1", "running", "py"),  # not waiting: removed
        ("e2b-pool-d1", "running", "py"),  # claimed before the restart: a sandbox, left alone
        ("e2b-xyz", "running", "py"),  # an ordinary sandbox: left alone
        ("other", "paused", "py"),  # not the server's: left alone
    ):
        m.machines[name] = FakeMachine(name, st, t)
    p = make_pool(m, {"py": 2})
    adopted, removed = p.adopt({"e2b-pool-d1"})
    assert adopted == ["e2b-pool-a1", "e2b-pool-a2"]
    assert sorted(removed) == ["e2b-pool-a3", "e2b-pool-b1", "e2b-pool-c1"]
    assert set(m.machines) == {"e2b-pool-a1", "e2b-pool-a2", "e2b-pool-d1", "e2b-xyz", "other"}
    assert p.ready("py") == 2 and p.members()[0].cpus == 2 and p.members()[0].memory_mb == 512


# ---------------------------------------------------------------------------- sandboxes and limits


def test_a_create_of_a_pooled_template_claims_and_keeps_the_vms_name(home: Path) -> None:
    m = FakeManager()
    metrics = Metrics()
    p = Pool(m, {"py@local": 1}, metrics, lambda _l: None)  # type: ignore[arg-type]
    sbs = Sandboxes(m, 2, pool=p, metrics=metrics)  # type: ignore[arg-type]
    p.start()
    try:
        wait_for(lambda: p.ready("py") == 1)
        member = p.members()[0]
        sb = sbs.create("py", 60, {"k": "v"}, {"E": "1"})
        assert (sb.id, sb.vm, sb.source) == (member.id, member.vm, "pool")
        assert sb.metadata == {"k": "v"} and sb.envs == {"E": "1"} and sb.end_at - sb.started_at == 60
        saved = Sandbox.load(home / "serve" / "sandboxes" / f"{sb.id}.json")
        assert saved.vm == member.vm  # a restarted server finds its VM by the recorded name
        assert sbs.get(sb.id).vm_name == member.vm
        assert metrics.value("herovm_serve_creates_total", template="py", source="pool", outcome="ok") == 1
        sbs.kill(sb.id)
        assert member.vm not in m.machines
    finally:
        p.stop()


def test_the_limit_counts_sandboxes_and_a_create_may_wait_for_a_slot(home: Path) -> None:
    m = FakeManager()
    metrics = Metrics()
    p = Pool(m, {"py@local": 1}, metrics, lambda _l: None)  # type: ignore[arg-type]
    sbs = Sandboxes(m, 1, pool=p, metrics=metrics, create_wait_s=0.0)  # type: ignore[arg-type]
    p._ready["py@local"] += [pool_mod.Member(f"m{i}", "py", 1, 1024) for i in range(2)]
    for i in range(2):
        m.machines[f"{POOL_PREFIX}m{i}"] = FakeMachine(f"{POOL_PREFIX}m{i}", "paused", "py")
    first = sbs.create("py", 60, {}, {})
    with pytest.raises(ApiError) as e:  # the pool holds one more, but the limit is the sandboxes'
        sbs.create("py", 60, {}, {})
    assert e.value.status == 429
    assert p.ready("py") == 1  # nothing claimed by the refused create
    sbs.create_wait_s = 5.0
    threading.Timer(0.2, sbs.kill, (first.id,)).start()
    started = time.monotonic()
    second = sbs.create("py", 60, {}, {})
    assert 0.15 < time.monotonic() - started < 4 and second.id == "m1"


def test_a_miss_restores_from_the_template(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = FakeManager()
    metrics = Metrics()
    p = Pool(m, {"py@local": 1}, metrics, lambda _l: None)  # type: ignore[arg-type]
    sbs = Sandboxes(m, None, pool=p, metrics=metrics)  # type: ignore[arg-type]
    made: list[str] = []

    def fake_create_vm(template: str, templates: dict, timeout: int, *_a: Any) -> Sandbox:
        made.append(template)
        return Sandbox(id="x1", template=template, token="t", started_at=0, end_at=timeout)

    monkeypatch.setattr(sbs, "_create_vm", fake_create_vm)
    sb = sbs.create("py", 30, {}, {})
    assert made == ["py"] and sb.source == "template"
    assert metrics.value("herovm_serve_pool_misses_total", template="py") == 1
    assert metrics.value("herovm_serve_create_seconds", template="py", source="template") == 1


# ------------------------------------------------------------------------------------- /metrics


def test_metrics_text_and_who_may_read_it(home: Path) -> None:
    m = FakeManager()
    metrics = Metrics()
    p = Pool(m, {"py@local": 2}, metrics, lambda _l: None)  # type: ignore[arg-type]
    sbs = Sandboxes(m, 3, pool=p, metrics=metrics)  # type: ignore[arg-type]
    metrics.observe("herovm_serve_create_seconds", 0.07, template="py", source="pool")
    metrics.observe("herovm_serve_create_seconds", 3.0, template="py", source="pool")
    metrics.inc("herovm_serve_pool_claims_total", template='we"ird\\')
    app = ServeApp(sbs, [KEY], log=lambda _l: None, pool=p)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        r = client.get("/metrics", headers={"X-API-KEY": KEY})
    p.stop()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    lines = text.splitlines()
    assert 'herovm_serve_sandboxes{state="running"} 0' in lines
    assert "herovm_serve_max_sandboxes 3" in lines
    assert 'herovm_serve_pool_target{template="py",host="local"} 2' in lines
    assert 'herovm_serve_create_seconds_bucket{source="pool",template="py",le="0.1"} 1' in lines
    assert 'herovm_serve_create_seconds_bucket{source="pool",template="py",le="4"} 2' in lines
    assert 'herovm_serve_create_seconds_bucket{source="pool",template="py",le="+Inf"} 2' in lines
    assert 'herovm_serve_create_seconds_count{source="pool",template="py"} 2' in lines
    assert 'herovm_serve_pool_claims_total{template="we\\"ird\\\\"} 1' in lines
    # every sample line is `name{labels} value` and every family has HELP and TYPE
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert any(name == f or name.startswith(f + "_") for f in families), line
            float(line.rsplit(" ", 1)[1].replace("+Inf", "inf"))


def test_the_user_check_runs_once_per_template_that_has_the_user(home: Path) -> None:
    m = FakeManager()
    sbs = Sandboxes(m)  # type: ignore[arg-type]
    a = sbs.create("py", 60, {}, {})
    b = sbs.create("py", 60, {}, {})
    c = sbs.create("node", 60, {}, {})
    assert (a.source, a.vm, c.source) == ("template", f"e2b-{a.id}", "template")
    assert m.execs == [a.vm, c.vm]  # b: a clone of a template whose clones have `user`: no exec
    assert b.id in {sb.id for sb in sbs.all()}
