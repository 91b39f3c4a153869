"""A VM's settings are declared once (herovm.settings.VMSettings): `herovm up`'s options, `!!vm.create`'s
parameters and `Manager.up`'s keyword arguments come from that declaration, with one check and one message.
And the VM record (herovm.record) reads what older versions stored."""

from __future__ import annotations

import pytest
import typer.main

from herovm.cli import app
from herovm.errors import InvalidInput
from herovm.playbook import host_registry
from herovm.record import LastBoot, RecordedSettings, VMRecord
from herovm.settings import VMSettings, declared


def up_options() -> dict[str, object]:
    command = typer.main.get_command(app).commands["up"]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def test_every_setting_is_an_option_of_up_and_a_parameter_of_vm_create_with_one_help() -> None:
    options = up_options()
    params = {p.name: p for p in host_registry().get("vm.create").params}
    for field, setting in declared():
        option = options[setting.option or field]
        param = params[setting.param or field]
        assert option.help == param.help == setting.help, field
    names = [setting.option or field for field, setting in declared()]
    assert list(options) == ["name", *names, "json_out"]
    assert [p for p in params if p not in ("name", "replace")] == [s.param or f for f, s in declared()]


def test_option_names_where_they_differ() -> None:
    options = up_options()
    assert options["var"].opts == ["--var"] and options["secret"].opts == ["--secret"]
    assert options["kernel_args"].opts == ["--kernel-args"]
    assert {"vars", "secrets"} <= {p.name for p in host_registry().get("vm.create").params}


def test_values_are_made_typed() -> None:
    s = VMSettings(memory="512MB", disk=20 << 30, timeout="2m", accel=None, bootstrap="", bootstrap_sha256="")
    assert (s.memory, s.disk, s.timeout, s.accel, s.bootstrap, s.bootstrap_sha256) == (
        512 << 20,
        20 << 30,
        120.0,
        "auto",
        None,
        None,
    )
    default = VMSettings()
    assert (default.memory, default.disk, default.timeout, default.variables) == (
        1 << 30,
        10 << 30,
        300.0,
        {},
    )
    assert VMSettings.of({"cpus": 2}, base=s) == VMSettings(memory="512MB", disk="20GB", timeout="2m", cpus=2)


@pytest.mark.parametrize(
    ("given", "setting", "message"),
    [
        ({"memory": "64MB"}, "memory", "memory 64MB is below the minimum of 128 MiB"),
        ({"memory": 64 << 20}, "memory", "memory 64 MiB is below the minimum of 128 MiB"),
        ({"disk": "65TB"}, "disk", "disk 65TB is above the maximum of 64 TiB"),
        ({"cpus": True}, "cpus", "cpus True must be a whole number from 1 to 64"),
        ({"timeout": 0}, "timeout", "timeout must be longer than zero"),
        ({"net": "bridge"}, "net", "unknown network mode 'bridge'"),
        ({"image": "../etc"}, "image", "invalid image name '../etc'"),
        ({"kernel_args": "a\nb"}, "kernel_args", "kernel_args must be one line of printable characters"),
        ({"variables": {"A": 1}}, "variables", "variables and secrets must map names to strings"),
        ({"variables": {"A": "1"}, "secrets": {"A": "2"}}, "secrets", "A: given both as a variable and as"),
        ({"bootstrap_sha256": "ab" * 32}, "bootstrap_sha256", "bootstrap_sha256 without a bootstrap"),
    ],
)
def test_one_check_names_its_setting(given: dict, setting: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        VMSettings(**given)
    assert info.value.message.startswith(message)
    assert info.value.details["setting"] == setting


def test_a_secret_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(VMSettings(secrets={"T": "hunter2"}))


def test_an_unknown_setting_is_refused_by_name() -> None:
    with pytest.raises(InvalidInput, match="unknown VM setting 'memroy'") as info:
        VMSettings.of({"memroy": "1GB"})
    assert "memory" in (info.value.hint or "")


# ------------------------------------------------------------------------------------------ the record


CURRENT = {
    "name": "box",
    "settings": {
        "image": "default",
        "cpus": 1,
        "memory": 1 << 30,
        "disk": 10 << 30,
        "accel": "tcg",
        "bootstrap": None,
        "net": "default",
        "vars": {"A": "1"},
        "kernel_args": "",
        "secrets": ["T"],
    },
    "image": "default",
    "image_id": "0123456789ab",
    "ssh_port": 40001,
    "host_key": "ssh-ed25519 AAAA host",
    "client_key": "ssh-ed25519 AAAA client",
    "agent_exec": True,
    "bootstrap": None,
    "created": "2026-01-01T00:00:00+00:00",
    "backend": "libvirt",
    "home": "/var/lib/herovm",
    "last_boot": {
        "nonce": "ab" * 16,
        "started": "2026-01-01T00:00:01+00:00",
        "outcome": "ready",
        "seconds": 2.5,
    },
}


def test_a_record_reads_and_writes_the_stored_shape() -> None:
    record = VMRecord.from_json("box", CURRENT)
    assert record.to_json() == CURRENT
    assert record.settings is not None and record.settings.secrets == ("T",)
    assert record.last_boot.ready and record.ssh_port == 40001


def test_a_record_made_by_an_older_version_still_reads() -> None:
    old = {
        "settings": {"image": "default", "cpus": 2, "memory": 1 << 30, "disk": 10 << 30, "accel": "kvm"},
        "ssh_port": 2222,
        "host_key": "ssh-ed25519 AAAA host",
        "someday": {"kept": True},
    }
    record = VMRecord.from_json("old", old)
    assert record.settings == RecordedSettings(
        image="default", cpus=2, memory=1 << 30, disk=10 << 30, accel="kvm", net="nat"
    )
    assert record.home is None and record.last_boot == LastBoot() and not record.agent_exec
    assert record.to_json()["someday"] == {"kept": True}
    assert "last_boot" not in record.to_json()  # never booted: what `gc` looks for


def test_a_record_with_values_of_the_wrong_type_reads_them_as_unknown() -> None:
    record = VMRecord.from_json("odd", {"ssh_port": "22", "settings": [], "last_boot": {"nonce": 5}})
    assert (record.ssh_port, record.settings, record.last_boot.nonce) == (None, None, None)
    assert VMRecord.from_json("odd", {"last_boot": {"outcome": "ready?"}}).last_boot.outcome is None
