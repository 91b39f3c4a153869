#!/usr/bin/env python3
"""herovm's instant-sandbox verbs against a cold boot: templates, fork, snapshot, pause (issue 11).

    HEROVM_HOME=/tmp/hvbench .venv/bin/python benchmarks/instant.py [--rounds 5] [--quick]

What a user waits for, timed around the `herovm` command (a subprocess of .venv/bin/herovm) from its start
to its return, and to the first `herovm exec NAME -- true` answering afterwards. One template is made at the
start (`template create --bootstrap F --net restricted`, F writes a file, adds a user, starts a service);
then --rounds rounds, each of:

1. the boot floor (compare.py's busybox initramfs: domain start to its /init) alone;
2. six guests, one after the other, cold and template alternating (cold, template, cold, template in even
   rounds, template first in odd ones, then two more from the template): `herovm up NAME --bootstrap F
   --net restricted` against `herovm up NAME --template T`, each followed by `exec true`;
3. with all six ready and idle --idle seconds, the PSS of each QEMU process (/proc/PID/smaps_rollup): the
   four template clones' sum against the two cold guests' sum;
4. `snapshot create` of the second cold guest (fresh: booted a minute before; memory and disk), then `pause`
   and `resume` of it and the first `exec` after the resume;
5. all but the first template clone removed, `fork` of it into one clone, that clone removed, and `fork`
   into four: total time, each clone's time and the source's pause (`--json`'s source_pause_seconds), and
   `exec true` in every clone and in the source afterwards.

Writes benchmarks/INSTANT.md and the raw results .bench/instant-last.json. Needs root (qemu:///system).
--quick: one round, for checking the script works. At most six guests of this run exist at once. Everything
it makes is named bench-<run>-..., and removed on the way out (errors, Ctrl-C and SIGTERM included); `herovm
gc` then removes the fork layers nothing lies on any more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
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

from benchmarks import compare, domains, images, timing  # noqa: E402
from herovm import accel, state  # noqa: E402
from herovm.manager import Manager  # noqa: E402

HEROVM = str(ROOT / ".venv/bin/herovm")
NET = "restricted"  # as compare.py's herovm guests: QEMU user networking, restrict=on
BOOTSTRAP = """\
// benchmarks/instant.py: the template's bootstrap (and the cold guests'): a file, a user, a service.
!!file.write path:/etc/bench/hello.txt content:'hello from the bootstrap'

!!user.add name:sandbox shell:/bin/bash

!!service.start name:ticker restart:always
    cmd:'while true; do date +%s.%N > /run/ticker; sleep 1; done'
"""
EFFECTS = (
    "cat /etc/bench/hello.txt; echo; id sandbox; a=$(cat /run/ticker); sleep 1.5; b=$(cat /run/ticker); "
    'test "$a" != "$b" && echo ticker-runs'
)
EXEC_DEADLINE = 30.0

log = compare.log
created: set[str] = set()  # VMs of this run that may exist (removed on the way out)


class Failed(Exception):
    pass


def herovm(*args: str, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    """Run `herovm ARGS`; returns (seconds from its start to its return, the process). It runs in a session
    of its own, so a Ctrl-C reaches only us: on Ctrl-C or SIGTERM it gets one SIGTERM, which herovm handles
    as a Ctrl-C (it undoes what it half made), and time for that before we go on."""
    t = time.monotonic()
    with subprocess.Popen(
        [HEROVM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
    seconds = time.monotonic() - t
    return seconds, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check(args: tuple[str, ...], p: subprocess.CompletedProcess) -> None:
    if p.returncode != 0:
        tail = " / ".join((p.stderr or p.stdout or "").strip().splitlines()[-3:])
        raise Failed(f"`herovm {' '.join(args)}` exited {p.returncode}: {tail}"[:400])


def run_ok(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    seconds, p = herovm(*args)
    check(args, p)
    return seconds, p


def exec_true(name: str) -> tuple[float, int]:
    """`herovm exec NAME -- true` until it answers (once, normally); (seconds of the last try, tries)."""
    deadline = time.monotonic() + EXEC_DEADLINE
    tries = 0
    while True:
        tries += 1
        seconds, p = herovm("exec", name, "--", "true", timeout=EXEC_DEADLINE)
        if p.returncode == 0:
            return seconds, tries
        if time.monotonic() > deadline:
            check(("exec", name, "--", "true"), p)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:400]


def stamps(stderr: str) -> dict:
    """herovm's progress lines ("  4.36s agent 2 started ..."), on its own clock from its Manager's start:
    when the domain was started (cold) or the restore began (template), the agent's first event, ready."""
    out: dict = {}
    for line in stderr.splitlines():
        m = re.match(r"\s*([0-9.]+)s (\S+)(.*)", line)
        if not m:
            continue
        t, word, rest = float(m[1]), m[2], m[3]
        if word in ("starting", "restoring"):
            out.setdefault("start", t)
        elif word == "agent" and (" started" in rest or " restored" in rest):
            out.setdefault("agent", t)
        elif word == "ready":
            out["ready"] = t
    return out


