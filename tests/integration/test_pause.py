"""Pause and resume with a real guest (libvirt suspend/resume): the E2B #884 pattern, ten cycles in a row
that keep files and a running service; no CPU while paused; exec refused at once while paused; the guest's
clock right after a resume; stop and down of a paused VM. Prints the CLI's pause and resume latencies
(command start to return), medians of ten."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from guests import assert_nothing_left, cli

from herovm.backends.libvirt import PREFIX
from herovm.errors import GuestError

TICKER = (
    "!!service.start name:ticker restart:always "
    "cmd:'echo $$ > /run/ticker.pid; while true; do echo tick >> /root/ticks; sleep 0.2; done'\n"
)


def qemu_cpu_seconds(name: str) -> float:
    pid = Path(f"/run/libvirt/qemu/{PREFIX}{name}.pid").read_text().strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def timed_cli(*args: str) -> float:
    t0 = time.monotonic()
    r = cli(*args)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    return took


def test_ten_pause_resume_cycles_keep_files_and_a_service(vm_factory, unique_name):
    name = unique_name("pause")
    vm = vm_factory(name, bootstrap=TICKER)  # --net default: passt keeps the forward across a pause
    m = vm_factory.manager
    vm.exec("echo kept > /root/kept")
    service_pid = vm.exec("cat /run/ticker.pid").stdout.strip()
    assert service_pid
    pauses, resumes = [], []
    for cycle in range(10):
        vm.exec(f"echo {cycle} >> /root/cycles")
        ticks = int(vm.exec("wc -l < /root/ticks").stdout)
        counted = time.monotonic()
        pauses.append(timed_cli("pause", name))
        paused = time.monotonic()
        assert m.machine(name).state == "paused"
        if cycle == 0:
            cpu = qemu_cpu_seconds(name)
            time.sleep(1.0)
            assert qemu_cpu_seconds(name) - cpu <= 0.03, "a paused VM uses no CPU"
            r = cli("exec", name, "--", "true")
            assert (r.returncode, r.stderr.splitlines()) == (
                255,
                [f"herovm: error: VM {name} is paused", f"  hint: resume it with `herovm resume {name}`"],
            )
            rows = {row["name"]: row for row in m.ls()}
            assert rows[name]["state"] == "paused" and m.status(name)["state"] == "paused"
        t0 = time.monotonic()
        try:
            m.attach(name).exec(["true"])
            raise AssertionError("exec into a paused VM ran")
        except GuestError as e:
            assert e.message == f"VM {name} is paused" and time.monotonic() - t0 < 1
        time.sleep(0.5 if cycle else 2.0)
        resuming = time.monotonic()
        resumes.append(timed_cli("resume", name))
        if cycle == 0:  # its clock stood still while paused; resume set it (the agent reads within 0.1 s)
            time.sleep(0.3)
            skew = float(vm.exec("date +%s.%N").stdout) - time.time()
            assert abs(skew) < 0.5, f"the guest's clock is {skew:+.2f}s off after a pause of 3 s"
        r = vm.exec(
            f"cat /root/kept; tail -n1 /root/cycles; kill -0 {service_pid.decode()} && echo alive; "
            "wc -l < /root/ticks"
        )
        kept, last_cycle, alive, ticks_after = r.stdout.decode().split()
        assert (kept, last_cycle, alive) == ("kept", str(cycle), "alive"), r
        # It ticks every 0.2 s while it runs: around the pause (the CLI's own start-up, slower under load),
        # and none in the 0.5-2 s it was surely paused (the span between the pause's return and the resume)
        running = (time.monotonic() - counted) - (resuming - paused)
        assert int(ticks_after) - ticks <= running / 0.2 + 2, "the service ticked on while the VM was paused"
    time.sleep(0.5)
    assert int(vm.exec("wc -l < /root/ticks").stdout) > ticks, "the service runs on after the last resume"
    assert vm.exec("cat /root/cycles").stdout.split() == [str(i).encode() for i in range(10)]
    print(
        f"\npause/resume latency (CLI, median of 10): pause {statistics.median(pauses):.3f}s "
        f"(min {min(pauses):.3f}, max {max(pauses):.3f}), resume {statistics.median(resumes):.3f}s "
        f"(min {min(resumes):.3f}, max {max(resumes):.3f})"
    )

    # stop of a paused VM: resumed, then powered off through the agent (not after its timeout)
    timed_cli("pause", name)
    t0 = time.monotonic()
    assert cli("stop", name).returncode == 0
    assert time.monotonic() - t0 < 15 and m.machine(name).state == "stopped"
    assert cli("start", name).returncode == 0
    assert vm.exec("cat /root/kept").stdout == b"kept\n"
    timed_cli("pause", name)
    assert cli("down", name).returncode == 0
    assert_nothing_left(name)
