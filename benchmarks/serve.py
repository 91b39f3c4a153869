#!/usr/bin/env python3
"""`herovm serve` as agent developers compare sandbox providers: from the E2B SDK's `Sandbox.create` call to
the result of the sandbox's first command (`commands.run("true")`), with a warm pool and without (issue 15).

    HEROVM_HOME=... .venv/bin/python benchmarks/serve.py [--runs 20] [--quick]

Makes two herovm templates from one bootstrap (a file and E2B's user `user`, `--net restricted`): P, served
by a pool (`--pool P=--pool-size`), and T, served without one (each create restores T). One `herovm serve`
on a free loopback port (`--max-sandboxes`, `--create-wait 300`: a create past the limit waits for a slot)
runs both:

1. sequential: --runs creates of each, alternating (pool, template, pool, ... and the other way round in odd
   pairs), each `create` -> `commands.run("true")` -> `kill`; before each create the pool is full again
   (its refill is not on the clock, nor competing with the create timed: a client that creates faster
   than the pool refills sees misses, and the report counts them);
2. a burst: --burst creates at once from threads, each create -> first command -> kill, first of T (no
   pool), then of P (the pool's members serve the first ones, the rest are misses).

The clock is the client's (`time.monotonic` around the SDK's calls); the server's own create time (request
to sandbox ready) comes from its /metrics. With the defaults at most 3 guests of this run exist at once (a
sandbox, and a paused pool member; 2 sandboxes and 1 pool member in the burst). Writes benchmarks/SERVE.md
and the raw results .bench/serve-last.json. Needs root (qemu:///system) and the `serve` and `e2b` packages
(.venv). Everything it makes (templates bench-<run>-..., sandboxes, pool VMs) is removed on the way out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import compare, domains  # noqa: E402
from herovm import state  # noqa: E402
from herovm.manager import Manager  # noqa: E402

HEROVM = str(ROOT / ".venv/bin/herovm")
BOOTSTRAP = """\
// benchmarks/serve.py: its templates' bootstrap: a file, and E2B's user (as E2B's templates have it)
!!file.write path:/etc/bench/serve.txt content:'hi'
!!user.add name:user shell:/bin/bash
"""
log = compare.log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stat(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "p95": _pct(values, 95),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


class Server:
    def __init__(self, work: Path, pool: str, pool_size: int, max_sandboxes: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "e2b_" + secrets.token_hex(16)
        self.log = work / "serve.log"
        self.args = [
            HEROVM, "serve", "--listen", f"127.0.0.1:{self.port}", "--pool", f"{pool}={pool_size}",
            "--max-sandboxes", str(max_sandboxes), "--create-wait", "300",
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env={**os.environ, "HEROVM_API_KEY": self.key}, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"herovm serve exited: {self.log.read_text()[-1500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError("herovm serve did not listen")

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/metrics", headers={"X-API-KEY": self.key}, timeout=30).text

    def value(self, text: str, name: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                series, _, v = line.rpartition(" ")
                if all(f'{k}="{val}"' in series for k, val in labels.items()):
                    return float(v)
        return 0.0

    def wait_pool(self, template: str, n: int, limit: float = 180) -> float:
        started = time.monotonic()
        while time.monotonic() - started < limit:
            if self.value(self.metrics(), "herovm_serve_pool_ready", template=template) >= n:
                return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"the pool of {template} did not fill in {limit:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def one(template: str) -> dict:
    """create -> commands.run("true") -> kill, timed by the client."""
    from e2b import Sandbox

    r: dict = {"template": template}
    started = time.monotonic()
    try:
        sb = Sandbox.create(template, timeout=600, request_timeout=600)
        r["create_s"] = time.monotonic() - started
        try:
            result = sb.commands.run("true", request_timeout=120)
            r["first_command_s"] = time.monotonic() - started
            r["exit_code"] = result.exit_code
        finally:
            killed = time.monotonic()
            sb.kill()
            r["kill_s"] = time.monotonic() - killed
    except Exception as e:  # noqa: BLE001 (a failure is a result)
        r["error"] = f"{type(e).__name__}: {e}"[:300]
    return r


def run(args: argparse.Namespace, run_id: str, work: Path) -> dict:
    started = time.time()
    pool_t, plain_t = f"bench-{run_id}-pool", f"bench-{run_id}-tpl"
    boot = work / "serve.hero"
    boot.write_text(BOOTSTRAP)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "machine": compare.machine(),
        "herovm_commit": _git("rev-parse", "--short", "HEAD"),
        "herovm_uncommitted": len(_git("status", "--porcelain", "--", "herovm").splitlines()),
        "pool_size": args.pool_size,
        "max_sandboxes": args.max_sandboxes,
        "load_start": domains.machine_load(run_id),
    }
    for t in (pool_t, plain_t):
        t0 = time.monotonic()
        subprocess.run(
            [HEROVM, "template", "create", t, "--bootstrap", str(boot), "--net", "restricted"],
            check=True,
            capture_output=True,
        )
        log(f"template {t} made in {time.monotonic() - t0:.1f}s")
    server = Server(work, pool_t, args.pool_size, args.max_sandboxes)
    os.environ.update(E2B_API_URL=server.url, E2B_SANDBOX_URL=server.url, E2B_API_KEY=server.key)
    server.start()
    try:
        log(f"pool of {args.pool_size} filling: {server.wait_pool(pool_t, args.pool_size):.1f}s")
        seq: list[dict] = []
        for i in range(args.runs):
            order = [pool_t, plain_t] if i % 2 == 0 else [plain_t, pool_t]
            for t in order:
                # a full pool before every create, of either kind: no refill competes with the one timed
                server.wait_pool(pool_t, args.pool_size)
                time.sleep(0.5)  # the refill's last steps (pause) settle
                before = server.metrics()
                r = one(t)
                after = server.metrics()
                r["kind"] = "pool" if t == pool_t else "template"
                r["claimed"] = server.value(
                    after, "herovm_serve_pool_claims_total", template=t
                ) > server.value(before, "herovm_serve_pool_claims_total", template=t)
                r["load1"] = os.getloadavg()[0]
                seq.append(r)
                log(
                    f"{r['kind']:8} create {r.get('create_s', 0):.3f}s first command "
                    f"{r.get('first_command_s', 0):.3f}s" + (f" ERROR {r['error']}" if "error" in r else "")
                )
        results["sequential"] = seq
        results["server_metrics_sequential"] = server.metrics()
        bursts = []
        for t, kind in ((plain_t, "template"), (pool_t, "pool")):
            if kind == "pool":
                server.wait_pool(pool_t, args.pool_size)
                time.sleep(0.5)
            before = server.metrics()
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(args.burst) as ex:
                rows = list(ex.map(one, [t] * args.burst))
            wall = time.monotonic() - t0
            after = server.metrics()
            claims = server.value(after, "herovm_serve_pool_claims_total", template=t) - server.value(
                before, "herovm_serve_pool_claims_total", template=t
            )
            bursts.append(
                {"kind": kind, "wall_s": wall, "rows": rows, "claims": claims, "load1": os.getloadavg()[0]}
            )
            failed = [r for r in rows if "error" in r]
            log(f"burst of {args.burst} ({kind}): {wall:.1f}s, {len(failed)} failed")
        results["bursts"] = bursts
        results["server_metrics"] = server.metrics()
    finally:
        server.stop()
        results["server_log"] = server.log.read_text()[-20000:]
        with Manager() as m:
            for t in (pool_t, plain_t):
                with contextlib.suppress(Exception):
                    m.remove_template(t)
    results["load_end"] = domains.machine_load(run_id)
    results["wall_seconds"] = time.time() - started
    return results


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip() or ""
    except OSError:
        return ""


def _fmt(s: dict | None) -> str:
    if s is None:
        return "–"
    return f"{s['median']:.3f} s (p95 {s['p95']:.3f}, {s['min']:.3f}–{s['max']:.3f}, n={s['n']})"


def summarize(results: dict) -> dict:
    s: dict = {}
    seq = results.get("sequential", [])
    for kind in ("pool", "template"):
        ok = [r for r in seq if r["kind"] == kind and "error" not in r]
        s[f"{kind}_first"] = stat([r["first_command_s"] for r in ok])
        s[f"{kind}_create"] = stat([r["create_s"] for r in ok])
        s[f"{kind}_errors"] = sum(1 for r in seq if r["kind"] == kind and "error" in r)
    s["pool_misses"] = sum(1 for r in seq if r["kind"] == "pool" and not r.get("claimed"))
    s["claimed_first"] = stat([r["first_command_s"] for r in seq if r.get("claimed") and "error" not in r])
    for b in results.get("bursts", []):
        ok = [r for r in b["rows"] if "error" not in r]
        s[f"burst_{b['kind']}"] = {
            "first": stat([r["first_command_s"] for r in ok]),
            "failed": len(b["rows"]) - len(ok),
            "n": len(b["rows"]),
            "wall_s": b["wall_s"],
            "claims": b["claims"],
            "errors": sorted({r["error"] for r in b["rows"] if "error" in r}),
        }
    text = results.get("server_metrics_sequential", "")
    for source in ("pool", "template"):
        total = count = 0.0
        for line in text.splitlines():
            if f'source="{source}"' in line and line.startswith("herovm_serve_create_seconds_sum"):
                total += float(line.rsplit(" ", 1)[1])
            if f'source="{source}"' in line and line.startswith("herovm_serve_create_seconds_count"):
                count += float(line.rsplit(" ", 1)[1])
        s[f"server_create_mean_{source}"] = total / count if count else None
    refills = [float(x) for x in re.findall(r"refilled \S+ in ([0-9.]+)s", results.get("server_log", ""))]
    s["refill"] = stat(refills)
    return s


def targets(s: dict) -> list[tuple[str, str, str]]:
    rows = []

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("**met**" if ok else "**missed**")

    p, t = s.get("pool_first"), s.get("template_first")
    rows.append(("with a pool: median ≤ 0.3 s", _fmt(p), verdict(p and p["median"] <= 0.3)))
    rows.append(("from a template, no pool: median ≤ 1.5 s", _fmt(t), verdict(t and t["median"] <= 1.5)))
    for kind in ("template", "pool"):
        b = s.get(f"burst_{kind}")
        if b:
            rows.append(
                (
                    f"burst of {b['n']} ({'no pool' if kind == 'template' else 'pool'}): no failure",
                    f"{b['failed']} failed, all done in {b['wall_s']:.1f} s",
                    verdict(b["failed"] == 0),
                )
            )
    return rows


def write_markdown(path: Path, results: dict, s: dict) -> None:
    m = results["machine"]
    loads = [results["load_start"]["load1"], results["load_end"]["load1"]] + [
        r["load1"] for r in results.get("sequential", [])
    ]
    others = sorted(set(results["load_start"]["other_guests"]) | set(results["load_end"]["other_guests"]))
    quick = " --quick" if results["quick"] else ""
    n_seq = len(results.get("sequential", [])) // 2
    lines = [
        "# `herovm serve`: from `Sandbox.create` to the first command's result",
        "",
        f"Measured {results['date']} by `benchmarks/serve.py{quick}` ({n_seq} sequential creates of each "
        f"kind, alternating; whole run {results['wall_seconds'] / 60:.1f} min) at herovm "
        f"`{results['herovm_commit']}`"
        + (
            f" ({results['herovm_uncommitted']} files under herovm/ changed and not committed)"
            if results["herovm_uncommitted"]
            else ""
        )
        + ". Regenerate with `sudo HEROVM_HOME=... .venv/bin/python benchmarks/serve.py [--runs 20] "
        "[--quick]`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_mib'] / 1024:.1f} GiB; "
        f"host kernel {m['kernel']}",
        f"- accelerator: **{m['accel']}** ({m['accel_reason']})",
        f"- the machine is **shared and noisy**: other engineers' tests and benchmarks ran guests on the "
        f"same 2 cores (1-minute load average {min(loads):.1f}–{max(loads):.1f} during the run; other "
        f"guests running at its start or end: {', '.join(others) or 'none'}). "
        "Treat the spread, not only the median.",
        f"- one `herovm serve` (loopback, HTTP/2 as the SDK's default), `--pool P={results['pool_size']}`, "
        f"`--max-sandboxes {results['max_sandboxes']}` (so at most "
        f"{results['max_sandboxes'] + results['pool_size']} guests of this run at once: the machine's "
        "share), `--create-wait 300`; the client is the e2b Python SDK in the same machine, one create after "
        "another, each sandbox killed before the next (kill not on the clock)",
        "- templates: 1 vCPU, 1 GiB, `--net restricted`, a bootstrap that writes one file and adds E2B's "
        "user `user`",
        "",
        "## Targets",
        "",
        "| target | measured: create call to first command's result | verdict |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in targets(s)],
        "",
        "## Sequential",
        "",
        "Seconds from `Sandbox.create` called; median (p95, min–max, n).",
        "",
        "| | with a pool | from a template, no pool |",
        "| --- | ---: | ---: |",
        f"| `Sandbox.create` returns | {_fmt(s['pool_create'])} | {_fmt(s['template_create'])} |",
        f'| `commands.run("true")` returns | **{_fmt(s["pool_first"])}** | **{_fmt(s["template_first"])}** |',
        f"| the server's own create (request to sandbox ready: /metrics, mean of these) | "
        f"{_sec(s['server_create_mean_pool'])} | {_sec(s['server_create_mean_template'])} |",
        f"| failed | {s['pool_errors']} | {s['template_errors']} |",
        "",
        f"Pool creates that missed (the pool was empty): {s['pool_misses']}. The pool was full before each "
        "pool create: a refill (restore, the user `user`, a first command as that user, pause) took "
        f"{_fmt(s['refill'])} in the background, so a client creating faster than that sees misses, which "
        "cost what a create from the template costs.",
        "",
        "## Burst",
        "",
        "All at once from threads, each create -> first command -> kill. Creates past `--max-sandboxes` wait "
        "for a slot (`--create-wait`), so the later ones include the wait.",
        "",
        "| | sandboxes | failed | all done | create to first command: median (p95, min–max) | pool claims |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, label in (("template", "from a template, no pool"), ("pool", "with a pool")):
        b = s.get(f"burst_{kind}")
        if b:
            lines.append(
                f"| {label} | {b['n']} | {b['failed']} | {b['wall_s']:.1f} s | {_fmt(b['first'])} | "
                f"{b['claims']:.0f} |"
            )
            for err in b["errors"]:
                lines.append(f"|  error | `{err[:150]}` | | | | |")
    lines += ["", "Raw results: `.bench/serve-last.json`.", ""]
    path.write_text("\n".join(lines))


def _sec(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="sequential creates of each kind")
    ap.add_argument("--burst", type=int, default=8, help="creates at once")
    ap.add_argument("--pool-size", type=int, default=1)
    ap.add_argument("--max-sandboxes", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="5 sequential creates of each kind")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/SERVE.md")
    args = ap.parse_args()
    if args.quick:
        args.runs = min(args.runs, 5)
    run_id = uuid.uuid4().hex[:6]
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    log(f"run {run_id}: herovm home {state.home()}")
    with tempfile.TemporaryDirectory(prefix="herovm-bench-serve-") as tmp:
        try:
            results = run(args, run_id, Path(tmp))
        except BaseException:
            traceback.print_exc()
            return 1
    raw = ROOT / ".bench/serve-last.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    s = summarize(results)
    write_markdown(args.out, results, s)
    for a, b, c in targets(s):
        log(f"{a}: {b} {c}")
    log(f"wrote {args.out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
