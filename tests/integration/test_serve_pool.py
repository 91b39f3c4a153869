"""`herovm serve --pool` with real guests through the e2b Python SDK: a pool VM waits paused and visible in
`herovm ls`; a create claims it (the sandbox id is the pool VM's, its metadata/envs/user are the create's);
the pool refills in the background; a create while it is empty is a miss that restores; /metrics (behind the
API key) counts claims, misses, refills and creates; a killed server's pool VM is adopted by the next one,
and a server that exits removes its waiting VMs. At most three guests at once (two sandboxes, one pool VM).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
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
from guests import e2b_sdk_at  # noqa: E402

HEROVM = str(Path(sys.executable).with_name("herovm"))
pytestmark = pytest.mark.usefixtures("serve_alone")  # conftest: the serve test files take turns
BOOTSTRAP = "!!file.write path:/srv/pooled content:'from the template'\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def herovm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([HEROVM, *args], capture_output=True, text=True, timeout=timeout)


class PoolServer:
    def __init__(self, template: str, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "e2b_" + secrets.token_hex(16)
        self.template, self.log = template, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [HEROVM, "serve", "--listen", f"127.0.0.1:{self.port}", "--max-sandboxes", "2"]
                + ["--pool", f"{self.template}=1"],
                env={**os.environ, "HEROVM_API_KEY": self.key},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"herovm serve exited: {self.log.read_text()[-2000:]}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.1)
        raise AssertionError(f"herovm serve did not listen: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> dict[str, float]:
        r = httpx.get(f"{self.url}/metrics", headers={"X-API-KEY": self.key}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    def metric(self, series: str) -> float:
        return self.metrics().get(series.replace("T", self.template), 0.0)

    def wait_ready(self, limit: float = 120) -> None:
        deadline = time.monotonic() + limit
        while self.metric('herovm_serve_pool_ready{template="T",host="local"}') < 1:
            assert time.monotonic() < deadline, f"the pool did not fill: {self.log.read_text()[-2000:]}"
            time.sleep(0.2)


def pool_vms() -> dict[str, str]:
    rows = json.loads(herovm("ls", "--json").stdout or "[]")
    return {r["name"]: r["state"] for r in rows if r["name"].startswith("e2b-pool-")}


@pytest.fixture(scope="module")
def template(image, run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"it-{run_id}-pool"
    boot = tmp_path_factory.mktemp("pool") / "pool.hero"
    boot.write_text(BOOTSTRAP)
    r = herovm("template", "create", name, "--bootstrap", str(boot), "--net", "restricted")
    assert r.returncode == 0, r.stderr
    yield name
    herovm("template", "rm", name)


@pytest.fixture
def server(template: str, tmp_path: Path) -> Iterator[PoolServer]:
    srv = PoolServer(template, tmp_path / "serve.log")
    try:
        with e2b_sdk_at(srv.url, srv.key):
            yield srv
    finally:
        srv.stop()
        for name in pool_vms():  # whatever a failed test left
            herovm("down", name)


def test_a_create_claims_a_pooled_vm_and_the_pool_refills(server: PoolServer) -> None:
    server.start()
    server.wait_ready()
    waiting = pool_vms()
    assert list(waiting.values()) == ["paused"], waiting  # a herovm VM, marked by its name
    (pooled,) = waiting

    started = time.monotonic()
    sb = Sandbox.create(server.template, metadata={"who": "pool"}, envs={"FROM_CREATE": "p1"}, timeout=300)
    r = sb.commands.run('echo "$FROM_CREATE"; whoami; cat /srv/pooled')
    took = time.monotonic() - started
    print(f"pool: create to first command {took:.2f}s")  # noqa: T201 (shown with -s)
    assert r.stdout == "p1\nuser\nfrom the template"
    assert pooled == f"e2b-pool-{sb.sandbox_id}"  # the sandbox id is the pool VM's; the VM keeps its name
    assert pool_vms()[pooled] == "running"
    assert sb.get_info().metadata == {"who": "pool"}
    sb.files.write("/home/user/a.txt", "mine")
    assert sb.files.read("/home/user/a.txt") == "mine"

    m = server.metrics()
    t = server.template
    assert m[f'herovm_serve_pool_claims_total{{template="{t}"}}'] == 1
    assert m[f'herovm_serve_creates_total{{outcome="ok",source="pool",template="{t}"}}'] == 1
    assert m[f'herovm_serve_create_seconds_count{{source="pool",template="{t}"}}'] == 1
    assert m['herovm_serve_sandboxes{state="running"}'] == 1

    # at once again: the pool is still refilling (a restore takes seconds), so this one is a miss
    other = Sandbox.create(server.template, timeout=300)
    assert other.commands.run("cat /srv/pooled").stdout == "from the template"
    names = {r["name"] for r in json.loads(herovm("ls", "--json").stdout)}
    assert f"e2b-{other.sandbox_id}" in names  # a miss: restored from the template under its own name
    server.wait_ready()  # refilled in the background
    m = server.metrics()
    assert m[f'herovm_serve_pool_misses_total{{template="{t}"}}'] >= 1
    assert m[f'herovm_serve_pool_refills_total{{template="{t}"}}'] >= 2
    assert m[f'herovm_serve_pool_refill_seconds_count{{template="{t}"}}'] >= 2
    assert m['herovm_serve_sandboxes{state="running"}'] == 2
    # the limit counts sandboxes, not pool VMs: a third is refused though one waits in the pool
    with pytest.raises(e2b.RateLimitException):
        Sandbox.create(server.template, timeout=300)

    sb.kill()
    other.kill()
    log = server.log.read_text()
    assert re.search(rf"pool {t}: claimed {pooled} on local in [0-9.]+s", log)
    assert f"pool {t}: miss" in log and re.search(
        rf"pool {t} on local: refilled e2b-pool-\w+ in [0-9.]+s", log
    )

    # /metrics is behind the API key
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 401
    bearer = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.key}"}, timeout=30)
    assert bearer.status_code == 200

    # a server that exits removes its waiting pool VM
    waiting = pool_vms()
    assert len(waiting) == 1 and list(waiting.values()) == ["paused"]
    server.stop()
    assert pool_vms() == {}
    assert "removed 1 waiting VM(s) at exit" in server.log.read_text()


def test_a_restarted_server_adopts_the_pool_vm_a_killed_one_left(server: PoolServer) -> None:
    server.start()
    server.wait_ready()
    (left,) = pool_vms()
    server.stop(signal.SIGKILL)  # no cleanup: the VM stays, paused
    assert pool_vms() == {left: "paused"}

    server.start()
    server.wait_ready(limit=30)
    assert f"pool: adopted {left}" in server.log.read_text()
    assert server.metric('herovm_serve_pool_refills_total{template="T"}') == 0  # adopted, not made
    sb = Sandbox.create(server.template, timeout=300)
    assert f"e2b-pool-{sb.sandbox_id}" == left
    assert sb.commands.run("cat /srv/pooled").stdout == "from the template"
    sb.kill()
