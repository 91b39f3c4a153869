"""CloudHypervisorBackend's Snapshots and Clones against the stand-in VMM: what each leaves on disk, which
VMM runs afterwards, what a failure leaves (nothing), and that a snapshot is only ever read."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from herovm import disks, state
from herovm.backends.base import Clones, MachineSpec, SavedState, Snapshots
from herovm.backends.cloud_hypervisor import CloudHypervisorBackend, CloudHypervisorError
from herovm.errors import AlreadyExists, InvalidInput, NotFound

from .conftest import StandIn, alive, needs_qemu_img

pytestmark = needs_qemu_img


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pid(b: CloudHypervisorBackend, name: str) -> int | None:
    return json.loads((b.state_dir() / f"{name}.json").read_text())["pid"]


def config(b: CloudHypervisorBackend, name: str) -> dict:
    return json.loads((b.state_dir() / f"{name}.json").read_text())["config"]


def snapdir(name: str, snap: str) -> Path:
    path = state.VMDir(name).snapshots / snap
    path.mkdir(parents=True, mode=0o700)
    return path


def files(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `path`, with its bytes and mode: a snapshot that must stay as it is."""
    return {
        str(p.relative_to(path)): (p.read_bytes(), mode(p)) for p in sorted(path.rglob("*")) if p.is_file()
    }


def console(spec: MachineSpec) -> str:
    return spec.console_log.read_text()


def running_box(standin: StandIn) -> tuple[CloudHypervisorBackend, MachineSpec]:
    b = standin.backend()
    spec = standin.spec(qcow2=True)
    b.define(spec)
    b.start("box")
    return b, spec


def clone_spec(standin: StandIn, name: str, frozen: Path) -> MachineSpec:
    """What the Manager hands `clone`: a new VM directory, its disk an overlay on the frozen disk."""
    spec = standin.spec(name, metadata={"name": name, "cloned_from": "box/s1"})
    spec.disk.unlink()
    disks.create_overlay(frozen, spec.disk, what=name)
    return spec


def leftovers(vmdir: Path) -> list[str]:
    return sorted(p.name for p in vmdir.iterdir() if p.name.startswith(".ch-restore"))


def test_the_backend_has_both_capabilities(standin: StandIn) -> None:
    b = standin.backend()
    assert isinstance(b, Snapshots) and isinstance(b, Clones)


def test_snapshot_of_a_running_vm(standin: StandIn) -> None:
    b, spec = running_box(standin)
    first = pid(b, "box")
    booted = console(spec).split()[-1]
    start = len(standin.endpoints())
    saved = b.snapshot("box", snapdir("box", "s1"))

    memory = spec.disk.parent / "snapshots/s1/memory.save"
    assert saved.memory == memory and mode(memory) == 0o700
    assert sorted(p.name for p in memory.iterdir()) == ["config.json", "memory-ranges", "state.json"]
    assert all(mode(p) == 0o600 for p in memory.iterdir())
    assert (memory / "memory-ranges").read_text() == booted  # the guest's memory, as the VMM saved it
    # the frozen disk: a copy of the overlay as it was, beside it; the VM goes on writing its own file
    assert saved.disk.parent == spec.disk.parent and disks.OVERLAY_RE.match(saved.disk.name)
    assert saved.disk != spec.disk and mode(saved.disk) == 0o600
    assert saved.disk.read_bytes() == spec.disk.read_bytes()
    assert disks.backing_file(saved.disk) == standin.base_image()
    assert b.disk("box") == spec.disk
    assert standin.endpoints()[start:] == ["vm.info", "vm.pause", "vm.snapshot", "vm.resume"]
    assert b.get("box").state == "running" and pid(b, "box") == first  # the same VMM ran on
    before = saved.disk.read_bytes()
    with open(spec.disk, "ab") as f:  # the guest writes on
        f.write(b"written after the snapshot")
    assert saved.disk.read_bytes() == before
    b.undefine("box")


def test_snapshot_of_a_paused_vm_leaves_it_paused(standin: StandIn) -> None:
    b, spec = running_box(standin)
    b.pause("box")
    start = len(standin.endpoints())
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert standin.endpoints()[start:] == ["vm.info", "vm.snapshot"]
    assert b.get("box").state == "paused" and saved.memory is not None
    assert saved.disk.read_bytes() == spec.disk.read_bytes()
    b.undefine("box")


@pytest.mark.parametrize("vmm", ["created", "none"])
def test_snapshot_of_a_stopped_vm_freezes_its_disk(standin: StandIn, vmm: str) -> None:
    """As on libvirt: the disk is frozen and a new overlay on it is the VM's disk, in its config; a VMM that
    holds the created VM (with the old disk in its config) ends, so the next start uses the new one."""
    b = standin.backend()
    spec = standin.spec(qcow2=True)
    b.define(spec)  # a VMM with the VM created, not booted
    if vmm == "none":
        b.destroy("box")
    held = pid(b, "box")
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved == SavedState(spec.disk)
    new = b.disk("box")
    assert new != spec.disk and new.parent == spec.disk.parent and mode(new) == 0o600
    assert disks.backing_file(new) == spec.disk
    assert config(b, "box")["disks"][0]["path"] == str(new)
    assert list((spec.disk.parent / "snapshots/s1").iterdir()) == []  # no memory
    assert held is None or not alive(held)
    assert b.get("box").state == "stopped"
    b.start("box")
    vm_config = b._api(json.loads((b.state_dir() / "box.json").read_text()), "GET", "vm.info")["config"]
    assert vm_config["disks"][0]["path"] == str(new)  # booted on the new overlay
    b.undefine("box")


