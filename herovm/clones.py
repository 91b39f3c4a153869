"""Clones: VMs that begin as another VM's running memory instead of a boot. `herovm up --template` makes
them from a template (herovm.templates), `herovm fork` from a running VM.

A clone is a VM like any other from its first moment: a directory, keys and an exec token of its own, its
own forwarded port and machine (herovm.backends.base.Clones), a disk that is a new overlay on a frozen
layer. The backend restores the snapshotted memory into it; the host then hands the guest its identity over
the agent channel (herovm.boot.Boot.handover, docs/protocol.md "Identity after a restore") and the clone
counts as ready only when the agent has taken it.

A fork's layer. The source's disk is frozen by its snapshot, and a fork's clones must outlive the source, so
the frozen disk becomes a layer of its own in HEROVM_HOME/layers/: a hard link to it when it lies directly on
the image (a VM that was never snapshotted), else a copy of what it holds above the image (`qemu-img convert
-B`). `gc` removes a layer no VM's disk lies on any more.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import disks, ports, state
from .backends import require
from .backends.base import Clones, Snapshots
from .errors import AlreadyExists, Busy, GuestError, HeroVMError, InvalidInput, NotFound
from .progress import Progress
from .record import LastBoot, VMRecord, after, now
from .vm import VM

if TYPE_CHECKING:
    from .images import Image
    from .manager import Manager

HANDOVER_TIMEOUT_S = 60.0  # a restored guest takes its identity in tenths of a second under TCG
# In a clone's record: the nonce of the handover that makes it. While that is its last boot and nobody saw
# the boot end, the clone is half made: `gc` removes it once no herovm holds it (herovm.leftovers).
HANDOVER_MARK = "handover"


@dataclass(frozen=True)
class Origin:
    """What clones are made from: a memory snapshot (only ever read), the frozen disk their overlays lie on,
    and the snapshotted VM's record and local facts, which a clone inherits (image, settings, bootstrap)."""

    memory: Path
    disk: Path
    record: VMRecord
    local: dict  # vm.json's local part: the bootstrap entry and variables, for the clone's later boots
    secrets: dict[str, str]
    origin: dict  # what the clone records as its origin: {"template": NAME} or {"fork": SOURCE, "at": T}

    def describe(self) -> str:
        return (
            f"template {self.origin['template']}" if "template" in self.origin else f"{self.origin['fork']}"
        )


def image_of(record: VMRecord, what: str, hint: str) -> Image:
    """The cached image a snapshotted VM ran: its clones boot that kernel on their later boots."""
    from . import images

    found = images.cached(record.image or "", record.image_id or "")
    if found is None:
        raise NotFound(
            f"{what} was made from image {record.image}/{record.image_id}, which is gone", hint=hint
        )
    return found


def make(
    m: Manager,
    name: str,
    origin: Origin,
    image: Image,
    *,
    keep_failed: bool = False,
    publish: tuple = (),
    ttl: float | None = None,
    marks: dict | None = None,
) -> VM:
    """Make VM `name` from `origin`, ready once its agent has taken its own identity. Nothing of it is left
    if that fails (unless `keep_failed`). It publishes each guest port its origin did, on its own host port,
    and `publish` (herovm.ports.for_clone); `ttl`: seconds until its time is up (as `up --ttl`)."""
    cloner = require(m.backend, Clones)
    state.validate_name(name)
    vmdir = state.VMDir(name)
    with vmdir.lock(wait=0):
        if m.backend.get(name) is not None:
            raise AlreadyExists(
                f"VM {name} already exists", hint=f"pick another name or remove it with `herovm down {name}`"
            )
        if vmdir.exists():  # left by a crashed herovm: there is no such VM
            vmdir.remove()
        try:
            record, nonce = _create(m, vmdir, origin, image, publish, ttl, marks or {})
            m.progress(Progress("clone", f"restoring {name} from {origin.describe()}"))
            cloner.clone(m.machine_spec(vmdir, image, record), origin.memory)
            record = m.booter().handover(vmdir, record, nonce, HANDOVER_TIMEOUT_S)
        except BaseException:
            if not keep_failed:
                m.remove_held(name)
            raise
    return VM(m, record)


