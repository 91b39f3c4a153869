"""The one progress type every long operation reports, and the CLI renders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    stage: str  # "image", "define", "boot", "agent", "down", ...
    message: str
    data: dict[str, Any] = field(default_factory=dict)


Reporter = Callable[[Progress], None]


def silent(_: Progress) -> None:
    """The default reporter: say nothing."""
