"""Benchmark the HeroScript parser and writer on a generated 10,000-action playbook.

Usage: .venv/bin/python scripts/bench_heroscript.py [N_ACTIONS]
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from herovm.heroscript import dumps, parse  # noqa: E402


def make_script(n: int) -> str:
    """A realistic mix: VM definitions, file writes with multi-line content, commands, packages."""
    parts: list[str] = []
    for i in range(n):
        r = i % 4
        if r == 0:
            parts.append(
                f"// sandbox {i} for the docs agent\n"
                f"!!vm.create name:vm{i} memory:1GB cpus:2 disk:20GB\n"
                f"    image:'ubuntu-24.04'\n"
                f"    dns:['8.8.8.8', '8.8.4.4']\n"
                f"    bootstrap:'setup-{i}.hero'\n"
            )
        elif r == 1:
            parts.append(
                f"!!file.write path:/etc/motd.{i} mode:0644 content:'\n"
                f"    welcome, agent {i}\n"
                f"      indented line with 'quotes' and \"double\" ones\n"
                f"    last line // not a comment\n"
                f"    '\n"
            )
        elif r == 2:
            parts.append(f"!!cmd.run cmd:'echo \"ready {i}\" > /run/ready' timeout:5m retries:3 // wait\n")
        else:
            parts.append(f"!!pkg.install git curl vim htop tag_{i} update:yes\n")
    return "\n".join(parts)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    text = make_script(n)
    print(f"python   {platform.python_version()} ({platform.python_implementation()})")
    print(f"machine  {platform.platform()} {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"cpus     {os.cpu_count()}")
    print(f"input    {n} actions, {text.count(chr(10)) + 1} lines, {len(text) / 1e6:.2f} MB")

    parse_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        pb = parse(text)
        parse_times.append(time.perf_counter() - t0)
    assert len(pb) == n, len(pb)

    dump_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = dumps(pb)
        dump_times.append(time.perf_counter() - t0)
    assert parse(out) == pb

    for label, times in (("parse", parse_times), ("dumps", dump_times)):
        print(f"{label:<8} median {statistics.median(times) * 1000:.1f} ms  (min {min(times) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
