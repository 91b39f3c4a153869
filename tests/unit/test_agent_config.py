"""The config drive's document (herovm.protocol.DriveConfig) as the guest agent reads it, fuzzed: whatever
the drive holds, the agent gets a well-typed config or a ValueError (reported as `failed`, stage `drive`),
never a crash of PID 1. The host runs the same check before it writes a drive."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herovm import protocol
from herovm.guest import configdrive
from herovm.protocol import BOOTSTRAP_NAME, SSH_PORT, BootstrapSpec, DriveConfig, Limits, Network

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "herovm/_data/agent"))
from herovm_agent.system import parse_config  # noqa: E402

GOOD = {
    "v": 1,
    "name": "box",
    "hostname": "box",
    "nonce": "ab",
    "network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns": ["10.0.2.3"], "mtu": 1500},
    "ssh": {"host_key": "KEY", "authorized_keys": ["ssh-ed25519 AAAA x"], "port": 22},
    "bootstrap": {"script": "!!cmd.run cmd:true", "name": "b.hero"},
    "vars": {"A": "b"},
    "secrets": {"T": "s"},
    "limits": {"bootstrap_bytes": 1024, "fetch_timeout": 30},
}


def test_a_drive_written_by_the_host_reads_back_whole(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    configdrive.write(drive, {k: v for k, v in GOOD.items() if k != "v"})
    config = parse_config(json.dumps(configdrive.read(drive)).encode())
    assert config == DriveConfig.from_json(GOOD)
    assert config.name == "box" and config.nonce == "ab" and config.secrets == {"T": "s"}
    assert config.network == Network(address="10.0.2.15/24", gateway="10.0.2.2", dns=["10.0.2.3"], mtu=1500)
    assert config.ssh is not None and config.ssh.authorized_keys == ["ssh-ed25519 AAAA x"]
    assert config.bootstrap == BootstrapSpec(script="!!cmd.run cmd:true", name="b.hero")
    assert config.limits == Limits(bootstrap_bytes=1024, fetch_timeout=30)


def test_what_is_absent_or_null_gets_its_default() -> None:
    config = parse_config(
        b'{"v": 1, "name": "box", "nonce": null, "ssh": {"host_key": "K"}, "bootstrap": {}}'
    )
    assert config.hostname is None and config.nonce is None and config.network is None
    assert config.vars == {} and config.secrets == {} and config.limits == Limits()
    assert config.ssh is not None and (config.ssh.port, config.ssh.authorized_keys) == (SSH_PORT, [])
    assert config.bootstrap == BootstrapSpec(name=BOOTSTRAP_NAME)
    assert (
        DriveConfig.from_json({"v": 1, "name": "a"}).vars
        is not DriveConfig.from_json({"v": 1, "name": "a"}).vars
    )


def test_the_host_refuses_to_write_what_the_agent_would_refuse(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    with pytest.raises(ValueError, match="network.mtu must be an integer from 68 to 65535"):
        configdrive.write(drive, {"name": "box", "network": {**GOOD["network"], "mtu": 9}})
    assert not drive.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "not a version 1"),
        ({"v": True}, "not a version 1"),
        ({"name": 5}, "name must be a string"),
        ({"name": None}, "name is missing"),
        ({"network": {"address": 1, "gateway": "g"}}, "network.address must be a string"),
        ({"network": {"address": "a"}}, "network.gateway is missing"),
        ({"network": {**GOOD["network"], "mtu": "big"}}, "network.mtu must be an integer"),
        ({"network": {**GOOD["network"], "mtu": 70000}}, "network.mtu must be an integer from 68 to 65535"),
        ({"network": {**GOOD["network"], "dns": "10.0.2.3"}}, "network.dns must be a list of strings"),
        ({"network": "10.0.2.15"}, "network must be an object"),
        ({"ssh": {"host_key": None}}, "ssh.host_key is missing"),
        ({"ssh": {"host_key": "k", "authorized_keys": "one"}}, "ssh.authorized_keys must be a list"),
        ({"ssh": {"host_key": "k", "port": True}}, "ssh.port must be an integer"),
        ({"ssh": {"host_key": "k", "exec_token": 7}}, "ssh.exec_token must be a string"),
        ({"bootstrap": {"url": ["x"]}}, "bootstrap.url must be a string"),
        ({"vars": {"A": 1}}, "vars must be an object of strings"),
        ({"secrets": {"T": ["s"]}}, "secrets must be an object of strings"),
        ({"secrets": "T=s"}, "secrets must be an object of strings"),
        ({"limits": {"fetch_timeout": "30"}}, "limits.fetch_timeout must be a number"),
        ({"limits": {"fetch_timeout": 0}}, "limits.fetch_timeout must be a number > 0"),
        ({"limits": {"bootstrap_bytes": 1.5}}, "limits.bootstrap_bytes must be an integer"),
        ({"hostname": True}, "hostname must be a string"),
    ],
)
def test_each_wrong_shape_is_named(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(json.dumps({**GOOD, **change}).encode())


def test_not_json_and_too_large() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        parse_config(b"\xff\xfe{")
    with pytest.raises(ValueError, match="too large"):
        parse_config(b" " * ((4 << 20) + 1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ValueError):  # the one failure allowed; anything else fails the test
        assert isinstance(parse_config(data), DriveConfig)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(GOOD)), json_values, max_size=9))
def test_arbitrary_fields_give_a_good_config_or_a_value_error(fields: dict) -> None:
    try:
        config = parse_config(json.dumps({**GOOD, **fields}).encode())
    except ValueError:
        return
    # Whatever got through has the types the agent relies on, every key declared.
    assert_typed(config)


# Each object of the document with its own keys, each holding anything: the nested checks get exercised.
NESTED = {"network": protocol.Network, "ssh": protocol.SSH, "bootstrap": BootstrapSpec, "limits": Limits}
nested_objects = st.sampled_from(sorted(NESTED)).flatmap(
    lambda name: st.tuples(
        st.just(name),
        st.dictionaries(st.sampled_from([k.name for k in NESTED[name].KEYS]), json_values, max_size=4),
    )
)


@settings(max_examples=600, deadline=None)
@given(st.lists(nested_objects, max_size=4))
def test_arbitrary_nested_values_give_a_good_config_or_a_value_error(objects: list) -> None:
    document = dict(GOOD)
    for name, fields in objects:
        document[name] = {**(document.get(name) or {}), **fields}
    try:
        config = parse_config(json.dumps(document).encode())
    except ValueError:
        return
    assert_typed(config)


def assert_typed(record) -> None:
    for key in record.KEYS:
        value = getattr(record, key.name)
        if value is None:
            assert not key.required, key.name
        elif isinstance(key.kind, type) and issubclass(key.kind, protocol.Record):
            assert type(value) is key.kind
            assert_typed(value)
        elif key.kind is list:
            assert all(isinstance(v, str) for v in value), key.name
        elif key.kind is dict:
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()), key.name
        elif key.kind is float:
            assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else:
            assert type(value) is key.kind, key.name