def test_restore_with_memory_runs_a_new_vmm_on_a_new_overlay(standin: StandIn) -> None:
    b, spec = running_box(standin)
    booted = console(spec).split()[-1]
    saved = b.snapshot("box", snapdir("box", "s1"))
    kept = files(spec.disk.parent / "snapshots/s1")
    first = pid(b, "box")
    b.restore("box", saved)

    new = b.disk("box")
    assert new not in (spec.disk, saved.disk) and disks.backing_file(new) == saved.disk
    assert mode(new) == 0o600 and config(b, "box")["disks"][0]["path"] == str(new)
    assert not alive(first) and alive(pid(b, "box")) and b.get("box").state == "running"
    assert console(spec).endswith(f"restored {booted}\n")  # the memory of the boot that was snapshotted
    restored = next(r for r in standin.requests() if r["path"].endswith("vm.restore"))
    source = Path(restored["body"]["source_url"].removeprefix("file://"))
    assert source.parent == spec.disk.parent and not source.exists()  # an edited copy, gone again
    assert files(spec.disk.parent / "snapshots/s1") == kept  # the snapshot itself is only read
    assert leftovers(spec.disk.parent) == []
    assert standin.endpoints()[-4:] == ["vmm.ping", "vm.restore", "vm.resume", "vm.info"]
    b.restore("box", saved)  # again: the snapshot stays usable
    assert b.get("box").state == "running" and b.disk("box") not in (new, saved.disk)
    b.undefine("box")


def test_restore_of_a_disk_snapshot_leaves_the_vm_stopped(standin: StandIn) -> None:
    b, spec = running_box(standin)
    b.destroy("box")
    saved = b.snapshot("box", snapdir("box", "s1"))
    b.start("box")
    running = pid(b, "box")
    b.restore("box", saved)
    assert not alive(running) and b.get("box").state == "stopped" and pid(b, "box") is None
    new = b.disk("box")
    assert disks.backing_file(new) == saved.disk and new != spec.disk
    b.start("box")  # boots on the new overlay
    assert b.get("box").state == "running" and "booted" in console(spec)
    b.undefine("box")


def test_two_clones_of_one_snapshot(standin: StandIn) -> None:
    b, spec = running_box(standin)
    booted = console(spec).split()[-1]
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved.memory is not None
    kept = files(saved.memory)
    specs = [clone_spec(standin, name, saved.disk) for name in ("c1", "c2")]
    for s in specs:
        b.clone(s, saved.memory)

    assert [m.name for m in b.list()] == ["box", "c1", "c2"]
    pids = {pid(b, n) for n in ("box", "c1", "c2")}
    assert len(pids) == 3 and all(alive(p) for p in pids)
    for s in specs:
        machine = b.get(s.name)
        assert machine is not None and machine.state == "running"
        assert machine.metadata == {"name": s.name, "cloned_from": "box/s1"}
        assert b.disk(s.name) == s.disk and disks.backing_file(s.disk) == saved.disk
        assert console(s).endswith(f"restored {booted}\n")
        assert mode(b.state_dir() / f"{s.name}.json") == 0o600
        assert leftovers(s.disk.parent) == []
        st = json.loads((b.state_dir() / f"{s.name}.json").read_text())
        assert st["vsock_socket"] == str(s.disk.parent / "vsock.sock")
        assert st["api_socket"] == str(s.disk.parent / "ch-api.sock")
        restored = b._api(st, "GET", "vm.info")["config"]  # what the clone's VMM runs with: its own files
        assert [d["path"] for d in restored["disks"]] == [str(s.disk), str(s.drive)]
        assert restored["vsock"]["socket"] == st["vsock_socket"]
        assert restored["serial"]["file"] == str(s.console_log)
    assert files(saved.memory) == kept
    assert b.get("box").state == "running" and b.disk("box") == spec.disk

    b.pause("c1")  # a VM like any other
    assert b.get("c1").state == "paused" and b.get("c2").state == "running"
    b.destroy("c1")
    assert b.get("c1").state == "stopped"
    b.start("c1")  # a cold boot of its own config
    assert b.get("c1").state == "running" and "booted" in console(specs[0])
    for name in ("c1", "c2", "box"):
        b.undefine(name)
    assert b.list() == []


def test_a_clone_of_an_existing_name_touches_nothing(standin: StandIn) -> None:
    b, spec = running_box(standin)
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved.memory is not None
    before = (b.state_dir() / "box.json").read_text()
    with pytest.raises(AlreadyExists):
        b.clone(spec, saved.memory)
    assert (b.state_dir() / "box.json").read_text() == before and b.get("box").state == "running"
    b.undefine("box")


