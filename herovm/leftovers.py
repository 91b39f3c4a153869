"""What crashed or killed herovm processes leave behind, found and removed (`herovm gc`).

Only this HEROVM_HOME's leftovers, and never a running or paused VM, nor anything a herovm process is
working on: each removal happens under the VM's lock, taken without waiting (docs/faults.md).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import clones, liveness, snapshots, state, templates
from .backends.base import UNREACHABLE, Snapshots
from .errors import Busy
from .record import VMRecord, epoch

if TYPE_CHECKING:
    from .manager import Manager


def collect(m: Manager) -> list[str]:
    """Remove what crashed or killed herovm processes left behind: VM directories without a domain,
    domains defined but never started whose directory is gone, lock files of VMs that are gone, partial
    snapshots, disk overlays that neither a VM nor its snapshots need (a killed restore's), partial
    templates and their builder VMs, clones that never took their identity, and fork layers no VM lies on.
    VMs whose time is up (`up --ttl`) are removed whatever their state. Other running and paused VMs are
    never touched (but a killed `template create`'s own VM and a killed clone),
    nor anything a herovm process is working on (its VM, template or the fork layers are locked)."""
    removed = templates.leftovers(m)  # first: a killed `template create`'s VM runs, and is garbage
    removed += half_made_clones(m)  # so is a clone whose `up --template` or `fork` was killed
    removed += expired(m)
    removed += orphaned_test_vms(m)
    machines = m.own_machines()
    for name in state.list_vm_dirs():
        if name in machines:
            continue
        vmdir = state.VMDir(name)
        try:
            with vmdir.lock(wait=0):
                machine = m.backend.get(name)
                if machine is None or not m.owns(machine):  # another home's domain of that name
                    vmdir.remove()
                    removed.append(f"directory of {name} (no domain)")
        except Busy:
            continue  # an `up` is creating it right now
    for name, machine in machines.items():
        if machine.state in ("running", "paused", UNREACHABLE):  # a host that does not answer: left as it is
            continue
        vmdir = state.VMDir(name)
        if not vmdir.exists():
            m.backend.undefine(name)
            removed.append(f"domain of {name} (no directory)")
        elif not VMRecord.from_json(name, machine.metadata).last_boot.to_json():
            try:
                with vmdir.lock(wait=0):
                    m.remove_held(name)
                    removed.append(f"{name} (defined by an `up` that never booted it)")
            except Busy:
                continue
    for name, machine in machines.items():  # what a killed `snapshot` or `snapshot restore` left
        if machine.state == UNREACHABLE:
            continue
        vmdir = state.VMDir(name)
        partial = sorted(vmdir.snapshots.glob(".*.partial")) if vmdir.snapshots.is_dir() else []
        if not partial and not isinstance(m.backend, Snapshots):
            continue
        try:
            with vmdir.lock(wait=0):
                for path in partial:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(f"partial snapshot {path.name[1:].removesuffix('.partial')} of {name}")
                if vmdir.exists():
                    removed += [
                        f"disk {disk} of {name} (nothing needs it)"
                        for disk in snapshots.prune_disks(m.backend, vmdir)
                    ]
        except Busy:
            continue
    removed += clones.remove_unused_layers(m)
    for name in state.stale_vm_locks():
        try:
            with state.VMDir(name).lock(wait=0):  # released with no directory: the file goes
                pass
            removed.append(f"lock file of {name}")
        except Busy:
            continue  # an `up` of that name holds it
    return removed


def half_made_clones(m: Manager) -> list[str]:
    """Clones whose making was killed (`up --template`, `fork`): their handover is still their last boot and
    nobody saw it end (no outcome, no duration; a handover that failed or timed out has one and is kept for
    inspection). Such a machine may run, from its origin's memory but without an identity of its own."""
    removed = []
    for name, machine in m.own_machines().items():
        if machine.state == UNREACHABLE or not _half_made(name, machine.metadata):
            continue
        try:
            with state.VMDir(name).lock(wait=0):  # a clone being made is held by its maker
                machine = m.backend.get(name)  # as it is now that nobody else can change it
                if machine is None or not m.owns(machine) or not _half_made(name, machine.metadata):
                    continue
                m.remove_held(name)
                removed.append(f"{name} (a clone whose making did not finish)")
        except Busy:
            continue
    return removed


def _half_made(name: str, metadata: dict) -> bool:
    record = VMRecord.from_json(name, metadata)
    boot = record.last_boot
    mark = record.extra.get(clones.HANDOVER_MARK)
    return mark is not None and mark == boot.nonce and boot.outcome is None and boot.seconds is None


def expired(m: Manager) -> list[str]:
    """Remove the VMs whose time is up (`up --ttl`), whatever their state: their guests powered themselves
    off at the deadline (a guest that could not is stopped here). One a herovm process holds is left."""

    def why(record: VMRecord) -> str | None:
        deadline = epoch(record.expires)
        return None if deadline is None or deadline > time.time() else f"its time was up at {record.expires}"

    return _remove_where(m, why)


def orphaned_test_vms(m: Manager) -> list[str]:
    """Remove the VMs a pytest session made (herovm.pytest_plugin marks them with its process) once that
    process is gone: a killed test run's. A VM kept for inspection (--herovm-keep-on-failure) is unmarked;
    a VM of a session that still runs, or one a herovm process holds, is left."""

    def why(record: VMRecord) -> str | None:
        mark = record.extra.get(liveness.SESSION_MARK)
        if mark is None or liveness.alive(mark):
            return None
        return f"made by a pytest session that is gone, pid {mark.get('pid')}"

    return _remove_where(m, why)


def _remove_where(m: Manager, why: Callable[[VMRecord], str | None]) -> list[str]:
    """Stop and remove each of this home's VMs for which `why` gives a reason, unless a herovm process holds
    it; returns "NAME (reason)" for each one removed."""
    removed = []
    for name, machine in m.own_machines().items():
        reason = why(VMRecord.from_json(name, machine.metadata))
        if reason is None or machine.state == UNREACHABLE:
            continue
        try:
            with state.VMDir(name).lock(wait=0):
                m.backend.destroy(name)
                m.remove_held(name)
            removed.append(f"{name} ({reason})")
        except Busy:
            continue
    return removed
