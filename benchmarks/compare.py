#!/usr/bin/env python3
"""herovm against cloud-init and the boot floor, side by side (issue 7).

    .venv/bin/python benchmarks/compare.py [--boots 5] [--execs 100] [--quick]

Builds or reuses three images from the same Debian packages and kernel (herovm's `default`, a stock-style
`cloudinit` image, a busybox `floor` initramfs), boots each --boots times alternating, measures herovm's
exec latency, stdout throughput, `down`, idle memory and concurrent `up`, and writes BENCHMARKS.md and
docs/boot-timelines.png. Needs root (qemu:///system, image builds) and the `bench` extra (matplotlib).
--quick: 1 boot each, 20 execs, concurrency up to 2: a few minutes, for checking the script works.
Every guest it makes is named bench-*, and removed on the way out (errors and Ctrl-C included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import domains, images, report, timing  # noqa: E402
from herovm import accel  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))) // 1024
    choice = accel.detect()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mib": mem,
        "kernel": platform.release(),
        "accel": choice.accel,
        "accel_reason": "; ".join(choice.reasons),
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def describe(variant: str, r: dict) -> str:
    mk = r.get("marks", {})
    parts = [
        f"{k} {mk[k]:.2f}s"
        for k in ("first_console", "ssh_banner", "user_space", "bootstrap_done", "ready", "exec_answers")
        if mk.get(k) is not None
    ]
    return f"{variant:13} {', '.join(parts)}" + (f"  ERROR {r['error']}" if r.get("error") else "")


def run(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    run_id = uuid.uuid4().hex[:6]
    choice = accel.detect().accel
    log(f"run {run_id}: accelerator {choice}; images")
    default = images.default_image(log)
    floor = images.floor_image(default, log)
    cloudinit = images.cloudinit_image(default, log)

    boots: dict[str, list[dict]] = {"herovm_test": [], "cloudinit": [], "floor": [], "herovm_empty": []}
    steps = {
        "herovm_test": lambda n, i: timing.boot_herovm(n, timing.TEST_BOOTSTRAP),
        "cloudinit": lambda n, i: timing.boot_cloudinit(cloudinit, n, choice, details=(i == 0)),
        "floor": lambda n, i: timing.boot_floor(floor, n, choice),
        "herovm_empty": lambda n, i: timing.boot_herovm(n, None),
    }
    for i in range(args.boots):  # A, B, C, D, A, B, ...: drift on the machine touches all alike
        for variant, step in steps.items():
            name = f"bench-{run_id}-{variant.replace('_', '-')}-{i}"
            load = domains.machine_load(run_id)
            try:
                r = step(name, i)
            except Exception as e:  # a failed boot is reported, and the run goes on
                r = {"name": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "marks": {}}
                log(traceback.format_exc().strip().splitlines()[-1])
            r["load"] = load
            boots[variant].append(r)
            busy = f" [load {load['load1']:.1f}, other guests: {len(load['other_guests'])}]"
            log(f"boot {i + 1}/{args.boots} " + describe(variant, r) + busy)

    log(f"exec latency ({args.execs} runs each), {args.throughput_mb} MB stdout, down")
    exec_load = domains.machine_load(run_id)
    try:
        exec_results = timing.exec_measurements(
            f"bench-{run_id}-exec", args.execs, args.throughput_mb * 10**6
        )
        log(
            f"exec p50: API {timing.pct(exec_results['api'], 50) * 1000:.1f} ms, "
            f"CLI {timing.pct(exec_results['cli'], 50) * 1000:.1f} ms; "
            f"throughput {exec_results['throughput']['mib_per_s']:.1f} MiB/s"
        )
    except Exception as e:  # reported in BENCHMARKS.md, and the run goes on
        exec_results = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        log(f"exec measurements failed: {exec_results['error']}")
    concurrency = []
    for k in args.concurrency:
        log(f"up of {k} guest{'s' if k > 1 else ''} at once")
        load = domains.machine_load(run_id)
        r = timing.concurrent_up(f"bench-{run_id}-c{k}", k)
        r["load"] = load
        concurrency.append(r)
        log(f"  {r['ok']}/{k} ok in {r['total']:.1f}s" + (f"; failed: {r['failed']}" if r["failed"] else ""))

    ci_version = next(
        (b.get("cloud_init_version") for b in boots["cloudinit"] if b.get("cloud_init_version")), "?"
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "boots_per_variant": args.boots,
        "machine": machine(),
        "versions": domains.versions(),
        "herovm_net": timing.HEROVM_UP.get("net", "user-mode (this herovm has no network modes)"),
        "images": {
            "default_id": default.id,
            "kernel_version": default.manifest["kernel_version"],
            "kernel_sha256": default.manifest["files"]["vmlinuz"]["sha256"],
            "cmdline": default.cmdline,
            "default_initrd_bytes": default.manifest["files"]["initrd.img"]["bytes"],
            "cloudinit_dir": cloudinit.path.name,
            "cloudinit_initrd_bytes": cloudinit.info["initrd_bytes"],
            "cloud_init_version": ci_version,
            "floor_dir": floor.path.name,
            "floor_initrd_bytes": floor.info["initrd_bytes"],
        },
        "boots": boots,
        "exec": {**exec_results, "load": exec_load},
        "herovm_image_ids": sorted(
            {b["image_id"] for k in ("herovm_test", "herovm_empty") for b in boots[k] if b.get("image_id")}
        ),
        "concurrency": concurrency,
        "wall_seconds": time.monotonic() - t_start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boots", type=int, default=5, help="boots of each variant (default 5)")
    ap.add_argument("--execs", type=int, default=100, help="exec round trips per client (default 100)")
    ap.add_argument("--throughput-mb", type=int, default=100, help="stdout size in MB (default 100)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="guests brought up at once (default 1,2,4,8)")
    ap.add_argument("--quick", action="store_true", help="1 boot each, 20 execs, concurrency 1,2")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--plot", default=str(ROOT / "docs/boot-timelines.png"))
    args = ap.parse_args()
    if args.quick:
        args.boots, args.execs, args.concurrency = 1, 20, "1,2"
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    if os.geteuid() != 0:
        sys.exit("compare.py needs root: it builds images and uses qemu:///system")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("matplotlib is missing: .venv/bin/pip install -e '.[bench]' (or pip install matplotlib)")

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        results = run(args)
    except KeyboardInterrupt:
        log("interrupted: removing this run's guests")
        sys.exit(130)
    finally:
        domains.cleanup_all()
        timing.cleanup_vms()
    summary = report.summarize(results)
    raw = ROOT / ".bench/compare-last.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps({**results, "summary": summary}, indent=1, default=str))
    report.write_markdown(Path(args.out), results, summary)
    report.plot(Path(args.plot), results, summary)
    log(f"wrote {args.out}, {args.plot} and {raw} ({results['wall_seconds'] / 60:.1f} min)")
    for row in report.targets(results, summary):
        log(" | ".join(row))


if __name__ == "__main__":
    main()
