"""`herovm up --ttl`: the guest powers itself off when its time is up (no daemon on the host), and `gc`
removes the VM then; before that, nothing happens to it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from herovm.leftovers import expired
from herovm.record import epoch


def test_a_vm_whose_time_is_up_powers_off_and_gc_removes_it(vm_factory, unique_name) -> None:
    name = unique_name("ttl")
    vm = vm_factory(name, net="restricted", ttl="25s")
    m = vm.manager
    status = m.status(name)
    deadline = epoch(status["expires"])
    assert deadline is not None and 0 < deadline - time.time() <= 25
    assert vm.exec("true").exit_code == 0
    assert not [r for r in expired(m) if r.startswith(f"{name} ")], "gc leaves a VM whose time is not up"
    while time.time() < deadline - 3:
        assert m.machine(name).state == "running", "powered off before its time was up"
        time.sleep(1)
    while m.machine(name).state != "stopped":
        assert time.time() < deadline + 30, "still running 30 s after its time was up"
        time.sleep(0.5)
    stopped_late = time.time() - deadline
    assert stopped_late > -3, "powered off more than 3 s early"
    # the guest's clock may run a little ahead of the host's under TCG: gc goes by the host's, after the time
    time.sleep(max(0.0, deadline - time.time() + 0.5))
    shown = subprocess.run([sys.executable, "-m", "herovm", "gc"], capture_output=True, text=True)
    assert shown.returncode == 0
    assert f"removed {name} (its time was up at {status['expires']})" in shown.stdout
    assert m.backend.get(name) is None
    print(f"\nttl: powered off {stopped_late:+.1f}s after its deadline (the agent wakes every 5 s)")


def test_herovm_ttl_sets_a_running_vms_time_and_never_lifts_it(vm_factory, unique_name) -> None:
    """`herovm ttl` tells the running guest at once (Command.DEADLINE): no boot needed; `never` lifts it."""
    lifted, limited = unique_name("never"), unique_name("later")
    vm_factory(lifted, net="restricted", ttl="12s")
    vm = vm_factory(limited, net="restricted")
    m = vm.manager
    assert m.status(limited)["expires"] is None
    cli = [sys.executable, "-m", "herovm", "ttl"]
    assert subprocess.run([*cli, lifted, "never"], capture_output=True).returncode == 0
    set_ = subprocess.run([*cli, limited, "6s", "--json"], capture_output=True, text=True)
    assert set_.returncode == 0, set_.stderr
    deadline = epoch(json.loads(set_.stdout)["expires"])
    assert m.status(lifted)["expires"] is None
    while m.machine(limited).state != "stopped":
        assert time.time() < deadline + 30, "still running 30 s after its time was up"
        time.sleep(0.5)
    assert time.time() > deadline - 3
    time.sleep(max(0.0, deadline + 8 - time.time()))  # past the 12 s the other one had
    assert m.machine(lifted).state == "running", "`never` lifted its limit"
