"""Typed results of the Python API: frozen dataclasses over the dicts that the CLI's `--json`, playbooks and
the server use.

The design, in three rules:

- **The dicts stay the source.** `Manager.status()`, `ls()`, `snapshot()`, `snapshots()`, `restore()`,
  `create_template()`, `templates()` and `fork()` return the same dicts as before (`herovm ... --json`
  prints them). Each has a typed twin that returns one of these classes made from that very dict:
  `Manager.info(name) -> VMStatus`, `Manager.vms() -> list[VMInfo]`, `Manager.snapshot_infos()`,
  `Manager.template_infos()`, `Manager.make_template()`, and on the VM handle `vm.status()`,
  `vm.snapshot()`, `vm.restore()`, `vm.fork()`. The asyncio form (herovm.aio) returns only these.
- **Every class round-trips.** `Cls.from_json(d).to_json() == d` for every dict herovm makes; a key this
  version does not know is kept in `extra` and written back, so a newer herovm's JSON survives an older
  reader. Reading is lenient (a missing key reads as None), as herovm.record's is.
- **Nothing new for what is typed already.** A VM's recorded settings and last boot are
  herovm.record's `RecordedSettings` and `LastBoot`; a command's result is `ExecResult`; guest files and
  processes are herovm.guest.ops's `EntryInfo`, `ProcessHandle`, `End`. They are re-exported here.

Sizes are bytes, durations seconds, times UTC ISO 8601 strings (as the dicts hold them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .guest.execution import ExecResult
from .guest.ops import End, EntryInfo, Output, ProcessHandle
from .record import LastBoot, RecordedSettings

__all__ = [
    "BootStep",
    "CloneInfo",
    "End",
    "EntryInfo",
    "ExecResult",
    "ForkResult",
    "LastBoot",
    "Output",
    "PortInfo",
    "ProcessHandle",
    "RecordedSettings",
    "SnapshotInfo",
    "TemplateInfo",
    "VMInfo",
    "VMStatus",
]


def _mapping(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} is read from a JSON object, not {type(data).__name__}")
    return data


def _extra(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k not in known}


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


@dataclass(frozen=True)
class PortInfo:
    """A published guest port: `guest_port` in the guest is reached at `address` (`host`:`host_port`)."""

    host: str
    host_port: int
    guest_port: int
    address: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PortInfo:
        """From a row of `status`'s or `ls`'s `ports` (or `herovm port ls --json`)."""
        d = _mapping(data, "a port")
        return cls(d.get("host"), d.get("host_port"), d.get("guest_port"), d.get("address"), _extra(cls, d))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """The row as herovm writes it."""
        return {
            **self.extra,
            "host": self.host,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "address": self.address,
        }


def _ports(value: Any) -> tuple[PortInfo, ...]:
    return tuple(PortInfo.from_json(p) for p in value) if isinstance(value, list) else ()


@dataclass(frozen=True)
class BootStep:
    """One bootstrap action of a VM's last boot, as `status` shows it: its `index`, `action` name, source
    `line`, whether it was `ok`, how long it took, its command's `exit_code` and its `error`, if any."""

    index: int | None
    action: str | None
    line: int | None
    ok: bool | None
    seconds: float | None
    exit_code: int | None
    error: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BootStep:
        """From a row of `status`'s `steps`."""
        d = _mapping(data, "a step")
        return cls(*(d.get(f.name) for f in fields(cls)))

    def to_json(self) -> dict[str, Any]:
        """The row as `status` writes it (every key, None where unknown)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class VMInfo:
    """One VM as `ls` lists it. `state`: running, paused, stopped, ... or "orphaned" (a VM directory with no
    machine: `herovm gc` removes it; then every other field is None). `ready`: it answers exec now."""

    name: str
    state: str
    image: str | None = None
    accel: str | None = None
    cpus: int | None = None
    memory: int | None = None  # bytes
    ports: tuple[PortInfo, ...] = ()
    ssh_port: int | None = None
    ready: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VMInfo:
        """From a row of `Manager.ls()` (`herovm ls --json`)."""
        d = _mapping(data, "an ls row")
        return cls(
            name=d["name"],
            state=d.get("state"),  # type: ignore[arg-type]
            image=d.get("image"),
            accel=d.get("accel"),
            cpus=d.get("cpus"),
            memory=d.get("memory"),
            ports=_ports(d.get("ports")),
            ssh_port=d.get("ssh_port"),
            ready=bool(d.get("ready")),
            extra=_extra(cls, d),
        )

    def to_json(self) -> dict[str, Any]:
        """The row as `ls` writes it."""
        return {
            **self.extra,
            "name": self.name,
            "state": self.state,
            "image": self.image,
            "accel": self.accel,
            "cpus": self.cpus,
            "memory": self.memory,
            "ports": [p.to_json() for p in self.ports],
            "ssh_port": self.ssh_port,
            "ready": self.ready,
        }


@dataclass(frozen=True)
class VMStatus:
    """A VM's facts and what its last boot came to, as `status` reports them (Manager.status's docstring
    says how `agent` and `events` are decided). `state` is the machine's now (running, paused, stopped);
    `agent` what its last boot came to (ready, failed, booting, unknown); `steps` its bootstrap actions;
    `failure` the failed action's facts when `agent` is "failed"."""

    name: str
    state: str
    paused_since: str | None = None
    backend: str | None = None
    image: str | None = None
    image_id: str | None = None
    settings: RecordedSettings | None = None
    ssh_port: int | None = None
    ports: tuple[PortInfo, ...] = ()
    bootstrap: str | None = None
    created: str | None = None
    last_boot: LastBoot = field(default_factory=LastBoot)
    restored: dict[str, Any] | None = None  # {"snapshot", "taken", "at"}: rolled back since its last boot
    origin: dict[str, Any] | None = None  # a clone's: {"template": T} or {"fork": SOURCE, "at": TIME}
    expires: str | None = None  # when its time is up (`ttl`)
    agent: str = "unknown"
    events: str = "none"  # whole, cut or none: how much of the last boot the console still holds
    steps: tuple[BootStep, ...] = ()
    failure: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """It runs and its last boot came to `ready`: it answers exec now."""
        return self.state == "running" and self.agent == "ready"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VMStatus:
        """From `Manager.status()`'s dict (`herovm status NAME --json`)."""
        d = _mapping(data, "a status")
        steps = d.get("steps")
        return cls(
            name=d["name"],
            state=d.get("state"),  # type: ignore[arg-type]
            paused_since=d.get("paused_since"),
            backend=d.get("backend"),
            image=d.get("image"),
            image_id=d.get("image_id"),
            settings=RecordedSettings.from_json(d.get("settings")),
            ssh_port=d.get("ssh_port"),
            ports=_ports(d.get("ports")),
            bootstrap=d.get("bootstrap"),
            created=d.get("created"),
            last_boot=LastBoot.from_json(d.get("last_boot")),
            restored=_dict_or_none(d.get("restored")),
            origin=_dict_or_none(d.get("origin")),
            expires=d.get("expires"),
            agent=d.get("agent", "unknown"),
            events=d.get("events", "none"),
            steps=tuple(BootStep.from_json(s) for s in steps) if isinstance(steps, list) else (),
            failure=_dict_or_none(d.get("failure")),
            extra=_extra(cls, d),
        )

    def to_json(self) -> dict[str, Any]:
        """The dict as `status` writes it."""
        return {
            **self.extra,
            "name": self.name,
            "state": self.state,
            "paused_since": self.paused_since,
            "backend": self.backend,
            "image": self.image,
            "image_id": self.image_id,
            "settings": self.settings.to_json() if self.settings is not None else None,
            "ssh_port": self.ssh_port,
            "ports": [p.to_json() for p in self.ports],
            "bootstrap": self.bootstrap,
            "created": self.created,
            "last_boot": self.last_boot.to_json(),
            "restored": self.restored,
            "origin": self.origin,
            "expires": self.expires,
            "agent": self.agent,
            "events": self.events,
            "steps": [s.to_json() for s in self.steps],
            "failure": self.failure,
        }


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot of VM `vm`: `kind` "memory" (taken while it ran or was paused: restoring it runs on from
    that moment) or "disk" (taken while it was stopped); `state` the VM's then; `memory_bytes` and
    `disk_bytes` what it takes on disk; `seconds` how long taking it took. After a restore, `vm_state` is
    the VM's state now (None otherwise)."""

    vm: str
    name: str
    created: str | None = None
    kind: str | None = None
    state: str | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    seconds: float | None = None
    vm_state: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SnapshotInfo:
        """From a row of `Manager.snapshots()` (or `snapshot()`, `restore()`)."""
        d = _mapping(data, "a snapshot row")
        return cls(
            vm=d["vm"],
            name=d["name"],
            created=d.get("created"),
            kind=d.get("kind"),
            state=d.get("state"),
            memory_bytes=d.get("memory_bytes"),
            disk_bytes=d.get("disk_bytes"),
            seconds=d.get("seconds"),
            vm_state=d.get("vm_state"),
            extra=_extra(cls, d),
        )

    def to_json(self) -> dict[str, Any]:
        """The row as herovm writes it (`vm_state` only after a restore)."""
        data = {
            **self.extra,
            "vm": self.vm,
            "name": self.name,
            "created": self.created,
            "kind": self.kind,
            "state": self.state,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "seconds": self.seconds,
        }
        if self.vm_state is not None:
            data["vm_state"] = self.vm_state
        return data


