"""The agent's reaper (herovm/_data/agent/herovm_agent/processes.py) run as PID 1 of a new PID namespace, as
in the guest, with pids reused on purpose through that namespace's `ns_last_pid`: a command that gets the pid
of an earlier child must be answered with its own exit status, never the earlier child's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "herovm/_data/agent"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (a PID namespace)"
)

# Runs as PID 1 of its own PID namespace (with its own /proc): orphans come to it, as to the agent.
PID1 = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from herovm_agent.processes import Processes

    assert os.getpid() == 1
    processes = Processes()

    def reaped(pid):
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}"):  # a zombie keeps its entry until it is reaped
            assert time.monotonic() < deadline, f"{pid} was never reaped"
            time.sleep(0.005)

    def run_after(first):  # `sh -c 'exit 7'` on the pid `first` had, once the reaper has reaped it
        pid = first.pid
        del first  # as the SSH listener does: nobody keeps it
        reaped(pid)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = processes.spawn(["sh", "-c", "exit 7"])
        return proc.pid == pid, processes.wait(proc, timeout=10)

    out = {}
    for case, waited in (("unwaited", False), ("never_waited_for", True)):
        # never_waited_for: a child spawned to be waited for, whose owner went away without waiting
        runs = [run_after(processes.spawn(["true"], waited=waited)) for _ in range(10)]
        out[case] = {"hits": sum(hit for hit, _ in runs), "codes": [code for _, code in runs]}
    out["statuses_kept"] = len(processes._status)
    out["polled_by_subprocess"] = len(subprocess._active)
    print(json.dumps(out))
    """
)


def test_a_reused_pid_gets_its_own_exit_status_never_a_stale_one() -> None:
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID1, str(AGENT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for case in ("unwaited", "never_waited_for"):
        assert out[case]["hits"] >= 5, f"{case}: the pid was reused in only {out[case]['hits']} of 10 runs"
        assert out[case]["codes"] == [7] * 10, case
    assert out["statuses_kept"] == 0  # nothing kept for pids nobody will ask about
    assert out["polled_by_subprocess"] == 0  # subprocess never holds a child of ours to reap it itself
