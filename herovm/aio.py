"""The asyncio form of herovm's verbs, for agent frameworks: `AsyncManager` and its `AsyncVM` handles.

    import asyncio, herovm

    async def main():
        async with herovm.AsyncManager() as m:
            vm = await m.up("box", memory="1GB")
            a, b = await asyncio.gather(vm.exec("sleep 1; echo a"), vm.exec("sleep 1; echo b"))  # ~1 s
            await vm.write_file("/root/x.txt", "hello")
            print((await vm.status()).agent, await vm.read_file("/root/x.txt"))
            await vm.down()

    asyncio.run(main())

**Why threads.** Every verb is the blocking one of herovm.manager / herovm.vm run in a thread of a pool
(`loop.run_in_executor`, as `asyncio.to_thread` does): libvirt-python, the agent's exec client and the
SSH copy are blocking, and a verb spends its time waiting on a guest (a boot seconds, an exec as long as its
command), not on Python. One thread per call is what that needs: herovm's calls hold no lock while they
wait, the agent client gives each concurrent exec a connection of its own, and libvirt's connection is
safe to share between threads. The hop costs ~30 us per call (tests/unit/test_api_types.py); an exec of
`true` took 15.7 ms awaited and 15.9 ms blocking (tests/integration/test_python_api.py). The pool is the
loop's default (min(32, CPUs + 4) threads) unless `executor=` gives one: a command that runs for an hour
holds its thread for that hour, so many long execs want a pool of their own.

**Results are typed**: `status()` is a VMStatus, `ls()` VMInfo rows, `snapshot()` a SnapshotInfo, and so
on (herovm.api_types); errors are herovm.errors's, raised from the `await`.

**Cancellation.** Python cannot stop a thread, so cancelling an `await` (a `Task.cancel()`, an
`asyncio.timeout`) works as follows:

- `up`: as Ctrl-C on `herovm up`: the VM that `up` was making is removed and nothing of it is left. The
  `await` raises CancelledError only once that is done: the thread is told at its next step (it raises
  KeyboardInterrupt there, which `up` already handles by removing what it made) and the guest, once
  defined, is powered off so that the boot ends at once; a VM `up` finished meanwhile is removed with
  `down`. Well under a second here (tests/integration/test_python_api.py). A second cancel meanwhile does
  not cut that short. A VM that existed before is never removed: an `up` that returns it as it is, or
  boots it because it was stopped, is left to finish first.
- a background process's `wait()` or `async for`: the handle stops following; the process runs on in the
  guest (as ProcessHandle.close).
- every other verb: CancelledError at once, and the call runs on to its end in its thread; its result
  is dropped. An `exec`'s command runs on in the guest until it ends or its `timeout` (pass one); a `down`,
  `stop` or `snapshot` completes.

Callbacks (`exec`'s on_stdout/on_stderr, the Manager's `progress`) are called in the worker thread: hand
what they get to the loop with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from .api_types import (
    End,
    EntryInfo,
    ExecResult,
    ForkResult,
    Output,
    ProcessHandle,
    SnapshotInfo,
    TemplateInfo,
    VMInfo,
    VMStatus,
)
from .errors import NotFound
from .manager import Manager
from .progress import Progress, Reporter, silent

if TYPE_CHECKING:
    from .backends import Backend
    from .guest.ops import Dropped, GuestOps
    from .record import VMRecord
    from .settings import VMSettings
    from .vm import VM

__all__ = ["AsyncManager", "AsyncProcess", "AsyncVM"]

T = TypeVar("T")


class _UpCancelled(Exception):
    """The worker thread's `up` stopped because its caller was cancelled (what it made is removed)."""


