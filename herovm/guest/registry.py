"""The guest's action registry, read on the host so a bootstrap is checked before any VM is made."""

from __future__ import annotations

import functools
import sys

from .. import resources
from ..heroscript import Registry


@functools.cache
def guest_registry() -> Registry:
    path = str(resources.AGENT)
    if path not in sys.path:
        sys.path.insert(0, path)
    from herovm_agent.actions import registry  # type: ignore[import-not-found]

    return registry
