"""Templates (`herovm template create|ls|rm`, `herovm up --template`): a VM booted and bootstrapped once,
sealed, and kept as its memory and disk, from which new VMs are restored instead of booted (herovm.clones).

A template lives in HEROVM_HOME/templates/NAME/ (0711; its files 0600): template.json (what it was made
with), its memory, disk.qcow2 (the frozen disk, lying on the image) and, if it was made with secrets,
secrets.json. Its memory: where the backend can (SharedMemory, libvirt), the template's VM ran on guest memory
kept in a file, memory.ram, and only its device state is saved, device.state: clones map memory.ram copy on
write and start in tenths of a second, sharing its pages; elsewhere, the backend's memory snapshot, which
each clone loads whole. It is built as `.NAME.partial` by a VM recorded as the template's builder and
gets its name only when whole: `gc` removes a partial template and its builder VM once no `template create`
holds the template's lock (a killed one). docs/templates.md.

A template may have copies on other hosts (herovm.hosts; `template create --host local,h2`), each made by a
builder VM of its own there: such a copy is volumes on that host (base.HostTemplates) that template.json
names, and `up --template` places a clone among the hosts with a copy. docs/hosts.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import clones, disks, state
from .backends import require
from .backends.base import (
    DEVICE_STATE,
    RAM_FILE,
    UNREACHABLE,
    Clones,
    HostTemplates,
    SharedMemory,
    Snapshots,
)
from .errors import AlreadyExists, BackendUnavailable, Busy, GuestError, HeroVMError, NotFound
from .hosts import LOCAL
from .progress import Progress
from .protocol import Command, Kind
from .record import VMRecord, now

if TYPE_CHECKING:
    from .images import Image
    from .manager import Manager
    from .settings import VMSettings
    from .vm import VM

BUILDER_MARK = "template_build"  # in a builder VM's record: the template it is building
SEAL_TIMEOUT_S = 15.0


def templates_dir() -> Path:
    return state.ensure_dir(state.vms_dir().parent / "templates", 0o711)


def validate_template_name(name: str) -> str:
    return state.validate_name(name, "template", "py311")


@dataclass(frozen=True)
class Copy:
    """A template's copy on one host: on the local host, files in the template's directory; on another
    (herovm.hosts), volumes there (`tpl.<tag>.memory.save` and `.disk.qcow2`, base.HostTemplates) that its
    facts name. Each copy was made by a VM of its own on its host, from the template's settings."""

    name: str
    host: str
    path: Path  # the template's directory
    facts: dict

    @property
    def local(self) -> bool:
        return self.host == LOCAL

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2" if self.local else Path(self.facts["disk"])

    @property
    def memory(self) -> Path:
        return self.path / self.facts["memory"] if self.local else Path(self.facts["memory"])

    @property
    def record(self) -> VMRecord:
        return VMRecord.from_json(self.name, self.facts["record"])

    def check_files(self) -> None:
        """HeroVMError if a file is not as the template left it (truncated, replaced, gone). Another host's
        volumes are looked up by the clone that uses them."""
        if not self.local:
            return
        files = [(self.memory, self.facts["memory_bytes"]), (self.disk, self.facts["disk_bytes"])]
        if isinstance(self.facts.get("ram_bytes"), int):  # a shared-memory template's memory file
            files.append((self.path / RAM_FILE, self.facts["ram_bytes"]))
        for path, want in files:
            size = _bytes(path)
            if size is None:
                raise HeroVMError(
                    f"template {self.name} is damaged: {path.name} is gone",
                    hint=f"make it again: `herovm template rm {self.name}`, then `template create`",
                )
            if size != want:
                raise HeroVMError(
                    f"template {self.name} is damaged: {path.name} is {size} bytes, it was {want}",
                    hint=f"make it again: `herovm template rm {self.name}`, then `template create`",
                )

    def image(self) -> Image:
        return clones.image_of(
            self.record,
            f"template {self.name}",
            f"make the template again: `herovm template rm {self.name}`, then `template create`",
        )

    def origin(self, image: Image) -> clones.Origin:
        """What clones of this copy are made from; `image`: its image (`image()`)."""
        return clones.Origin(
            memory=self.memory,
            # another host's clone lies on the template's disk there (the backend's clone makes it); here
            # its directory's overlay lies on the image, which is what tells the host which image it boots
            disk=self.disk if self.local else image.disk,
            record=self.record,
            local=self.facts.get("local") or {},
            secrets=_read_secrets(self.path / "secrets.json"),
            origin={"template": self.name},
        )


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    facts: dict  # template.json: {"name", "created", "copies": {host: copy's facts}}, or (older) one copy's

    @property
    def copies(self) -> dict[str, Copy]:
        found = _copy_facts(self.facts)
        ordered = sorted(found.items(), key=lambda kv: (kv[0] != LOCAL, kv[0]))  # `local` first, as host ls
        return {host: Copy(self.name, host, self.path, facts) for host, facts in ordered}

    @property
    def hosts(self) -> list[str]:
        return list(self.copies)

    @property
    def first(self) -> Copy:
        return next(iter(self.copies.values()))

    @property
    def record(self) -> VMRecord:
        return self.first.record

    @property
    def disk(self) -> Path | None:
        """The local copy's frozen disk (what local VMs' disks lie on); None without a local copy."""
        copy = self.copies.get(LOCAL)
        return copy.disk if copy is not None else None

    def copy(self, host: str) -> Copy:
        copies = self.copies
        if host not in copies:
            raise NotFound(
                f"template {self.name} has no copy on host {host} (it is on {', '.join(copies)})",
                hint=f"make one there: `herovm template create {self.name} --host {host} ...` after "
                f"`herovm template rm {self.name}`, or leave --host out",
            )
        return copies[host]