def up(name: str, kind: str, template: str, bootstrap: Path) -> dict:
    """`herovm up` (cold, or from the template), then `exec true`; times from the command's start."""
    args: tuple[str, ...] = ("up", name)
    if kind == "cold":
        args += ("--bootstrap", str(bootstrap), "--net", NET)
    else:
        args += ("--template", template)
    r: dict = {"name": name, "kind": kind, "others": len(created)}
    created.add(name)
    t0 = time.monotonic()
    try:
        r["up_returns"], p = run_ok(*args)
        if "making the ext4 root disk" in p.stderr:  # the guest sources changed: not counted
            r["image_built"] = True
        r["stamps"] = stamps(p.stderr)
        r["progress"] = p.stderr.splitlines()[:40]
        if "ready" in r["stamps"]:
            r["stamps"]["rest"] = r["up_returns"] - r["stamps"]["ready"]
        r["exec_s"], r["exec_tries"] = exec_true(name)
        r["exec_answers"] = time.monotonic() - t0
    except Failed as e:
        r["error"] = str(e)
    return r


def pss(name: str) -> dict:
    """The VM's QEMU process: PSS, RSS and PSS of its anonymous and file pages, MiB (smaps_rollup)."""
    pid = domains.qemu_pid(f"herovm-{name}")
    if pid is None:
        raise Failed(f"no QEMU pid for herovm-{name}")
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        fields[key.rstrip(":")] = int(value) / 1024
    return {
        "pid": pid,
        "pss": fields["Pss"],
        "rss": fields["Rss"],
        "pss_anon": fields.get("Pss_Anon"),
        "pss_file": fields.get("Pss_File"),
    }


def down(*names: str) -> None:
    """Remove VMs of this run (not timed), in one Manager."""
    with Manager() as m:
        for name in names:
            try:
                m.down(name)
            except Exception as e:  # reported, and the round goes on
                log(f"down {name} failed: {error_text(e)}")
            else:
                created.discard(name)


def fork(source: str, names: list[str]) -> dict:
    r: dict = {"source": source, "clones": len(names)}
    created.update(names)
    t0 = time.monotonic()
    try:
        r["total"], p = run_ok("fork", source, *names, "--json")
        out = json.loads(p.stdout)
        r["source_pause"] = out["source_pause_seconds"]
        r["per_clone"] = [c["seconds"] for c in out["clones"]]
        r["exec_s"] = [exec_true(name)[0] for name in names]
        r["all_exec_answer"] = time.monotonic() - t0  # fork started -> exec answered in every clone
        r["source_exec_s"] = exec_true(source)[0]
    except Failed as e:
        r["error"] = str(e)
    return r


