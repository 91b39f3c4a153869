"""Paths of the project's data directories (templates, image recipes, the guest agent).

herovm runs from its checkout (an editable install, as the README sets it up): these live beside the package.
"""

import re
from pathlib import Path

from .errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
RECIPES = ROOT / "images"
BOOTSTRAP = ROOT / "bootstrap"
AGENT = BOOTSTRAP / "agent"
INITRAMFS = BOOTSTRAP / "initramfs"
HEROSCRIPT = Path(__file__).resolve().parent / "heroscript"
PROTOCOL = Path(__file__).resolve().parent / "protocol.py"  # the host-guest contract: both sides import it

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
