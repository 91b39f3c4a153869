from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import paramiko
import pytest

from herovm.guest.keys import generate_keypair, host_key_entry, public_line

LINE = re.compile(r"^ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI[A-Za-z0-9+/]{43}=? vm-1 client$")


def test_private_key_is_0600_and_openssh_format(tmp_path: Path) -> None:
    key = tmp_path / "id"
    generate_keypair(key, comment="vm-1 client")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")


def test_private_key_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_keypair(tmp_path / "id", comment="c")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "id").stat().st_mode) == 0o600


def test_file_is_created_exclusively_with_mode_0600(tmp_path: Path, mocker) -> None:
    spy = mocker.spy(os, "open")
    generate_keypair(tmp_path / "id", comment="c")
    (path, flags, mode), _ = spy.call_args
    assert Path(path) == tmp_path / "id"
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert mode == 0o600


def test_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("precious")
    with pytest.raises(FileExistsError):
        generate_keypair(key, comment="c")
    assert key.read_text() == "precious"


def test_public_line_format(tmp_path: Path) -> None:
    line = generate_keypair(tmp_path / "id", comment="vm-1 client")
    assert LINE.match(line), line
    assert not (tmp_path / "id.pub").exists()  # storing the public line is the caller's job


def test_public_line_from_private_file_matches(tmp_path: Path) -> None:
    line = generate_keypair(tmp_path / "id", comment="vm-1 client")
    assert public_line(tmp_path / "id", comment="vm-1 client") == line
    assert public_line(tmp_path / "id") == " ".join(line.split()[:2])


def test_loads_with_paramiko(tmp_path: Path) -> None:
    line = generate_keypair(tmp_path / "id", comment="c")
    key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "id"))
    assert key.get_name() == "ssh-ed25519"
    assert key.get_base64() == line.split()[1]
    assert isinstance(paramiko.PKey.from_path(tmp_path / "id"), paramiko.Ed25519Key)


def test_keys_are_distinct(tmp_path: Path) -> None:
    assert generate_keypair(tmp_path / "a", comment="c") != generate_keypair(tmp_path / "b", comment="c")


def test_comment_must_be_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_keypair(tmp_path / "id", comment="a\nb")
    assert not (tmp_path / "id").exists()


def test_host_key_entry(tmp_path: Path) -> None:
    line = generate_keypair(tmp_path / "host", comment="host key of vm-1")
    key_type, blob = host_key_entry(line)
    assert key_type == "ssh-ed25519"
    assert blob == line.split()[1]
    assert host_key_entry(" ".join(line.split()[:2]) + "\n") == (key_type, blob)
    pinned = paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    assert pinned == paramiko.PKey.from_path(tmp_path / "host")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ssh-ed25519",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
        "ssh-ed25519 not*base64",
        "ecdsa-sha2-nistp256 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        "ssh-ed25519 AAAA",
    ],
)
def test_host_key_entry_rejects_malformed_lines(bad: str) -> None:
    with pytest.raises(ValueError):
        host_key_entry(bad)
