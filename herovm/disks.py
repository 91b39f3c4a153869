"""A VM's disks: qcow2 overlays on its image's base, readable by their owner only.

A VM starts with one overlay, `disk.qcow2`. A snapshot freezes the VM's disk as it is (never written
again) and the VM goes on on a new overlay of it, `disk-<8 hex>.qcow2` beside it; a restore gives the VM a
new overlay on the snapshot's frozen disk. So a VM's disk is a chain of overlays in its directory, down to
the image: `chain` follows it through each qcow2's header, and `prune` removes the overlays nothing needs
any more."""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .errors import HeroVMError

OVERLAY_RE = re.compile(r"^disk(-[0-9a-f]{8})?\.qcow2$")
_QCOW2_MAGIC = b"QFI\xfb"


def create_overlay(base: Path, path: Path, size: int | None = None, *, what: str) -> None:
    """Create `path`, a qcow2 backed by the qcow2 `base` (of `size` bytes; None: the base's), mode 0600.
    `what` names the VM in the error."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path)]
    try:
        subprocess.run(
            cmd + ([str(size)] if size is not None else []), check=True, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as e:
        raise HeroVMError(f"cannot create the disk of {what}: {e.stderr.strip()}") from e
    # qemu-img honours the umask only: 0644 made the disk, which holds the guest's host key, world-readable
    os.chmod(path, 0o600)


def new_overlay_path(directory: Path) -> Path:
    """A name for a new overlay in a VM's directory, taken by no file."""
    while True:
        path = directory / f"disk-{secrets.token_hex(4)}.qcow2"
        if not path.exists():
            return path


def backing_file(path: Path) -> Path | None:
    """The backing file a qcow2 names in its header (None: it has none). Reads the header only, so it works
    on a disk QEMU has open."""
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
            raise HeroVMError(f"{path} is not a qcow2 disk")
        offset, size = struct.unpack(">QI", header[8:20])
        if not offset:
            return None
        if size > 1023:
            raise HeroVMError(f"{path}: its backing file name is {size} bytes long")
        f.seek(offset)
        name = f.read(size).decode()
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def chain(top: Path) -> list[Path]:
    """`top` and the files under it, down to the image's base."""
    files = [top]
    while (below := backing_file(files[-1])) is not None:
        if below in files or len(files) > 4096:
            raise HeroVMError(f"the backing chain of {top} loops")
        files.append(below)
    return files


def users_of(target: Path, home: Path) -> list[str]:
    """What lies on `target` under the herovm home `home`: VMs (by name), templates ("template T") and fork
    layers ("layer L"), each once. A chain that cannot be read counts as lying on it (never cut a disk from
    under something)."""
    target = target.resolve()
    places = [
        (lambda p: p.parent.name, sorted((home / "vms").glob("*/disk*.qcow2"))),
        (lambda p: f"template {p.parent.name}", sorted((home / "templates").glob("*/disk.qcow2"))),
        (lambda p: f"layer {p.stem}", sorted((home / "layers").glob("*.qcow2"))),
    ]
    found: list[str] = []
    for label, tops in places:
        for top in tops:
            try:
                lies = target in (p.resolve() for p in chain(top)[1:])
            except (OSError, UnicodeDecodeError, HeroVMError):
                lies = True
            if lies and label(top) not in found:
                found.append(label(top))
    if target.name == "base.qcow2":  # an image: a template kept on other hosts alone boots its kernel there
        elsewhere = [f"template {t}" for t in _templates_elsewhere_on(target.parent.name, home)]
        found += [label for label in elsewhere if label not in found]
    return found


def _templates_elsewhere_on(image_id: str, home: Path) -> list[str]:
    """The templates with no copy here (no disk.qcow2) whose copies on other hosts were made from image
    `image_id` (herovm.templates); one whose template.json cannot be read counts."""
    found = []
    for facts in sorted((home / "templates").glob("*/template.json")):
        if (facts.parent / "disk.qcow2").exists():
            continue
        try:
            copies = json.loads(facts.read_text()).get("copies") or {}
            made_from = {(c.get("record") or {}).get("image_id") for c in copies.values()}
        except (OSError, ValueError, AttributeError):
            made_from = {image_id}
        if image_id in made_from:
            found.append(facts.parent.name)
    return found


def prune(directory: Path, tops: Iterable[Path]) -> list[Path]:
    """Remove the overlays in `directory` that no chain from `tops` (the VM's disk, its snapshots' frozen
    disks) goes through; returns them. A chain that cannot be read removes nothing."""
    needed: set[Path] = set()
    try:
        for top in tops:
            needed.update(p.resolve() for p in chain(top))
    except (OSError, UnicodeDecodeError, HeroVMError):
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if OVERLAY_RE.match(path.name) and path.is_file() and path.resolve() not in needed:
            path.unlink()
            removed.append(path)
    return removed
