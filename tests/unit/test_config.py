"""Defaults without flags (herovm.config): a command-line option over the environment over the config file
over herovm's own default; bad values and keys are errors that say where they came from; `herovm config`
shows each value's source; a template's VM never takes image or sizes from the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from herovm import config
from herovm.cli import app
from herovm.errors import InvalidInput
from herovm.manager import Manager


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("HEROVM_CONFIG", str(path))
    for key in config.KEYS:
        monkeypatch.delenv(f"HEROVM_{key.upper()}", raising=False)
    return path


class Captured(Exception):
    pass


@pytest.fixture
def up_options(monkeypatch: pytest.MonkeyPatch) -> dict:
    """What `herovm up` hands Manager.up (which then stops: nothing boots)."""
    seen: dict = {}

    def up(self, name, settings=None, **options):
        seen.update(options)
        raise Captured

    monkeypatch.setattr(Manager, "up", up)
    return seen


def run_up(*args: str):
    return CliRunner().invoke(app, ["--connect", "test:///default", "up", "box", *args])


def test_an_option_wins_over_the_environment_over_the_file(
    cfg: Path, up_options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg.write_text('memory = "512MB"\ncpus = 2\nnet = "restricted"\ndisk = "20GB"\n')
    monkeypatch.setenv("HEROVM_CPUS", "3")
    result = run_up("--disk", "30GB")
    assert isinstance(result.exception, Captured)
    assert up_options["memory"] == "512MB" and up_options["net"] == "restricted"  # the file
    assert up_options["cpus"] == 3  # the environment over the file
    assert up_options["disk"] == "30GB"  # the option over both
    assert up_options["image"] == "default"  # nobody said: herovm's own


def test_a_template_never_takes_image_or_sizes_from_the_config(cfg: Path, up_options: dict) -> None:
    cfg.write_text('memory = "512MB"\nnet = "restricted"\n')
    assert isinstance(run_up("--template", "py").exception, Captured)
    assert up_options["template"] == "py" and up_options["memory"] == "1GB" and up_options["net"] == "default"


def test_bad_values_and_keys_say_where_they_came_from(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, up_options: dict
) -> None:
    cfg.write_text('memory = "5KB"\n')
    result = run_up()
    assert result.exit_code == 2
    assert f"memory from the config file {cfg}: memory 5KB is below the minimum" in result.stderr
    cfg.write_text("colour = 1\n")
    with pytest.raises(InvalidInput, match="unknown key 'colour'"):
        config.values()
    cfg.write_text("memory = \n")
    with pytest.raises(InvalidInput, match="is not valid TOML"):
        config.values()
    cfg.write_text("")
    monkeypatch.setenv("HEROVM_NET", "everywhere")
    assert run_up().exit_code == 2 and "net from the environment HEROVM_NET" in run_up().stderr


def test_herovm_config_shows_each_source(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg.write_text('backend = "cloud-hypervisor"\nmemory = "2GB"\n')
    monkeypatch.setenv("HEROVM_IMAGE", "default")
    shown = json.loads(CliRunner().invoke(app, ["config", "--json"]).stdout)
    assert shown["file"] == str(cfg)
    assert shown["values"]["memory"] == {"value": "2GB", "source": f"config file {cfg}"}
    assert shown["values"]["image"]["source"] == "environment HEROVM_IMAGE"
    assert shown["values"]["cpus"] == {"value": 1, "source": "default"}
    assert config.configured_backend() == "cloud-hypervisor"
    monkeypatch.setenv("HEROVM_BACKEND", "libvirt")
    assert config.configured_backend() is None  # the environment decides (herovm.backends.get_backend)


def test_no_file_is_no_config(cfg: Path) -> None:
    assert not cfg.exists() and config.read_file() == {} and config.configured_backend() is None
    assert {v.source for v in config.values().values()} == {"default"}
