"""Throwaway machines for tests of the libvirt layer (its test driver boots nothing: paths need not exist)."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

from herovm.backends.base import MachineSpec

_counter = itertools.count()


def unique(prefix: str = "lv") -> str:
    return f"{prefix}{os.getpid() % 10000}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def spec(
    tmp_path: Path,
    name: str | None = None,
    *,
    accel: str = "tcg",
    ssh_port: int | None = 2222,
    metadata: dict | None = None,
) -> MachineSpec:
    d = tmp_path / "vm"
    return MachineSpec(
        name=name or unique(),
        cpus=2,
        memory=256 << 20,
        kernel=d / "vmlinuz",
        initrd=d / "initrd.img",
        cmdline="console=ttyS0 root=/dev/vda rw quiet",
        disk=d / "disk.qcow2",
        drive=d / "config.iso",
        console_log=d / "console.log",
        channel=d / "agent.sock",
        ssh_port=ssh_port,
        accel=accel,
        metadata=metadata if metadata is not None else {"settings": {"cpus": 2}, "ssh_port": ssh_port},
    )


def define_in_vmdir(backend, tmp_path: Path, name: str, metadata: dict) -> None:
    """Define `name` on `backend` with its files in its real VM directory (made here), as `up` would."""
    from herovm import state

    vmdir = state.VMDir(name)
    vmdir.create()
    backend.define(
        MachineSpec(
            name=name,
            cpus=1,
            memory=256 << 20,
            kernel=tmp_path / "k",
            initrd=tmp_path / "i",
            cmdline="x",
            disk=vmdir.disk,
            drive=vmdir.drive,
            console_log=vmdir.console_log,
            channel=vmdir.agent_socket,
            ssh_port=None,
            accel="tcg",
            metadata=metadata,
        )
    )
