"""The backend interface: everything herovm needs from a hypervisor, and nothing more.

`Backend` is what every backend has. What only some have is a small capability interface of its own, checked
with `isinstance` (they are `runtime_checkable`): `Pausable` (pause, resume), `Snapshots` (snapshot,
restore, disk) and `Clones` (clone). `herovm.backends.require` turns a missing one into `Unsupported`,
which names the backend.

    backend = get_backend("cloud-hypervisor")
    if isinstance(backend, Pausable):
        backend.pause("box")
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class MachineSpec:
    """One machine as the backend sees it: files to boot from, sizes, the SSH forward, and opaque metadata
    the backend stores with the machine (so the hypervisor stays the source of truth)."""

    name: str
    cpus: int
    memory: int  # bytes
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path  # the VM's copy-on-write overlay
    drive: Path  # the config-drive ISO
    console_log: Path
    channel: Path  # unix socket of the agent channel
    ssh_port: int | None  # forwarded from 127.0.0.1:ssh_port to the guest's port 22; None: no NIC
    accel: str  # "kvm" | "tcg"
    metadata: dict = field(default_factory=dict)
    # Network mode (see NET_MODES); net_dir holds what a mode needs on the host (e.g. passt's socket).
    net: str = "nat"
    net_dir: Path | None = None
    # Published guest ports: 127.0.0.1:host -> the guest's port, as (host, guest) pairs (herovm.ports)
    ports: tuple[tuple[int, int], ...] = ()
    # Guest memory kept in this file, shared with it (a template's VM: SharedMemory); None: ordinary memory.
    ram_file: Path | None = None


# The guest's network settings, static (no DHCP on the boot path): QEMU user networking's built-in addresses,
# which passt is told to use too. The Manager puts them on the config drive.
GUEST_NET = {"address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns": ["10.0.2.3"], "mtu": 1500}

# What the guest may reach. Every mode but "none" forwards 127.0.0.1:ssh_port to the guest's SSH.
NET_MODES = {
    "default": "egress to the outside, never to the host (passt --no-map-gw)",
    "restricted": "no egress at all; the host fetches a bootstrap URL (QEMU user networking, restrict=on)",
    "none": "no network device: no SSH, so no exec/cp; the bootstrap still runs",
    "nat": "egress anywhere, including the host's loopback as 10.0.2.2 (QEMU user networking)",
}


@dataclass(frozen=True)
class Machine:
    name: str
    state: str  # "running" | "stopped" | "paused" | "crashed" | "other" | UNREACHABLE (a host not answering)
    metadata: dict


UNREACHABLE = "unreachable"  # a machine on a host that did not answer (herovm.backends.fleet)


GuestConnector = Callable[[int, float], socket.socket]
"""connect(port, deadline) -> a stream connected to the guest's `port` (herovm.protocol's AGENT_VSOCK_PORT:
the agent's event channel; SSH_PORT: sshd and the agent's exec), waiting for it to answer until `deadline`
(time.monotonic()): TimeoutError after that. A port the machine cannot be reached on at all (no network)
raises GuestError at once."""


class Backend(Protocol):
    """Runs machines: defines, starts and stops them, keeps herovm's metadata with them, says how to reach
    their guests. Names are herovm's VM names; a backend keeps to its own machines."""

    name: str

    def define(self, spec: MachineSpec) -> None:
        """Create the machine, not started. AlreadyExists if it exists."""

    def start(self, name: str) -> None:
        """Boot the defined machine. NotFound if there is none."""

    def destroy(self, name: str) -> None:
        """Power the machine off at once; no error if it is off or absent."""

    def undefine(self, name: str) -> None:
        """Remove the machine's definition, stopping it first; no error if it is absent."""

    def get(self, name: str) -> Machine | None:
        """The machine (state and metadata), None if there is none."""

    def list(self) -> list[Machine]:
        """herovm's machines, and only those."""

    def set_metadata(self, name: str, metadata: dict) -> None:
        """Replace the metadata kept with the machine (herovm's record of it: the backend is its source of
        truth)."""

    def close(self) -> None:
        """Let go of connections; running machines keep running."""

    def guest_connector(self, name: str, ssh_port: int | None) -> GuestConnector:
        """How the host reaches the guest's ports, in every case: libvirt connects the agent's
        virtio-serial socket and the SSH forward on 127.0.0.1:`ssh_port` (the MachineSpec's, as recorded;
        None: no NIC, so no SSH port), Cloud Hypervisor its hybrid vsock (it has no forward). Asks the
        hypervisor nothing until a port is connected: `herovm exec` takes it on its hot path."""


@runtime_checkable
class Pausable(Protocol):
    """A backend that can freeze a running machine and let it go on later."""

    def pause(self, name: str) -> None:
        """Stop the machine's vCPUs; its memory and devices stay as they are."""

    def resume(self, name: str) -> None:
        """Run a paused machine on."""


