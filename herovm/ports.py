"""Guest ports: forwards from 127.0.0.1:HOST on this host to a guest's port (docs/ports.md).

`herovm up --publish [HOST:]GUEST` (VMSettings.publish, so `!!vm.create publish:` and
`Manager.up(publish=...)` too) asks for them when a VM is made; `herovm port add` (Manager.publish) adds one
to a VM that exists; `herovm port NAME GUEST` (Manager.port) says where one is. Each forward is recorded in
the VM's record (`VMRecord.ports`: (host, guest) pairs) and in its machine's definition, so it comes back
on every start, restore and clone, in every network mode but `none`:

- `nat`, `restricted`: QEMU user networking's `hostfwd`, on QEMU's command line; added to a running VM
  through the monitor (HMP `hostfwd_add`).
- `default`: passt's own `-t 127.0.0.1/HOST:GUEST`. passt takes its forwards when it starts and has no way
  to add one later, so a running VM in this mode gets a new forward only at its next start: `port add`
  refuses it while the VM runs (docs/ports.md says why the alternatives were not taken).

Forwards listen on 127.0.0.1 only: every local user can connect to them (docs/security.md), so a published
port exposes whatever the guest serves there to everyone on this host, and to nobody else.
A clone (of a template, or a fork) gets its own host port for each guest port its origin published.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from .errors import AlreadyExists, InvalidInput, NotFound, Unsupported

if TYPE_CHECKING:
    from .backends import Backend
    from .manager import Manager

HOST = "127.0.0.1"  # the only address forwards listen on


class PortSpec(NamedTuple):
    """One port to publish, as asked: `host` None means any free port."""

    host: int | None
    guest: int

    def text(self) -> str:
        return f"{self.host}:{self.guest}" if self.host is not None else str(self.guest)


Forward = tuple[int, int]  # (host port on 127.0.0.1, guest port): what a VM's record holds


@runtime_checkable
class Forwards(Protocol):
    """A backend that can add a forward to a machine that exists (its definition, and the running
    machine when its network can take one live)."""

    def publish(self, name: str, forward: Forward) -> None:
        """Forward 127.0.0.1:forward[0] to the guest's forward[1] from the machine's next start on, and now
        if it runs. Unsupported if the running machine's network cannot add it."""


@runtime_checkable
class RemotePorts(Protocol):
    """A backend whose forwards listen on another host's loopback (herovm.backends.remote): a port free
    here may be taken there."""

    def port_in_use(self, port: int) -> bool:
        """Whether something listens on the host's 127.0.0.1:`port`."""


# ------------------------------------------------------------------------------------------- parsing


def _number(text: str, what: str, given: object) -> int:
    text = text.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidInput(
            f"publish {given!r}: {what} {text!r} is not a port from 1 to 65535",
            hint="--publish [HOST_PORT:]GUEST_PORT, e.g. --publish 8080 or --publish 9000:8080",
        )
    return int(text)


def parse_spec(value: Any) -> PortSpec:
    """`8080`, `"8080"`, `"9000:8080"`, `"127.0.0.1:9000:8080"`, `(9000, 8080)` or a PortSpec. Another
    listening address than 127.0.0.1 is refused (docs/ports.md: how to reach a port from elsewhere)."""
    if isinstance(value, PortSpec):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return PortSpec(None, _number(str(value), "guest port", value))
    if isinstance(value, tuple | list) and len(value) == 2:
        host, guest = value
        return PortSpec(
            None if host is None else _number(str(host), "host port", value),
            _number(str(guest), "guest port", value),
        )
    if not isinstance(value, str):
        raise InvalidInput(f"publish {value!r} is not a port", hint="e.g. 8080 or 9000:8080")
    parts = value.strip().split(":")
    if len(parts) == 3:
        address = parts.pop(0)
        if address not in (HOST, "localhost"):
            raise InvalidInput(
                f"publish {value!r}: forwards listen on {HOST} only",
                hint="other local users can reach 127.0.0.1 already; to serve a port beyond this host, "
                "forward it yourself (docs/ports.md)",
            )
    if len(parts) == 1:
        return PortSpec(None, _number(parts[0], "guest port", value))
    if len(parts) == 2:
        return PortSpec(_number(parts[0], "host port", value), _number(parts[1], "guest port", value))
    raise InvalidInput(f"publish {value!r} is not [HOST_PORT:]GUEST_PORT", hint="e.g. 8080 or 9000:8080")


def parse_publish(value: Any, what: str = "publish") -> tuple[PortSpec, ...]:
    """VMSettings.publish's check: a list of specs (one spec alone too), each guest port and each host
    port at most once."""
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str | int | PortSpec) else list(value)
    specs = tuple(parse_spec(v) for v in items)
    guests = [s.guest for s in specs]
    hosts = [s.host for s in specs if s.host is not None]
    for seen, kind in ((guests, "guest"), (hosts, "host")):
        twice = sorted({p for p in seen if seen.count(p) > 1})
        if twice:
            raise InvalidInput(f"publish: {kind} port {twice[0]} is given twice", hint="publish each once")
    return specs


def parse_forwards(value: Any) -> tuple[Forward, ...]:
    """A record's `ports` as stored ([{"host": H, "guest": G}, ...]), leniently: what is not a pair of
    ports is left out."""
    out = []
    for item in value if isinstance(value, list | tuple) else ():
        pair = (item.get("host"), item.get("guest")) if isinstance(item, dict) else item
        if (
            isinstance(pair, list | tuple)
            and len(pair) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in pair)
        ):
            out.append((pair[0], pair[1]))
    return tuple(out)


def forwards_json(forwards: Iterable[Forward]) -> list[dict[str, int]]:
    return [{"host": h, "guest": g} for h, g in forwards]