def load(name: str) -> Template:
    """The template; NotFound (exit 3) if there is none."""
    validate_template_name(name)
    path = templates_dir() / name
    try:
        facts = json.loads((path / "template.json").read_text())
    except FileNotFoundError:
        raise NotFound(f"no template {name}", hint="see `herovm template ls`") from None
    except (OSError, ValueError) as e:
        raise HeroVMError(f"template {name} cannot be read: {e}") from e
    copies = _copy_facts(facts) if isinstance(facts, dict) else None
    if not isinstance(copies, dict) or not copies or not all(_whole(h, c) for h, c in copies.items()):
        raise HeroVMError(f"template {name} is damaged ({path / 'template.json'})")
    return Template(name, path, facts)


def _copy_facts(facts: dict) -> object:
    """template.json's copies by host: its `copies`, or an older one's own facts as the local copy."""
    return facts.get("copies", {LOCAL: facts})


def _whole(host: str, facts: object) -> bool:
    """Whether a copy's facts are as `create` writes them."""
    if not isinstance(facts, dict) or not isinstance(facts.get("record"), dict):
        return False
    if not all(isinstance(facts.get(k), int) for k in ("memory_bytes", "disk_bytes")):
        return False
    if host == LOCAL:
        return facts.get("memory") in ("memory.save", "memory", DEVICE_STATE)
    return all(isinstance(facts.get(k), str) for k in ("tag", "memory", "disk"))


def all_templates() -> list[Template]:
    found = []
    for path in sorted(templates_dir().iterdir()):
        if path.is_dir() and not path.name.startswith("."):
            try:
                found.append(load(path.name))
            except HeroVMError:
                continue
    return found


