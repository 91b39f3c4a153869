"""The Cloud Hypervisor backend against a stand-in VMM (fake_cloud_hypervisor.py): a real process serving
the API, built from Cloud Hypervisor's OpenAPI document, on a real unix socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from herovm import disks, state
from herovm.backends.base import MachineSpec
from herovm.backends.cloud_hypervisor import CloudHypervisorBackend

from . import contract

HERE = Path(__file__).resolve().parent
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

if reason := contract.available():
    pytest.skip(reason, allow_module_level=True)


@dataclass
class StandIn:
    home: Path
    binary: Path
    log: Path

    def requests(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.log.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def endpoints(self) -> list[str]:
        return [r["path"].removeprefix(contract.ROOT + "/") for r in self.requests()]

    def pids(self) -> set[int]:
        return {r["pid"] for r in self.requests()}

    def backend(self, **options: object) -> CloudHypervisorBackend:
        options.setdefault("api_timeout", 2.0)
        return CloudHypervisorBackend(self.binary, kernel=lambda bz: bz, **options)  # type: ignore[arg-type]

    def spec(self, name: str = "box", *, qcow2: bool = False, **changes: object) -> MachineSpec:
        """A VM's spec and its files; with `qcow2` its disk is a real overlay on a base image (as herovm's
        are: snapshots make overlays of it), else an empty file."""
        vmdir = state.VMDir(name)
        vmdir.create()
        for f in ("vmlinuz", "initrd.img"):
            (self.home / f).write_bytes(b"stand-in")
        if qcow2:
            disks.create_overlay(self.base_image(), vmdir.disk, what=name)
        else:
            vmdir.disk.write_bytes(b"")
        vmdir.drive.write_bytes(b"")
        fields = dict(
            name=name,
            cpus=2,
            memory=512 << 20,
            kernel=self.home / "vmlinuz",
            initrd=self.home / "initrd.img",
            cmdline="console=ttyS0 root=/dev/vda rw",
            disk=vmdir.disk,
            drive=vmdir.drive,
            console_log=vmdir.console_log,
            channel=vmdir.agent_socket,
            ssh_port=None,
            accel="kvm",
            metadata={"name": name, "settings": {"cpus": 2}},
            net="none",
            net_dir=None,
        )
        fields.update(changes)
        return MachineSpec(**fields)  # type: ignore[arg-type]

    def base_image(self) -> Path:
        base = self.home / "base.qcow2"
        if not base.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
        return base


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    # A short path: unix socket paths must stay under 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="hvch-"))
    binary = home / "cloud-hypervisor"
    # exec: the stand-in keeps the wrapper's pid, as the real binary would have it
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_cloud_hypervisor.py"} "$@"\n')
    binary.chmod(0o755)
    monkeypatch.setenv("HEROVM_HOME", str(home))
    monkeypatch.setenv("FAKE_CH_LOG", str(home / "requests.jsonl"))
    for knob in ("FAKE_CH_FAIL", "FAKE_CH_HANG", "FAKE_CH_IGNORE_TERM", "FAKE_CH_EXIT"):
        monkeypatch.delenv(knob, raising=False)
    s = StandIn(home, binary, home / "requests.jsonl")
    try:
        yield s
        # The contract: every request herovm sent is an operation of the document with a fitting body, and
        # every answer the stand-in gave is one the document (or Cloud Hypervisor's generic errors) allows.
        for r in s.requests():
            assert contract.request_problems(r["method"], r["path"], r["body"]) == [], r
            allowed = contract.response_statuses(r["method"], r["path"]) | {400, 404, 500}
            assert r["status"] in allowed, r
        leftover = [pid for pid in s.pids() if alive(pid)]
        assert leftover == [], f"stand-in VMMs outlived the test: {leftover}"
    finally:
        for pid in s.pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
