"""`herovm up --ttl`: the guest powers itself off when its time is up (no daemon on the host), and `gc`
removes the VM then; before that, nothing happens to it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guests import home_domains, link_image

from herovm.leftovers import expired
from herovm.manager import Manager
from herovm.record import epoch


@pytest.fixture
def own_home(image, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    """A HEROVM_HOME of the test's own (the image hard-linked into it): other test files run `herovm gc` on
    the shared one at the same time, and one of those removed this test's VM once its time was up, before
    this test's own gc could (two clean-clone runs failed so: "nothing to remove")."""
    home = Path(tempfile.mkdtemp(prefix="herovm-it-ttl-", dir="/tmp"))
    try:
        os.chmod(home, 0o711)  # QEMU reaches the VM's disk under it
        link_image(image, home)
        monkeypatch.setenv("HEROVM_HOME", str(home))
        m = Manager()
        try:
            yield m
        finally:
            m.down_all()
            m.close()
            assert home_domains(home) == {}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_vm_whose_time_is_up_powers_off_and_gc_removes_it(own_home: Manager, unique_name) -> None:
    name = unique_name("ttl")
    m = own_home
    vm = m.up(name, net="restricted", ttl="25s")
    status = m.status(name)
    deadline = epoch(status["expires"])
    assert deadline is not None and 0 < deadline - time.time() <= 25
    assert vm.exec("true").exit_code == 0
    vm.close()
    assert not [r for r in expired(m) if r.startswith(f"{name} ")], "gc leaves a VM whose time is not up"
    while time.time() < deadline - 3:
        assert m.machine(name).state == "running", "powered off before its time was up"
        time.sleep(1)
    while m.machine(name).state != "stopped":
        assert time.time() < deadline + 30, "still running 30 s after its time was up"
        time.sleep(0.5)
    stopped_late = time.time() - deadline
    assert stopped_late > -3, "powered off more than 3 s early"
    time.sleep(max(0.0, deadline - time.time() + 0.5))  # gc goes by the host's clock
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
