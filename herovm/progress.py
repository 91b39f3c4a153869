"""The one progress type every long operation reports, and the CLI renders."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def still_waiting(progress: Reporter, stage: str, what: str, every: float = 5.0) -> Iterator[None]:
    """Report, every `every` seconds until the block ends, that `what` is still going on: a call that
    blocks must not look like a hang (a define on a fresh machine once sat silent for 84 s)."""
    done = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not done.wait(every):
            progress(Progress(stage, f"still {what} ({time.monotonic() - started:.0f}s)"))

    thread = threading.Thread(target=tick, name="herovm-still-waiting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
