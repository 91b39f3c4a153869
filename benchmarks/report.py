"""BENCHMARKS.md and docs/boot-timelines.png from one compare.py run's results."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

VARIANTS = {
    "herovm_test": "herovm, test bootstrap",
    "herovm_empty": "herovm, empty bootstrap",
    "cloudinit": "cloud-init, same bootstrap",
    "floor": "floor (busybox /init)",
}
MILESTONES = [
    ("first_console", "first console line"),
    ("ssh_banner", "SSH banner on the forwarded port"),
    ("user_space", "first word from user space (agent / init)"),
    ("bootstrap_done", "bootstrap commands done (cloud-init runcmd)"),
    ("ready", "**ready** (herovm `ready`; cloud-init final message; floor /init)"),
    ("exec_answers", "`exec` answers"),
]
COLORS = {
    "first_console": "#9e9e9e",
    "ssh_banner": "#1f77b4",
    "user_space": "#2ca02c",
    "bootstrap_done": "#ff7f0e",
    "ready": "#d62728",
    "exec_answers": "#9467bd",
}


def _values(boots: list[dict], key: str, where: str = "marks") -> list[float]:
    return [b[where][key] for b in boots if b.get(where, {}).get(key) is not None]


def _stat(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(results: dict) -> dict:
    summary: dict = {}
    for variant, boots in results["boots"].items():
        ok = [b for b in boots if not b.get("error")]
        s = {key: _stat(_values(ok, key)) for key, _ in MILESTONES}
        s["guest_ready"] = _stat(_values(ok, "ready", "guest"))
        s["guest_user_space"] = _stat(_values(ok, "user_space", "guest"))
        s["rss_mib"] = _stat([b["rss_mib"] for b in ok if b.get("rss_mib")])
        s["down"] = _stat([b["down"] for b in ok if b.get("down") is not None])
        s["poweroff_to_gone"] = _stat([b["poweroff_to_gone"] for b in ok if b.get("poweroff_to_gone")])
        s["failures"] = [b["error"] for b in boots if b.get("error")]
        summary[variant] = s
    return summary


def _fmt(stat: dict | None, unit: str = "s", digits: int = 2) -> str:
    if stat is None:
        return "–"
    m, lo, hi = stat["median"], stat["min"], stat["max"]
    if stat["n"] == 1:
        return f"{m:.{digits}f} {unit}"
    return f"{m:.{digits}f} {unit} ({lo:.{digits}f}–{hi:.{digits}f})"


def _ms(values: list[float], p: float) -> str:
    from .timing import pct

    return f"{pct(values, p) * 1000:.1f} ms" if values else "–"


def targets(results: dict, summary: dict) -> list[tuple[str, str, str]]:
    rows = []
    t, e, c, f = (summary.get(k, {}) for k in ("herovm_test", "herovm_empty", "cloudinit", "floor"))

    def med(s: dict, key: str) -> float | None:
        return s.get(key, {})["median"] if s.get(key) else None

    ht, ci = med(t, "ready"), med(c, "ready")
    if ht and ci:
        ratio = ci / ht
        verdict = "met" if ratio >= 5 else "missed"
        rows.append(
            (
                "herovm ready (test bootstrap) ≥ 5x sooner than cloud-init finished",
                f"{ci:.1f} s / {ht:.2f} s = **{ratio:.1f}x** (to `exec` answering: "
                f"{ci / med(t, 'exec_answers'):.1f}x)"
                if med(t, "exec_answers")
                else f"{ratio:.1f}x",
                f"{verdict}: {'by' if verdict == 'met' else 'short by'} "
                f"{abs(ratio - 5):.1f}x ({abs(ratio / 5 - 1) * 100:.0f}%)",
            )
        )
    he, fl = med(e, "ready"), med(f, "ready")
    if he and fl:
        ratio = he / fl
        verdict = "met" if ratio <= 1.5 else "missed"
        rows.append(
            (
                "herovm ready (empty bootstrap) within 1.5x the floor",
                f"{he:.2f} s / {fl:.2f} s = **{ratio:.2f}x**",
                f"{verdict}: {'with' if verdict == 'met' else 'over by'} {abs(1.5 * fl - he):.2f} s "
                f"{'to spare' if verdict == 'met' else ''}".rstrip(),
            )
        )
    ex = results.get("exec")
    if ex and not ex.get("error"):
        from .timing import pct

        for key, label, limit in (
            ("api", "Python-API exec p50 < 20 ms", 0.020),
            ("cli", "CLI exec p50 < 250 ms", 0.250),
        ):
            p50 = pct(ex[key], 50)
            verdict = "met" if p50 < limit else "missed"
            rows.append(
                (
                    label,
                    f"**{p50 * 1000:.1f} ms** (n={len(ex[key])})",
                    f"{verdict}: {abs(limit - p50) * 1000:.1f} ms {'under' if verdict == 'met' else 'over'}",
                )
            )
    conc = results.get("concurrency") or []
    top = max(conc, key=lambda r: r["guests"]) if conc else None
    if top:
        ok = top["ok"] == top["guests"]
        verdict = "met" if ok and top["guests"] >= 8 else ("not run at 8 (quick mode)" if ok else "missed")
        rows.append(
            (
                "8 guests up at once without failures",
                f"{top['ok']}/{top['guests']} up at once in {top['total']:.1f} s",
                verdict + ("" if ok else f": {len(top['failed'])} failed"),
            )
        )
    return rows


def cloudinit_stages(boot: dict) -> list[tuple[str, str, str, str]]:
    """(stage, starts at guest uptime, cloud-init's own time in it, its systemd unit's time)."""
    console = boot.get("console") or []
    starts = {}
    for _, line in console:
        if m := re.search(r"running '([a-z:-]+)' at .* Up ([0-9.]+) seconds", line):
            starts[m[1]] = float(m[2])
    details = boot.get("details") or {}
    own = dict(
        re.findall(r"Finished stage: \(([a-z:-]+)\) ([0-9.]+) seconds", details.get("cloud_init_analyze", ""))
    )
    blame = {}
    for line in details.get("systemd_analyze", "").splitlines():
        if m := re.match(r"\s*(?:(\d+)min )?([0-9.]+)(ms|s) (cloud-\S+)\.service", line):
            seconds = float(m[2]) / (1000 if m[3] == "ms" else 1) + 60 * int(m[1] or 0)
            blame[m[4]] = seconds
    stages = [
        ("init-local", "init-local", "cloud-init-local"),
        ("init", "init-network", "cloud-init"),
        ("modules:config", "modules-config", "cloud-config"),
        ("modules:final", "modules-final", "cloud-final"),
    ]
    rows = []
    for console_name, analyze_name, unit in stages:
        start = f"{starts[console_name]:.1f} s" if console_name in starts else "?"
        inside = f"{float(own[analyze_name]):.1f} s" if analyze_name in own else "?"
        unit_t = f"{blame[unit]:.1f} s" if unit in blame else "?"
        rows.append((f"{unit}.service ({console_name})", start, inside, unit_t))
    return rows


def load_line(results: dict) -> str:
    samples = [b["load"] for boots in results["boots"].values() for b in boots if b.get("load")]
    samples += [r["load"] for r in results.get("concurrency") or [] if r.get("load")]
    if results.get("exec", {}).get("load"):
        samples.append(results["exec"]["load"])
    if not samples:
        return "- machine load: not recorded"
    loads = [x["load1"] for x in samples]
    busy = [len(x["other_guests"]) for x in samples]
    shared = sum(1 for b in busy if b)
    return (
        f"- other load on the machine when each measurement began: 1-minute load average {min(loads):.1f}–"
        f"{max(loads):.1f}; guests of other users running at {shared} of {len(samples)} starts"
        + (f" (up to {max(busy)} at once): those numbers are pessimistic" if shared else "")
    )


def write_markdown(path: Path, results: dict, summary: dict) -> None:
    m, v, imgs = results["machine"], results["versions"], results["images"]
    variants = [k for k in VARIANTS if k in summary]
    n = results["boots_per_variant"]
    lines = [
        "# herovm against cloud-init and the boot floor",
        "",
        f"Measured {results['date']} by `benchmarks/compare.py{' --quick' if results['quick'] else ''}` "
        f"({n} boot{'s' if n > 1 else ''} of each variant, alternating; "
        f"whole run {results['wall_seconds'] / 60:.1f} min). Regenerate with "
        "`.venv/bin/python benchmarks/compare.py [--boots 5] [--quick]`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_mib'] / 1024:.1f} GiB; "
        f"host kernel {m['kernel']}",
        f"- accelerator: **{m['accel']}** ({m['accel_reason']})",
        f"- QEMU {v['qemu']} (`{v['qemu_binary']}`), libvirt {v['libvirt']} (qemu:///system)",
        f"- guest kernel `{imgs['kernel_version']}` (vmlinuz sha256 `{imgs['kernel_sha256'][:16]}…`), "
        "the same "
        "file for all three; command line "
        f"`{imgs['cmdline']}`",
        f"- images: herovm `default/{imgs['default_id']}`; "
        f"cloud-init {imgs.get('cloud_init_version', '?')} image "
        f"`{imgs['cloudinit_dir']}` (Debian initramfs {imgs['cloudinit_initrd_bytes'] / 2**20:.1f} MiB); "
        "floor "
        f"`{imgs['floor_dir']}` (initramfs {imgs['floor_initrd_bytes'] / 2**20:.1f} MiB). herovm's own "
        f"initramfs: {imgs['default_initrd_bytes'] / 2**20:.1f} MiB."
        + (
            f" **The herovm boots used {len(ids)} image builds ({', '.join(ids)}): the guest sources "
            "changed during the run.**"
            if len(ids := results.get("herovm_image_ids") or []) > 1
            else ""
        ),
        load_line(results),
        "- every guest: 1 vCPU, 1 GiB, virtio-rng, serial console to a file, QEMU user-mode networking with "
        "one forward on 127.0.0.1 "
        f"(`restrict=on`; herovm: net mode `{results.get('herovm_net', '?')}`); herovm and cloud-init: a "
        "virtio disk and a read-only virtio seed/config disk (herovm also its virtio-serial channel). The "
        "floor has no disks: given herovm's two disks and channel, its /init came 0.02 s later (median of "
        "10 boots each, within the noise).",
        "",
        "## Boot: seconds from domain start, median (min–max)",
        "",
        "| milestone | " + " | ".join(VARIANTS[k] for k in variants) + " |",
        "| --- |" + " ---: |" * len(variants),
    ]
    for key, label in MILESTONES:
        lines.append(f"| {label} | " + " | ".join(_fmt(summary[k][key]) for k in variants) + " |")
    lines += [
        "| guest uptime at ready (kernel clock) | "
        + " | ".join(_fmt(summary[k]["guest_ready"]) for k in variants)
        + " |",
        "| QEMU RSS, idle guest | "
        + " | ".join(_fmt(summary[k]["rss_mib"], "MiB", 0) for k in variants)
        + " |",
        "| `down` (herovm); floor: from /init's marker to the domain gone | "
        + " | ".join(_fmt(summary[k]["down"] or summary[k]["poweroff_to_gone"]) for k in variants)
        + " |",
        "",
    ]
    fails = {k: summary[k]["failures"] for k in variants if summary[k]["failures"]}
    if fails:
        lines += ["**Failed boots**: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in fails.items()), ""]
    t, c, e, f = (summary.get(k, {}) for k in ("herovm_test", "cloudinit", "herovm_empty", "floor"))
    if t.get("ready") and c.get("ready"):
        lines.append(
            f"Ratios of medians: cloud-init finished / herovm ready (test bootstrap) = "
            f"**{c['ready']['median'] / t['ready']['median']:.1f}x**; "
            + (
                f"herovm ready (empty) / floor = **{e['ready']['median'] / f['ready']['median']:.2f}x**; "
                if e.get("ready") and f.get("ready")
                else ""
            )
            + (
                "SSH banner: cloud-init / herovm = "
                f"{c['ssh_banner']['median'] / t['ssh_banner']['median']:.1f}x."
                if c.get("ssh_banner") and t.get("ssh_banner")
                else ""
            )
        )
        lines.append("")
    lines += [
        "![boot timelines](docs/boot-timelines.png)",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c_} |" for a, b, c_ in targets(results, summary)],
        "",
    ]
    ex = results.get("exec")
    if ex and ex.get("error"):
        lines += ["## exec, throughput, down", "", f"**Not measured: {ex['error']}**", ""]
    elif ex:
        tp = ex["throughput"]
        lines += [
            "## exec, throughput, down (herovm, one idle guest, empty bootstrap)",
            "",
            "| exec of `true` | p50 | p95 | p99 | runs |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| Python API, kept connection | {_ms(ex['api'], 50)} | {_ms(ex['api'], 95)} | "
            f"{_ms(ex['api'], 99)} | "
            f"{len(ex['api'])} |",
            f"| CLI (`.venv/bin/herovm exec NAME -- true`) | {_ms(ex['cli'], 50)} | {_ms(ex['cli'], 95)} | "
            f"{_ms(ex['cli'], 99)} | {len(ex['cli'])} |",
            *(
                f"| {label} | {_ms(ex[key], 50)} | {_ms(ex[key], 95)} | {_ms(ex[key], 99)} | {len(ex[key])} |"
                for key, label in (
                    ("ssh", "Python API over SSH instead, kept connection"),
                    ("connect", "Python API, new connection each time (first exec)"),
                    ("cli_startup", "CLI process alone (`herovm --help`, no guest)"),
                )
                if ex.get(key)
            ),
            "",
            f"- stdout throughput: {tp['bytes'] / 1e6:.0f} MB (`head -c` of /dev/zero) "
            f"in {tp['seconds']:.1f} s = "
            f"**{tp['mib_per_s']:.1f} MiB/s**{'' if tp['ok'] else ' (INCOMPLETE)'}",
            f"- QEMU RSS of that guest after all of the above, 2 s idle: {ex['rss_after_mib']:.0f} MiB "
            "(QEMU's TCG translation cache and the guest's page cache grow with use); "
            f"`down`: {ex['down']:.2f} s",
            "",
        ]
    conc = results.get("concurrency")
    if conc:
        lines += [
            "## Concurrent `up` (test bootstrap, one thread and one `Manager` each, until `exec` answers)",
            "",
            "| guests at once | up ok | total | per guest, median | per guest, slowest | down, median "
            "| failures |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in conc:
            failures = "; ".join(f"{x['name']}: {x['error']}" for x in r["failed"]) or "none"
            lines.append(
                f"| {r['guests']} | {r['ok']}/{r['guests']} | {r['total']:.1f} s | "
                f"{r['per_guest_median'] or 0:.1f} s | {r['per_guest_max'] or 0:.1f} s | "
                f"{r['down_median'] or 0:.2f} s | {failures} |"
            )
        lines.append("")
    detail_boot = next((b for b in results["boots"].get("cloudinit", []) if b.get("details")), None)
    if detail_boot:
        d = detail_boot["details"]
        lines += [
            "## Where the cloud-init boot's time goes (its first boot in this run)",
            "",
            "| cloud-init stage | starts at guest uptime | cloud-init's own time in it | its unit's time "
            "(systemd-analyze blame) |",
            "| --- | ---: | ---: | ---: |",
            *[f"| {a} | {b} | {c_} | {d_} |" for a, b, c_, d_ in cloudinit_stages(detail_boot)],
            "",
            "The gap between a unit's time and cloud-init's own time in it is a fresh Python process "
            "starting and importing cloud-init, once per stage, on the one vCPU it shares with everything "
            "else systemd starts meanwhile.",
            "",
            "<details><summary>systemd-analyze, critical chain, cloud-init analyze, effects check</summary>",
            "",
            "```",
            d.get("systemd_analyze", ""),
            "",
            d.get("critical_chain", ""),
            "",
            d.get("cloud_init_analyze", ""),
            "",
            "# effects of the bootstrap, checked in the guest afterwards:",
            d.get("effects", ""),
            "# cloud-init schema --system:",
            d.get("cloud_init_schema", ""),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += [
        "## How this was measured",
        "",
        "- Times are host wall clock from just before the domain is started (herovm: its `boot` step, right "
        "before the backend starts the domain). Console lines are timestamped as the console file grows "
        "(checked every 10 ms); the SSH banner is a TCP connect plus read of `SSH-` on the forwarded port, "
        "tried every 100 ms (so each guest starts sshd once for the probe during its boot; herovm hands "
        "every connection to a fresh `sshd -i`, so its banner comes later than its agent's listener). "
        "cloud-init's completion is seen only in the console file: the last runcmd line writes a marker "
        "to /dev/ttyS0 and `final_message` is a second marker.",
        "- All three boot the same kernel file with the same command line (herovm's: `quiet`, no i8042 "
        "probing), on the same machine type (q35); herovm adds `norandmaps` under TCG, as it does for every "
        "TCG guest (docs/benchmarks.md: why), the other two boot as they would elsewhere. "
        'The differences are user space and initramfs. With `quiet`, the "first console line" '
        "is whatever user space prints first: herovm's agent mirrors its `boot` event, the floor's /init "
        "prints "
        "its marker, and stock Debian prints nothing until cloud-init's first stage.",
        "- cloud-init image: mmdebstrap bookworm (same mirror, same kernel package version as herovm's "
        "image, vmlinuz checked byte-identical) with systemd, udev, cloud-init, openssh-server, sudo, "
        "python3, "
        "iproute2, ca-certificates, initramfs-tools (stock configuration: MODULES=most, Debian's "
        "compression), systemd-networkd DHCP; `datasource_list: [NoCloud, None]`. Each boot is a fresh "
        "instance: new qcow2 overlay, new seed ISO (label `cidata`) with a new instance-id. The user-data is "
        "translated from tests/integration/data/full.hero (benchmarks/seed.py); like herovm, the host "
        "provides "
        "the SSH host key (no key generation) and the root file system is not resized.",
        "- The floor is a busybox initramfs whose /init prints /proc/uptime and powers off: the kernel alone "
        "reaching its first process, on this machine.",
        "- herovm: `Manager.up` with the standard test bootstrap (tests/integration/data/full.hero) or none, "
        "then one `exec` of `true`. QEMU RSS is read from /proc/PID/status (PID from "
        "/run/libvirt/qemu/DOMAIN.pid) after 2 s idle.",
        "- Percentiles are nearest-rank. Raw results: `.bench/compare-last.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


MARKERS = {
    "first_console": ("s", -0.24),
    "user_space": ("^", -0.1),
    "ready": ("o", 0.04),
    "ssh_banner": ("D", 0.18),
    "bootstrap_done": ("v", 0.18),
    "exec_answers": ("P", 0.3),
}


def cloudinit_stage_starts(results: dict) -> dict[str, float]:
    """Median host time (from domain start) at which each cloud-init stage announced itself."""
    seen: dict[str, list[float]] = {}
    for boot in results["boots"].get("cloudinit", []):
        for t, line in boot.get("console") or []:
            if m := re.search(r"running '([a-z:-]+)' at", line):
                seen.setdefault(m[1], []).append(t)
    return {stage: statistics.median(ts) for stage, ts in seen.items()}


def plot(path: Path, results: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [k for k in VARIANTS if k in summary][::-1]
    fig, ax = plt.subplots(figsize=(12, 1.6 + 1.1 * len(variants)))
    for y, variant in enumerate(variants):
        s = summary[variant]
        ready = s.get("ready")
        if ready:
            ax.barh(y, ready["median"], height=0.6, color="#f4cccc", zorder=1)
            ax.annotate(
                f" {ready['median']:.1f} s",
                (ready["median"], y - 0.3),
                fontsize=9,
                ha="left",
                va="center",
                color=COLORS["ready"],
            )
        for key, label in MILESTONES:
            st = s.get(key)
            if not st:
                continue
            marker, dy = MARKERS[key]
            ax.errorbar(
                st["median"],
                y + dy,
                xerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]],
                fmt=marker,
                color=COLORS[key],
                capsize=3,
                markersize=7,
                zorder=3,
                label=re.sub(r"[*`]", "", label).split(" (")[0],
            )
        if variant == "cloudinit":
            for stage, t in cloudinit_stage_starts(results).items():
                ax.plot([t, t], [y - 0.3, y + 0.3], color="#555555", lw=1, zorder=2)
                ax.annotate(stage, (t, y - 0.42), fontsize=7, ha="center", va="top", color="#555555")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yticks(range(len(variants)), [VARIANTS[v] for v in variants])
    ax.set_ylim(-0.8, len(variants) - 0.4)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds from domain start (median; whiskers: min–max; cloud-init row: its stages)")
    m = results["machine"]
    ax.set_title(
        f"Boot timelines, {m['accel'].upper()}, {m['cores']} cores, n={results['boots_per_variant']} each "
        f"({results['date']})",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
