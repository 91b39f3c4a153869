"""The per-boot config drive: an ISO9660 volume labelled DRIVE_LABEL holding config.json, the document
herovm.protocol.DriveConfig describes (docs/protocol.md, "Inputs: the config drive")."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import pycdlib

from ..errors import InvalidInput
from ..protocol import DRIVE_FILE, DRIVE_LABEL, DRIVE_MAX_BYTES, DRIVE_VERSION, DriveConfig


def write(path: Path, config: Mapping) -> None:
    """Write the drive atomically, readable only by its owner (it holds the guest's SSH host key). `config`
    is checked first with the agent's own check (DriveConfig): the host never writes a drive the agent would
    refuse. ValueError for a malformed config, InvalidInput for one too large for the agent to read."""
    document = {"v": DRIVE_VERSION, **config}
    DriveConfig.from_json(document)
    data = json.dumps(document, indent=1).encode()
    if len(data) > DRIVE_MAX_BYTES:
        raise InvalidInput(
            f"the config drive would hold {len(data)} bytes, more than the guest reads ({DRIVE_MAX_BYTES})",
            hint="pass fewer or smaller --var and --secret values",
        )
    write_iso(path, DRIVE_LABEL, {DRIVE_FILE: data})


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
        iso.get_file_from_iso_fp(out, rr_path=f"/{DRIVE_FILE}")
    finally:
        iso.close()
    return json.loads(out.getvalue())