def one_round(i: int, run_id: str, template: str, bootstrap: Path, floor, choice: str, idle: float) -> dict:
    prefix = f"bench-{run_id}-r{i}"
    # Built here, not in a timed `up`, if the guest sources changed since (others edit this checkout).
    r: dict = {"round": i, "image_id": images.default_image(log).id, "load": domains.machine_load(run_id)}

    # 1. the floor, alone
    try:
        fl = timing.boot_floor(floor, f"{prefix}-floor", choice)
        r["floor"] = {"ready": fl["marks"]["ready"], "guest_ready": fl["guest"]["ready"]}
    except Exception as e:
        r["floor"] = {"error": error_text(e)}
        log(traceback.format_exc().strip().splitlines()[-1])
    log(f"round {i + 1}: floor " + _say(r["floor"], "ready"))

    # 2. six guests, cold and template alternating
    order = ["cold", "template", "cold", "template"]
    if i % 2:
        order = ["template", "cold", "template", "cold"]
    order += ["template", "template"]
    ups, count = [], {"cold": 0, "template": 0}
    for kind in order:
        name = f"{prefix}-{'c' if kind == 'cold' else 't'}{count[kind]}"
        count[kind] += 1
        u = up(name, kind, template, bootstrap)
        ups.append(u)
        log(
            f"round {i + 1}: up {kind:8} {name}: "
            + (
                f"returned {u['up_returns']:.2f}s, exec answered {u['exec_answers']:.2f}s"
                if "exec_answers" in u
                else f"ERROR {u['error']}"
            )
            + f" ({u['others']} guests of this run running)"
        )
    r["ups"] = ups
    cold = [u["name"] for u in ups if u["kind"] == "cold" and "exec_answers" in u]
    clones = [u["name"] for u in ups if u["kind"] == "template" and "exec_answers" in u]
    if i == 0 and clones:
        p = herovm("exec", clones[0], "--", "sh", "-c", EFFECTS)[1]
        r["effects"] = (p.stdout + p.stderr).strip()
        log(f"round 1: the bootstrap's effects in {clones[0]}: {r['effects']!r}")

    # 3. memory, all six ready and idle
    time.sleep(idle)
    r["load_memory"] = domains.machine_load(run_id)
    mem: dict = {}
    for name in cold + clones:
        try:
            mem[name] = pss(name)
        except (Failed, OSError) as e:
            mem[name] = {"error": error_text(e)}
    r["memory"] = {
        "cold": {n: mem[n] for n in cold},
        "template": {n: mem[n] for n in clones},
    }
    sums = {k: sum(v.get("pss", 0) for v in r["memory"][k].values()) for k in ("cold", "template")}
    log(
        f"round {i + 1}: PSS {len(clones)} template clones {sums['template']:.0f} MiB, "
        f"{len(cold)} cold guests {sums['cold']:.0f} MiB"
    )

    # 4. snapshot, pause, resume of a fresh cold guest
    if len(cold) >= 1:
        guest = cold[-1]
        s: dict = {"vm": guest}
        try:
            s["snapshot"], p = run_ok("snapshot", "create", guest, "s0", "--json")
            row = json.loads(p.stdout)
            s["herovm_seconds"], s["memory_bytes"], s["kind"] = (
                row["seconds"],
                row["memory_bytes"],
                row["kind"],
            )
            s["pause"] = run_ok("pause", guest)[0]
            s["resume"] = run_ok("resume", guest)[0]
            s["exec_after_resume"] = exec_true(guest)[0]
        except Failed as e:
            s["error"] = str(e)
        r["snapshot"] = s
        log(
            f"round {i + 1}: snapshot {_say(s, 'snapshot')}, pause {_say(s, 'pause')}, "
            f"resume {_say(s, 'resume')}, exec after resume {_say(s, 'exec_after_resume')}"
        )

    # 5. fork of one, then of four, from the first template clone
    if clones:
        source = clones[0]
        down(*[n for n in cold + clones if n != source])
        f1 = [f"{prefix}-f1-0"]
        r["fork1"] = fork(source, f1)
        log(f"round {i + 1}: fork {source} -> 1: " + _say_fork(r["fork1"]))
        down(*f1)
        f4 = [f"{prefix}-f4-{k}" for k in range(4)]
        r["fork4"] = fork(source, f4)
        log(f"round {i + 1}: fork {source} -> 4: " + _say_fork(r["fork4"]))
    down(*sorted(n for n in created if n.startswith(prefix)))
    return r


def _say(d: dict, key: str) -> str:
    return f"{d[key]:.2f}s" if isinstance(d.get(key), float) else f"ERROR {d.get('error', '?')}"


def _say_fork(f: dict) -> str:
    if "error" in f:
        return f"ERROR {f['error']}"
    return (
        f"{f['total']:.2f}s, clones {', '.join(f'{x:.2f}' for x in f['per_clone'])}s, "
        f"source paused {f['source_pause']:.3f}s, every clone answered exec at {f['all_exec_answer']:.2f}s"
    )


def cleanup(run_id: str, template: str | None) -> None:
    """Remove every VM of this run (also one a killed command left), the template, and unused fork
    layers."""
    with contextlib.suppress(Exception):
        domains.cleanup_all()
    mine = f"bench-{run_id}-"
    try:
        with Manager() as m:
            names = set(created) | {n for n in m.own_machines() if n.startswith(mine)}
            names |= {n for n in state.list_vm_dirs() if n.startswith(mine)}
            for name in sorted(names):
                with contextlib.suppress(Exception):
                    m.down(name)
                created.discard(name)
            if template:
                with contextlib.suppress(Exception):
                    m.remove_template(template)
            with contextlib.suppress(Exception):
                for what in m.gc():
                    log(f"gc: {what}")
            left = [n for n in m.own_machines() if n.startswith(mine)]
            if left:
                log(f"NOT REMOVED: {', '.join(left)}")
    except Exception as e:
        log(f"cleanup failed: {error_text(e)}")


