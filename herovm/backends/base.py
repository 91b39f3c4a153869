"""The backend interface: everything herovm needs from a hypervisor, and nothing more."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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
    state: str  # "running" | "stopped" | "paused" | "crashed" | "other"
    metadata: dict


class Backend(Protocol):
    name: str

    def define(self, spec: MachineSpec) -> None: ...  # create the machine, not started; error if it exists
    def start(self, name: str) -> None: ...
    def destroy(self, name: str) -> None: ...  # power off at once (no error if already off)
    def undefine(self, name: str) -> None: ...  # remove the definition (stopped first); no error if absent
    def get(self, name: str) -> Machine | None: ...
    def list(self) -> list[Machine]: ...  # only herovm's machines
    def set_metadata(self, name: str, metadata: dict) -> None: ...
    def close(self) -> None: ...
    # How the host reaches a guest port. None: through the agent socket and the SSH forward (libvirt);
    # else connect(port, deadline) -> a connected stream socket (Cloud Hypervisor: hybrid vsock).
    def guest_connector(self, name: str) -> Callable[[int, float], socket.socket] | None: ...