@dataclass(frozen=True)
class SavedState:
    """What a backend's snapshot saved: the machine's disk as it was (a qcow2 that is never written again),
    and, when the machine ran, its memory and device state (None: a snapshot of a stopped machine)."""

    disk: Path
    memory: Path | None = None


@runtime_checkable
class Snapshots(Protocol):
    """A backend that can snapshot a machine (its disk, and while it runs its memory and device state) and
    roll it back to a snapshot. The Manager keeps the snapshots (their directories and records); a backend
    saves into the directory it is given and keeps the machine's disks as a chain of qcow2 overlays in the
    VM's directory (herovm.disks)."""

    def snapshot(self, name: str, directory: Path) -> SavedState:
        """Snapshot the machine. While it runs (or is paused): its memory and device state, into a file in
        `directory` (empty, made by the caller); it runs on (or stays paused) afterwards. Always its disk:
        the disk as it is now is frozen, and the machine goes on on a new overlay of it."""

    def restore(self, name: str, saved: SavedState) -> None:
        """Roll the machine back to `saved`: a new overlay on `saved.disk` becomes its disk. With
        `saved.memory` the machine then runs on from that state (one that runs is stopped first); without
        it, the machine is left stopped (one that runs is stopped hard)."""

    def disk(self, name: str) -> Path:
        """The machine's disk: the overlay it writes, the top of its chain."""


@runtime_checkable
class Clones(Protocol):
    """A backend that can make a new machine run on from another machine's memory snapshot (a template's,
    or a running machine's for a fork): many clones of one snapshot, each its own machine."""

    def clone(self, spec: MachineSpec, memory: Path) -> None:
        """Create machine `spec.name`, running from `memory` (a file or directory that `snapshot` wrote, or
        the DEVICE_STATE file of `SharedMemory.save_device_state` with its RAM_FILE beside it, of a machine
        with the same sizes and devices), as `spec` says: its own disk (`spec.disk`, an overlay the
        caller made on that snapshot's frozen disk), config drive, console, agent channel, forwarded port,
        network directory and metadata; never the snapshotted machine's. `memory` is only read: any number
        of clones may be made from it, at the same time too. AlreadyExists if `spec.name` exists. On any
        failure nothing of the new machine is left."""


@runtime_checkable
class SharedMemory(Protocol):
    """A backend that can run a machine on guest memory kept in a file (MachineSpec.ram_file) and save such
    a machine's device state alone. `Clones.clone` given that state maps the file privately into each clone
    (copy on write): a template's clones share its memory pages and start without loading them, where a
    snapshot's clone loads a copy of the whole memory (docs/templates.md: 0.3 s and 54 MiB of host memory per
    clone, against 1.2 s and 213 MiB)."""

    def save_device_state(self, name: str, path: Path) -> None:
        """Pause the machine (which runs on its ram_file) and write its device state, without that memory, to
        `path`, beside which the caller keeps the memory as `memory.ram` (RAM_FILE) for `Clones.clone`. The
        machine stays paused; its memory file is never written again once it is stopped."""


@runtime_checkable
class HostTemplates(Protocol):
    """A backend that keeps templates on the hosts it reaches (herovm.backends.fleet): a template made on
    another host stays there as volumes of its own (its saved memory and its disk), and `Clones.clone` is
    given the path there of its memory. The local host's templates are files in HEROVM_HOME."""

    def freeze_template(self, name: str, tag: str) -> dict:
        """Keep the running machine `name`, on another host, as template `tag` there; the machine stops.
        Returns {"tag", "memory": its path there (for clone), "disk", "memory_bytes", "disk_bytes"}."""

    def remove_template(self, host: str, tag: str) -> list[str]:
        """Remove template `tag`'s volumes from `host`; what was removed."""


@runtime_checkable
class RemoteConsole(Protocol):
    """A backend whose machines may write their console on another host: `copy_console` brings a copy to
    the path the VM's directory names, where boot, status and logs read it (herovm.backends.fleet)."""

    def copy_console(self, name: str, dest: Path) -> None:
        """Copy the machine's console log to `dest` (0600); nothing if it is local or has none yet."""


def copy_console(backend: object, name: str, dest: Path) -> None:
    """Bring a remote machine's console to `dest` (RemoteConsole), best effort: a host that does not answer
    leaves the last copy."""
    from ..errors import HeroVMError

    if isinstance(backend, RemoteConsole):
        with contextlib.suppress(HeroVMError, OSError):
            backend.copy_console(name, dest)


RAM_FILE = "memory.ram"  # a template's guest memory, beside its device state (SharedMemory)
DEVICE_STATE = "device.state"


CAPABILITIES: dict[type, str] = {
    Pausable: "pause or resume",
    Snapshots: "take or restore snapshots",
    Clones: "start clones of a snapshot (templates, fork)",
    SharedMemory: "run machines on shared memory files",
    HostTemplates: "keep templates on other hosts",
}