def run(args: argparse.Namespace, run_id: str, work: Path) -> dict:
    t_start = time.monotonic()
    choice = accel.detect().accel
    log(f"run {run_id}: accelerator {choice}, herovm home {state.home()}; images")
    default = images.default_image(log)
    floor = images.floor_image(default, log)
    bootstrap = work / "sandbox.hero"
    bootstrap.write_text(BOOTSTRAP)
    template = f"bench-{run_id}-tpl"
    RUN["template"] = template
    log(f"template create {template}")
    seconds, p = run_ok("template", "create", template, "--bootstrap", str(bootstrap), "--net", NET, "--json")
    row = json.loads(p.stdout)
    made = {
        "name": template,
        "command_seconds": seconds,
        "herovm_seconds": row.get("seconds"),
        "memory_bytes": row.get("memory_bytes"),
        "disk_bytes": row.get("disk_bytes"),
        "image_id": row.get("image_id"),
    }
    log(f"template made in {seconds:.1f}s ({row.get('memory_bytes', 0) >> 20} MiB of memory)")
    rounds = []
    for i in range(args.rounds):
        try:
            rounds.append(one_round(i, run_id, template, bootstrap, floor, choice, args.idle))
        except Exception as e:  # reported in INSTANT.md, and the run goes on
            log(traceback.format_exc().strip().splitlines()[-1])
            rounds.append({"round": i, "error": error_text(e), "load": domains.machine_load(run_id)})
            down(*sorted(n for n in created if n.startswith(f"bench-{run_id}-r{i}-")))
    changed = _git("status", "--porcelain", "--", "herovm")  # "?": none (or no git)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "rounds_asked": args.rounds,
        "idle_s": args.idle,
        "machine": compare.machine(),
        "versions": domains.versions(),
        "herovm_commit": _git("describe", "--always", "--dirty"),
        "herovm_uncommitted": 0 if changed == "?" else len(changed.splitlines()),
        "herovm_home": str(state.home()),
        "net": NET,
        "image": {
            "default_id": default.id,
            "kernel_version": default.manifest["kernel_version"],
            "floor_dir": floor.path.name,
        },
        "bootstrap": BOOTSTRAP,
        "template": made,
        "rounds": rounds,
        "wall_seconds": time.monotonic() - t_start,
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------- report


def _stat(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt(s: dict | None, unit: str = "s", digits: int = 2) -> str:
    if s is None:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f} {unit}"
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']})"


