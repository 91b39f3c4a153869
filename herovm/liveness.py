"""Whether the process that made a VM still runs: a pytest session marks its VMs with its process (pid and
start time, so that a later process given the same pid is not taken for it), and `gc` removes a VM whose
maker is gone (herovm.leftovers.orphaned_test_vms). Imports nothing of herovm: the pytest plugin, which
every pytest session of a user loads, uses it."""

from __future__ import annotations

import os

SESSION_MARK = (
    "pytest_session"  # in a VM's record: {"pid": N, "start": ticks}, the pytest process that made it
)


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22, after the command's parentheses


def mark(pid: int | None = None) -> dict[str, int | None]:
    """This process (or `pid`), as a VM's record keeps it."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": process_start(pid)}


def alive(marked: object) -> bool:
    """Whether the process a mark names still runs (a mark that cannot be read: yes, so nothing is taken)."""
    if not isinstance(marked, dict) or not isinstance(marked.get("pid"), int):
        return True
    start = process_start(marked["pid"])
    return start is not None and start == marked.get("start")
