"""Which backend herovm uses is decided in one place (herovm.backends.get_backend), and every way in honours
it: the CLI's --backend, `herovm run`, the playbook API and the pytest plugin. Each is tried on a VM that the
stand-in VMM runs: only the cloud-hypervisor backend knows it (libvirt, were it used by mistake, is the test
driver here, which does not)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from herovm.backends import get_backend
from herovm.backends.cloud_hypervisor import CloudHypervisorBackend
from herovm.backends.libvirt import LibvirtBackend
from herovm.cli import app
from herovm.errors import InvalidInput
from herovm.playbook import run_playbook

from .conftest import StandIn

pytest_plugins = ["pytester"]


@pytest.fixture
def box(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    monkeypatch.setenv("HEROVM_CLOUD_HYPERVISOR", str(standin.binary))
    monkeypatch.delenv("HEROVM_BACKEND", raising=False)
    monkeypatch.setenv("HEROVM_LIBVIRT_URI", "test:///default")
    b = standin.backend()
    b.define(standin.spec())
    b.start("box")
    try:
        yield standin
    finally:
        with contextlib.suppress(Exception):
            b.undefine("box")


def delete_play(tmp_path: Path) -> Path:
    play = tmp_path / "play.hero"
    play.write_text("!!vm.delete name:box\n")
    return play


def test_get_backend_decides_from_the_name_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEROVM_BACKEND", raising=False)
    assert isinstance(get_backend(uri="test:///default"), LibvirtBackend)
    monkeypatch.setenv("HEROVM_BACKEND", "cloud-hypervisor")
    assert isinstance(get_backend(), CloudHypervisorBackend)
    assert isinstance(get_backend("libvirt", uri="test:///default"), LibvirtBackend)
    with pytest.raises(InvalidInput, match=r"a libvirt URI \(test:///default\) was given"):
        get_backend(uri="test:///default")


def test_the_cli_backend_option_and_environment(box: StandIn) -> None:
    runner = CliRunner()
    for args, env in (
        (["--backend", "cloud-hypervisor", "ls", "--json"], {}),
        (["ls", "--json"], {"HEROVM_BACKEND": "cloud-hypervisor"}),
    ):
        r = runner.invoke(app, args, env=env)
        assert r.exit_code == 0, r.output
        assert [(row["name"], row["state"]) for row in json.loads(r.stdout)] == [("box", "running")]
    r = runner.invoke(app, ["ls", "--json"])  # libvirt (the test driver) has no such VM: a directory only
    assert r.exit_code == 0 and [(row["name"], row["state"]) for row in json.loads(r.stdout)] == [
        ("box", "orphaned")
    ]
    r = runner.invoke(app, ["--backend", "cloud-hypervisor", "--connect", "test:///default", "ls"])
    assert r.exit_code == 2 and "a libvirt URI (test:///default) was given" in r.stderr


def test_herovm_run_uses_the_backend_option(box: StandIn, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["--backend", "cloud-hypervisor", "run", str(delete_play(tmp_path))])
    assert r.exit_code == 0, r.output
    assert "vm.delete box: ok" in r.stderr and "changed" in r.stderr
    assert CloudHypervisorBackend().get("box") is None


def test_the_playbook_api_takes_a_backend(box: StandIn, tmp_path: Path) -> None:
    [result] = run_playbook(delete_play(tmp_path), backend="cloud-hypervisor")
    assert result.ok and result.value == {"name": "box", "changed": True}
    assert CloudHypervisorBackend().get("box") is None


INNER = """
def test_backend(herovm_manager):
    assert herovm_manager.backend.name == "cloud-hypervisor"
    assert herovm_manager.backend.get("box").state == "running"
"""


@pytest.mark.parametrize("how", ["option", "environment"])
def test_the_pytest_plugin_uses_the_backend(
    box: StandIn, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    pytester.makepyfile(test_inner=INNER)
    if how == "environment":
        monkeypatch.setenv("HEROVM_BACKEND", "cloud-hypervisor")
        result = pytester.runpytest("-p", "no:cacheprovider")
    else:
        result = pytester.runpytest("--herovm-backend", "cloud-hypervisor", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
