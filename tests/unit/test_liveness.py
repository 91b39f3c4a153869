"""A killed test session's VMs are found and removed by `gc`, and never a VM that belongs to someone else
(herovm.liveness, herovm.leftovers.orphaned_test_vms): a VM is marked with the pytest process that made it,
by pid and start time; gc removes it once that process is gone, and leaves a VM whose maker still runs, a
VM without the mark, and one a herovm process holds. On libvirt's test driver."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from specs import define_in_vmdir, unique

from herovm import liveness, state
from herovm.leftovers import orphaned_test_vms
from herovm.manager import Manager


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_mark_names_a_process_by_pid_and_start_time() -> None:
    me = liveness.mark()
    assert liveness.alive(me)
    assert not liveness.alive({"pid": dead_pid(), "start": me["start"]})
    assert not liveness.alive({**me, "start": me["start"] + 1}), "a later process with the same pid"
    assert liveness.alive("not a mark") and liveness.alive({"pid": "1"}), "what cannot be read is not taken"


def test_gc_removes_the_vms_of_a_session_that_is_gone_and_nothing_else(
    manager: Manager, backend, tmp_path: Path
) -> None:
    gone, running, plain, held = (unique(t) for t in ("gone", "live", "plain", "held"))
    dead = {"pid": dead_pid(), "start": liveness.mark()["start"]}
    for name, extra in (
        (gone, {liveness.SESSION_MARK: dead}),
        (running, {liveness.SESSION_MARK: liveness.mark()}),
        (plain, {}),
        (held, {liveness.SESSION_MARK: dead}),
    ):
        define_in_vmdir(backend, tmp_path, name, {**extra, "home": str(state.home())})
    with state.VMDir(held).lock():  # a herovm process is working on it
        removed = orphaned_test_vms(manager)
    assert removed == [f"{gone} (made by a pytest session that is gone, pid {dead['pid']})"]
    assert backend.get(gone) is None and not state.VMDir(gone).exists()
    assert all(backend.get(n) is not None for n in (running, plain, held))
    assert any(r.startswith(f"{held} (made by a pytest session") for r in manager.gc()), "once let go"