class AsyncManager:
    """The asyncio form of Manager (module docstring): the same verbs, awaited, typed results.

    `async with herovm.AsyncManager() as m: vm = await m.up("box")`. `backend`, `uri` and `progress` are
    Manager's; `manager` wraps an existing Manager instead; `executor` runs the calls (default:
    the loop's)."""

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        uri: str | None = None,
        progress: Reporter = silent,
        manager: Manager | None = None,
        executor: Executor | None = None,
    ) -> None:
        """Make the Manager (nothing is connected yet: libvirt is opened at the first call)."""
        self.manager = manager if manager is not None else Manager(backend, uri=uri, progress=progress)
        self.executor = executor

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the executor, with this context's variables (as asyncio.to_thread):
        for a blocking herovm call that has no async form here."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await loop.run_in_executor(self.executor, call)

    # ------------------------------------------------------------------------------------------- up

    async def up(self, name: str, settings: VMSettings | None = None, **options: Any) -> AsyncVM:
        """Create and boot a VM (Manager.up: `settings`, or `options` named as VMSettings's fields, such as
        memory="1GB", bootstrap="setup.hero", template="py"); returns once it answers exec. Cancelled, it
        removes the VM it was making before raising CancelledError (module docstring)."""
        cancelled = threading.Event()
        owned = threading.Event()  # this call's `up` has the VM's lock and made (or is making) its machine
        worker: list[int] = []
        report = self.manager.progress

        def progress(p: Progress) -> None:
            mine = bool(worker) and threading.get_ident() == worker[0]  # not a still_waiting thread's
            if mine and p.stage == "define":
                owned.set()
            report(p)
            # Manager.up's Ctrl-C path: what it made is removed. Only while it makes the VM (or the image
            # before it): an `up` that starts an existing stopped VM is left to finish, as it would remove it.
            # Never in the middle of its own clean-up ("up: removing ...", "down"): that would cut it short.
            making = owned.is_set() or p.stage == "image"
            if cancelled.is_set() and mine and making and p.stage not in ("up", "down"):
                raise KeyboardInterrupt

        # A Manager for this call only (sharing the backend): `up` swaps its progress while it runs, which
        # concurrent `up`s on one Manager must not see.
        m = Manager(self.manager.backend, progress=progress)
        m.fetch_timeout = self.manager.fetch_timeout

        def call() -> VM:
            worker.append(threading.get_ident())
            try:
                if cancelled.is_set():
                    raise KeyboardInterrupt
                return m.up(name, settings, **options)
            except KeyboardInterrupt:
                if cancelled.is_set():  # asyncio must never see a KeyboardInterrupt: it would end the loop
                    raise _UpCancelled(name) from None
                raise

        future = asyncio.ensure_future(self.run(call))
        try:
            vm = await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            cleanup = asyncio.ensure_future(self._undo_up(future, name, owned))
            while not cleanup.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(cleanup)
            raise
        return AsyncVM(self, vm)

    async def _undo_up(self, future: asyncio.Future, name: str, owned: threading.Event) -> None:
        """After `up` was cancelled: power its guest off (once it has one) until its thread ends, then
        remove whatever of the VM is left (an `up` that finished meanwhile, a failed action's VM kept)."""
        while not future.done():
            if owned.is_set():
                with contextlib.suppress(Exception):
                    await self.run(self.manager.backend.destroy, name)
            await asyncio.wait({future}, timeout=0.2)
        if not future.cancelled():
            future.exception()  # retrieved: it is the cancellation's, not the caller's
        if owned.is_set():
            with contextlib.suppress(NotFound):
                await self.run(self.manager.down, name)

    # ----------------------------------------------------------------------------- other verbs

    async def get(self, name: str) -> AsyncVM:
        """A handle on the existing VM `name`; NotFound if there is none."""
        return AsyncVM(self, await self.run(self.manager.get, name))

    async def start(self, name: str, timeout: str | float = "5m") -> AsyncVM:
        """Boot a stopped VM again; returns once it answers exec (Manager.start)."""
        return AsyncVM(self, await self.run(self.manager.start, name, timeout))

    async def stop(self, name: str, timeout: float = 20.0) -> None:
        """Power the guest off, hard after `timeout` seconds; its disk is kept (Manager.stop)."""
        await self.run(self.manager.stop, name, timeout)

    async def pause(self, name: str) -> None:
        """Freeze the VM: no CPU used, everything kept until `resume` (Manager.pause)."""
        await self.run(self.manager.pause, name)

    async def resume(self, name: str) -> None:
        """Let a paused VM run on (Manager.resume)."""
        await self.run(self.manager.resume, name)

    async def down(self, name: str) -> None:
        """Remove the VM; nothing is left (Manager.down)."""
        await self.run(self.manager.down, name)

    async def status(self, name: str) -> VMStatus:
        """The VM's facts and what its last boot came to (Manager.info)."""
        return await self.run(self.manager.info, name)

    async def ls(self) -> list[VMInfo]:
        """Every VM of this HEROVM_HOME (Manager.vms)."""
        return await self.run(self.manager.vms)

    async def snapshot(self, name: str, snap: str) -> SnapshotInfo:
        """Snapshot the VM as `snap` (Manager.snapshot)."""
        return SnapshotInfo.from_json(await self.run(self.manager.snapshot, name, snap))

    async def snapshots(self, name: str | None = None) -> list[SnapshotInfo]:
        """The snapshots of one VM, or of every VM, oldest first (Manager.snapshot_infos)."""
        return await self.run(self.manager.snapshot_infos, name)

    async def restore(self, name: str, snap: str) -> SnapshotInfo:
        """Roll the VM back to its snapshot `snap` (Manager.restore)."""
        return SnapshotInfo.from_json(await self.run(self.manager.restore, name, snap))

    async def remove_snapshot(self, name: str, snap: str) -> None:
        """Remove the VM's snapshot `snap`."""
        await self.run(self.manager.remove_snapshot, name, snap)

    async def create_template(
        self, name: str, settings: VMSettings | None = None, *, hosts: list[str] | None = None, **options: Any
    ) -> TemplateInfo:
        """Make template `name` (Manager.make_template; a copy on each of `hosts`); `up(NAME,
        template=name)` restores VMs from it."""
        return await self.run(self.manager.make_template, name, settings, hosts=hosts, **options)

    async def templates(self) -> list[TemplateInfo]:
        """Every template (Manager.template_infos)."""
        return await self.run(self.manager.template_infos)

    async def hosts(self) -> list[dict]:
        """Every host herovm may place VMs on, and what it has (Manager.hosts: `herovm host ls --json`)."""
        return await self.run(self.manager.hosts)

    async def remove_template(self, name: str) -> None:
        """Remove template `name` (Busy while a VM's disk lies on it)."""
        await self.run(self.manager.remove_template, name)

    async def fork(self, source: str, names: Sequence[str]) -> ForkResult:
        """New VMs `names` from the running VM `source` (Manager.fork)."""
        return ForkResult.from_json(await self.run(self.manager.fork, source, list(names)))

    async def port(self, name: str, guest_port: int) -> tuple[str, int]:
        """(host, port) on this host where the VM's `guest_port` is published (Manager.port)."""
        return await self.run(self.manager.port, name, guest_port)

    async def gc(self) -> list[str]:
        """Remove what crashed or killed herovm processes left behind (Manager.gc)."""
        return await self.run(self.manager.gc)

    async def close(self) -> None:
        """Close the Manager (its libvirt connection)."""
        await self.run(self.manager.close)

    async def __aenter__(self) -> AsyncManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncVM:
    """The asyncio form of a VM handle (herovm.vm.VM): exec, files, processes, and the Manager's verbs for
    this VM. `vm` is the blocking handle underneath; `async with vm:` closes its connections at the end
    (the VM runs on; `down()` removes it)."""

    def __init__(self, manager: AsyncManager, vm: VM) -> None:
        """A handle on `vm`, through `manager` (made by AsyncManager.up, get, start)."""
        self.manager = manager
        self.vm = vm
        self.name = vm.name

    @property
    def record(self) -> VMRecord:
        """What herovm recorded about the VM (herovm.record.VMRecord)."""
        return self.vm.record

    @property
    def ops(self) -> GuestOps:
        """The blocking guest ops (herovm.guest.ops): for what has no async form here, through `run`."""
        return self.vm.ops

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the manager's executor (AsyncManager.run)."""
        return await self.manager.run(fn, *args, **kwargs)

    async def exec(
        self,
        command: Sequence[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | BinaryIO | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> ExecResult:
        """Run `command` and wait for it (VM.exec). Concurrent execs run side by side. Cancelled, the
        command runs on in the guest until it ends or `timeout` (module docstring)."""
        return await self.run(
            self.vm.exec,
            command,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )

    async def put(self, local: str | os.PathLike, remote: str) -> None:
        """Copy a local file or directory into the guest (VM.put; `herovm cp LOCAL NAME:REMOTE`)."""
        await self.run(self.vm.put, local, remote)

    async def get(self, remote: str, local: str | os.PathLike) -> list[str]:
        """Copy a guest file or directory here (VM.get; `herovm cp NAME:REMOTE LOCAL`); returns the
        skipped entries."""
        return await self.run(self.vm.get, remote, local)

    async def read_file(
        self, path: str, *, user: str = "root", offset: int = 0, limit: int | None = None
    ) -> bytes:
        """The guest file's bytes, read as `user` (VM.read_file)."""
        return await self.run(self.vm.read_file, path, user=user, offset=offset, limit=limit)

    async def write_file(
        self,
        path: str,
        data: bytes | bytearray | memoryview | str | BinaryIO | Iterable[bytes],
        *,
        user: str = "root",
        mode: int | None = None,
    ) -> EntryInfo:
        """Write the guest file atomically as `user` (VM.write_file)."""
        return await self.run(self.vm.write_file, path, data, user=user, mode=mode)

    async def listdir(self, path: str = ".", *, user: str = "root", depth: int = 1) -> list[EntryInfo]:
        """The entries of the guest directory `path` (VM.listdir)."""
        return await self.run(self.vm.listdir, path, user=user, depth=depth)

    async def start_process(
        self,
        command: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str = "root",
        tag: str | None = None,
        stdin: bool = False,
    ) -> AsyncProcess:
        """Start `command` in the background and return at once (VM.start_process): `await p.wait()` for
        its End, or `async for event in p`."""
        handle = await self.run(
            self.vm.start_process, command, env=env, cwd=cwd, user=user, tag=tag, stdin=stdin
        )
        return AsyncProcess(self.manager, handle)

    async def status(self) -> VMStatus:
        """The VM's facts and what its last boot came to (VM.status)."""
        return await self.run(self.vm.status)

    async def stop(self, timeout: float = 20.0) -> None:
        """Power the guest off; the disk is kept (VM.stop)."""
        await self.run(self.vm.stop, timeout)

    async def start(self, timeout: str | float = "5m") -> AsyncVM:
        """Boot the stopped VM again (VM.start); returns this handle."""
        await self.run(self.vm.start, timeout)
        return self

    async def pause(self) -> None:
        """Freeze the VM (VM.pause)."""
        await self.run(self.vm.pause)

    async def resume(self) -> None:
        """Let the paused VM run on (VM.resume)."""
        await self.run(self.vm.resume)

    async def down(self) -> None:
        """Remove the VM; nothing is left (VM.down)."""
        await self.run(self.vm.down)

    async def snapshot(self, snap: str) -> SnapshotInfo:
        """Snapshot the VM as `snap` (VM.snapshot)."""
        return await self.run(self.vm.snapshot, snap)

    async def snapshots(self) -> list[SnapshotInfo]:
        """The VM's snapshots, oldest first."""
        return await self.run(self.vm.snapshots)

    async def restore(self, snap: str) -> SnapshotInfo:
        """Roll the VM back to its snapshot `snap` (VM.restore)."""
        return await self.run(self.vm.restore, snap)

    async def fork(self, *names: str) -> ForkResult:
        """New VMs `names` from this running VM (VM.fork)."""
        return await self.run(self.vm.fork, *names)

    async def port(self, guest_port: int) -> tuple[str, int]:
        """(host, port) on this host that reaches the guest's published `guest_port` (VM.port)."""
        return await self.run(self.vm.port, guest_port)

    async def close(self) -> None:
        """Let this handle's connections go (the VM runs on)."""
        await self.run(self.vm.close)

    async def __aenter__(self) -> AsyncVM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<herovm.AsyncVM {self.name}>"


class AsyncProcess:
    """A background process in the guest being followed (the async form of ProcessHandle): `pid`, `tag`;
    `await wait()` for its End (with its output), or `async for event in p` (Output, Dropped, End last).
    Cancelling either stops following; the process runs on (`vm.ops.signal(tag)` ends it)."""

    def __init__(self, manager: AsyncManager, handle: ProcessHandle) -> None:
        """Follow `handle` through `manager`'s executor."""
        self.manager = manager
        self.handle = handle
        self.pid = handle.pid
        self.tag = handle.tag

    async def wait(self, max_output: int = 64 << 20) -> End:
        """Follow to the end; the End carries the output that came meanwhile (ProcessHandle.wait)."""
        try:
            return await self.manager.run(self.handle.wait, max_output)
        except asyncio.CancelledError:
            self._stop_following()
            raise

    async def __aiter__(self) -> AsyncIterator[Output | Dropped | End]:
        events = iter(self.handle)
        done = object()
        try:
            while True:
                event = await self.manager.run(next, events, done)
                if event is done:
                    return
                yield event  # type: ignore[misc]
        finally:
            self._stop_following()

    def _stop_following(self) -> None:
        """Close the handle in the executor, not waiting: a close while no thread iterates waits for the
        agent's word (up to seconds), which the loop must not."""
        asyncio.get_running_loop().run_in_executor(self.manager.executor, self.handle.close)

    async def close(self) -> None:
        """Stop following (the process runs on)."""
        await self.manager.run(self.handle.close)
