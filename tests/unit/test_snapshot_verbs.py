"""Snapshots (Manager.snapshot/snapshots/restore/remove_snapshot, `herovm snapshot ...`) over libvirt's test
driver with real qcow2 files: the disk snapshot of a stopped VM end to end, the overlay chain and what is
pruned, names and clashes, what an interrupted or killed create leaves and what `gc` removes, the records
and the CLI. The test driver cannot save a guest's memory: tests/integration/test_snapshots.py does, with a
real guest."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from specs import define_in_vmdir, unique
from typer.testing import CliRunner

from herovm import disks, snapshots, state
from herovm.backends import require
from herovm.backends.base import Snapshots
from herovm.backends.libvirt import LibvirtBackend
from herovm.cli import app
from herovm.errors import AlreadyExists, HeroVMError, InvalidInput, NotFound
from herovm.manager import Manager
from herovm.record import LastBoot, VMRecord

URI = "test:///default"


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


def qcow2(path: Path, base: Path | None = None) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    cmd += ["-F", "qcow2", "-b", str(base), str(path)] if base else [str(path), "1G"]
    subprocess.run(cmd, check=True)
    return path


def stopped_vm(backend: LibvirtBackend, tmp_path: Path) -> str:
    """A defined, stopped VM whose disk is a real overlay on a real base, as `up` makes it."""
    name = unique("sn")
    define_in_vmdir(backend, tmp_path, name, {"last_boot": {"nonce": "first", "outcome": "ready"}})
    base = tmp_path / f"{name}-base.qcow2"
    qcow2(base)
    disks.create_overlay(base, state.VMDir(name).disk, what=name)
    return name


def write(manager: Manager, name: str, text: bytes) -> None:
    """Stands for the guest writing its disk: a mark in the VM's current overlay file."""
    with open(manager.backend.disk(name), "ab") as f:  # type: ignore[attr-defined]
        f.write(text)


# ------------------------------------------------------------------------------------ the chain