def rows(forwards: Iterable[Forward]) -> list[dict[str, Any]]:
    """What `ls`, `status` and `port ls` show of a VM's forwards."""
    return [{"host": HOST, "host_port": h, "guest_port": g, "address": f"{HOST}:{h}"} for h, g in forwards]


# ---------------------------------------------------------------------------------------- allocation


def _taken(backend: Backend) -> set[int]:
    """The host ports every herovm VM of this host has recorded (SSH and published), of every HEROVM_HOME.
    Given every host (a Fleet), the local one's: asking the others would wait on any that went away."""
    from .backends.fleet import local_backend_of
    from .record import VMRecord

    taken: set[int] = set()
    for machine in local_backend_of(backend).list():
        record = VMRecord.from_json(machine.name, machine.metadata)
        if record.ssh_port:
            taken.add(record.ssh_port)
        taken.update(h for h, _ in record.ports)
    return taken


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _host_port(spec: PortSpec, taken: set[int]) -> int:
    from .state import allocate_port

    if spec.host is None:
        return allocate_port(taken)
    if spec.host in taken or not _free(spec.host):
        raise AlreadyExists(
            f"{HOST}:{spec.host} is already in use: it cannot forward to guest port {spec.guest}",
            hint=f"publish {spec.guest} alone and herovm picks a free port (`herovm port NAME {spec.guest}`)",
        )
    return spec.host


def allocate(backend: Backend, net: str, publish: Sequence[PortSpec | str]) -> tuple[int | None, tuple]:
    """The SSH port and the published forwards of a new VM (None and () for `--net none`). Call under the
    `ports` lock (herovm.state.named_lock) and record them before letting go of it, so that concurrent
    `up`s never share a port."""
    from .state import allocate_port

    specs = parse_publish(publish)
    if net == "none":
        if specs:
            raise InvalidInput(
                "publish: a VM with --net none has no network, so no port can be forwarded to it",
                hint="use --net restricted (no egress, ports still forwarded) or another mode",
            )
        return None, ()
    if specs and not isinstance(backend, Forwards):
        raise Unsupported(
            f"the {backend.name} backend cannot forward guest ports", hint="use --backend libvirt"
        )
    taken = _taken(backend)
    ssh = allocate_port(taken)
    for _ in range(20):  # on another host: free there too (QEMU would fail to bind it as it starts)
        if not (isinstance(backend, RemotePorts) and backend.port_in_use(ssh)):
            break
        taken.add(ssh)
        ssh = allocate_port(taken)
    taken.add(ssh)
    forwards = []
    for spec in specs:
        host = _host_port(spec, taken)
        taken.add(host)
        forwards.append((host, spec.guest))
    return ssh, tuple(forwards)


def for_clone(inherited: Iterable[Forward], own: Sequence[PortSpec]) -> tuple[PortSpec, ...]:
    """What a clone publishes: each guest port its origin published, on a host port of its own (a host port
    cannot be shared), and its own `publish`, which wins for the same guest port."""
    mine = {s.guest for s in own}
    return tuple(PortSpec(None, g) for _, g in inherited if g not in mine) + tuple(own)


# ------------------------------------------------------------------------------------------- the verbs


def port(m: Manager, name: str, guest: int) -> tuple[str, int]:
    """(host, port) where the VM's guest port `guest` is published; NotFound (exit 3) if it is not."""
    record = m.record(name)
    guest = parse_spec(guest).guest
    for h, g in record.ports:
        if g == guest:
            return HOST, h
    raise NotFound(
        f"guest port {guest} of VM {name} is not published",
        hint=f"publish it: `herovm port add {name} {guest}` (or `herovm up {name} --publish {guest}`)",
    )


def publish(m: Manager, name: str, guest: int, host: int | None = None) -> tuple[str, int]:
    """Forward 127.0.0.1:`host` (a free port when None) to the VM's guest port `guest`, from now on (if its
    network can take it while it runs) and on every later start. A port already published is returned as
    it is (AlreadyExists if it is published on another host port than `host`)."""
    from dataclasses import replace

    from . import state
    from .record import VMRecord

    spec = parse_spec((host, guest))
    vmdir = state.VMDir(name)
    with vmdir.lock():
        machine = m.machine(name)
        record = VMRecord.from_json(name, machine.metadata)
        for h, g in record.ports:
            if g == spec.guest:
                if spec.host not in (None, h):
                    raise AlreadyExists(
                        f"guest port {g} of VM {name} is published on {HOST}:{h} already",
                        hint=f"use {HOST}:{h}",
                    )
                return HOST, h
        net = record.settings.net if record.settings else "nat"
        if record.ssh_port is None or net == "none":
            raise InvalidInput(
                f"VM {name} has no network (--net none), so no port can be forwarded to it",
                hint="make it with another --net mode (restricted has no egress and forwards ports)",
            )
        if not isinstance(m.backend, Forwards):
            raise Unsupported(f"the {m.backend.name} backend cannot forward guest ports")
        if machine.state in ("running", "paused") and net == "default":
            raise Unsupported(
                f"VM {name} runs in the default network mode, whose forwards (passt's) are fixed while "
                "it runs",
                hint=f"publish it when the VM is made (`--publish {spec.text()}`), or stop it, "
                f"`herovm port add {name} {spec.guest}`, and start it (docs/ports.md)",
            )
        with state.named_lock("ports"):
            taken = _taken(m.backend)
            forward = (_host_port(spec, taken), spec.guest)
            m.backend.publish(name, forward)
            record = replace(record, ports=(*record.ports, forward))
            m.backend.set_metadata(name, record.to_json())
            if vmdir.exists():
                vmdir.write_meta({**vmdir.read_meta(), "ports": forwards_json(record.ports)})
    return HOST, forward[0]
