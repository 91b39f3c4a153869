"""A VM's disk: a qcow2 overlay on its image's base, readable by its owner only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import HeroVMError


def create_overlay(base: Path, path: Path, size: int, *, what: str) -> None:
    """Create `path`, a qcow2 of `size` bytes backed by the qcow2 `base`, mode 0600. `what` names the VM in
    the error."""
    try:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path), str(size)],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as e:
        raise HeroVMError(f"cannot create the disk of {what}: {e.stderr.strip()}") from e
    # qemu-img honours the umask only: 0644 made the disk, which holds the guest's host key, world-readable
    os.chmod(path, 0o600)
