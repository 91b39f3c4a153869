"""PID 1's process duties: the one reaper, spawning with exit notification, and supervised services.

Only the reaper reaps. Everything the agent starts goes through `spawn`, which registers the child under the
lock the reaper holds while it reaps: a child that exits at once is still delivered to its owner, and a pid
cannot be reused between the reaping and the lookup of whose child it was (the reaper first waits without
reaping, `WNOWAIT`, then reaps that pid under the lock). Orphans re-parented to PID 1 are reaped and dropped.

An exit status is kept only for a child someone will `wait` for; a child spawned with `waited=False` (an
`sshd -i` session) has its status dropped, and a spawn discards any status left for its pid, so a command
that gets a reused pid is never answered with an earlier process's exit. The `Popen` of each child is kept
until it is reaped and then given its return code, so `subprocess` itself never polls (and never reaps) it.

The reaper starts with the first child: `threading` (and the functools and collections it imports) is not
needed before then, which is after `ready` when the bootstrap is empty.
"""

from __future__ import annotations

import _thread
import os
import time
from _signal import SIGKILL, SIGTERM

from herovm.protocol import Kind, ServiceState

TYPE_CHECKING = False  # typing itself is a cost at boot
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable


class Processes:
    def __init__(self) -> None:
        # pid -> (its Popen, on_exit: a callback, None: `wait` will ask, False: nobody will ask)
        self._owned: dict[int, tuple[subprocess.Popen, Callable[[int], None] | None | bool]] = {}
        self._status: dict[int, int] = {}
        self._start_lock = _thread.allocate_lock()
        self._started = False

    def start(self) -> None:
        """Start the reaper (on the first spawn, if not before)."""
        with self._start_lock:
            if self._started:
                return
            import threading

            self._lock = threading.Lock()
            self._have_children = threading.Condition(self._lock)
            self._exited = threading.Condition(self._lock)
            threading.Thread(target=self._reap, name="reaper", daemon=True).start()
            self._started = True

    def spawn(
        self,
        args: list[str],
        on_exit: Callable[[int], None] | None = None,
        *,
        waited: bool = True,
        **popen: object,
    ) -> subprocess.Popen:
        """Start a child; `on_exit(returncode)` runs in the reaper thread when it ends. Without `on_exit` the
        caller must `wait` for it, unless `waited=False`: nobody will, and its exit status is dropped."""
        import subprocess  # first needed after `ready` (~45 ms at boot under TCG, with selectors)

        self.start()
        with self._lock:
            proc = subprocess.Popen(args, **popen)  # type: ignore[call-overload]
            self._status.pop(proc.pid, None)  # an earlier holder of this pid's status: not ours
            self._owned[proc.pid] = (proc, on_exit if on_exit is not None or waited else False)
            self._have_children.notify()
        return proc

    def signal_group(self, proc: subprocess.Popen, sig: int) -> bool:
        """Send `sig` to the process group `proc` leads, if `proc` has not been reaped: under the reaper's
        lock, so its pid cannot have been reaped and given to another process meanwhile."""
        if not self._started:
            return False
        with self._lock:
            owner = self._owned.get(proc.pid)
            if owner is None or owner[0] is not proc:
                return False
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return False
            return True

    def wait(self, proc: subprocess.Popen, timeout: float | None = None) -> int | None:
        """The child's return code once the reaper has it (None on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.start()
        with self._lock:
            while proc.pid not in self._status:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._exited.wait(left)
            code = self._status.pop(proc.pid)
        proc.returncode = code
        return code

    def _reap(self) -> None:
        import contextlib

        while True:
            try:  # which child has exited; it stays a zombie (its pid taken) until reaped below
                pid = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT).si_pid
            except ChildProcessError:
                with self._lock:
                    self._have_children.wait(1.0)
                continue
            on_exit: Callable[[int], None] | None | bool = False
            with self._lock:  # no spawn meanwhile: the owner looked up is the one of the child reaped
                try:
                    reaped, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    reaped = 0  # someone else reaped it
                if reaped != pid:
                    continue
                code = os.waitstatus_to_exitcode(status)
                owner = self._owned.pop(pid, None)
                if owner is None:
                    continue  # an orphan: reaped, nothing to tell
                proc, on_exit = owner
                proc.returncode = code  # so that subprocess never polls this pid itself
                if on_exit is None:
                    self._status[pid] = code
                    self._exited.notify_all()
            if callable(on_exit):
                with contextlib.suppress(Exception):  # a callback must never stop the reaper
                    on_exit(code)


class Service:
    """One supervised service. (A plain class: `dataclasses` imports `inspect`, 70 ms at boot under TCG.)"""

    def __init__(self, name: str, cmd: str, env: dict[str, str], restart: str) -> None:
        self.name, self.cmd, self.env = name, cmd, env
        self.restart = restart  # always | on-failure | never
        self.state = "starting"
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None  # the running process, until it is reaped
        self.timer = None  # the pending restart (a threading.Timer) while it backs off
        self.restarts = 0
        self.last_exit: int | None = None
        self.stopping = False


class Services:
    """Services started by `!!service.start`, kept running by their restart policy.

    One lock orders everything that changes a service: a launch records the process and says `started`
    under it, and the exit callback (in the reaper thread) takes it too, so a service that exits at once
    is seen exiting only after it was seen starting. Signals go through `Processes.signal_group`, which
    signals only a process not yet reaped. Lock order: this lock, then the reaper's (never the other way:
    the reaper calls back with its own lock released). A name is started once; `start` refuses it again.
    """

    def __init__(self, processes: Processes, notify: Callable[..., None]) -> None:
        self._processes = processes
        self._notify = notify
        self.services: dict[str, Service] = {}
        self._lock = _thread.allocate_lock()

    def start(self, service: Service) -> None:
        """Start `service`; ValueError if a service of that name was started before."""
        with self._lock:
            if service.name in self.services:
                raise ValueError(
                    f"service {service.name!r} was started before: each service needs its own name"
                )
            self.services[service.name] = service
            try:
                self._launch(service)
            except BaseException:
                del self.services[service.name]  # it never ran
                raise

    def _launch(self, service: Service) -> None:
        """Start the service's process and record it; the caller holds the lock."""
        import subprocess

        launched: list[
            subprocess.Popen
        ] = []  # filled below, before the lock that _exited waits for is let go
        log = open(f"/var/log/herovm/{service.name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = self._processes.spawn(
                ["/bin/sh", "-c", service.cmd],
                on_exit=lambda code: self._exited(service, launched, code),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=service.env,
                start_new_session=True,
            )
        finally:
            log.close()
        launched.append(proc)
        service.proc, service.pid, service.state = proc, proc.pid, "running"
        self._notify(Kind.SERVICE, name=service.name, state=ServiceState.STARTED, pid=proc.pid)

    def _exited(self, service: Service, launched: list[subprocess.Popen], code: int) -> None:
        with self._lock:  # taken only once the launch of this process has recorded it
            if not launched or service.proc is not launched[0]:
                return
            service.last_exit, service.pid, service.proc = code, None, None
            policy = service.restart
            if service.stopping or policy == "never" or (policy == "on-failure" and code == 0):
                service.state = ServiceState.STOPPED if service.stopping else ServiceState.EXITED
                self._notify(Kind.SERVICE, name=service.name, state=service.state, exit_code=code)
                return
            service.restarts += 1
            service.state = ServiceState.RESTARTING
            self._notify(
                Kind.SERVICE,
                name=service.name,
                state=ServiceState.RESTARTING,
                exit_code=code,
                restarts=service.restarts,
            )
            delay = min(0.1 * 2 ** min(service.restarts, 6), 5.0)
            import threading

            service.timer = threading.Timer(delay, self._relaunch, args=(service,))
            service.timer.daemon = True
            service.timer.start()

    def _relaunch(self, service: Service) -> None:
        with self._lock:
            service.timer = None
            if service.stopping or service.state != ServiceState.RESTARTING:
                return
            try:
                self._launch(service)
            except Exception as e:  # noqa: BLE001 - in a timer thread: nobody else would hear of it
                service.state = ServiceState.EXITED
                print(f"herovm-agent: cannot restart service {service.name}: {e}", flush=True)
                self._notify(Kind.SERVICE, name=service.name, state=ServiceState.EXITED)

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every service: SIGTERM to each one's process group, SIGKILL to what is left after `grace`.
        A service waiting out its restart backoff is stopped there. Each says `stopped`."""
        with self._lock:
            services = list(self.services.values())
            for s in services:
                s.stopping = True
                if s.timer is not None:
                    s.timer.cancel()
                    s.timer = None
                if s.proc is not None:
                    self._processes.signal_group(s.proc, SIGTERM)
                elif s.state == ServiceState.RESTARTING:
                    s.state = ServiceState.STOPPED
                    self._notify(Kind.SERVICE, name=s.name, state=ServiceState.STOPPED)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(s.proc is not None for s in services):
            time.sleep(0.05)
        with self._lock:
            for s in services:
                if s.proc is not None:
                    self._processes.signal_group(s.proc, SIGKILL)

    def snapshot(self) -> dict[str, dict]:
        return {
            s.name: {
                "state": s.state,
                "pid": s.pid,
                "restarts": s.restarts,
                "last_exit": s.last_exit,
                "restart": s.restart,
            }
            for s in list(self.services.values())
        }
