"""The per-boot config drive: an ISO9660 volume labelled HEROVM with config.json (bootstrap/PROTOCOL.md)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pycdlib

LABEL = "HEROVM"
PROTOCOL_VERSION = 1


def write(path: Path, config: dict) -> None:
    """Write the drive atomically, readable only by its owner (it holds the guest's SSH host key)."""
    data = json.dumps({"v": PROTOCOL_VERSION, **config}, indent=1).encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    fp = io.BytesIO(data)
    iso.add_fp(fp, len(data), "/CONFIG.JSON;1", rr_name="config.json", joliet_path="/config.json")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            iso.write_fp(out)
    finally:
        iso.close()
    tmp.replace(path)


def read(path: Path) -> dict:
    """Read config.json back from a drive (for tests and `herovm doctor`)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/config.json")
    finally:
        iso.close()
    return json.loads(out.getvalue())
