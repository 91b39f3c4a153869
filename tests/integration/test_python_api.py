"""The Python API on real guests (docs/python.md): the VM handle's file helpers, background processes,
typed status, stop/start and down; and the asyncio form: up, exec (two at once run side by side), files,
a background process, down, and a cancelled `up` that leaves nothing, cancelled while the image is being
made ready or while the guest boots.

Timings are printed (`-s`): the thread hop of the async form next to a plain exec, and how long a
cancelled `up` takes to clean up."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from guests import assert_nothing_left

import herovm
from herovm.aio import AsyncManager
from herovm.api_types import EntryInfo, VMInfo, VMStatus
from herovm.errors import NotFound
from herovm.guest.ops import End, OpError, Output


def test_the_vm_handle_files_processes_status_stop_start_and_down(vm_factory, unique_name):
    name = unique_name()
    vm = vm_factory(name)

    status = vm.status()
    assert isinstance(status, VMStatus) and status.ready and status.name == name
    assert status.to_json() == vm.manager.status(name)

    # files: str and bytes, a mode, a user's home, a listing
    info = vm.write_file("/srv/app/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert isinstance(info, EntryInfo) and info.mode == 0o755 and info.path == "/srv/app/run.sh"
    vm.write_file("/srv/app/data.bin", bytes(range(256)) * 10)
    assert vm.read_file("/srv/app/data.bin") == bytes(range(256)) * 10
    assert vm.read_file("/srv/app/data.bin", offset=256, limit=4) == bytes(range(4))
    assert vm.exec(["/srv/app/run.sh"]).stdout == b"ran\n"
    entries = {e.name: e for e in vm.listdir("/srv/app")}
    assert set(entries) == {"run.sh", "data.bin"} and entries["data.bin"].size == 2560
    assert entries["run.sh"].type == "file"
    assert vm.exec("id nobody >/dev/null").exit_code == 0
    with pytest.raises(OpError) as e:
        vm.read_file("/root/.bashrc", user="nobody")
    assert e.value.code == "permission"
    with pytest.raises(OpError) as e:
        vm.listdir("/no/such/dir")
    assert e.value.code == "not_found"

    # a background command: returns at once, runs on, is followed to its end
    t = time.monotonic()
    p = vm.start_process("sleep 1; echo done; echo oops >&2; exit 3", tag="bg")
    assert time.monotonic() - t < 1.0 and p.pid > 1 and p.tag == "bg"
    assert any(q.tag == "bg" and q.running for q in vm.ops.list_processes())
    end = p.wait()
    assert end == End(3, None, b"done\n", b"oops\n")
    # one that outlives its handle: closed, still running, ended by a signal
    lasting = vm.start_process(["sleep", "300"], tag="long")
    lasting.close()
    (running,) = [q for q in vm.ops.list_processes() if q.tag == "long"]
    assert running.running
    vm.ops.signal("long", "KILL")
    assert list(vm.ops.connect("long", replay=True))[-1] == End(128 + 9, 9)

    # stop and start through the handle: the disk (and the file) is kept, the handle works on
    vm.stop()
    assert vm.status().state == "stopped" and not vm.status().ready
    assert vm.start() is vm
    assert vm.status().ready and vm.read_file("/srv/app/run.sh").startswith(b"#!/bin/sh")

    vm.down()
    assert_nothing_left(name)
    with pytest.raises(NotFound):
        vm.manager.info(name)


def _remove(name: str) -> None:
    with herovm.Manager() as m, contextlib.suppress(NotFound):
        m.down(name)


def test_the_async_form_up_exec_side_by_side_files_and_down(image, unique_name):
    name = unique_name()

    async def main() -> None:
        async with AsyncManager() as m:
            vm = await m.up(name, timeout="3m")
            assert vm.name == name
            status = await vm.status()
            assert status.ready and status == await m.status(name)
            rows = {v.name: v for v in await m.ls()}
            assert isinstance(rows[name], VMInfo) and rows[name].ready and rows[name].state == "running"

            # two execs at once run side by side: about one second, not two
            t = time.monotonic()
            a, b = await asyncio.gather(vm.exec("sleep 1; echo a"), vm.exec(["sh", "-c", "sleep 1; echo b"]))
            both = time.monotonic() - t
            assert (a.stdout, b.stdout, a.exit_code, b.exit_code) == (b"a\n", b"b\n", 0, 0)
            assert both < 1.8, f"two 1 s execs took {both:.2f} s together"

            # the thread hop, next to the exec it carries
            for _ in range(3):
                vm.vm.exec(["true"])
            n = 20
            t = time.monotonic()
            for _ in range(n):
                vm.vm.exec(["true"])
            sync_s = (time.monotonic() - t) / n
            t = time.monotonic()
            for _ in range(n):
                await vm.exec(["true"])
            async_s = (time.monotonic() - t) / n
            print(f"\nexec true: {sync_s * 1e3:.1f} ms blocking, {async_s * 1e3:.1f} ms awaited")

            await vm.write_file("notes/a.txt", "hello")  # relative: root's home
            assert await vm.read_file("/root/notes/a.txt") == b"hello"
            assert [e.name for e in await vm.listdir("/root/notes")] == ["a.txt"]
            p = await vm.start_process("echo one; sleep 0.2; echo two")
            events = [e async for e in p]
            assert [e for e in events if isinstance(e, Output)] == [
                Output("stdout", b"one\n"),
                Output("stdout", b"two\n"),
            ]
            assert events[-1] == End(0, None)
            assert (await (await vm.start_process("exit 4")).wait()).exit_code == 4

            await vm.pause()
            assert (await m.status(name)).state == "paused"
            await vm.resume()
            assert (await vm.exec("echo back")).stdout == b"back\n"

            await vm.down()
            with pytest.raises(NotFound):
                await m.status(name)

    try:
        asyncio.run(main())
    finally:
        _remove(name)
    assert_nothing_left(name)


@pytest.mark.parametrize("when", ["at-once", "starting", "agent"])
def test_a_cancelled_async_up_leaves_nothing(image, unique_name, when):
    """Cancelled at once (before anything was made), while libvirt starts the machine (0.3 s after `up`
    said "starting"), or once the guest's agent has spoken: the await ends with CancelledError, and nothing
    of the VM is left."""
    name = unique_name(f"cancel-{when}")
    stages: list[str] = []
    reached = threading.Event()

    def progress(p) -> None:
        stages.append(p.stage)
        if p.stage == {"starting": "boot", "agent": "agent"}.get(when):
            reached.set()

    async def main() -> float:
        async with AsyncManager(progress=progress) as m:
            task = asyncio.ensure_future(m.up(name, timeout="3m"))
            if when != "at-once":
                while not reached.is_set():
                    await asyncio.sleep(0.01)
                if when == "starting":
                    await asyncio.sleep(0.3)
            else:
                await asyncio.sleep(0)
            t = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t

    try:
        took = asyncio.run(main())
    finally:
        _remove(name)  # should find nothing
    print(f"\ncancelled up ({when}): cleaned up in {took:.2f} s; stages seen {sorted(set(stages))}")
    if when != "at-once":
        assert "define" in stages and "boot" in stages
    assert_nothing_left(name)
    with herovm.Manager() as m:
        assert name not in {v.name for v in m.vms()}
