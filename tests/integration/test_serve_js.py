"""`herovm serve` through E2B's JavaScript SDK (npm `e2b`, pinned) with the machine's node: create,
commands.run (stdout, stderr, exit code, the create's envs, user), files write/read, kill.

The package is installed by the test into a temporary directory with npm and its configured registry
(nothing global); the test is skipped, saying why, where node or npm is missing, too old, or the install
fails (no registry reachable). The SDK runs with its defaults: E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY
point it at a server on a free loopback port. One guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

E2B_JS = "2.51.0"  # npm e2b, pinned (needs node >= 20.18.1)
HEROVM = str(Path(sys.executable).with_name("herovm"))
pytestmark = pytest.mark.usefixtures("serve_alone")  # conftest: the serve test files take turns

SCRIPT = r"""
import { Sandbox, CommandExitError } from 'e2b'

const out = {}
const started = Date.now()
const sbx = await Sandbox.create({
  timeoutMs: 300_000, metadata: { suite: 'js' }, envs: { FROM_CREATE: 'js1' },
})
try {
  out.sandboxId = sbx.sandboxId
  const r = await sbx.commands.run('echo "hello $FROM_CREATE"; echo err >&2; whoami')
  out.firstCommandMs = Date.now() - started
  out.run = { stdout: r.stdout, stderr: r.stderr, exitCode: r.exitCode }
  try {
    await sbx.commands.run('exit 3')
    out.exit3 = 'no error'
  } catch (e) {
    out.exit3 = e instanceof CommandExitError ? e.exitCode : String(e)
  }
  out.root = (await sbx.commands.run('whoami', { user: 'root' })).stdout
  await sbx.files.write('/home/user/js.txt', 'written by the JS SDK')
  out.read = await sbx.files.read('/home/user/js.txt')
  out.cat = (await sbx.commands.run('cat /home/user/js.txt')).stdout
  const listed = await Sandbox.list({ query: { metadata: { suite: 'js' } } }).nextItems()
  out.listed = listed.map((s) => s.sandboxId)
} finally {
  await sbx.kill()
}
out.killed = !(await Sandbox.list().nextItems()).some((s) => s.sandboxId === out.sandboxId)
console.log('RESULT ' + JSON.stringify(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def e2b_js(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with node_modules/e2b installed, or a skip saying why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the JavaScript SDK test (not found on PATH)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    if (major, minor) < (20, 18) or major == 21:
        pytest.skip(f"npm e2b {E2B_JS} needs node >= 20.18.1 (not 21); this machine has {version}")
    work = tmp_path_factory.mktemp("e2b-js")
    (work / "package.json").write_text(json.dumps({"name": "herovm-serve-js-test", "private": True}))
    try:
        r = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", f"e2b@{E2B_JS}"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm could not install e2b@{E2B_JS} in 300 s (is its registry reachable?)")
    if r.returncode != 0 or not (work / "node_modules/e2b/package.json").exists():
        why = (r.stderr or r.stdout).strip().splitlines()[-3:]
        pytest.skip(f"npm could not install e2b@{E2B_JS} from its configured registry: {' / '.join(why)}")
    return work


@pytest.fixture
def server(image, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    port, key, log = _free_port(), "e2b_" + secrets.token_hex(16), tmp_path / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [HEROVM, "serve", "--listen", f"127.0.0.1:{port}", "--max-sandboxes", "1"],
            env={**os.environ, "HEROVM_API_KEY": key},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"herovm serve exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            assert time.monotonic() < deadline, "herovm serve did not listen"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", key, log
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (Path(os.environ.get("HEROVM_HOME", "/var/lib/herovm")) / "serve" / "sandboxes").glob(
            "*.json"
        ):
            with contextlib.suppress(Exception):
                facts = json.loads(f.read_text())
                if facts.get("metadata", {}).get("suite") == "js":  # a sandbox the script left: removed
                    subprocess.run(
                        [HEROVM, "down", facts.get("vm_name") or f"e2b-{facts['id']}"], timeout=120
                    )
                    f.unlink(missing_ok=True)


def test_the_javascript_sdk_creates_runs_writes_reads_and_kills(
    e2b_js: Path, server: tuple[str, str, Path]
) -> None:
    url, key, log = server
    script = e2b_js / "flow.mjs"
    script.write_text(SCRIPT)
    env = {**os.environ, "E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": key}
    r = subprocess.run(
        ["node", str(script)], cwd=e2b_js, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"node failed: {r.stderr[-3000:]}\nserver: {log.read_text()[-2000:]}"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"JS SDK: create to first command {out['firstCommandMs'] / 1000:.2f}s")  # noqa: T201
    assert out["run"] == {"stdout": "hello js1\nuser\n", "stderr": "err\n", "exitCode": 0}
    assert out["exit3"] == 3
    assert out["root"] == "root\n"
    assert out["read"] == out["cat"] == "written by the JS SDK"
    assert out["listed"] == [out["sandboxId"]]
    assert out["killed"] is True