def _bytes(path: Path) -> int | None:
    """The length of a file, or of a directory's files (Cloud Hypervisor's memory snapshot); None: gone."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return None


def _read_secrets(path: Path) -> dict[str, str]:
    try:
        found = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise HeroVMError(f"the secrets of {path.parent.name} cannot be read: {e}") from e
    return found if isinstance(found, dict) else {}


# ------------------------------------------------------------------------------------------------ verbs


def create(m: Manager, name: str, settings: VMSettings, hosts: list[str] | None = None) -> dict:
    """Boot a VM with `settings`, wait for its bootstrap to finish, seal it (docs/protocol.md), snapshot its
    memory and disk as template `name`, and remove the VM; on each of `hosts` (herovm.hosts: a copy made
    there by a VM of its own; default `settings.host`, else the local host). Returns the template's row
    (see `listing`)."""
    settings = replace(settings, ttl=None)  # the template's VM lives only as long as making it takes
    where = list(dict.fromkeys(hosts or [settings.host or LOCAL]))
    require(m.backend, Snapshots)
    require(m.backend, Clones)
    if any(h != LOCAL for h in where):
        require(m.backend, HostTemplates)
        from . import hosts as hosts_mod

        for host in where:
            hosts_mod.get(host)  # NotFound, with its hint, before anything is booted
    validate_template_name(name)
    with state.named_lock(f"template-{name}", wait=0, what=f"template {name}"):
        final = templates_dir() / name
        if final.exists():
            raise AlreadyExists(
                f"template {name} already exists", hint=f"remove it with `herovm template rm {name}` first"
            )
        partial = templates_dir() / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(0o700)
        copies: dict[str, dict] = {}
        try:
            for host in where:
                copies[host] = _make_copy(m, name, replace(settings, host=host), partial)
            for mark in partial.glob("copy.*.json"):  # the template now names its copies itself
                mark.unlink()
            facts = {"name": name, "created": now(), "copies": copies}
            state.write_private(partial / "template.json", json.dumps(facts, indent=2, sort_keys=True))
            os.chmod(partial, 0o711)  # QEMU reads the disk, as the image's user
            os.rename(partial, final)
        except BaseException:
            # what it made on other hosts (each named by a copy.HOST.json in the partial template); a host
            # that does not answer keeps the partial template, so that `gc` removes them later
            if _remove_partial_copies(m, partial):
                shutil.rmtree(partial, ignore_errors=True)
            raise
    return row(load(name), m)


def _make_copy(m: Manager, name: str, settings: VMSettings, partial: Path) -> dict:
    """The template's copy on `settings.host`: booted, bootstrapped and sealed by a builder VM there, its
    memory and disk kept (in `partial`, or on that host as volumes: HostTemplates); returns its facts. What
    it makes on another host is named in `partial`/copy.HOST.json first (`_remove_partial_copies`)."""
    host = settings.host or LOCAL
    builder = f"tmpl-{secrets.token_hex(4)}"
    started = time.monotonic()
    on = f" on {host}" if host != LOCAL else ""
    try:
        m.progress(Progress("template", f"booting template {name}{on} (VM {builder})"))
        vm = m.up_marked(builder, settings, {BUILDER_MARK: name})
        ready_s = vm.record.last_boot.seconds
        vm.close()
        _seal(m, vm.record)
        builder_dir = state.VMDir(builder)
        snap_started = time.monotonic()
        remote: dict = {}
        if host != LOCAL:
            m.progress(Progress("template", f"saving {builder}'s memory and disk on {host}"))
            tag = f"{name}-{secrets.token_hex(4)}"
            # named before it is made: a failure, or `gc` after a killed create, removes it (leftovers)
            state.write_private(partial / f"copy.{host}.json", json.dumps({"tag": tag}))
            remote = require(m.backend, HostTemplates).freeze_template(builder, tag)
            memory_bytes, disk_bytes, ram_bytes = remote["memory_bytes"], remote["disk_bytes"], None
            memory_name = remote["memory"]
        elif isinstance(m.backend, SharedMemory) and (builder_dir.path / RAM_FILE).exists():
            # its memory is in its file already: only the device state is saved (docs/templates.md)
            m.progress(Progress("template", f"saving {builder}'s device state; its memory stays in its file"))
            memory = partial / DEVICE_STATE
            m.backend.save_device_state(builder, memory)
            m.backend.destroy(builder)
            os.rename(builder_dir.path / RAM_FILE, partial / RAM_FILE)
            os.rename(builder_dir.disk, partial / "disk.qcow2")  # lies on the image alone
            memory_name, memory_bytes, ram_bytes = memory.name, _bytes(memory), _bytes(partial / RAM_FILE)
            disk_bytes = _bytes(partial / "disk.qcow2")
        else:
            m.progress(Progress("template", f"snapshotting {builder}: its memory and disk"))
            saved = require(m.backend, Snapshots).snapshot(builder, partial)
            if saved.memory is None:
                raise HeroVMError(f"the {m.backend.name} backend kept no memory of {builder}")
            m.backend.destroy(builder)
            os.rename(saved.disk, partial / "disk.qcow2")  # lies on the image alone: never snapshotted
            memory_name, memory_bytes, ram_bytes = saved.memory.name, _bytes(saved.memory), None
            disk_bytes = _bytes(partial / "disk.qcow2")
        snapshot_s = time.monotonic() - snap_started
        if builder_dir.secrets_file.exists() and not (partial / "secrets.json").exists():
            shutil.copy2(builder_dir.secrets_file, partial / "secrets.json")
        return {
            **remote,
            "created": now(),
            "backend": m.backend.name,
            "record": replace(vm.record, extra={}).to_json(),  # without the builder's mark
            "local": clones.local_facts(builder_dir),
            "memory": memory_name,
            "memory_bytes": memory_bytes,
            "ram_bytes": ram_bytes,  # None: the memory is in the snapshot
            "disk_bytes": disk_bytes,
            "ready_seconds": ready_s,
            "snapshot_seconds": round(snapshot_s, 3),
            "seconds": round(time.monotonic() - started, 3),
        }
    finally:
        _remove_builder(m, builder)


def _seal(m: Manager, record: VMRecord) -> None:
    """Command.SEAL, and wait for the agent's `sealed`: from then on the VM's credentials answer nothing."""
    from .boot import agent_channel

    m.progress(Progress("template", f"sealing {record.name}: its exec and SSH credentials stop answering"))
    deadline = time.monotonic() + SEAL_TIMEOUT_S
    try:
        channel = agent_channel(m.backend, record, deadline)
        try:
            channel.send({"op": Command.SEAL})
            for event in channel.events(deadline):
                if event["event"] == Kind.SEALED:
                    return
        finally:
            channel.close()
    except (TimeoutError, OSError):
        pass
    raise GuestError(
        f"the agent of {record.name} did not seal it",
        hint="rebuild the image (`herovm image build --force`): an older agent cannot make templates",
    )


def _remove_builder(m: Manager, builder: str) -> None:
    vmdir = state.VMDir(builder)
    if m.backend.get(builder) is not None or vmdir.exists():
        with vmdir.lock():  # remove_held says "removing"
            m.remove_held(builder)


def row(t: Template, m: Manager | None = None) -> dict:
    first = t.first
    record = first.record
    s = record.settings
    return {
        "name": t.name,
        "created": t.facts.get("created"),
        "hosts": t.hosts,
        "image": record.image,
        "image_id": record.image_id,
        "cpus": s.cpus if s else None,
        "memory": s.memory if s else None,
        "net": s.net if s else None,
        "bootstrap": record.bootstrap,
        "memory_bytes": first.facts["memory_bytes"],
        "disk_bytes": first.facts["disk_bytes"],
        "ram_bytes": first.facts.get("ram_bytes"),  # a shared-memory template's memory file (apparent size)
        "on_disk_bytes": state.footprint(t.path),  # what the template takes on this host's disk, all files
        "seconds": sum(c.facts.get("seconds") or 0 for c in t.copies.values()),
        "used_by": users(t) if m is not None else None,
    }


def listing(m: Manager) -> list[dict]:
    """Every template: its row (name, created, hosts, image, cpus, memory, net, bootstrap, memory_bytes,
    disk_bytes, seconds: how long making it took, used_by: the VMs whose disks lie on it)."""
    return [row(t, m) for t in all_templates()]


def users(t: Template) -> list[str]:
    """The VMs whose disk, or one of whose snapshots, lies on the template's disk, and its clones' forks
    (their memory maps the template's memory file when they start from memory)."""
    disk = t.disk.resolve() if t.disk is not None else None
    found = []
    for name in state.list_vm_dirs():
        if (state.VMDir(name).read_meta().get("origin") or {}).get("template") == t.name:
            found.append(name)
            continue
        if disk is None:  # no local copy: only its clones (found above) lie on it
            continue
        for top in state.VMDir(name).path.glob("disk*.qcow2"):
            try:
                if disk in (p.resolve() for p in disks.chain(top)):
                    found.append(name)
                    break
            except (OSError, UnicodeDecodeError, HeroVMError):
                found.append(name)  # cannot tell: counted as a user, so its disk is never cut from under it
                break
    return found


def remove(m: Manager, name: str, forget_unreachable: bool = False) -> list[str]:
    """Remove the template; refused (Busy) while a VM's disk lies on it. Its copies on other hosts go
    first, each struck from template.json once gone: a host that does not answer keeps the template (with
    what is left of it), unless `forget_unreachable` (`template rm --force`: for a host gone for good),
    which forgets that copy here and leaves its volumes there. Returns the hosts whose copy was forgotten."""
    with state.named_lock(f"template-{name}", wait=0, what=f"template {name}"):
        t = load(name)
        using = users(t)
        if using:
            raise Busy(
                f"template {name} is in use: {', '.join(using)} lie on it (their disks, or a fork's memory)",
                hint=f"remove them first (`herovm down {' '.join(using)}`)",
            )
        copies = {h: c.facts for h, c in t.copies.items()}
        forgotten = []
        for host in [h for h in copies if h != LOCAL]:
            try:
                require(m.backend, HostTemplates).remove_template(host, copies[host]["tag"])
            except BackendUnavailable as e:
                if not forget_unreachable:
                    e.hint = f"retry once it answers; a host gone for good: `template rm {name} --force`"
                    raise
                forgotten.append(host)
                m.progress(
                    Progress("template", f"forgetting {name}'s copy on {host}: its volumes stay there")
                )
            del copies[host]
            if copies:
                facts = {**t.facts, "copies": copies} if "copies" in t.facts else t.facts
                state.write_private(t.path / "template.json", json.dumps(facts, indent=2, sort_keys=True))
        shutil.rmtree(t.path)
        return forgotten


def up(
    m: Manager,
    name: str,
    template: str,
    keep_failed: bool = False,
    publish: tuple = (),
    ttl: float | None = None,
    marks: dict | None = None,
    host: str | None = None,
) -> VM:
    """VM `name`, restored from `template` (herovm.clones.make) on `host`, or on the host with the most room
    among those holding a copy of it, publishing the template's guest ports and `publish`
    (herovm.ports.for_clone)."""
    t = load(template)
    among = [h for h in t.hosts if m.allowed_hosts is None or h in m.allowed_hosts]
    if host is not None:
        copy = t.copy(host)
    elif len(among) == 1:
        copy = t.copy(among[0])
    elif not among:
        raise HeroVMError(f"template {template} has no copy on the hosts in use ({', '.join(t.hosts)})")
    else:  # the placement rule among the hosts with a copy (herovm.hosts.place)
        s = t.record.settings
        memory = s.memory if s is not None else 1 << 30
        copy = t.copy(m.backend.place(None, memory, None, m.progress, among=among))  # type: ignore[attr-defined]
    copy.check_files()
    image = copy.image()
    return clones.make(
        m, name, copy.origin(image), image, keep_failed=keep_failed, publish=publish, ttl=ttl, marks=marks
    )


def leftovers(m: Manager) -> list[str]:
    """What killed `template create`s left: partial templates and their builder VMs (running ones too: the
    builder is herovm's, not the user's), each only once no `template create` holds the template's lock."""
    removed = []
    builders: dict[str, list[str]] = {}
    for vm, machine in m.own_machines().items():
        if machine.state == UNREACHABLE:  # on a host that does not answer: left as it is
            continue
        mark = VMRecord.from_json(vm, machine.metadata).extra.get(BUILDER_MARK)
        if isinstance(mark, str):
            builders.setdefault(mark, []).append(vm)
    partials = {p.name[1:].removesuffix(".partial"): p for p in templates_dir().glob(".*.partial")}
    for name in sorted(set(builders) | set(partials)):
        try:
            with state.named_lock(f"template-{name}", wait=0):
                if name in partials and _remove_partial_copies(m, partials[name]):
                    shutil.rmtree(partials[name], ignore_errors=True)
                    removed.append(f"partial template {name}")
                for vm in builders.get(name, []):
                    m.backend.destroy(vm)
                    with state.VMDir(vm).lock(wait=0):
                        m.remove_held(vm)
                    removed.append(f"{vm} (the VM of a template create that did not finish)")
        except Busy:
            continue
    return removed


def _remove_partial_copies(m: Manager, partial: Path) -> bool:
    """Remove the volumes a killed create made on other hosts (named by its `copy.HOST.json`); False while
    a host does not answer: the partial template is kept, so a later `gc` tries again."""
    whole = True
    for mark in partial.glob("copy.*.json"):
        host = mark.name.removeprefix("copy.").removesuffix(".json")
        try:
            tag = json.loads(mark.read_text())["tag"]
            require(m.backend, HostTemplates).remove_template(host, tag)
            mark.unlink()
        except (OSError, ValueError, KeyError, TypeError, HeroVMError):
            whole = False
    return whole
