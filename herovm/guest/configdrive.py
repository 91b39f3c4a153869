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
    write_iso(path, LABEL, {"config.json": data})


def write_iso(path: Path, label: str, files: dict[str, bytes]) -> None:
    """An ISO9660 volume holding ``files`` (Rock Ridge and Joliet names as given), atomically, 0600."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    for name, data in files.items():
        stem, dot, ext = name.upper().replace("-", "").partition(".")
        iso9660_name = f"/{stem}.{ext if dot else ''};1"
        iso.add_fp(io.BytesIO(data), len(data), iso9660_name, rr_name=name, joliet_path=f"/{name}")
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