def _create(
    m: Manager,
    vmdir: state.VMDir,
    origin: Origin,
    image: Image,
    publish: tuple,
    ttl: float | None,
    marks: dict,
) -> tuple[VMRecord, str]:
    """The clone's directory: its own keys, exec token, overlay, port, record and config drive (what its
    later boots read). Returns the record, with the nonce of its handover as its last boot's."""
    from .guest import keys

    name = vmdir.name
    vmdir.create()
    if origin.secrets:
        vmdir.write_secrets(origin.secrets)
    client_pub = keys.generate_keypair(vmdir.client_key, comment=f"herovm-client@{name}")
    host_pub = keys.generate_keypair(vmdir.host_key, comment=f"herovm-host@{name}")
    keys.generate_token(vmdir.exec_token)
    disks.create_overlay(origin.disk, vmdir.disk, what=name)
    settings = origin.record.settings
    with state.named_lock("ports"):
        wanted = ports.for_clone(origin.record.ports, ports.parse_publish(publish))
        on = m.on_host(origin.record.host or "local")  # its host: the template's copy's
        port, published = ports.allocate(on, settings.net if settings else "nat", wanted)
        if settings is not None:
            settings = replace(settings, publish=tuple(p.text() for p in wanted))
        record = replace(
            origin.record,
            name=name,
            settings=settings,
            ssh_port=port,
            ports=published,
            host_key=host_pub,
            client_key=client_pub,
            created=now(),
            backend=m.backend.name,
            home=str(state.home()),
            last_boot=LastBoot(),
            restored=None,
            origin=origin.origin,
            expires=after(ttl) if ttl else None,  # never the snapshotted VM's
            extra={},
        )
        vmdir.write_meta({**record.to_json(), **origin.local})
        nonce = m.booter().write_drive(vmdir, record)
        # recorded before the guest runs, as for a boot: `status` tells this VM's events by it
        record = replace(
            record.booted(LastBoot(nonce=nonce, started=now())), extra={**marks, HANDOVER_MARK: nonce}
        )
        m.progress(Progress("define", f"defining {name} (port {port})"))
    return record, nonce


def local_facts(vmdir: state.VMDir) -> dict:
    """The part of a VM's vm.json that is not its record: what its later boots need."""
    meta = vmdir.read_meta()
    return {k: meta[k] for k in ("bootstrap_entry", "vars") if k in meta}


# ------------------------------------------------------------------------------------------------- fork


def layers_dir() -> Path:
    return state.ensure_dir(state.vms_dir().parent / "layers", 0o711)


