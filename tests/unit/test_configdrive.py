"""herovm.guest.configdrive: the per-boot ISO, checked with pycdlib and with the guest agent's own reader."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import pycdlib
import pytest

from herovm import resources
from herovm.errors import InvalidInput
from herovm.guest import configdrive
from herovm.protocol import DRIVE_FILE, DRIVE_FILE_ISO9660, DRIVE_LABEL, DRIVE_MAX_BYTES, DRIVE_VERSION

CONFIG = {
    "name": "cd1",
    "hostname": "cd1",
    "nonce": "00ff" * 8,
    "network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns": ["10.0.2.3"], "mtu": 1500},
    "ssh": {
        "host_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
        "authorized_keys": ["ssh-ed25519 AAAA test"],
        "port": 22,
    },
    "bootstrap": {"script": "!!file.write path:/x content:'héllo ✓'\n", "name": "setup.hero"},
    "vars": {"A": "1"},
    "limits": {"bootstrap_bytes": 1 << 20, "fetch_timeout": 30},
}


@pytest.fixture
def agent_system():
    """The guest agent's herovm_agent.system, imported from herovm/_data/agent as the guest has it."""
    path = str(resources.AGENT)
    if path not in sys.path:
        sys.path.insert(0, path)
    from herovm_agent import system

    return system


def test_round_trip(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    configdrive.write(drive, CONFIG)
    assert configdrive.read(drive) == {"v": DRIVE_VERSION, **CONFIG}


def test_file_is_private_and_written_atomically(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    configdrive.write(drive, {"name": "x"})
    assert stat.S_IMODE(drive.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.iso"]  # no .tmp left


def test_rewrite_replaces_the_content(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    configdrive.write(drive, {"name": "x", "nonce": "first", "padding": "x" * 5000})
    configdrive.write(drive, {"name": "x", "nonce": "second"})
    assert configdrive.read(drive) == {"v": 1, "name": "x", "nonce": "second"}


def test_write_keeps_mode_0600_over_an_existing_world_readable_file(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    drive.write_text("old")
    os.chmod(drive, 0o644)
    configdrive.write(drive, {"name": "x"})
    assert stat.S_IMODE(drive.stat().st_mode) == 0o600


def test_config_carries_the_protocol_version(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    configdrive.write(drive, {"name": "x"})
    assert configdrive.read(drive) == {"v": 1, "name": "x"}


def test_label_in_the_primary_volume_descriptor(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    configdrive.write(drive, CONFIG)
    with open(drive, "rb") as f:
        f.seek(32768)
        pvd = f.read(2048)
    assert pvd[:6] == b"\x01CD001"  # type 1 = primary volume descriptor, standard identifier
    assert pvd[40:72] == DRIVE_LABEL.encode().ljust(32, b" ")


def test_every_tree_names_config_json(tmp_path: Path) -> None:
    """The guest mounts the ISO with the kernel's isofs (Rock Ridge first, then Joliet): every view must
    hold the file under its expected name and the same bytes."""
    drive = tmp_path / "config.iso"
    configdrive.write(drive, CONFIG)
    iso = pycdlib.PyCdlib()
    iso.open(str(drive))
    try:
        assert iso.has_rock_ridge()
        assert iso.has_joliet()
        contents = {}
        for kind, path in (
            ("iso_path", f"/{DRIVE_FILE_ISO9660}"),
            ("rr_path", f"/{DRIVE_FILE}"),
            ("joliet_path", f"/{DRIVE_FILE}"),
        ):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, **{kind: path})
            contents[kind] = out.getvalue()
        assert iso.pvd.volume_identifier.rstrip(b" ") == DRIVE_LABEL.encode()
    finally:
        iso.close()
    assert len(set(contents.values())) == 1
    assert json.loads(contents["rr_path"])["bootstrap"]["script"] == CONFIG["bootstrap"]["script"]


def test_a_drive_too_large_for_the_guest_is_refused_on_the_host(tmp_path: Path) -> None:
    drive = tmp_path / "config.iso"
    with pytest.raises(InvalidInput, match="more than the guest reads"):
        configdrive.write(drive, {"name": "x", "vars": {"BIG": "x" * DRIVE_MAX_BYTES}})
    assert not drive.exists()


def test_guest_find_drive_recognises_the_host_drive(tmp_path: Path, agent_system, monkeypatch) -> None:
    """Run the guest's own PVD check (system.find_drive) on a drive the host wrote.

    find_drive lists /sys/block and opens /dev/<name>. Scanning the host's real disks would tell us nothing,
    so only that one listing is replaced: it names the drive through a relative path under /dev, and
    find_drive then opens and parses the real file itself."""
    drive = tmp_path / "config.iso"
    other = tmp_path / "other.iso"
    configdrive.write(drive, CONFIG)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="NOTHEROVM")
    with open(other, "wb") as f:
        iso.write_fp(f)
    iso.close()
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 40000)

    def via_dev(p: Path) -> str:
        return os.path.relpath(p, "/dev")

    real_listdir = os.listdir
    entries: list[str] = []

    def listdir(path="."):
        return list(entries) if path == "/sys/block" else real_listdir(path)

    monkeypatch.setattr(agent_system.os, "listdir", listdir)
    entries[:] = [via_dev(plain), via_dev(other), "loop0", "ram0"]
    assert agent_system.find_drive() is None
    entries[:] = [via_dev(plain), via_dev(other), via_dev(drive)]
    found = agent_system.find_drive()
    assert found is not None and Path(found).resolve() == drive.resolve()


def test_guest_reads_config_json_in_place_from_the_host_drive(tmp_path: Path, agent_system) -> None:
    """The agent reads the drive without mounting it (no isofs module at boot): its ISO9660 reader must
    find config.json among other files, whatever their order, and give exactly its bytes."""
    drive = tmp_path / "config.iso"
    big = os.urandom(5000)
    files = {f"note{i}.txt": f"note {i}\n".encode() for i in range(60)}  # the root spans several sectors
    configdrive.write_iso(drive, DRIVE_LABEL, {**files, DRIVE_FILE: b'{"v": 1}', "big.bin": big})
    with open(drive, "rb") as f:
        assert agent_system.read_iso_file(f, DRIVE_FILE_ISO9660.encode(), 1 << 20) == b'{"v": 1}'
        assert agent_system.read_iso_file(f, b"BIG.BIN;1", 1 << 20) == big
        assert agent_system.read_iso_file(f, b"BIG.BIN;1", 100) == big[:100]
        assert agent_system.read_iso_file(f, b"NOTE59.TXT;1", 100) == b"note 59\n"
        with pytest.raises(ValueError, match="no NOPE.JSON;1"):
            agent_system.read_iso_file(f, b"NOPE.JSON;1", 100)
    configdrive.write(drive, CONFIG)
    with open(drive, "rb") as f:
        data = agent_system.read_iso_file(f, DRIVE_FILE_ISO9660.encode(), DRIVE_MAX_BYTES + 1)
    config = agent_system.parse_config(data)
    assert (config.name, config.nonce, config.vars) == (CONFIG["name"], CONFIG["nonce"], CONFIG["vars"])
    assert config.bootstrap is not None and config.bootstrap.script == CONFIG["bootstrap"]["script"]


def test_guest_reader_refuses_what_is_not_iso9660(tmp_path: Path, agent_system) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 40000)
    with open(plain, "rb") as f, pytest.raises(ValueError, match="no ISO9660"):
        agent_system.read_iso_file(f, DRIVE_FILE_ISO9660.encode(), 100)