def summarize(results: dict) -> dict:
    rounds = results["rounds"]

    def ups(kind: str, key: str, first_only: bool = False) -> list[float]:
        out = []
        for r in rounds:
            mine = [
                u for u in r.get("ups", []) if u["kind"] == kind and key in u and not u.get("image_built")
            ]
            out += [u[key] for u in (mine[:1] if first_only else mine)]
        return out

    def get(section: str, key: str) -> list[float]:
        return [r[section][key] for r in rounds if isinstance(r.get(section, {}).get(key), int | float)]

    def forks(section: str, key: str) -> list[float]:
        vals = []
        for r in rounds:
            v = r.get(section, {}).get(key)
            vals += v if isinstance(v, list) else ([v] if v is not None else [])
        return vals

    def mem(kind: str, key: str, total: bool) -> list[float]:
        out = []
        for r in rounds:
            guests = [g for g in r.get("memory", {}).get(kind, {}).values() if key in g]
            if not total:
                out += [g[key] for g in guests]
            elif len(guests) == {"cold": 2, "template": 4}[kind]:  # sums of whole sets only
                out.append(sum(g[key] for g in guests))
        return out

    s: dict = {
        "floor": _stat(get("floor", "ready")),
        "floor_guest": _stat(get("floor", "guest_ready")),
    }
    for kind in ("cold", "template"):
        for key in ("up_returns", "exec_answers", "exec_s"):
            s[f"{kind}_{key}"] = _stat(ups(kind, key))
        for key in ("start", "agent", "ready", "rest"):
            s[f"{kind}_stamp_{key}"] = _stat(
                [
                    u["stamps"][key]
                    for r in rounds
                    for u in r.get("ups", [])
                    if u["kind"] == kind and key in u.get("stamps", {}) and not u.get("image_built")
                ]
            )
        s[f"{kind}_first_exec_answers"] = _stat(ups(kind, "exec_answers", first_only=True))
        for key in ("pss", "rss", "pss_anon", "pss_file"):
            s[f"{kind}_{key}"] = _stat(mem(kind, key, total=False))
        s[f"{kind}_pss_sum"] = _stat(mem(kind, "pss", total=True))
    ratios = []
    for r in rounds:
        m = r.get("memory", {})
        c = [g["pss"] for g in m.get("cold", {}).values() if "pss" in g]
        t = [g["pss"] for g in m.get("template", {}).values() if "pss" in g]
        if len(c) == 2 and len(t) == 4:
            ratios.append(sum(t) / sum(c))
    s["pss_ratio"] = _stat(ratios)
    for key in ("snapshot", "herovm_seconds", "pause", "resume", "exec_after_resume"):
        s[f"snap_{key}"] = _stat(get("snapshot", key))
    s["snap_memory_mib"] = _stat([v / 2**20 for v in get("snapshot", "memory_bytes")])
    for f in ("fork1", "fork4"):
        for key in ("total", "source_pause", "all_exec_answer", "source_exec_s"):
            s[f"{f}_{key}"] = _stat(forks(f, key))
        s[f"{f}_per_clone"] = _stat(forks(f, "per_clone"))
        s[f"{f}_exec_s"] = _stat(forks(f, "exec_s"))
    s["pause_all"] = _stat(forks("fork1", "source_pause") + forks("fork4", "source_pause"))
    s["image_built"] = [u["name"] for r in rounds for u in r.get("ups", []) if u.get("image_built")]
    s["image_ids"] = sorted({r["image_id"] for r in rounds if r.get("image_id")})
    s["failures"] = [f"round {r['round'] + 1}: {r['error']}" for r in rounds if r.get("error")]
    s["failures"] += [
        f"round {r['round'] + 1} {where}: {d['error']}"
        for r in rounds
        for where, d in [("floor", r.get("floor", {}))]
        + [(f"up {u['name']}", u) for u in r.get("ups", [])]
        + [("snapshot", r.get("snapshot", {})), ("fork1", r.get("fork1", {})), ("fork4", r.get("fork4", {}))]
        if d.get("error")
    ]
    return s


def targets(s: dict) -> list[tuple[str, str, str]]:
    rows = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    fl, tu = s.get("floor"), s.get("template_exec_answers")
    if fl and tu:
        limit = fl["median"] / 3
        rows.append(
            (
                "`up --template` to `exec` answering ≤ 1/3 of the cold boot floor",
                f"{tu['median']:.2f} s against {fl['median']:.2f} s / 3 = {limit:.2f} s "
                f"(= {tu['median'] / fl['median']:.2f}x the floor; slowest {tu['max']:.2f} s; the issue "
                "expected the floor's third at ~1 s)",
                verdict(tu["median"] <= limit)
                + f": {abs(limit - tu['median']):.2f} s {'to spare' if tu['median'] <= limit else 'over'}",
            )
        )
    sn = s.get("snap_snapshot")
    if sn:
        rows.append(
            (
                "`snapshot create` of a fresh 1 GiB guest ≤ 1 s",
                f"{sn['median']:.2f} s (slowest {sn['max']:.2f} s; herovm's own part "
                f"{s['snap_herovm_seconds']['median']:.2f} s)"
                if s.get("snap_herovm_seconds")
                else f"{sn['median']:.2f} s",
                verdict(sn["median"] <= 1.0) + (" (every run)" if sn["max"] <= 1.0 else " (not every run)"),
            )
        )
    pa = s.get("pause_all")
    if pa:
        rows.append(
            (
                "the source's pause during `fork` ≤ 1 s",
                f"{pa['median']:.3f} s (slowest {pa['max']:.3f} s; forks of 1 and of 4)",
                verdict(pa["median"] <= 1.0) + (" (every fork)" if pa["max"] <= 1.0 else " (not every fork)"),
            )
        )
    t, c = s.get("template_pss_sum"), s.get("cold_pss_sum")
    if t and c:
        ratio = s.get("pss_ratio")
        rows.append(
            (
                "PSS of four template clones together < two cold guests'",
                f"{t['median']:.0f} MiB against {c['median']:.0f} MiB"
                + (f" (ratio {ratio['median']:.2f}, {ratio['min']:.2f}–{ratio['max']:.2f})" if ratio else ""),
                verdict(t["median"] < c["median"]),
            )
        )
    return rows