def fork(m: Manager, source: str, names: list[str]) -> dict:
    """New VMs `names` from the running (or paused) VM `source`, each holding its memory and disk as they
    were at the fork; the source runs on (paused for the snapshot: `source_pause_seconds`)."""
    saver = require(m.backend, Snapshots)
    require(m.backend, Clones)
    if not names:
        raise InvalidInput("name at least one new VM", hint=f"herovm fork {source} NEW [NEW...]")
    for name in names:
        state.validate_name(name)
    if len(set(names)) != len(names) or source in names:
        raise InvalidInput("the new VMs need names of their own", hint="each NEW once, none the source's")
    taken = [n for n in names if m.backend.get(n) is not None]
    if taken:
        raise AlreadyExists(f"VM {taken[0]} already exists", hint="pick another name")
    src_dir = state.VMDir(source)
    # Held until every clone's disk lies on the new layer: `gc` collects layers only when it can take it.
    with state.named_lock("layers", what="the fork layers (another fork)"):
        work = layers_dir() / f".fork-{secrets.token_hex(4)}.partial"
        work.mkdir(0o700)
        try:
            with src_dir.lock():
                machine = m.machine(source)
                if machine.state not in ("running", "paused"):
                    raise GuestError(
                        f"VM {source} is {machine.state}: only a running or paused VM can be forked",
                        hint=f"start it with `herovm start {source}`",
                    )
                record = VMRecord.from_json(source, machine.metadata)
                image = image_of(record, f"VM {source}", "its image was removed: the fork cannot boot later")
                m.progress(Progress("fork", f"snapshotting {source}: its memory and disk"))
                started = time.monotonic()
                saved = saver.snapshot(source, work)
                pause_s = round(time.monotonic() - started, 3)
                layer = make_layer(saved.disk, work)
                origin = Origin(
                    memory=saved.memory,  # type: ignore[arg-type]  # a running VM's snapshot has its memory
                    disk=layer,
                    record=record,
                    local=local_facts(src_dir),
                    secrets=src_dir.read_secrets(),
                    # a fork of a template's clone maps that template's memory file when it starts from
                    # memory (SharedMemory): it names the template too, so the template stays while it is
                    origin={"fork": source, "at": now(), **_template_of(record)},
                )
            clones = []
            for name in names:
                t = time.monotonic()
                vm = make(m, name, origin, image)
                clones.append({"name": vm.name, "seconds": round(time.monotonic() - t, 3)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"source": source, "source_pause_seconds": pause_s, "clones": clones}


def _template_of(record: VMRecord) -> dict:
    """{"template": T} when the VM began as template T's clone (or a fork of one), else {}."""
    template = (record.origin or {}).get("template")
    return {"template": template} if isinstance(template, str) else {}


def make_layer(frozen: Path, work: Path) -> Path:
    """The frozen disk as a layer of its own in layers/ (see the module's docstring), made in `work` first."""
    chain = disks.chain(frozen)
    layer = layers_dir() / f"{secrets.token_hex(8)}.qcow2"
    tmp = work / layer.name
    if len(chain) == 2:  # it lies on the image: it is never written again, so it can be shared as it is
        try:
            os.link(frozen, tmp)
        except OSError:
            shutil.copyfile(frozen, tmp)
    else:
        cmd = ["qemu-img", "convert", "-q", "-O", "qcow2", "-B", str(chain[-1]), "-F", "qcow2", str(frozen)]
        try:
            subprocess.run([*cmd, str(tmp)], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise HeroVMError(f"cannot copy the disk of the fork: {e.stderr.strip()}") from e
    os.chmod(tmp, 0o600)
    os.rename(tmp, layer)
    return layer


def layers_in_use(m: Manager) -> set[Path]:
    """The layers some VM's disk (or one of its snapshots, or a template) lies on."""
    from . import templates

    used: set[Path] = set()
    tops = [p for name in state.list_vm_dirs() for p in state.VMDir(name).path.glob("disk*.qcow2")]
    tops += [t.disk for t in templates.all_templates() if t.disk is not None]  # a local copy's
    for top in tops:
        try:
            used.update(p.resolve() for p in disks.chain(top))
        except (OSError, UnicodeDecodeError, HeroVMError):
            raise Busy(f"cannot read the disk chain of {top}: layers are kept") from None
    return used


def remove_unused_layers(m: Manager) -> list[str]:
    """Remove the layers nothing lies on (a removed fork's) and what a killed fork left half made; nothing
    while a fork runs."""
    root = layers_dir()
    removed = []
    try:
        with state.named_lock("layers", wait=0):
            for path in sorted(root.glob(".fork-*.partial")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"the work of a fork that did not finish ({path.name})")
            used = layers_in_use(m)
            for path in sorted(root.glob("*.qcow2")):
                if path.resolve() not in used:
                    path.unlink()
                    removed.append(f"fork layer {path.name} (no VM lies on it)")
    except Busy:
        pass
    return removed
