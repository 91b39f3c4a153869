"""What herovm records about a VM: `VMRecord`, kept as JSON in the machine's metadata (the backend's source of
truth) and in the VM's vm.json. Reading is lenient, so domains made by older versions still read: a field
they lack gets the value it had then (a VM made before `--net` existed has QEMU user networking), a field
of the wrong type reads as unknown, and keys this version does not know are kept as they are."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .ports import parse_forwards
from .protocol import TERMINAL


def now() -> str:
    """The time as a record holds it: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def after(seconds: float) -> str:
    """The time `seconds` from now, as a record holds it."""
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return later.isoformat(timespec="seconds")


def epoch(stamp: str | None) -> float | None:
    """A record's time as seconds since 1970 (None: none, or not a time)."""
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp() if stamp else None
    except ValueError:
        return None


def _of(value: Any, kind: type | tuple[type, ...], default: Any = None) -> Any:
    return value if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) else default


@dataclass(frozen=True)
class RecordedSettings:
    """The settings a VM was made with, as `up` of an existing VM compares them: the accelerator as chosen,
    the bootstrap by its sha256, the secrets by name only (their values stay in the VM's secrets/)."""

    image: str | None = None
    cpus: int | None = None
    memory: int | None = None  # bytes
    disk: int | None = None  # bytes
    accel: str | None = None
    bootstrap: str | None = None
    net: str = "nat"
    vars: dict[str, str] = field(default_factory=dict)
    kernel_args: str = ""
    secrets: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()  # the ports asked for ("8080", "9000:8080"); the forwards: VMRecord.ports
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> RecordedSettings | None:
        if not isinstance(data, Mapping):
            return None
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            image=_of(data.get("image"), str),
            cpus=_of(data.get("cpus"), int),
            memory=_of(data.get("memory"), int),
            disk=_of(data.get("disk"), int),
            accel=_of(data.get("accel"), str),
            bootstrap=_of(data.get("bootstrap"), str),
            net=_of(data.get("net"), str, "nat"),
            vars=dict(_of(data.get("vars"), Mapping, {})),
            kernel_args=_of(data.get("kernel_args"), str, ""),
            secrets=tuple(_of(data.get("secrets"), list, [])),
            publish=tuple(p for p in _of(data.get("publish"), list, []) if isinstance(p, str)),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        data["vars"] = dict(sorted(self.vars.items()))
        secrets = data.pop("secrets")
        if secrets:  # their names only; absent when there are none, as it always was
            data["secrets"] = sorted(secrets)
        if not data["publish"]:  # absent when there are none, as before ports could be published
            data.pop("publish")
        else:
            data["publish"] = list(data["publish"])
        return {**self.extra, **data}


@dataclass(frozen=True)
class LastBoot:
    """A VM's last boot: its nonce (recorded before the guest runs), and how it ended, as `up` or `start`
    saw it (None while nobody saw the end)."""

    nonce: str | None = None
    started: str | None = None
    outcome: str | None = None  # "ready" | "failed"
    seconds: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> LastBoot:
        if not isinstance(data, Mapping):
            return cls()
        outcome = data.get("outcome")
        return cls(
            nonce=_of(data.get("nonce"), str),
            started=_of(data.get("started"), str),
            outcome=outcome if outcome in TERMINAL else None,
            seconds=_of(data.get("seconds"), (int, float)),
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def ready(self) -> bool:
        return self.outcome == "ready"


@dataclass(frozen=True)
class VMRecord:
    """herovm's facts about one VM (see the module's docstring)."""

    name: str
    settings: RecordedSettings | None = None
    image: str | None = None
    image_id: str | None = None
    ssh_port: int | None = None  # the forward 127.0.0.1:ssh_port -> guest:22; None: no NIC (or no forward)
    host_key: str = ""  # the guest's pinned host public key
    client_key: str = ""  # the public half of herovm's key for the guest
    agent_exec: bool = False  # the image's agent serves exec (HEROVM-EXEC) on port 22
    bootstrap: str | None = None  # its URL or file name
    created: str | None = None
    backend: str | None = None
    home: str | None = None  # the HEROVM_HOME that made it: every home shares libvirt
    last_boot: LastBoot = field(default_factory=LastBoot)
    # The snapshot the VM was last rolled back to ({"snapshot", "taken", "at"}), until its next boot. After
    # a memory snapshot's restore, last_boot is the boot whose memory runs again: the snapshot's.
    restored: dict[str, Any] | None = None
    # What a clone began as: {"template": NAME} (`up --template`), {"fork": SOURCE, "at": TIME}; None: booted
    origin: dict[str, Any] | None = None
    # Published guest ports: (host port on 127.0.0.1, guest port) pairs (herovm.ports); stored as
    # [{"host", "guest"}], absent when there are none
    ports: tuple[tuple[int, int], ...] = ()
    # When its time is up (`--ttl`): its guest powers itself off then, and `gc` removes it. None: never.
    expires: str | None = None
    # The host it runs on (herovm.hosts), when not the local one; absent for local VMs
    host: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, name: str, data: Any) -> VMRecord:
        data = data if isinstance(data, Mapping) else {}
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            name=name,
            settings=RecordedSettings.from_json(data.get("settings")),
            image=_of(data.get("image"), str),
            image_id=_of(data.get("image_id"), str),
            ssh_port=_of(data.get("ssh_port"), int),
            host_key=_of(data.get("host_key"), str, ""),
            client_key=_of(data.get("client_key"), str, ""),
            agent_exec=bool(data.get("agent_exec")),
            bootstrap=_of(data.get("bootstrap"), str),
            created=_of(data.get("created"), str),
            backend=_of(data.get("backend"), str),
            home=_of(data.get("home"), str),
            last_boot=LastBoot.from_json(data.get("last_boot")),
            restored=dict(r) if isinstance(r := data.get("restored"), Mapping) else None,
            origin=dict(o) if isinstance(o := data.get("origin"), Mapping) else None,
            ports=parse_forwards(data.get("ports")),
            expires=_of(data.get("expires"), str),
            host=_of(data.get("host"), str),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        """The record as stored. A record that never booted has no `last_boot` (`gc` tells such VMs by it)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        data["settings"] = self.settings.to_json() if self.settings is not None else None
        last = self.last_boot.to_json()
        data.pop("last_boot")
        if last:
            data["last_boot"] = last
        for key in ("restored", "origin", "expires", "host"):  # absent when unset, as before they existed
            if data[key] is None:
                data.pop(key)
        data["ports"] = [{"host": h, "guest": g} for h, g in self.ports]
        if not self.ports:
            data.pop("ports")
        return {**self.extra, **data}

    def booted(self, last_boot: LastBoot) -> VMRecord:
        """The record with `last_boot`, a boot of its own: no longer what a restore brought back."""
        return replace(self, last_boot=last_boot, restored=None)