@dataclass(frozen=True)
class TemplateInfo:
    """A template (docs/templates.md): what its VM was made with, its `memory_bytes` and `disk_bytes`,
    `seconds` making it took, and `used_by`: the VMs whose disks lie on it (None where not asked)."""

    name: str
    created: str | None = None
    image: str | None = None
    image_id: str | None = None
    cpus: int | None = None
    memory: int | None = None  # the VM's memory, bytes
    net: str | None = None
    bootstrap: str | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    seconds: float | None = None
    used_by: tuple[str, ...] | None = None
    hosts: tuple[str, ...] = ("local",)  # the hosts with a copy of it (docs/hosts.md)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TemplateInfo:
        """From a row of `Manager.templates()` (or `create_template()`)."""
        d = _mapping(data, "a template row")
        used_by = d.get("used_by")
        return cls(
            name=d["name"],
            created=d.get("created"),
            image=d.get("image"),
            image_id=d.get("image_id"),
            cpus=d.get("cpus"),
            memory=d.get("memory"),
            net=d.get("net"),
            bootstrap=d.get("bootstrap"),
            memory_bytes=d.get("memory_bytes"),
            disk_bytes=d.get("disk_bytes"),
            seconds=d.get("seconds"),
            used_by=tuple(used_by) if isinstance(used_by, list) else None,
            hosts=tuple(d["hosts"]) if isinstance(d.get("hosts"), list) else ("local",),
            extra=_extra(cls, d),
        )

    def to_json(self) -> dict[str, Any]:
        """The row as herovm writes it."""
        return {
            **self.extra,
            "name": self.name,
            "created": self.created,
            "image": self.image,
            "image_id": self.image_id,
            "cpus": self.cpus,
            "memory": self.memory,
            "net": self.net,
            "bootstrap": self.bootstrap,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "seconds": self.seconds,
            "used_by": list(self.used_by) if self.used_by is not None else None,
            "hosts": list(self.hosts),
        }


