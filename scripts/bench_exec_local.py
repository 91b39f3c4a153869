"""Measure GuestConnection.exec latency on a kept connection to a private local sshd.

Starts the same throwaway sshd the unit tests use (tests/unit/guest/conftest.py: 127.0.0.1, a free
port, its own host key), connects once, then times ``exec(["true"])`` N times and prints p50/p95.
Needs /usr/sbin/sshd and root (for /run/sshd and to log in as yourself).

Usage: .venv/bin/python scripts/bench_exec_local.py [-n 200] [--host-home] [--throughput-mb 100]

By default the sessions get an empty HOME, as in the tests, so the number is herovm + sshd and not
your ~/.bashrc (bash sources it for every ssh session). --host-home keeps your real HOME.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit" / "guest"))

from conftest import ClientKeys, LocalSshd  # noqa: E402

from herovm.guest.ssh import GuestConnection  # noqa: E402


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="number of timed execs (default 200)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--host-home", action="store_true", help="keep the real HOME (and its ~/.bashrc)")
    parser.add_argument("--throughput-mb", type=int, default=0, help="also stream this many MB of stdout")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="herovm-bench-") as tmp:
        keys = ClientKeys(Path(tmp) / "keys")
        with LocalSshd(Path(tmp) / "sshd", keys, clean_home=not args.host_home).start() as server:
            conn = GuestConnection(
                port=server.port, client_key=keys.client_key, host_key=keys.host_public, user=server.user
            )
            started = time.perf_counter()
            with conn.connect(deadline_s=10):
                connect_ms = (time.perf_counter() - started) * 1000
                for _ in range(args.warmup):
                    conn.exec(["true"])
                samples = []
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    result = conn.exec(["true"])
                    samples.append((time.perf_counter() - t0) * 1000)
                    if result.exit_code != 0:
                        print(f"exec failed: {result}", file=sys.stderr)
                        return 1
                samples.sort()
                print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus")
                print(f"connect: {connect_ms:.1f} ms")
                print(
                    f"exec(['true']) x {args.n} on one connection: "
                    f"p50 {percentile(samples, 0.50):.2f} ms, p95 {percentile(samples, 0.95):.2f} ms, "
                    f"mean {statistics.fmean(samples):.2f} ms, max {samples[-1]:.2f} ms"
                    + (" (real HOME)" if args.host_home else "")
                )
                if args.throughput_mb:
                    total = 0

                    def count(data: bytes) -> None:
                        nonlocal total
                        total += len(data)

                    size = args.throughput_mb * 1000 * 1000
                    t0 = time.perf_counter()
                    conn.exec(["head", "-c", str(size), "/dev/zero"], on_stdout=count)
                    seconds = time.perf_counter() - t0
                    rate = total / 1e6 / seconds
                    print(f"stdout throughput: {total / 1e6:.0f} MB in {seconds:.2f} s = {rate:.0f} MB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
