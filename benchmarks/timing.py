"""One boot of each variant, and the herovm-only measurements (exec latency, throughput, concurrent up).

Every boot time is host wall clock in seconds from the moment the domain is started (for herovm: its
`boot` progress step, taken just before the backend starts the domain; for the others: just before
`virDomain.create()`). Milestones:

- `first_console`: the first non-empty line in the serial console file (read as it grows, every 10 ms);
- `ssh_banner`: a TCP connect to the forwarded port on 127.0.0.1 returns an `SSH-` banner (a try per 100 ms);
- `user_space`: the guest's own first word from user space (herovm: the agent's `boot` event; floor: /init);
- `ready`: the guest did what it was asked (herovm: `ready`; cloud-init: its final message; floor: /init);
- `bootstrap_done`: cloud-init's last runcmd line ran (the bootstrap's commands are done);
- `exec_answers`: herovm only, the first `exec` of `true` over the kept API connection returned.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path

from herovm import state
from herovm.guest import keys
from herovm.guest.ssh import GuestConnection
from herovm.manager import Manager
from herovm.progress import Progress

from . import domains, seed
from .images import BenchImage

ROOT = Path(__file__).resolve().parent.parent
TEST_BOOTSTRAP = ROOT / "tests/integration/data/full.hero"
VARIABLES = {"WHO": "bench"}
IDLE_BEFORE_RSS = 2.0
BOOT_DEADLINE = 300.0


def _herovm_net() -> dict:
    """herovm's network mode for the comparison: QEMU user networking with restrict=on, the same as the
    cloud-init and floor domains, where this herovm has network modes; its only network otherwise."""
    if "net" in inspect.signature(Manager.up).parameters:
        return {"net": "restricted"}
    return {}


HEROVM_UP = _herovm_net()

# herovm VMs this process made and has not removed yet (for the cleanup on the way out).
created_vms: set[str] = set()
_created_lock = threading.Lock()


def _track(name: str, alive: bool) -> None:
    with _created_lock:
        (created_vms.add if alive else created_vms.discard)(name)


def cleanup_vms() -> None:
    for name in sorted(created_vms):
        with contextlib.suppress(Exception), Manager() as m:
            m.down(name)
        _track(name, False)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


# --------------------------------------------------------------------------------------------- herovm


def boot_herovm(name: str, bootstrap: Path | None, *, measure_down: bool = True) -> dict:
    marks: dict[str, float | None] = {}
    guest: dict[str, float] = {}
    probes: dict = {}

    def progress(p: Progress) -> None:
        now = time.monotonic()
        if p.stage == "boot":
            probes["t0"] = now
            vmdir = state.VMDir(name)
            probes["console"] = domains.ConsoleWatcher(vmdir.console_log, now)
            port = vmdir.read_meta().get("ssh_port")
            probes["ssh"] = domains.SSHBannerProbe(port, now, now + BOOT_DEADLINE)
        elif p.stage == "agent":
            kind = p.data.get("event")
            if kind == "boot":
                marks["user_space"], guest["user_space"] = now - probes["t0"], p.data["t"]
            elif kind == "ready":
                marks["ready"], guest["ready"] = now - probes["t0"], p.data["t"]

    record: dict = {"name": name}
    try:
        with Manager(progress=progress) as m:
            _track(name, True)
            t_call = time.monotonic()
            vm = m.up(
                name,
                bootstrap=str(bootstrap) if bootstrap else None,
                variables=VARIABLES,
                timeout="5m",
                **HEROVM_UP,
            )
            r = vm.exec(["true"])
            if r.exit_code != 0:
                raise RuntimeError(f"exec true in {name} exited {r.exit_code}")
            t_exec = time.monotonic()
            record["image_id"] = vm.meta.get("image_id")
            marks["exec_answers"] = t_exec - probes["t0"]
            record["up_call_to_exec"] = t_exec - t_call
            probes["ssh"].wait(10)
            marks["ssh_banner"] = probes["ssh"].at
            time.sleep(0.2)  # let the console catch up with the events mirrored on it
            first = probes["console"].first_line()
            marks["first_console"], record["first_line"] = first if first else (None, "")
            vm.close()
            time.sleep(IDLE_BEFORE_RSS)
            record["rss_mib"] = domains.rss_mib(domains.qemu_pid(f"herovm-{name}"))
            if measure_down:
                t = time.monotonic()
                m.down(name)
                record["down"] = time.monotonic() - t
                _track(name, False)
    finally:
        for key in ("console", "ssh"):
            if key in probes:
                probes[key].stop()
        if name in created_vms:
            with contextlib.suppress(Exception), Manager() as m:
                m.down(name)
            _track(name, False)
    record["marks"], record["guest"] = marks, guest
    return record


def exec_measurements(name: str, n: int, throughput_bytes: int) -> dict:
    """p50/p95/p99 of `true` over the Python API (kept connection) and the CLI; a large stdout; down."""
    out: dict = {}
    with Manager() as m:
        _track(name, True)
        try:
            vm = m.up(name, timeout="5m", **HEROVM_UP)
            vm.exec(["true"])  # connect once: the API numbers are for a kept connection
            api = []
            for _ in range(n):
                t = time.monotonic()
                vm.exec(["true"])
                api.append(time.monotonic() - t)
            cli = []
            herovm = str(ROOT / ".venv/bin/herovm")
            for _ in range(n):
                t = time.monotonic()
                subprocess.run([herovm, "exec", name, "--", "true"], check=True, capture_output=True)
                cli.append(time.monotonic() - t)
            # The same over SSH (what exec was before the agent served it), for comparison.
            over_ssh = []
            conn = vm.connection()
            conn.exec(["true"])
            for _ in range(n):
                t = time.monotonic()
                conn.exec(["true"])
                over_ssh.append(time.monotonic() - t)
            # Where the CLI's time goes: a new agent connection (challenge and answer), and the CLI
            # process starting.
            connects = []
            for _ in range(min(10, n)):
                vm.close()
                t = time.monotonic()
                vm.exec(["true"])
                connects.append(time.monotonic() - t)
            startup = []
            for _ in range(min(10, n)):
                t = time.monotonic()
                subprocess.run([herovm, "--help"], check=True, capture_output=True)
                startup.append(time.monotonic() - t)
            got = 0

            def count(chunk: bytes) -> None:
                nonlocal got
                got += len(chunk)

            t = time.monotonic()
            r = vm.exec(["head", "-c", str(throughput_bytes), "/dev/zero"], on_stdout=count, timeout=600)
            seconds = time.monotonic() - t
            out["throughput"] = {
                "bytes": got,
                "seconds": seconds,
                "mib_per_s": got / seconds / 2**20,
                "ok": r.exit_code == 0 and got == throughput_bytes,
            }
            vm.close()
            time.sleep(IDLE_BEFORE_RSS)
            out["rss_after_mib"] = domains.rss_mib(domains.qemu_pid(f"herovm-{name}"))
            t = time.monotonic()
            m.down(name)
            out["down"] = time.monotonic() - t
            _track(name, False)
        finally:
            if name in created_vms:
                with contextlib.suppress(Exception):
                    m.down(name)
                _track(name, False)
    out["api"], out["cli"], out["connect"], out["cli_startup"] = api, cli, connects, startup
    out["ssh"] = over_ssh
    return out


def concurrent_up(prefix: str, k: int) -> dict:
    """`up` (standard test bootstrap) of k guests at once, one thread and one Manager each; then down."""
    barrier = threading.Barrier(k)
    results: list[dict] = [{} for _ in range(k)]

    def one(i: int) -> None:
        name = f"{prefix}-{i}"
        r = results[i]
        r["name"] = name
        try:
            with Manager() as m:
                _track(name, True)
                barrier.wait()
                t = time.monotonic()
                r["start"] = t
                boot = str(TEST_BOOTSTRAP)
                vm = m.up(name, bootstrap=boot, variables=VARIABLES, timeout="10m", **HEROVM_UP)
                code = vm.exec(["true"]).exit_code
                r["seconds"] = time.monotonic() - t
                r["ok"] = code == 0
                if code != 0:
                    r["error"] = f"exec true exited {code}"
                vm.close()
        except Exception as e:  # reported, not hidden
            r["ok"] = False
            r["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]

    threads = [threading.Thread(target=one, args=(i,), name=f"up-{i}") for i in range(k)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    downs: list[float] = []
    try:
        for t in threads:
            t.join()
        total = time.monotonic() - t0
    except BaseException:
        # Interrupted: release threads still at the barrier, and let the `up`s in flight finish, so the
        # downs below find every guest (a guest created after its down had run would be left behind).
        barrier.abort()
        for t in threads:
            t.join()
        raise
    finally:
        # Down all of them (also the failed ones: herovm keeps those for inspection).
        for r in results:
            if "name" not in r:
                continue
            with contextlib.suppress(Exception), Manager() as m:
                t = time.monotonic()
                m.down(r["name"])
                downs.append(time.monotonic() - t)
            _track(r["name"], False)
    times = [r["seconds"] for r in results if r.get("ok")]
    return {
        "guests": k,
        "total": total,
        "ok": sum(1 for r in results if r.get("ok")),
        "failed": [{"name": r["name"], "error": r.get("error", "?")} for r in results if not r.get("ok")],
        "per_guest": times,
        "per_guest_median": statistics.median(times) if times else None,
        "per_guest_max": max(times) if times else None,
        "down_median": statistics.median(downs) if downs else None,
    }


# ------------------------------------------------------------------------------------------ cloud-init


def boot_cloudinit(img: BenchImage, name: str, accel: str, *, details: bool = False) -> dict:
    """A fresh instance (new overlay, new seed with a new instance-id) booted to cloud-init's final
    message. With `details`, afterwards (outside the timed part) log in to check the bootstrap's effects
    and collect systemd-analyze and cloud-init analyze output."""
    record: dict = {"name": name}
    marks: dict[str, float | None] = {}
    guest: dict[str, float] = {}
    with domains.BenchDomain(name) as dom:
        host_key, client_key = dom.dir / "ssh_host_ed25519_key", dom.dir / "id_ed25519"
        host_pub = keys.generate_keypair(host_key, comment=f"bench-host@{name}")
        client_pub = keys.generate_keypair(client_key, comment=f"bench-client@{name}")
        config = seed.cloud_config(
            TEST_BOOTSTRAP.read_text(),
            VARIABLES,
            host_key=host_key.read_text(),
            host_pub=host_pub,
            root_pub=client_pub,
        )
        seed_iso = dom.dir / "seed.iso"
        seed.write_seed(seed_iso, config, f"i-{uuid.uuid4().hex[:16]}", config.get("hostname", name))
        disk = dom.dir / "disk.qcow2"
        assert img.disk is not None
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(img.disk), str(disk), "10G"],
            check=True,
            capture_output=True,
        )
        port = domains.free_port()
        dom.define(
            domains.domain_xml(
                name,
                accel=accel,
                kernel=img.kernel,
                initrd=img.initrd,
                cmdline=img.cmdline,
                console=dom.console,
                ssh_port=port,
                disk=disk,
                seed=seed_iso,
            )
        )
        t0 = dom.start()
        deadline = t0 + BOOT_DEADLINE
        watcher = domains.ConsoleWatcher(dom.console, t0)
        probe = domains.SSHBannerProbe(port, t0, deadline)
        try:
            got = watcher.wait_for(seed.RUNCMD_MARKER + r" uptime=([0-9.]+)", deadline)
            if got:
                marks["bootstrap_done"], guest["bootstrap_done"] = got[0], float(got[1][1])
            got = watcher.wait_for(seed.FINAL_MARKER + r" uptime=([0-9.]+)", deadline)
            if got is None:
                tail = [line for _, line in watcher.lines[-3:]]
                raise RuntimeError(f"cloud-init did not finish in {BOOT_DEADLINE:.0f}s; console: {tail}")
            marks["ready"], guest["ready"] = got[0], float(got[1][1])
            probe.wait(30)
            marks["ssh_banner"] = probe.at
            first = watcher.first_line()
            marks["first_console"], record["first_line"] = first if first else (None, "")
            version = watcher.wait_for(r"Cloud-init v\. (\S+)", time.monotonic())
            record["cloud_init_version"] = version[1][1] if version else "?"
            time.sleep(IDLE_BEFORE_RSS)
            record["rss_mib"] = domains.rss_mib(dom.qemu_pid())
            if details:
                record["details"] = _cloudinit_details(port, client_key, host_pub)
            record["console"] = watcher.lines
        finally:
            watcher.stop()
            probe.stop()
    record["marks"], record["guest"] = marks, guest
    return record


DETAIL_COMMANDS = {
    "effects": "hostname; cat /etc/herovm-test/hello.txt; echo; cat /etc/herovm-test/multi.txt; echo; "
    "cat /srv/app/cmd.out; id agent; systemctl is-active ticker; test -s /run/ticker && echo ticker-ok; "
    "sudo -l -U agent | tail -1",
    "systemd_analyze": "systemd-analyze; systemd-analyze blame --no-pager | head -15",
    "critical_chain": "systemd-analyze critical-chain --no-pager cloud-final.service",
    "cloud_init_analyze": "cloud-init analyze show",
    "cloud_init_schema": "cloud-init schema --system 2>&1 | tail -5",
}


def _cloudinit_details(port: int, client_key: Path, host_pub: str) -> dict:
    out = {}
    with GuestConnection(port=port, client_key=client_key, host_key=host_pub) as conn:
        conn.connect(60)
        for key, cmd in DETAIL_COMMANDS.items():
            r = conn.exec(cmd, timeout=120)
            out[key] = r.stdout.decode("utf-8", "replace").strip()
    return out


# ---------------------------------------------------------------------------------------------- floor


def boot_floor(img: BenchImage, name: str, accel: str) -> dict:
    record: dict = {"name": name}
    marks: dict[str, float | None] = {}
    guest: dict[str, float] = {}
    with domains.BenchDomain(name) as dom:
        port = domains.free_port()
        dom.define(
            domains.domain_xml(
                name,
                accel=accel,
                kernel=img.kernel,
                initrd=img.initrd,
                cmdline=img.cmdline,
                console=dom.console,
                ssh_port=port,
            )
        )
        t0 = dom.start()
        watcher = domains.ConsoleWatcher(dom.console, t0)
        try:
            got = watcher.wait_for(r"BENCH-FLOOR-INIT uptime=([0-9.]+)", t0 + 120)
            if got is None:
                raise RuntimeError("the floor initramfs never reached /init")
            marks["user_space"] = marks["ready"] = got[0]
            guest["user_space"] = guest["ready"] = float(got[1][1])
            while dom.is_active() and time.monotonic() - t0 < 120:
                time.sleep(0.02)
            marks["stopped"] = time.monotonic() - t0
            record["poweroff_to_gone"] = marks["stopped"] - marks["ready"]
            first = watcher.first_line()
            marks["first_console"], record["first_line"] = first if first else (None, "")
        finally:
            watcher.stop()
    record["marks"], record["guest"] = marks, guest
    return record
