#!/usr/bin/env python3
"""Many hosts (issue 17): what a user waits for on another host against the local one, side by side in one
run, command start to return (the herovm CLI, as a user runs it).

    .venv/bin/python benchmarks/hosts.py [--rounds 3] [--execs 10]

The second host is the one the integration tests use (tests/integration/second_host.py): a throwaway
user's qemu:///session behind an sshd of the benchmark's own on a loopback port, reached only through
`qemu+ssh://`. So the network costs nothing here: what is measured is herovm's own work (libvirt's remote
protocol over SSH, the storage API, the tunnel). Runs in a HEROVM_HOME of its own (the default image
hard-linked into it), so the host added is seen by nothing else.

1. `host add` (the pool made there, the key pinned);
2. the first `up --host h2` (with the image's upload, read back and checked);
3. `template create --host local,h2` (a copy on each host: two builder VMs, one after the other);
4. --rounds rounds, alternating: `up` on local, `up --host h2`, each `--net restricted` (the only network
   modes other hosts have; the same on both sides), then `up --template` on each (a restore), then --execs
   `exec -- true` on each, alternating, then `down` of each;
5. `ls` and `host ls` with both hosts answering.

Writes benchmarks/HOSTS.md and .bench/hosts-last.json. Needs root (users, sshd, qemu:///system).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from benchmarks import compare, domains  # noqa: E402
from herovm import images  # noqa: E402

HEROVM = [str(ROOT / ".venv/bin/python"), "-m", "herovm"]
log = compare.log


def timed(env: dict, *args: str) -> float:
    """Seconds from the command's start to its return; it must succeed."""
    t0 = time.monotonic()
    r = subprocess.run([*HEROVM, *args], env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"herovm {' '.join(args)} failed: {r.stderr.strip()}")
    return seconds


def stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": ordered[0],
        "max": ordered[-1],
    }


