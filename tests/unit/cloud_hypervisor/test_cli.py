"""`herovm pause/resume NAME` and `herovm snapshot create|ls|restore|rm` with --backend cloud-hypervisor,
against the stand-in VMM."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from herovm.backends.cloud_hypervisor import CloudHypervisorBackend
from herovm.cli import app

from .conftest import StandIn, needs_qemu_img


def test_pause_resume(standin: StandIn, monkeypatch) -> None:
    monkeypatch.setenv("HEROVM_CLOUD_HYPERVISOR", str(standin.binary))
    b = standin.backend()
    b.define(standin.spec())
    b.start("box")
    runner = CliRunner()
    env = {"HEROVM_BACKEND": "cloud-hypervisor"}
    r = runner.invoke(app, ["pause", "box"], env=env)
    assert r.exit_code == 0, r.output
    assert CloudHypervisorBackend().get("box").state == "paused"
    r = runner.invoke(app, ["--backend", "cloud-hypervisor", "resume", "box"])
    assert r.exit_code == 0, r.output
    assert b.get("box").state == "running"
    r = runner.invoke(app, ["resume", "box"], env=env)  # running already: left as it is
    assert (r.exit_code, r.stdout) == (0, "box is running\n")
    r = runner.invoke(app, ["pause", "box", "--json"], env=env)
    assert r.exit_code == 0 and json.loads(r.stdout) == {"name": "box", "state": "paused"}
    runner.invoke(app, ["resume", "box"], env=env)
    r = runner.invoke(app, ["pause", "nobox"], env=env)
    assert r.exit_code == 3  # not found
    b.undefine("box")


@needs_qemu_img
def test_snapshot_verbs(standin: StandIn, monkeypatch) -> None:
    """The Manager's snapshot verbs take what this backend saves: memory.save (a directory here), a frozen
    disk in the VM's directory."""
    monkeypatch.setenv("HEROVM_CLOUD_HYPERVISOR", str(standin.binary))
    b = standin.backend()
    spec = standin.spec(qcow2=True)
    b.define(spec)
    b.start("box")
    runner = CliRunner()
    env = {"HEROVM_BACKEND": "cloud-hypervisor"}
    r = runner.invoke(app, ["snapshot", "create", "box", "s1", "--json"], env=env)
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert (row["kind"], row["state"]) == ("memory", "running")
    assert (spec.disk.parent / "snapshots/s1/memory.save/memory-ranges").is_file()
    assert b.get("box").state == "running"
    r = runner.invoke(app, ["snapshot", "restore", "box", "s1", "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["vm_state"] == "running"
    assert b.disk("box") != spec.disk and not spec.disk.exists()  # a new overlay; the old one pruned
    r = runner.invoke(app, ["snapshot", "rm", "box", "s1"], env=env)
    assert r.exit_code == 0, r.output
    b.undefine("box")