def test_a_clone_the_vmm_cannot_restore_leaves_nothing(standin: StandIn, monkeypatch) -> None:
    b, spec = running_box(standin)
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved.memory is not None
    kept = files(saved.memory)
    c1 = clone_spec(standin, "c1", saved.disk)
    monkeypatch.setenv("FAKE_CH_FAIL", "vm.restore:500")  # for the VMMs started from now on
    with pytest.raises(CloudHypervisorError, match="injected failure of vm.restore"):
        b.clone(c1, saved.memory)
    assert b.get("c1") is None and not (b.state_dir() / "c1.json").exists()
    assert leftovers(c1.disk.parent) == []
    assert not any(
        (c1.disk.parent / f).exists() for f in ("ch-api.sock", "vsock.sock", "cloud-hypervisor.pid")
    )
    assert files(saved.memory) == kept
    assert [m.name for m in b.list()] == ["box"] and b.get("box").state == "running"
    b.undefine("box")


def test_a_clone_on_a_disk_in_use_fails_and_leaves_nothing(standin: StandIn) -> None:
    """The restored VMM cannot open its disk: here the running VM's own overlay (a hard link of it in the
    clone's directory), which that VMM holds."""
    b, spec = running_box(standin)
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved.memory is not None
    c1 = standin.spec("c1")
    c1.disk.unlink()
    c1.disk.hardlink_to(spec.disk)
    with pytest.raises(CloudHypervisorError, match="in use"):
        b.clone(c1, saved.memory)
    assert b.get("c1") is None and leftovers(c1.disk.parent) == []
    assert not (c1.disk.parent / "ch-api.sock").exists() and not (c1.disk.parent / "vsock.sock").exists()
    assert b.get("box").state == "running"
    b.undefine("box")


def test_a_clone_of_other_sizes_or_no_snapshot_is_refused(standin: StandIn) -> None:
    b, spec = running_box(standin)
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved.memory is not None
    spawned = len(standin.pids())
    with pytest.raises(InvalidInput, match="cpus boot_vcpus 2, this one 4"):
        b.clone(replace(clone_spec(standin, "c1", saved.disk), cpus=4), saved.memory)
    with pytest.raises(InvalidInput, match="not a Cloud Hypervisor snapshot"):
        b.clone(clone_spec(standin, "c2", saved.disk), standin.home)
    with pytest.raises(InvalidInput, match="no network device"):
        b.clone(standin.spec("c3", net="nat"), saved.memory)
    assert [m.name for m in b.list()] == ["box"] and len(standin.pids()) == spawned
    b.undefine("box")


def test_a_failed_restore_leaves_the_vm_stopped_on_the_snapshots_disk(standin: StandIn, monkeypatch) -> None:
    b, spec = running_box(standin)
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved.memory is not None
    kept = files(saved.memory)
    first = pid(b, "box")
    monkeypatch.setenv("FAKE_CH_FAIL", "vm.restore:500")
    with pytest.raises(CloudHypervisorError, match="injected failure of vm.restore"):
        b.restore("box", saved)
    assert not alive(first) and pid(b, "box") is None and b.get("box").state == "stopped"
    assert disks.backing_file(b.disk("box")) == saved.disk
    assert leftovers(spec.disk.parent) == [] and files(saved.memory) == kept
    b.undefine("box")


def test_a_failed_vm_snapshot_resumes_the_vm_and_leaves_no_disk(standin: StandIn, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_CH_FAIL", "vm.snapshot:500")
    b, spec = running_box(standin)
    overlays = sorted(spec.disk.parent.glob("disk*.qcow2"))
    with pytest.raises(CloudHypervisorError, match="injected failure of vm.snapshot"):
        b.snapshot("box", snapdir("box", "s1"))
    assert b.get("box").state == "running"
    assert sorted(spec.disk.parent.glob("disk*.qcow2")) == overlays
    b.undefine("box")


def test_restore_and_disk_of_an_unknown_vm(standin: StandIn) -> None:
    b = standin.backend()
    with pytest.raises(NotFound):
        b.disk("nope")
    with pytest.raises(NotFound):
        b.snapshot("nope", standin.home)
    with pytest.raises(NotFound):
        b.restore("nope", SavedState(standin.home / "disk.qcow2"))


def test_a_restore_from_another_machines_snapshot_changes_nothing(standin: StandIn) -> None:
    b, spec = running_box(standin)
    saved = b.snapshot("box", snapdir("box", "s1"))
    assert saved.memory is not None
    other = standin.home / "other"
    other.mkdir()
    snap = json.loads((saved.memory / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**snap, "memory": {"size": 1 << 30}}))
    running = pid(b, "box")
    with pytest.raises(InvalidInput, match="memory size 1073741824, this one 536870912"):
        b.restore("box", SavedState(saved.disk, other))
    assert pid(b, "box") == running and b.get("box").state == "running" and b.disk("box") == spec.disk
    b.undefine("box")
