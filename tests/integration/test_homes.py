"""Every HEROVM_HOME shares the one libvirtd: `gc`, `ls` and `down --all` of one home never touch another's
VMs. (`herovm gc` under another home destroyed this home's stopped and paused VMs: their directories were
not in that home, so they looked like leftovers.) The domains are real, on qemu:///system; none is booted."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from guests import cli

from herovm.backends.base import MachineSpec
from herovm.backends.libvirt import LibvirtBackend


def define(backend: LibvirtBackend, name: str, home: Path, tmp_path: Path) -> None:
    d = tmp_path / name
    backend.define(
        MachineSpec(
            name=name,
            cpus=1,
            memory=256 << 20,
            kernel=d / "vmlinuz",
            initrd=d / "initrd.img",
            cmdline="console=ttyS0",
            disk=d / "disk.qcow2",
            drive=d / "config.iso",
            console_log=d / "console.log",
            channel=d / "agent.sock",
            ssh_port=None,
            accel="tcg",
            # a VM that booted once and was stopped: the kind gc used to take for another home's leftover
            metadata={"name": name, "home": str(home), "last_boot": {"outcome": "ready"}, "settings": {}},
            net="none",
        )
    )


@pytest.fixture
def backend():
    b = LibvirtBackend("qemu:///system")
    yield b
    b.close()


def test_gc_ls_and_down_all_keep_to_their_own_home(backend, tmp_path: Path):
    tag = uuid.uuid4().hex[:6]
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    mine, theirs = f"it-{tag}-home-a", f"it-{tag}-home-b"
    define(backend, mine, home_a, tmp_path)
    define(backend, theirs, home_b, tmp_path)
    (home_a / "vms" / mine).mkdir(parents=True)
    (home_b / "vms" / theirs).mkdir(parents=True)
    env_a = {**os.environ, "HEROVM_HOME": str(home_a)}
    env_b = {**os.environ, "HEROVM_HOME": str(home_b)}
    try:
        r = cli("gc", "--json", env=env_b)
        assert r.returncode == 0, r.stderr
        assert backend.get(mine) is not None, "gc of home b removed home a's stopped VM"
        assert backend.get(theirs) is not None

        (home_b / "vms" / mine).mkdir()  # a stray directory in home b named like home a's VM
        rows = json.loads(cli("ls", "--json", env=env_b).stdout)
        assert {"name": mine, "state": "orphaned"}.items() <= next(
            r for r in rows if r["name"] == mine
        ).items()
        r = cli("gc", "--json", env=env_b)
        assert not (home_b / "vms" / mine).exists(), "home b's own stray directory is garbage"
        assert backend.get(mine) is not None, "but home a's domain of that name is not"

        names_b = {row["name"] for row in json.loads(cli("ls", "--json", env=env_b).stdout)}
        assert theirs in names_b and mine not in names_b
        names_a = {row["name"] for row in json.loads(cli("ls", "--json", env=env_a).stdout)}
        assert mine in names_a and theirs not in names_a

        r = cli("down", mine, env=env_b)
        assert r.returncode == 3 and "belongs to another herovm home" in r.stderr, r.stderr
        r = cli("down", "--all", env=env_b)
        assert r.returncode == 0, r.stderr
        assert backend.get(theirs) is None and backend.get(mine) is not None
        r = cli("down", mine, env=env_a)
        assert r.returncode == 0, r.stderr
        assert backend.get(mine) is None
    finally:
        for name in (mine, theirs):
            backend.undefine(name)