def write_markdown(path: Path, results: dict, s: dict) -> None:
    m, v = results["machine"], results["versions"]
    n = len(results["rounds"])
    tpl = results["template"]
    loads = [r["load"] for r in results["rounds"]] + [
        r["load_memory"] for r in results["rounds"] if r.get("load_memory")
    ]
    busy = [len(x["other_guests"]) for x in loads]
    quick = " --quick" if results["quick"] else ""
    lines = [
        "# herovm's instant sandboxes: templates, fork, snapshot, pause",
        "",
        f"Measured {results['date']} by `benchmarks/instant.py{quick}` "
        f"({n} round{'s' if n > 1 else ''}, each measurement once or more per round, alternating; whole run "
        f"{results['wall_seconds'] / 60:.1f} min) at herovm `{results['herovm_commit']}`"
        + (
            f" ({results['herovm_uncommitted']} files under herovm/ changed and not committed yet)"
            if results.get("herovm_uncommitted")
            else ""
        )
        + ". Regenerate with "
        "`sudo HEROVM_HOME=... .venv/bin/python benchmarks/instant.py [--rounds 5] [--quick]`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_mib'] / 1024:.1f} GiB; "
        f"host kernel {m['kernel']}",
        f"- accelerator: **{m['accel']}** ({m['accel_reason']})",
        f"- QEMU {v['qemu']} (`{v['qemu_binary']}`), libvirt {v['libvirt']} (qemu:///system)",
        f"- image `default/{results['image']['default_id']}`, guest kernel "
        f"`{results['image']['kernel_version']}`; floor `{results['image']['floor_dir']}` (compare.py's)",
        "- every guest: 1 vCPU, 1 GiB, net mode "
        f"`{results['net']}` (QEMU user networking, `restrict=on`, as in compare.py); the template is made "
        "with it, so its clones have it too",
        f"- other load when each round and each memory reading began: 1-minute load average "
        f"{min(x['load1'] for x in loads):.1f}–{max(x['load1'] for x in loads):.1f}; guests of other users "
        f"running at {sum(1 for b in busy if b)} of {len(loads)} (up to {max(busy)} at once)"
        + (": those numbers are pessimistic" if any(busy) else ""),
        "",
        "## Targets",
        "",
        "| target | measured (median) | verdict |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in targets(s)],
        "",
        "## Boot: cold against the template",
        "",
        "Seconds from the start of the `herovm` command; median (min–max, n).",
        "",
        "| | cold `herovm up --bootstrap F` | `herovm up --template T` |",
        "| --- | ---: | ---: |",
        f"| `up` returns | {_fmt(s['cold_up_returns'])} | {_fmt(s['template_up_returns'])} |",
        f"| first `herovm exec NAME -- true` answered | **{_fmt(s['cold_exec_answers'])}** | "
        f"**{_fmt(s['template_exec_answers'])}** |",
        f"| the same, the first of each kind in a round (fewest other guests) | "
        f"{_fmt(s['cold_first_exec_answers'])} | {_fmt(s['template_first_exec_answers'])} |",
        f"| that first `exec` alone | {_fmt(s['cold_exec_s'])} | {_fmt(s['template_exec_s'])} |",
        "| *where `up`'s time goes: herovm's progress lines, on its clock (from its Manager's start)* | | |",
        f"| domain started (cold) / restore begun (template) | {_fmt(s['cold_stamp_start'])} | "
        f"{_fmt(s['template_stamp_start'])} |",
        f"| the agent's first event | {_fmt(s['cold_stamp_agent'])} | {_fmt(s['template_stamp_agent'])} |",
        f"| ready | {_fmt(s['cold_stamp_ready'])} | {_fmt(s['template_stamp_ready'])} |",
        f"| the rest of `up` (Python starting, importing herovm; after ready: status, exit) | "
        f"{_fmt(s['cold_stamp_rest'])} | {_fmt(s['template_stamp_rest'])} |",
        "",
        f"The boot floor (busybox initramfs, domain start to its /init; no `herovm` command, no Python): "
        f"**{_fmt(s['floor'])}** (guest uptime then {_fmt(s['floor_guest'])}). "
        + (
            f"Ratios of medians: cold `up` to exec / `up --template` to exec = "
            f"**{s['cold_exec_answers']['median'] / s['template_exec_answers']['median']:.1f}x**; "
            f"`up --template` to exec / floor = "
            f"**{s['template_exec_answers']['median'] / s['floor']['median']:.2f}**."
            if s.get("cold_exec_answers") and s.get("template_exec_answers") and s.get("floor")
            else ""
        ),
        "",
        *(
            [
                "Where `up --template`'s time goes (medians, herovm's clock): the clone's directory, keys, "
                f"overlay and domain by {s['template_stamp_start']['median']:.2f} s; the restore of the "
                "template's memory into a new QEMU, until the agent's first event, "
                f"{s['template_stamp_agent']['median'] - s['template_stamp_start']['median']:.2f} s; the "
                "handover of the clone's identity to ready "
                f"{s['template_stamp_ready']['median'] - s['template_stamp_agent']['median']:.2f} s; Python "
                f"and the rest of the command {s['template_stamp_rest']['median']:.2f} s; then the first "
                f"`exec` {s['template_exec_s']['median']:.2f} s (against "
                f"{s['cold_exec_s']['median']:.2f} s after a cold boot: a restored QEMU's TCG has "
                "translated nothing yet, docs/snapshots.md).",
                "",
            ]
            if all(
                s.get(k)
                for k in (
                    "template_stamp_start",
                    "template_stamp_agent",
                    "template_stamp_ready",
                    "template_stamp_rest",
                    "template_exec_s",
                    "cold_exec_s",
                )
            )
            else []
        ),
        f"The template: `herovm template create` took {tpl['command_seconds']:.1f} s once "
        f"(memory snapshot {(tpl['memory_bytes'] or 0) / 2**20:.0f} MiB, disk "
        f"{(tpl['disk_bytes'] or 0) / 2**20:.1f} MiB). Its bootstrap, the cold guests' too:",
        "",
        "```",
        results["bootstrap"].rstrip(),
        "```",
        "",
    ]
    effects = next((r["effects"] for r in results["rounds"] if r.get("effects")), None)
    if effects:
        lines += [
            "Checked in the first clone of the first round (`cat` the file; `id sandbox`; the service's file "
            "changes within 1.5 s): `" + effects.replace("\n", " / ") + "`",
            "",
        ]
    lines += [
        "## Snapshot, pause, resume (a cold guest, booted about a minute before, idle)",
        "",
        "| command | median (min–max, n) |",
        "| --- | ---: |",
        f"| `herovm snapshot create NAME SNAP` (memory and disk), start to return | "
        f"**{_fmt(s['snap_snapshot'])}** |",
        f"| its own `seconds` (--json) | {_fmt(s['snap_herovm_seconds'])} |",
        f"| memory file | {_fmt(s['snap_memory_mib'], 'MiB', 0)} |",
        f"| `herovm pause NAME` | {_fmt(s['snap_pause'])} |",
        f"| `herovm resume NAME` | {_fmt(s['snap_resume'])} |",
        f"| first `herovm exec NAME -- true` after the resume | {_fmt(s['snap_exec_after_resume'])} |",
        "",
        "## Fork (source: a template clone, idle; `herovm fork SRC NEW... --json`)",
        "",
        "| | 1 clone | 4 clones |",
        "| --- | ---: | ---: |",
        f"| `fork`, start to return | {_fmt(s['fork1_total'])} | {_fmt(s['fork4_total'])} |",
        f"| each clone (--json `seconds`) | {_fmt(s['fork1_per_clone'])} | {_fmt(s['fork4_per_clone'])} |",
        "| **the source paused** (--json `source_pause_seconds`) | "
        f"**{_fmt(s['fork1_source_pause'], 's', 3)}** | **{_fmt(s['fork4_source_pause'], 's', 3)}** |",
        f"| fork's start to `exec` answered in every clone (one after the other) | "
        f"{_fmt(s['fork1_all_exec_answer'])} | {_fmt(s['fork4_all_exec_answer'])} |",
        f"| first `exec` in a clone | {_fmt(s['fork1_exec_s'])} | {_fmt(s['fork4_exec_s'])} |",
        f"| `exec` in the source afterwards | {_fmt(s['fork1_source_exec_s'])} | "
        f"{_fmt(s['fork4_source_exec_s'])} |",
        "",
        f"## Host memory: four template clones against two cold guests ({results['idle_s']:.0f} s idle)",
        "",
        "PSS of each guest's QEMU process (`/proc/PID/smaps_rollup`, PID from "
        "`/run/libvirt/qemu/herovm-NAME.pid`), MiB, all six guests running, read one after the other.",
        "",
        "| | cold guest | template clone |",
        "| --- | ---: | ---: |",
        f"| PSS, one guest | {_fmt(s['cold_pss'], 'MiB', 0)} | {_fmt(s['template_pss'], 'MiB', 0)} |",
        f"| of it anonymous | {_fmt(s['cold_pss_anon'], 'MiB', 0)} | "
        f"{_fmt(s['template_pss_anon'], 'MiB', 0)} |",
        f"| of it file-backed | {_fmt(s['cold_pss_file'], 'MiB', 0)} | "
        f"{_fmt(s['template_pss_file'], 'MiB', 0)} |",
        f"| RSS, one guest | {_fmt(s['cold_rss'], 'MiB', 0)} | {_fmt(s['template_rss'], 'MiB', 0)} |",
        f"| **PSS together** (2 cold, 4 clones) | **{_fmt(s['cold_pss_sum'], 'MiB', 0)}** | "
        f"**{_fmt(s['template_pss_sum'], 'MiB', 0)}** |",
        "",
    ]
    if s.get("template_pss") and s.get("template_pss_file") and s.get("cold_pss"):
        lines += [
            f"Of a clone's {s['template_pss']['median']:.0f} MiB, {s['template_pss_file']['median']:.0f} MiB "
            "is file-backed: the clones share next to nothing with each other or with the template's memory "
            "file (each restore reads it into its QEMU's own anonymous memory). A clone is smaller than a "
            f"cold guest ({s['template_pss']['median']:.0f} against {s['cold_pss']['median']:.0f} MiB: it "
            f"holds the template's {(tpl['memory_bytes'] or 0) / 2**20:.0f} MiB memory image rather than "
            "what a whole boot touched), but four of them are more than two cold guests.",
            "",
        ]
    if s["image_built"] or len(s["image_ids"]) > 1:
        lines += [
            "**The guest sources changed during the run** (others edit this checkout): the cold guests "
            f"booted images {', '.join(s['image_ids'])}"
            + (
                f"; the `up`s of {', '.join(s['image_built'])} built the image first and are not counted."
                if s["image_built"]
                else "."
            ),
            "",
        ]
    if s["failures"]:
        lines += ["## Failures", "", *[f"- {f}" for f in s["failures"]], ""]
    lines += [
        "## How this was measured",
        "",
        "- Every time is host wall clock around a `.venv/bin/herovm` subprocess, as a user at a shell "
        "waits for it: Python starting and importing herovm (~0.1–0.2 s here) is included; `exec answered` "
        "is from the start of the `up` (or `fork`) to the return of the first `herovm exec NAME -- true` "
        "after it (one try, unless it failed: then tried again, and counted).",
        "- Each round: the floor alone; then six guests one after the other, cold and template "
        "alternating (even rounds cold first, odd rounds template first), then two more from the "
        "template; so the later ones start with more of this run's idle guests running (the table's "
        "'first of each kind' row has fewest). Then the memory reading, snapshot, pause and resume of "
        "the second cold guest, and forks of the first template clone with the rest removed (at most six "
        "guests of this run at once).",
        "- The boot floor is compare.py's: the same kernel booting a busybox initramfs whose /init prints "
        "its uptime, timed from just before libvirt starts the domain (benchmarks/timing.py `boot_floor`). "
        "It has no `herovm` command around it; the targets compare `up --template` to it as the issue did.",
        "- Raw results: `.bench/instant-last.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------ main

RUN: dict = {}  # what cleanup() needs to know even when run() did not return: the template's name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--quick", action="store_true", help="one round, to check the script works")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading PSS (default 5)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/INSTANT.md"))
    ap.add_argument("--from", dest="raw", help="only write --out again from this raw results file")
    args = ap.parse_args()
    if args.raw:
        results = json.loads(Path(args.raw).read_text())
        write_markdown(Path(args.out), results, summarize(results))
        return
    if args.quick:
        args.rounds = 1
    if os.geteuid() != 0:
        sys.exit("instant.py needs root: it uses qemu:///system")
    if not Path(HEROVM).exists():
        sys.exit(f"{HEROVM} is missing: make the virtual environment first")
    run_id = uuid.uuid4().hex[:6]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background job ignores it
        signal.signal(sig, compare._interrupt)
    work = Path(tempfile.mkdtemp(prefix="herovm-instant-"))
    try:
        results = run(args, run_id, work)
    except KeyboardInterrupt:
        log("interrupted: removing this run's guests and template")
        sys.exit(130)
    finally:
        cleanup(run_id, RUN.get("template"))
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(results)
    raw = ROOT / ".bench/instant-last.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps({**results, "summary": summary}, indent=1, default=str))
    write_markdown(Path(args.out), results, summary)
    log(f"wrote {args.out} and {raw} ({results['wall_seconds'] / 60:.1f} min)")
    for row in targets(summary):
        log(" | ".join(row))
    for f in summary["failures"]:
        log(f"failure: {f}")


if __name__ == "__main__":
    main()
