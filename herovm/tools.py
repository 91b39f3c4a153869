"""The host programs herovm runs, found where Debian puts them: a user's PATH has no /usr/sbin, where
mkfs.ext4, nft and groupadd live (a non-root `herovm doctor` said `mkfs.ext4: not found`)."""

from __future__ import annotations

import os
import shutil

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def which(name: str) -> str | None:
    """The program's path: on PATH, else in the sbin directories; None if it is nowhere."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None