def test_backing_files_chain_and_prune(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    a = qcow2(tmp_path / "disk.qcow2", base)
    b = qcow2(tmp_path / "disk-0000000b.qcow2", a)
    c = qcow2(tmp_path / "disk-0000000c.qcow2", a)
    stray = qcow2(tmp_path / "disk-0000000d.qcow2", base)
    (tmp_path / "notes.txt").write_text("not an overlay: never pruned")
    assert disks.backing_file(base) is None and disks.backing_file(b) == a
    assert disks.chain(b) == [b, a, base]
    assert disks.prune(tmp_path, [b]) == [c, stray]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", b.name, "disk.qcow2", "notes.txt"]
    (tmp_path / "notes.txt").write_bytes(b"QFI\xfb")
    assert disks.prune(tmp_path, [tmp_path / "notes.txt"]) == [], "an unreadable chain prunes nothing"
    with pytest.raises(HeroVMError, match="is not a qcow2 disk"):
        disks.chain(tmp_path / "notes.txt")


# ----------------------------------------------------------------------- a stopped VM's disk


def test_libvirt_has_snapshots(backend: LibvirtBackend) -> None:
    assert require(backend, Snapshots) is backend


def test_disk_snapshot_restore_and_rm_of_a_stopped_vm(manager: Manager, backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    vmdir = state.VMDir(name)
    write(manager, name, b"one")
    row = manager.snapshot(name, "d1")
    assert row == {
        "vm": name,
        "name": "d1",
        "created": row["created"],
        "kind": "disk",
        "state": "stopped",
        "memory_bytes": None,
        "disk_bytes": row["disk_bytes"],
        "seconds": row["seconds"],
    }
    frozen = vmdir.disk
    assert backend.disk(name) != frozen and disks.backing_file(backend.disk(name)) == frozen
    assert frozen.read_bytes().endswith(b"one")
    for path in [vmdir.snapshots, *vmdir.snapshots.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    taken = json.loads((vmdir.snapshots / "d1" / "snapshot.json").read_text())
    assert (taken["disk"], taken["memory"], taken["last_boot"]) == (
        "disk.qcow2",
        None,
        {"nonce": "first", "outcome": "ready"},
    )

    write(manager, name, b"two")  # after the snapshot: into the new overlay, never into the frozen disk
    assert frozen.read_bytes().endswith(b"one")
    after = backend.disk(name)
    restored = manager.restore(name, "d1")
    assert restored["vm_state"] == "stopped" and restored["name"] == "d1"
    assert backend.disk(name) not in (after, frozen) and disks.backing_file(backend.disk(name)) == frozen
    assert not after.exists(), "the overlay it replaced is pruned: nothing needs it"
    record = manager.record(name)
    assert record.restored and record.restored["snapshot"] == "d1"
    assert record.last_boot.nonce == "first"  # a disk restore boots nothing
    assert manager.status(name)["restored"] == record.restored

    assert [r["name"] for r in manager.snapshots(name)] == ["d1"]
    manager.remove_snapshot(name, "d1")
    assert manager.snapshots(name) == [] and not (vmdir.snapshots / "d1").exists()
    assert frozen.exists(), "the VM's disk still lies on it"
    manager.down(name)
    assert not vmdir.path.exists()


def test_a_chain_of_snapshots_keeps_what_is_needed(manager: Manager, backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    vmdir = state.VMDir(name)
    layers = []
    for snap in ("s1", "s2", "s3"):
        layers.append(backend.disk(name))
        manager.snapshot(name, snap)
    manager.restore(name, "s1")  # a branch: the VM now lies on s1's disk; s2 and s3 keep theirs
    overlays = {p.name for p in vmdir.path.glob("disk*.qcow2")}
    assert {p.name for p in layers} | {backend.disk(name).name} == overlays
    manager.remove_snapshot(name, "s3")  # its disk lay on s2's, which s2 still needs: only s3's goes
    assert not layers[2].exists() and layers[1].exists()
    manager.remove_snapshot(name, "s2")
    assert not layers[1].exists() and layers[0].exists()
    manager.remove_snapshot(name, "s1")
    assert layers[0].exists(), "the VM's own disk lies on it"
    assert len(disks.chain(backend.disk(name))) == 3  # its overlay, s1's disk, the base


def test_names_clashes_and_unknowns(manager: Manager, backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    manager.snapshot(name, "s1")
    with pytest.raises(AlreadyExists) as info:
        manager.snapshot(name, "s1")
    assert info.value.message == f"VM {name} already has a snapshot s1" and info.value.exit_code == 4
    for bad in ("S1", "../x", "-a", "", "a" * 41, ".s1.partial"):
        with pytest.raises(InvalidInput, match="invalid snapshot name") as info:
            manager.snapshot(name, bad)
        assert info.value.exit_code == 2
    for verb in (manager.restore, manager.remove_snapshot):
        with pytest.raises(NotFound) as info:
            verb(name, "nope")
        assert info.value.message == f"VM {name} has no snapshot nope" and info.value.exit_code == 3
        with pytest.raises(NotFound, match="VM ghost not found"):
            verb("ghost", "s1")
    with pytest.raises(NotFound, match="VM ghost not found"):
        manager.snapshot("ghost", "s1")
    with pytest.raises(NotFound):
        manager.snapshots("ghost")


def test_snapshots_of_every_vm(manager: Manager, backend, tmp_path: Path) -> None:
    a, b = stopped_vm(backend, tmp_path), stopped_vm(backend, tmp_path)
    manager.snapshot(a, "x")
    manager.snapshot(b, "y")
    assert {(r["vm"], r["name"]) for r in manager.snapshots()} == {(a, "x"), (b, "y")}
    assert [r["name"] for r in manager.snapshots(b)] == ["y"]


# ------------------------------------------------------------------- interrupted, failed, killed


def test_a_failed_or_interrupted_create_leaves_nothing(manager, backend, tmp_path, monkeypatch) -> None:
    name = unique("sn")
    define_in_vmdir(backend, tmp_path, name, {})
    backend.start(name)  # the test driver refuses libvirt's external snapshot: a failure, for real
    with pytest.raises(HeroVMError, match=f"libvirt failed while snapshotting {name}"):
        manager.snapshot(name, "s1")
    vmdir = state.VMDir(name)
    assert list(vmdir.snapshots.iterdir()) == [] and manager.snapshots(name) == []
    backend.destroy(name)

    def interrupted(name: str, directory: Path):
        (directory / "memory.save").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "snapshot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        manager.snapshot(name, "s1")
    assert list(vmdir.snapshots.iterdir()) == []


def test_gc_removes_what_a_killed_create_or_restore_left(manager, backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    manager.snapshot(name, "keep")
    vmdir = state.VMDir(name)
    partial = vmdir.snapshots / ".s2.partial"  # a create killed before it could finish or clean up
    partial.mkdir()
    (partial / "memory.save").write_bytes(b"half")
    stray = vmdir.path / "disk-0badf00d.qcow2"  # a restore killed after it made its overlay
    disks.create_overlay(vmdir.disk, stray, what=name)
    assert [r["name"] for r in manager.snapshots(name)] == ["keep"]
    assert sorted(manager.gc()) == [
        f"disk disk-0badf00d.qcow2 of {name} (nothing needs it)",
        f"partial snapshot s2 of {name}",
    ]
    assert not partial.exists() and not stray.exists()
    assert vmdir.disk.exists() and backend.disk(name).exists() and (vmdir.snapshots / "keep").exists()
    assert manager.gc() == []
    # a create of the same name also clears it first
    partial.mkdir()
    manager.snapshot(name, "s2")
    assert not partial.exists() and (vmdir.snapshots / "s2").is_dir()


def test_gc_leaves_a_vm_that_someone_works_on(manager, backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    vmdir = state.VMDir(name)
    vmdir.snapshots.mkdir(mode=0o700)
    (vmdir.snapshots / ".s1.partial").mkdir()
    with vmdir.lock():  # a `snapshot create` in progress
        assert manager.gc() == []
    assert (vmdir.snapshots / ".s1.partial").exists()


def test_a_damaged_record_is_said_and_prunes_nothing(manager, backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    manager.snapshot(name, "s1")
    vmdir = state.VMDir(name)
    (vmdir.snapshots / "s1" / "snapshot.json").write_text(json.dumps({"disk": "../../etc/passwd"}))
    with pytest.raises(HeroVMError, match="snapshot s1 of .* is damaged"):
        manager.restore(name, "s1")
    assert snapshots.prune_disks(manager.backend, vmdir) == [] and vmdir.disk.exists()


# ------------------------------------------------------------------------------------ records


def test_the_record_says_restored_until_the_next_boot() -> None:
    record = VMRecord.from_json("box", {"last_boot": {"nonce": "a"}, "restored": {"snapshot": "s1"}})
    assert record.restored == {"snapshot": "s1"} and record.to_json()["restored"] == {"snapshot": "s1"}
    booted = record.booted(LastBoot(nonce="b"))
    assert booted.restored is None and "restored" not in booted.to_json()
    assert "restored" not in VMRecord.from_json("box", {}).to_json()


# ------------------------------------------------------------------------------------------ CLI


def run(*args: str):
    return CliRunner().invoke(app, ["--connect", URI, *args])


def test_cli_create_ls_restore_rm(backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    r = run("snapshot", "create", name, "d1")
    assert r.exit_code == 0 and r.stdout.startswith(f"snapshot d1 of {name} taken in ")
    assert r.stdout.endswith("s (disk)\n")
    r = run("snapshot", "create", name, "d1")
    assert (r.exit_code, r.stderr.splitlines()[0]) == (
        4,
        f"herovm: error: VM {name} already has a snapshot d1",
    )
    r = run("snapshot", "ls", name)
    assert r.stdout.splitlines()[0].split() == [
        "VM",
        "SNAPSHOT",
        "KIND",
        "CREATED",
        "MEMORY",
        "DISK",
        "SECONDS",
    ]
    assert r.stdout.splitlines()[1].split()[:3] == [name, "d1", "disk"]
    rows = json.loads(run("snapshot", "ls", "--json").stdout)
    assert [(x["vm"], x["name"], x["kind"]) for x in rows] == [(name, "d1", "disk")]
    r = run("snapshot", "restore", name, "d1")
    assert r.exit_code == 0 and r.stdout.endswith(f"stopped (`herovm start {name}` boots it)\n")
    r = run("snapshot", "restore", name, "d1", "--json")
    assert json.loads(r.stdout)["vm_state"] == "stopped"
    r = run("snapshot", "rm", name, "d1", "--json")
    assert (r.exit_code, json.loads(r.stdout)) == (0, {"removed": "d1", "vm": name})
    r = run("snapshot", "ls", name)
    assert r.stdout == f"no snapshots (take one with `herovm snapshot create {name} SNAP`)\n"


def test_cli_exit_codes(backend, tmp_path: Path) -> None:
    name = stopped_vm(backend, tmp_path)
    for args, code, first in (
        (("create", "ghost", "s1"), 3, "herovm: error: VM ghost not found"),
        (("restore", name, "nope"), 3, f"herovm: error: VM {name} has no snapshot nope"),
        (("rm", name, "nope"), 3, f"herovm: error: VM {name} has no snapshot nope"),
        (("create", name, "Bad_Name"), 2, "herovm: error: invalid snapshot name 'Bad_Name'"),
        (("ls", "Bad_Name"), 2, "herovm: error: invalid VM name 'Bad_Name'"),
    ):
        r = run("snapshot", *args)
        assert (r.exit_code, r.stderr.splitlines()[0]) == (code, first), args
    r = run("snapshot", "restore", name, "nope", "--json")
    assert r.exit_code == 3 and json.loads(r.stdout)["error"] == "NotFound"
    assert os.listdir(state.VMDir(name).path)  # nothing above removed anything
