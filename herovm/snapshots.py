"""Snapshots of a VM (`herovm snapshot create|ls|restore|rm`): what the Manager's snapshot verbs do.

A running or paused VM's snapshot is its memory and device state plus a frozen disk layer, taken by the
backend (herovm.backends.base.Snapshots); a stopped VM's is its disk. Everything lies under the VM's
directory, 0600 files in `snapshots/` (0700), and a snapshot gets its name only when complete: an interrupted
one is a `.SNAP.partial` directory that the next create of that name, or `gc`, removes. docs/snapshots.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from . import disks, state
from .backends import Backend, require
from .backends.base import SavedState, Snapshots
from .errors import AlreadyExists, GuestError, HeroVMError, NotFound
from .progress import Progress
from .record import LastBoot, VMRecord, now

if TYPE_CHECKING:
    from .manager import Manager


def create(m: Manager, name: str, snap: str) -> dict:
    """Snapshot the VM as `snap` (a name like a VM's). A running or paused VM: its disk and its memory and
    device state, taken while it is paused for a moment; it runs on (or stays paused). A stopped VM: its
    disk. Files go under the VM's directory (0600) and only a complete snapshot gets its name: one
    interrupted leaves a `.SNAP.partial` directory that the next create of that name, or `gc`, removes.
    Returns the snapshot's row (see `snapshots`)."""
    saver = require(m.backend, Snapshots)
    state.validate_snapshot_name(snap)
    vmdir = state.VMDir(name)
    with vmdir.lock():
        machine = m.machine(name)
        if machine.state not in ("running", "paused", "stopped"):
            raise GuestError(
                f"VM {name} is {machine.state}: only a running, paused or stopped VM can be snapshotted"
            )
        final = vmdir.snapshots / snap
        if final.exists():
            raise AlreadyExists(
                f"VM {name} already has a snapshot {snap}",
                hint=f"pick another name, or remove it with `herovm snapshot rm {name} {snap}`",
            )
        state.ensure_dir(vmdir.snapshots, 0o700)
        partial = vmdir.snapshots / f".{snap}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(0o700)
        record = VMRecord.from_json(name, machine.metadata)
        what = "its disk" if machine.state == "stopped" else "its memory and disk"
        m.progress(Progress("snapshot", f"snapshotting {name} ({machine.state}): {what}"))
        started = time.monotonic()
        try:
            saved = saver.snapshot(name, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if saved.disk.parent != vmdir.path or (saved.memory and saved.memory.parent != partial):
            raise HeroVMError(f"the {m.backend.name} backend saved {name} outside its directory")
        taken = {
            "name": snap,
            "vm": name,
            "created": now(),
            "state": machine.state,
            "disk": saved.disk.name,
            "memory": saved.memory.name if saved.memory is not None else None,
            "last_boot": record.last_boot.to_json(),
            "seconds": round(time.monotonic() - started, 3),
        }
        state.write_private(partial / "snapshot.json", json.dumps(taken, indent=2, sort_keys=True))
        os.rename(partial, final)
        return row(vmdir, snap)


def listing(m: Manager, name: str | None = None) -> list[dict]:
    """The snapshots of one VM, or of every VM of this home: one row each (vm, name, created, kind
    "memory" or "disk", state: the VM's then, memory_bytes, disk_bytes: the frozen overlay's, seconds:
    how long taking it took), oldest first."""
    if name is not None:
        m.machine(name)  # NotFound
        names = [name]
    else:
        names = state.list_vm_dirs()
    rows = []
    for vm in names:
        vmdir = state.VMDir(vm)
        rows += [row(vmdir, snap) for snap in vmdir.snapshot_names()]
    return sorted(rows, key=lambda r: (r["created"] or "", r["vm"], r["name"]))


def restore(m: Manager, name: str, snap: str) -> dict:
    """Roll the VM back to its snapshot `snap`: its disk as it was then, and for a memory snapshot its
    running state (it runs on from that moment: processes, files; its clock is set to now). A disk
    snapshot leaves the VM stopped (`start` boots it). The snapshot stays, so it can be restored again.
    Returns the snapshot's row with the VM's `vm_state` now."""
    saver = require(m.backend, Snapshots)
    state.validate_snapshot_name(snap)
    vmdir = state.VMDir(name)
    with vmdir.lock():
        m.machine(name)
        taken = taken_record(vmdir, snap)
        saved = SavedState(
            vmdir.path / taken["disk"],
            vmdir.snapshots / snap / taken["memory"] if taken["memory"] else None,
        )
        what = "running from its memory" if saved.memory else "its disk (left stopped)"
        m.progress(Progress("restore", f"restoring {name} to {snap}: {what}"))
        saver.restore(name, saved)
        vmdir.mark_paused(False)
        if saved.memory is not None:
            m.set_guest_clock(name)
        record = VMRecord.from_json(name, m.machine(name).metadata)
        restored = {"snapshot": snap, "taken": taken["created"], "at": now()}
        if saved.memory is not None:  # the boot whose memory runs again: its console events count
            record = replace(record, last_boot=LastBoot.from_json(taken["last_boot"]))
        m.backend.set_metadata(name, replace(record, restored=restored).to_json())
        prune_disks(m.backend, vmdir)
        return {**row(vmdir, snap), "vm_state": m.machine(name).state}


def remove(m: Manager, name: str, snap: str) -> None:
    """Remove the VM's snapshot `snap`: its memory file, and its frozen disk unless the VM's disk or
    another snapshot's still lies on it."""
    require(m.backend, Snapshots)
    state.validate_snapshot_name(snap)
    vmdir = state.VMDir(name)
    with vmdir.lock():
        m.machine(name)
        taken_record(vmdir, snap)
        shutil.rmtree(vmdir.snapshots / snap)
        prune_disks(m.backend, vmdir)


def taken_record(vmdir: state.VMDir, snap: str) -> dict:
    """A snapshot's record; NotFound if the VM has no such snapshot."""
    path = vmdir.snapshots / snap / "snapshot.json"
    try:
        taken = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(
            f"VM {vmdir.name} has no snapshot {snap}", hint=f"see `herovm snapshot ls {vmdir.name}`"
        ) from None
    except (OSError, ValueError) as e:
        raise HeroVMError(f"snapshot {snap} of {vmdir.name} cannot be read: {e}") from e
    if not (
        isinstance(taken, dict)
        and isinstance(taken.get("disk"), str)
        and disks.OVERLAY_RE.match(taken["disk"])
        and taken.get("memory") in (None, "memory.save")
    ):
        raise HeroVMError(f"snapshot {snap} of {vmdir.name} is damaged ({path})")
    return taken


def row(vmdir: state.VMDir, snap: str) -> dict:
    taken = taken_record(vmdir, snap)

    memory = taken["memory"]
    return {
        "vm": vmdir.name,
        "name": snap,
        "created": taken.get("created"),
        "kind": "memory" if memory else "disk",
        "state": taken.get("state"),
        "memory_bytes": state.footprint(vmdir.snapshots / snap / memory) if memory else None,
        "disk_bytes": state.footprint(vmdir.path / taken["disk"]),
        "seconds": taken.get("seconds"),
    }


def prune_disks(backend: Backend, vmdir: state.VMDir) -> list[str]:
    """Remove the VM's overlays that neither its disk nor a snapshot needs (herovm.disks.prune)."""
    if not isinstance(backend, Snapshots):
        return []
    try:
        tops = [backend.disk(vmdir.name)]
        for snap in vmdir.snapshot_names():
            tops.append(vmdir.path / taken_record(vmdir, snap)["disk"])
    except HeroVMError:  # gone meanwhile, or a damaged snapshot: then nothing is certain, keep all
        return []
    return [p.name for p in disks.prune(vmdir.path, tops)]
