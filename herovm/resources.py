"""Paths of the project's data directories (templates, image recipes, the guest agent).

herovm runs from its checkout (an editable install, as the README sets it up): these live beside the package.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
RECIPES = ROOT / "images"
BOOTSTRAP = ROOT / "bootstrap"
AGENT = BOOTSTRAP / "agent"
INITRAMFS = BOOTSTRAP / "initramfs"
HEROSCRIPT = Path(__file__).resolve().parent / "heroscript"
PROTOCOL = Path(__file__).resolve().parent / "protocol.py"  # the host-guest contract: both sides import it