@dataclass(frozen=True)
class CloneInfo:
    """One VM a fork made: its `name`, and the `seconds` it took to be ready."""

    name: str
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CloneInfo:
        """From a row of `fork()`'s `clones`."""
        d = _mapping(data, "a clone row")
        return cls(d["name"], d.get("seconds"), _extra(cls, d))

    def to_json(self) -> dict[str, Any]:
        """The row as herovm writes it."""
        return {**self.extra, "name": self.name, "seconds": self.seconds}


@dataclass(frozen=True)
class ForkResult:
    """What a fork did: the `source` VM (paused `source_pause_seconds` for its snapshot, then running on)
    and the new VMs, in the order asked for."""

    source: str
    source_pause_seconds: float | None = None
    clones: tuple[CloneInfo, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The new VMs' names."""
        return [c.name for c in self.clones]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ForkResult:
        """From `Manager.fork()`'s dict (`herovm fork --json`)."""
        d = _mapping(data, "a fork result")
        clones = d.get("clones")
        return cls(
            source=d["source"],
            source_pause_seconds=d.get("source_pause_seconds"),
            clones=tuple(CloneInfo.from_json(c) for c in clones) if isinstance(clones, list) else (),
            extra=_extra(cls, d),
        )

    def to_json(self) -> dict[str, Any]:
        """The dict as herovm writes it."""
        return {
            **self.extra,
            "source": self.source,
            "source_pause_seconds": self.source_pause_seconds,
            "clones": [c.to_json() for c in self.clones],
        }
