"""The guest agent's config-drive reader, fuzzed: whatever the drive holds, the agent gets a well-shaped
config or a ValueError (reported as `failed`, stage `drive`), never a crash of PID 1."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herovm.guest import configdrive

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bootstrap/agent"))
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
    assert parse_config(json.dumps(configdrive.read(drive)).encode()) == GOOD


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "not a version 1"),
        ({"name": 5}, "name has the wrong type"),
        ({"network": {"address": 1, "gateway": "g"}}, "network.address"),
        ({"network": {**GOOD["network"], "mtu": "big"}}, "network.mtu"),
        ({"network": {**GOOD["network"], "dns": "10.0.2.3"}}, "network.dns"),
        ({"ssh": {"host_key": None}}, "ssh.host_key"),
        ({"ssh": {"host_key": "k", "authorized_keys": "one"}}, "authorized_keys"),
        ({"ssh": {"host_key": "k", "port": True}}, "ssh.port"),
        ({"bootstrap": {"url": ["x"]}}, "bootstrap.url"),
        ({"vars": {"A": 1}}, "vars"),
        ({"secrets": {"T": ["s"]}}, "secrets must map strings to strings"),
        ({"secrets": "T=s"}, "secrets has the wrong type"),
        ({"limits": {"fetch_timeout": "30"}}, "limits"),
        ({"hostname": True}, "hostname has the wrong type"),
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
        assert parse_config(data)["v"] == 1


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(GOOD)), json_values, max_size=9))
def test_arbitrary_fields_give_a_good_config_or_a_value_error(fields: dict) -> None:
    try:
        config = parse_config(json.dumps({**GOOD, **fields}).encode())
    except ValueError:
        return
    # Whatever got through has the shape the agent relies on.
    assert config["v"] == 1 and isinstance(config["name"], str)
    for key in ("network", "ssh", "bootstrap", "vars", "secrets", "limits"):
        assert isinstance(config.get(key) or {}, dict)
    for key in ("vars", "secrets"):
        assert all(isinstance(v, str) for v in (config.get(key) or {}).values())
    assert all(isinstance(k, str) for k in (config.get("ssh") or {}).get("authorized_keys", []))
