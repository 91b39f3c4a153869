"""Two hosts: this machine's qemu:///system (`local`) and a second libvirt daemon reached only through
`qemu+ssh://` over loopback (a throwaway user's qemu:///session behind an sshd of the test's own:
second_host.py). Driven through the CLI, as a user would, in a HEROVM_HOME of the module's own (the image
hard-linked into it), so no other test ever sees the second host.

Up on each host, exec, cp both ways, stop/start, down; placement picks the host with room; the image reaches
the second host once (uploaded through libvirt's storage API, read back and checked); a host whose packets
are dropped mid-test gives clear errors within its timeouts while the local VM keeps working, and its VM is
seen again once it answers; nothing is left on either host afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from guests import HEROVM, cli, home_domains, link_image
from second_host import SecondHost, second_host

from herovm import images


@dataclass
class Fleet:
    home: Path
    env: dict[str, str]
    second: SecondHost

    def herovm(self, *args: str, timeout: float = 300, env: dict | None = None):
        return cli(*args, timeout=timeout, env={**self.env, **(env or {})})

    def json(self, *args: str, timeout: float = 300):
        r = self.herovm(*args, "--json", timeout=timeout)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def second_domains(self) -> list[str]:
        conn = libvirt.open(self.second.libvirt_uri)
        try:
            return [d.name() for d in conn.listAllDomains()]
        finally:
            conn.close()

    def second_volumes(self) -> list[str]:
        conn = libvirt.open(self.second.libvirt_uri)
        try:
            pool = conn.storagePoolLookupByName("herovm")
            pool.refresh(0)
            return pool.listVolumes()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def fleet(image: images.Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = Path(tempfile.mkdtemp(prefix="herovm-it-hosts-", dir="/tmp"))
    try:
        os.chmod(home, 0o711)  # QEMU (libvirt-qemu) reaches the local VMs' disks under it
        link_image(image, home)
        env = {**os.environ, "HEROVM_HOME": str(home), "HEROVM_HOST_TIMEOUT": "4"}
        with second_host(tmp_path_factory.mktemp("second-host")) as second:
            f = Fleet(home, env, second)
            added = f.herovm(
                "host", "add", "h2", second.ssh_uri, "--identity", str(second.identity),
                "--host-key", second.host_key, "--accel", "tcg",
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            try:
                yield f
            finally:
                down = f.herovm("down", "--all")
                assert down.returncode == 0, down.stderr
                assert home_domains(home) == {}, "domains of the test's home left on the local host"
                assert f.second_domains() == [], "domains left on the second host"
                left = [v for v in f.second_volumes() if v.startswith("vm.")]
                assert left == [], f"VM volumes left on the second host: {left}"
                pruned = f.json("host", "prune", "h2")["removed"]
                assert pruned and all(v.startswith("img.") for v in pruned), pruned
                assert f.second_volumes() == [], "volumes left on the second host"
                removed = f.herovm("host", "rm", "h2")
                assert removed.returncode == 0, removed.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def two_vms(fleet: Fleet, run_id: str) -> dict[str, str]:
    """One VM on each host: local (its default network), and on h2 (restricted: no passt there)."""
    names = {"local": f"it-{run_id}-hl", "h2": f"it-{run_id}-hr"}
    up = fleet.herovm("up", names["local"])
    assert up.returncode == 0, up.stderr
    up = fleet.herovm("up", names["h2"], "--host", "h2", "--net", "restricted")
    assert up.returncode == 0, up.stderr
    assert "uploading base.qcow2" in up.stderr and "base.qcow2 is on h2, checked" in up.stderr, up.stderr
    return names


def test_a_host_key_is_pinned_never_learnt(fleet: Fleet, tmp_path: Path):
    second = fleet.second
    nobody = {"HOME": str(tmp_path)}  # no ~/.ssh/known_hosts: nothing to take the key from
    r = fleet.herovm("host", "add", "h3", second.ssh_uri, "--identity", str(second.identity), env=nobody)
    assert r.returncode != 0 and "never trusts a host's key the first time" in r.stderr, r.stderr
    other = tmp_path / "other"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {other}")  # noqa: S605 - a fixed command
    wrong = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    r = fleet.herovm(
        "host", "add", "h3", second.ssh_uri, "--identity", str(second.identity), "--host-key", wrong,
        timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "host h3" in r.stderr and "cannot be reached" in r.stderr, r.stderr
    assert "h3" not in {h["name"] for h in fleet.json("host", "ls")}
    doctor = fleet.herovm("doctor")
    assert f"[ok  ] host h2: {second.ssh_uri}: tcg" in doctor.stdout, doctor.stdout
    pinned = fleet.home / "hosts" / "h2.known_hosts"
    assert second.host_key in pinned.read_text() and pinned.stat().st_mode & 0o077 == 0
    assert not (fleet.home / "hosts" / "h3.known_hosts").exists()  # a failed add leaves nothing


def test_up_exec_cp_stop_start_on_each_host(fleet: Fleet, two_vms: dict[str, str], tmp_path: Path):
    rows = {r["name"]: r for r in fleet.json("ls")}
    assert {rows[n]["host"] for n in two_vms.values()} == {"local", "h2"}
    assert all(rows[n]["ready"] for n in two_vms.values())
    for host, name in two_vms.items():
        r = fleet.herovm("exec", name, "--", "uname", "-n")
        assert r.returncode == 0 and r.stdout.strip() == name, (host, r.stderr)
    remote = two_vms["h2"]
    assert fleet.json("status", remote)["host"] == "h2"
    assert f"herovm-{remote}" in fleet.second_domains()
    src = tmp_path / "in.txt"
    src.write_text("across hosts\n")
    assert fleet.herovm("cp", str(src), f"{remote}:/root/in.txt").returncode == 0
    back = tmp_path / "back.txt"
    assert fleet.herovm("cp", f"{remote}:/root/in.txt", str(back)).returncode == 0
    assert back.read_text() == "across hosts\n"
    if shutil.which("script"):  # an interactive shell through the tunnel, on a terminal `script` makes
        shell = subprocess.run(
            ["script", "-q", "-c", shlex.join([*HEROVM, "ssh", remote]), "/dev/null"],
            input="echo SHELL-$((40+2))\nexit\n", env=fleet.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert shell.returncode == 0 and "SHELL-42" in shell.stdout, shell.stdout[-500:]
    logs = fleet.herovm("logs", remote)
    assert logs.returncode == 0 and "ready" in logs.stdout, logs.stderr  # its console, copied from h2
    stop = fleet.herovm("stop", remote)
    assert stop.returncode == 0, stop.stderr
    assert {r["name"]: r["state"] for r in fleet.json("ls")}[remote] == "stopped"
    start = fleet.herovm("start", remote)
    assert start.returncode == 0, start.stderr
    again = fleet.herovm("exec", remote, "--", "cat", "/root/in.txt")
    assert again.returncode == 0 and again.stdout == "across hosts\n", again.stderr


def test_placement_picks_the_host_with_room_and_the_image_goes_once(
    fleet: Fleet, two_vms: dict[str, str], run_id: str
):
    facts = {h["name"]: h for h in fleet.json("host", "ls")}
    assert facts["h2"]["reachable"] and facts["h2"]["accel"] == "tcg"
    assert facts["h2"]["vms_running"] >= 1
    image_id = fleet.json("status", two_vms["h2"])["image_id"]
    assert image_id in facts["h2"]["images"]
    assert fleet.json("host", "prune", "h2")["removed"] == []  # a VM there lies on it
    # the local VM takes 1 GiB: with local limited to that, a new VM has room on h2 only
    assert fleet.herovm("host", "set", "local", "--max-memory", "1GB").returncode == 0
    try:
        assert {h["name"]: h["room"] for h in fleet.json("host", "ls")}["local"] == 0
        name = f"it-{run_id}-hp"
        up = fleet.herovm("up", name, "--net", "restricted", "--memory", "512MB")
        assert up.returncode == 0, up.stderr
        assert "placed on h2" in up.stderr, up.stderr
        assert "uploading" not in up.stderr, "the image was uploaded to h2 a second time"
        assert {r["name"]: r["host"] for r in fleet.json("ls")}[name] == "h2"
        # the default network mode stays on the local host, which has no room now
        r = fleet.herovm("up", f"it-{run_id}-hq", "--memory", "512MB")
        assert r.returncode != 0 and "no host has room" in r.stderr, r.stderr
        r = fleet.herovm("up", f"it-{run_id}-hq", "--host", "h2")
        assert r.returncode != 0 and "default network mode" in r.stderr, r.stderr
        down = fleet.herovm("down", name)
        assert down.returncode == 0, down.stderr
    finally:
        fleet.herovm("host", "set", "local", "--max-memory", "none")


def test_an_unreachable_host_fails_clearly_and_comes_back(fleet: Fleet, two_vms: dict[str, str]):
    local, remote = two_vms["local"], two_vms["h2"]
    with fleet.second.unreachable():
        t0 = time.monotonic()
        rows = {r["name"]: r for r in fleet.json("ls", timeout=60)}
        assert time.monotonic() - t0 < 15  # HEROVM_HOST_TIMEOUT is 4 s
        assert rows[remote]["state"] == "unreachable" and rows[local]["state"] == "running"
        t0 = time.monotonic()
        r = fleet.herovm("exec", remote, "--", "true", timeout=60)
        assert time.monotonic() - t0 < 15
        assert r.returncode != 0 and "host h2" in r.stderr and "cannot be reached" in r.stderr, r.stderr
        r = fleet.herovm("status", remote, timeout=60)
        assert r.returncode != 0 and "cannot be reached" in r.stderr, r.stderr
        r = fleet.herovm("exec", local, "--", "true", timeout=60)  # the other host is not held up
        assert r.returncode == 0, r.stderr
        hosts = {h["name"]: h for h in fleet.json("host", "ls", timeout=60)}
        assert not hosts["h2"]["reachable"] and hosts["local"]["reachable"]
        doctor = fleet.herovm("doctor", timeout=60)
        assert "[warn] host h2:" in doctor.stdout and "cannot be reached" in doctor.stdout, doctor.stdout
    rows = {r["name"]: r for r in fleet.json("ls", timeout=60)}
    assert rows[remote]["state"] == "running"
    r = fleet.herovm("exec", remote, "--", "uname", "-n")
    assert r.returncode == 0 and r.stdout.strip() == remote, r.stderr
    # a host gone for good: `down --force` forgets its VM here; once the host answers again, `ls` finds the
    # VM there and `down` removes it from the host
    with fleet.second.unreachable():
        r = fleet.herovm("down", remote, "--force", timeout=60)
        assert r.returncode == 0 and "its machine there stays" in r.stderr, r.stderr
        assert not (fleet.home / "vms" / remote).exists()
    assert remote in {r["name"] for r in fleet.json("ls", timeout=60)}
    r = fleet.herovm("down", remote)
    assert r.returncode == 0, r.stderr
    assert f"herovm-{remote}" not in fleet.second_domains()


def _metric(url: str, key: str, series: str) -> float:
    import httpx

    r = httpx.get(f"{url}/metrics", headers={"X-API-KEY": key}, timeout=30)
    assert r.status_code == 200, r.text
    for line in r.text.splitlines():
        if line.startswith(series + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def test_a_template_on_both_hosts_and_serve_hands_out_sandboxes_on_each(
    fleet: Fleet, run_id: str, tmp_path: Path
):
    """`template create --host local,h2` makes a copy on each host (the second's kept there through libvirt's
    save and storage API); its clones restore on either; `herovm serve` with pools per host hands the E2B
    SDK's sandboxes out on both hosts; `template rm` takes the second host's volumes with it."""
    e2b = pytest.importorskip("e2b", reason="the e2b SDK (dev extra) is not installed")
    from guests import e2b_sdk_at

    name, clone = f"it-{run_id}-tpl", f"it-{run_id}-tc2"
    boot = tmp_path / "t.hero"
    boot.write_text("!!file.write path:/srv/made content:'by the template'\n")
    made = fleet.herovm(
        "template", "create", name, "--host", "local,h2", "--net", "restricted", "--bootstrap", str(boot)
    )
    assert made.returncode == 0, made.stderr
    assert "saving" in made.stderr and "on h2" in made.stderr, made.stderr
    server: subprocess.Popen | None = None
    try:
        rows = {t["name"]: t for t in fleet.json("template", "ls")}
        assert rows[name]["hosts"] == ["local", "h2"]
        assert len([v for v in fleet.second_volumes() if v.startswith("tpl.")]) == 2  # memory and disk
        refused = fleet.herovm("host", "rm", "h2")
        assert refused.returncode != 0 and f"templates of this home: {name}" in refused.stderr

        up = fleet.herovm("up", clone, "--template", name, "--host", "h2")
        assert up.returncode == 0, up.stderr
        assert f"herovm-{clone}" in fleet.second_domains()
        r = fleet.herovm("exec", clone, "--", "sh", "-c", "uname -n; cat /srv/made")
        assert r.returncode == 0 and r.stdout.split("\n")[:2] == [clone, "by the template"], r.stderr
        assert [v for v in fleet.second_volumes() if v.endswith(".restore.save")] == []  # the copy is gone
        busy = fleet.herovm("template", "rm", name)
        assert busy.returncode != 0 and "in use" in busy.stderr and clone in busy.stderr
        assert fleet.herovm("down", clone).returncode == 0

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url, key = f"http://127.0.0.1:{port}", "e2b_" + secrets.token_hex(16)
        log = tmp_path / "serve.log"
        with log.open("ab") as out:
            server = subprocess.Popen(
                [*HEROVM, "serve", "--listen", f"127.0.0.1:{port}", "--pool", f"{name}=1"]
                + ["--host", "local", "--host", "h2"],
                env={**fleet.env, "HEROVM_API_KEY": key},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 180
        ready = [f'herovm_serve_pool_ready{{template="{name}",host="{h}"}}' for h in ("local", "h2")]
        while True:  # one waiting VM per host: the pools are per host
            assert server.poll() is None, log.read_text()[-2000:]
            with contextlib.suppress(httpx_errors()):
                if all(_metric(url, key, series) == 1 for series in ready):
                    break
            assert time.monotonic() < deadline, f"the pools did not fill: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        with e2b_sdk_at(url, key):
            sandboxes = [e2b.Sandbox.create(template=name) for _ in range(2)]
            vms = {r["name"]: r for r in fleet.json("ls")}
            on = {vms[f"e2b-pool-{sb.sandbox_id}"]["host"] for sb in sandboxes}
            assert on == {"local", "h2"}, "the two creates were not served by both hosts' pools"
            for sb in sandboxes:
                assert sb.commands.run("cat /srv/made").stdout == "by the template"
                sb.kill()
        server.send_signal(signal.SIGTERM)  # it removes its waiting pool VMs on both hosts
        assert server.wait(180) == 0, log.read_text()[-2000:]
        assert [n for n in fleet.second_domains() if "e2b-" in n] == []

        # the template's memory deleted behind herovm's back on h2: one line, nothing of the clone left there
        conn = libvirt.open(fleet.second.libvirt_uri)
        try:
            pool = conn.storagePoolLookupByName("herovm")
            pool.refresh(0)
            next(v for v in pool.listAllVolumes() if v.name().endswith(".memory.save")).delete(0)
        finally:
            conn.close()
        gone = fleet.herovm("up", clone, "--template", name, "--host", "h2")
        assert gone.returncode != 0 and "gone from h2" in gone.stderr, gone.stderr
        assert f"herovm-{clone}" not in fleet.second_domains()
        assert [v for v in fleet.second_volumes() if v.startswith(f"vm.{clone}.")] == []
        with fleet.second.unreachable():  # rm with h2 silent: refused within the timeout, nothing removed
            t0 = time.monotonic()
            silent = fleet.herovm("template", "rm", name, timeout=120)
            assert time.monotonic() - t0 < 30
            assert silent.returncode == 5 and "h2" in silent.stderr and "--force" in silent.stderr
        assert fleet.json("template", "ls")[0]["hosts"] == ["local", "h2"]
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(180)
        for vm in fleet.json("ls"):
            if vm["name"].startswith("e2b-") or vm["name"] == clone:
                fleet.herovm("down", vm["name"])
        removed = fleet.herovm("template", "rm", name)
        assert removed.returncode == 0, removed.stderr
    assert [v for v in fleet.second_volumes() if v.startswith("tpl.")] == []


def httpx_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.HTTPError, OSError)
