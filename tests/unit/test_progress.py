"""A call that blocks says so while it blocks (a define once sat silent for 84 s on a fresh machine)."""

from __future__ import annotations

import time

from herovm.progress import Progress, still_waiting


def test_a_long_wait_is_reported_while_it_lasts_and_not_after():
    seen: list[Progress] = []
    with still_waiting(seen.append, "define", "waiting for libvirt to define box", every=0.1):
        time.sleep(0.45)
    count = len(seen)
    assert count >= 3
    assert all(p.stage == "define" and p.message.startswith("still waiting for libvirt") for p in seen)
    time.sleep(0.25)
    assert len(seen) == count, "reports stop when the wait ends"


def test_a_short_wait_says_nothing_and_errors_pass_through():
    seen: list[Progress] = []
    try:
        with still_waiting(seen.append, "boot", "starting", every=5.0):
            raise RuntimeError("define failed")
    except RuntimeError as e:
        assert str(e) == "define failed"
    assert seen == []