def run(args: argparse.Namespace) -> dict:
    from guests import link_image  # tests/integration: the same helpers as the tests
    from second_host import second_host

    run_id = uuid.uuid4().hex[:6]
    image = images.ensure("default")
    home = Path(tempfile.mkdtemp(prefix="herovm-bench-hosts-", dir="/tmp"))
    os.chmod(home, 0o711)
    link_image(image, home)
    env = {**os.environ, "HEROVM_HOME": str(home)}
    results: dict = {
        "machine": compare.machine(),
        "load_start": domains.machine_load(run_id),
        "rounds": args.rounds,
        "execs": args.execs,
    }
    made: list[str] = []
    keys = Path(tempfile.mkdtemp(prefix="herovm-bench-second-"))
    try:
        with second_host(keys) as second:
            results["host_add"] = timed(
                env, "host", "add", "h2", second.ssh_uri, "--identity", str(second.identity),
                "--host-key", second.host_key, "--accel", "tcg",
            )  # fmt: skip
            first = f"bench-{run_id}-first"
            made.append(first)
            log("first up on h2 (with the image's upload)")
            results["first_remote_up"] = timed(env, "up", first, "--host", "h2", "--net", "restricted")
            results["first_remote_down"] = timed(env, "down", first)
            made.remove(first)
            log("template create on local and h2")
            template = f"bench-{run_id}-t"
            results["template_create"] = timed(
                env, "template", "create", template, "--host", "local,h2", "--net", "restricted"
            )
            clones: dict[str, list[float]] = {"local": [], "h2": []}
            ups: dict[str, list[float]] = {"local": [], "h2": []}
            execs: dict[str, list[float]] = {"local": [], "h2": []}
            downs: dict[str, list[float]] = {"local": [], "h2": []}
            for i in range(args.rounds):
                order = ["local", "h2"] if i % 2 == 0 else ["h2", "local"]
                names = {host: f"bench-{run_id}-{host}-{i}" for host in order}
                for host in order:
                    log(f"round {i + 1}: up on {host}")
                    made.append(names[host])
                    ups[host].append(timed(env, "up", names[host], "--host", host, "--net", "restricted"))
                for host in order:
                    log(f"round {i + 1}: up --template on {host}")
                    clone = f"bench-{run_id}-{host}-c{i}"
                    made.append(clone)
                    clones[host].append(timed(env, "up", clone, "--template", template, "--host", host))
                    subprocess.run([*HEROVM, "down", clone], env=env, capture_output=True, timeout=300)
                    made.remove(clone)
                for _ in range(args.execs):
                    for host in order:
                        execs[host].append(timed(env, "exec", names[host], "--", "true"))
                if i == args.rounds - 1:
                    results["ls"] = stats([timed(env, "ls") for _ in range(5)])
                    results["host_ls"] = stats([timed(env, "host", "ls") for _ in range(5)])
                for host in order:
                    downs[host].append(timed(env, "down", names[host]))
                    made.remove(names[host])
            results["up"] = {h: stats(v) for h, v in ups.items()}
            results["up_template"] = {h: stats(v) for h, v in clones.items()}
            results["exec"] = {h: stats(v) for h, v in execs.items()}
            results["down"] = {h: stats(v) for h, v in downs.items()}
            results["load_end"] = domains.machine_load(run_id)
    finally:
        for name in made:
            subprocess.run([*HEROVM, "down", name], env=env, capture_output=True, timeout=300)
        subprocess.run(
            [*HEROVM, "template", "rm", f"bench-{run_id}-t"], env=env, capture_output=True, timeout=120
        )
        subprocess.run([*HEROVM, "host", "rm", "h2"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(keys, ignore_errors=True)
    return results


def write_markdown(path: Path, r: dict) -> None:
    m = r["machine"]

    def row(what: str, key: str) -> str:
        local, remote = r[key]["local"], r[key]["h2"]
        return (
            f"| {what} | {local['median']:.2f} s ({local['min']:.2f}-{local['max']:.2f}) | "
            f"{remote['median']:.2f} s ({remote['min']:.2f}-{remote['max']:.2f}) | "
            f"{remote['median'] - local['median']:+.2f} s |"
        )

    load = r["load_start"]
    up_h2 = r["up"]["h2"]["median"]
    lines = [
        "# Many hosts: the local host against another one, side by side",
        "",
        "Written by `benchmarks/hosts.py` (its docstring has the method): what a user waits for, from the",
        "command's start to its return. The other host is a throwaway user's `qemu:///session` behind an",
        "sshd on a loopback port, reached only through `qemu+ssh://`: the network costs nothing, so the",
        "difference is herovm's own work on the remote path (libvirt's remote protocol over SSH, the storage",
        "API, the tunnel).",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB, kernel {m['kernel']}",
        f"- accelerator: **{m['accel']}** ({m['accel_reason']})",
        f"- load: {load['load1']:.2f} at the start, {r['load_end']['load1']:.2f} at the end; "
        f"other guests running at the start: {len(load['other_guests'])}",
        f"- {r['rounds']} rounds (local and h2 alternating, `--net restricted` on both), "
        f"{r['execs']} execs on each per round",
        "",
        "| | local | h2 (over SSH) | difference |",
        "| --- | --- | --- | --- |",
        row("`up`", "up"),
        row("`up --template`", "up_template"),
        row("`exec -- true`", "exec"),
        row("`down`", "down"),
        "",
        f"- `host add h2` (key pinned, pool made there): {r['host_add']:.2f} s",
        f"- `template create --host local,h2` (a builder VM on each host, one after the other; on h2 the "
        f"memory saved by libvirt and the disk copied there): {r['template_create']:.2f} s",
        f"- the first `up --host h2`, with the default image uploaded and read back: "
        f"{r['first_remote_up']:.2f} s (against {up_h2:.2f} s once it is there)",
        f"- `ls` with both hosts: {r['ls']['median']:.2f} s; `host ls`: {r['host_ls']['median']:.2f} s "
        "(medians of 5)",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--execs", type=int, default=10)
    args = parser.parse_args()
    results = run(args)
    out = ROOT / ".bench"
    out.mkdir(exist_ok=True)
    (out / "hosts-last.json").write_text(json.dumps(results, indent=2))
    write_markdown(ROOT / "benchmarks" / "HOSTS.md", results)
    print((ROOT / "benchmarks" / "HOSTS.md").read_text())


if __name__ == "__main__":
    main()
