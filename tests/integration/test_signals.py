"""`herovm up` ended by a signal while its guest boots: SIGINT (Ctrl-C) and SIGTERM (what a CI runner or a
supervisor sends) both remove the half-made VM. Only SIGINT did; SIGTERM left the VM directory behind."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from guests import HEROVM, assert_nothing_left

from herovm import state


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_up_ended_by_a_signal_while_booting_leaves_nothing(image, unique_name, sig, code):
    name = unique_name(sig.name.lower())
    proc = subprocess.Popen(
        [*HEROVM, "up", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a runner started in the background (`cmd &` in a script) hands its children
        # SIGINT ignored, and Python then keeps ignoring it (found when .ci/run ran that way: exit 0)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        console = state.VMDir(name).console_log
        deadline = time.monotonic() + 120
        while not console.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert console.exists() and proc.poll() is None, "the guest never started booting"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "the half-made VM was removed" in err
    assert_nothing_left(name)
