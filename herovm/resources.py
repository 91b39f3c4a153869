"""Paths of the data herovm ships inside its package (templates, image recipes, the guest agent).

Everything lives under `herovm/_data/`, package data found through `importlib.resources`, so a checkout (an
editable install), a wheel and a pipx install all find it the same way. herovm copies these files into images,
puts the agent on `sys.path` and hands the template directory to Jinja, so they must be real files: an install
that is not (a zip) is refused with a message rather than half working.
"""

import re
from importlib.resources import files
from pathlib import Path

from .errors import InvalidInput


def _package_dir() -> Path:
    here = files(__package__)
    if not isinstance(here, Path) or not (here / "_data").is_dir():
        raise RuntimeError(
            f"herovm's data files are not on disk beside its code ({here}): install herovm as files "
            "(pip install, pipx install, or an editable install of a checkout), not as a zip"
        )
    return here


PACKAGE = _package_dir()  # .../herovm: the checkout's herovm/ or site-packages/herovm
# Image ids hash file names relative to this (herovm/_data/agent/..., herovm/protocol.py), never absolute
# paths: the same sources give the same id from a checkout and from an installed wheel.
ROOT = PACKAGE.parent
DATA = PACKAGE / "_data"
TEMPLATES = DATA / "templates"  # the libvirt domain template (Jinja)
RECIPES = DATA / "images"  # image recipes: images/NAME.toml
AGENT = DATA / "agent"  # the guest agent: agent.py, herovm_agent/, sshd_config (copied into the image)
INITRAMFS = DATA / "initramfs"  # the initramfs's init and its module list
HEROSCRIPT = PACKAGE / "heroscript"  # imported by both sides: the image carries a copy
PROTOCOL = PACKAGE / "protocol.py"  # the host-guest contract: both sides import it

RECIPE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def check_recipe_name(name: str) -> str:
    """Recipe names become paths under images/ and the cache: nothing else may get through."""
    if not isinstance(name, str) or not RECIPE_RE.match(name):
        raise InvalidInput(
            f"invalid image name {name!r}", hint=f"recipes: {', '.join(recipe_names()) or 'none'}"
        )
    return name
