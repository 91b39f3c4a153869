"""`herovm pause/resume NAME` with --backend cloud-hypervisor, against the stand-in VMM; `herovm snapshot` is
libvirt's (Cloud Hypervisor cannot freeze a running VM's disk)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from herovm.backends.cloud_hypervisor import CloudHypervisorBackend
from herovm.cli import app

from .conftest import StandIn


def test_pause_resume_and_no_snapshots(standin: StandIn, monkeypatch) -> None:
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
    r = runner.invoke(app, ["snapshot", "create", "box", "s1"], env=env)
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        "herovm: error: the cloud-hypervisor backend cannot take or restore snapshots",
        "  hint: the backends that can: libvirt (--backend)",
    ]
    b.undefine("box")
