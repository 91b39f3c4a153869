"""Warm pools (`herovm serve --pool TEMPLATE=N`): N VMs of a herovm template, restored, readied and paused,
so a create of that template is a resume (~0.1 s) instead of a restore (~1 s) or a boot (~4 s).

A pool VM is an ordinary herovm VM named `e2b-pool-<id>` (`herovm ls` shows it; the name marks it as a pool
member). A create of the template claims one: resumes it (its clock set) and makes it the sandbox `<id>`.
libvirt renames only domains that are shut off, so a claimed VM keeps its name: the sandbox's record holds
the VM's name (`Sandbox.vm_name`), and `herovm ls` shows a claimed one running where waiting ones are paused.
Each clone of a template has its own identity from its restore (hostname, keys, agent token); what E2B gives
a sandbox at create (id, access token, metadata, environment, timeout) is the server's and is set at claim.

One background thread refills the pools, one VM at a time (a refill is a restore: CPU the sandboxes need),
with a growing pause after a failure. The server's exit removes the waiting members (they hold memory and
nobody can claim them while no server runs); a server with --pool that starts finds the members a killed
server left and adopts the paused ones of templates it pools, up to N, and removes the rest. One server per
HEROVM_HOME keeps pools (`$HEROVM_HOME/serve/pools.lock`); servers without --pool touch no pool VM.

Bounds: a pool holds at most N VMs; `--max-sandboxes` counts sandboxes (what clients hold), not waiting
pool members, so the server holds at most max-sandboxes + the sum of the pools' N VMs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HeroVMError
from ..manager import Manager
from .metrics import Metrics

POOL_PREFIX = "e2b-pool-"
MAX_POOL = 64
RETRY_S = (2.0, 5.0, 15.0, 30.0, 60.0)  # pauses after consecutive failed refills of one template


@dataclass
class Member:
    id: str  # the sandbox id it becomes
    template: str
    cpus: int
    memory_mb: int

    @property
    def vm(self) -> str:
        return POOL_PREFIX + self.id


def parse_pools(specs: list[str]) -> dict[str, int]:
    """`TEMPLATE=N` options -> {template: N}; ValueError naming the bad one."""
    from ..templates import validate_template_name

    pools: dict[str, int] = {}
    for spec in specs:
        name, sep, count = spec.partition("=")
        if not sep or not count.strip().isdigit() or not 0 < int(count) <= MAX_POOL:
            raise ValueError(f"--pool {spec!r} is not TEMPLATE=N with N from 1 to {MAX_POOL}")
        validate_template_name(name.strip())
        if name.strip() in pools:
            raise ValueError(f"--pool names template {name.strip()!r} twice")
        pools[name.strip()] = int(count)
    return pools


class Pool:
    """The server's warm pools. `claim` is called from request threads, the refill runs in its own."""

    def __init__(
        self,
        manager: Manager,
        targets: dict[str, int],
        metrics: Metrics,
        log: Callable[[str], None],
        ready_vm: Callable[[str], None] | None = None,
    ) -> None:
        """`ready_vm(vm)`: what a new member needs before it is paused (the server makes the user `user`)."""
        self.manager = manager
        self.targets = dict(targets)
        self.metrics = metrics
        self.log = log
        self.ready_vm = ready_vm
        self._cond = threading.Condition()
        self._ready: dict[str, list[Member]] = {t: [] for t in targets}
        self._failures: dict[str, int] = dict.fromkeys(targets, 0)
        self._retry_at: dict[str, float] = dict.fromkeys(targets, 0.0)
        self._filling: str | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ queries

    def serves(self, template: str) -> bool:
        return template in self.targets

    def ready(self, template: str) -> int:
        with self._cond:
            return len(self._ready.get(template, ()))

    def members(self) -> list[Member]:
        with self._cond:
            return [m for ms in self._ready.values() for m in ms]

    def gauges(self) -> list[tuple[str, str, list[tuple[tuple[tuple[str, str], ...], float]]]]:
        with self._cond:
            ready = [((("template", t),), float(len(ms))) for t, ms in sorted(self._ready.items())]
            filling = [((("template", t),), float(self._filling == t)) for t in sorted(self.targets)]
        target = [((("template", t),), float(n)) for t, n in sorted(self.targets.items())]
        return [
            ("herovm_serve_pool_ready", "pool VMs waiting to be claimed, by template", ready),
            ("herovm_serve_pool_target", "pool size asked for (--pool), by template", target),
            ("herovm_serve_pool_filling", "1 while a pool VM of the template is being made", filling),
        ]

    # ---------------------------------------------------------------------------- start and stop

    def adopt(self, claimed: set[str]) -> tuple[list[str], list[str]]:
        """Take over the pool VMs a previous server left: paused ones of a pooled template, up to its N, are
        adopted; the rest (other templates, running, stopped, over N) are removed. `claimed`: the VM names
        that are sandboxes now (claimed before the restart), left alone. Returns (adopted, removed)."""
        adopted: list[str] = []
        removed: list[str] = []
        templates = {t["name"]: t for t in self.manager.templates()}
        for name, machine in sorted(self.manager.own_machines().items()):
            if not name.startswith(POOL_PREFIX) or name in claimed:
                continue
            template = None
            with contextlib.suppress(HeroVMError, KeyError, TypeError):
                template = (self.manager.record(name).origin or {}).get("template")
            keep = (
                machine.state == "paused"
                and template in self.targets
                and template in templates
                and len(self._ready[template]) < self.targets[template]
            )
            if keep:
                assert template is not None
                row = templates[template]
                member = Member(
                    name.removeprefix(POOL_PREFIX),
                    template,
                    int(row.get("cpus") or 1),
                    int(row.get("memory") or 1 << 30) >> 20,
                )
                with self._cond:
                    self._ready[template].append(member)
                adopted.append(name)
                continue
            with contextlib.suppress(HeroVMError):
                self.manager.down(name)
                removed.append(name)
        for name in adopted:
            self.log(f"pool: adopted {name} (left by a previous server)")
        for name in removed:
            self.log(f"pool: removed {name} (left by a previous server, not wanted now)")
        return adopted, removed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._refill_loop, name="herovm-serve-pool", daemon=True)
        self._thread.start()

    def stop(self, wait_s: float = 120.0) -> list[str]:
        """Stop refilling (a refill under way finishes) and remove the waiting members; their names."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(wait_s)
        with self._cond:
            members = [m for ms in self._ready.values() for m in ms]
            for ms in self._ready.values():
                ms.clear()
        for m in members:
            with contextlib.suppress(HeroVMError):
                self.manager.down(m.vm)
        if members:
            self.log(f"pool: removed {len(members)} waiting VM(s) at exit")
        return [m.vm for m in members]

    # ------------------------------------------------------------------------------------- claim

    def claim(self, template: str) -> Member | None:
        """A pool member of `template`, resumed and running, now the caller's; None if the pool is empty
        (a miss, counted) or its member would not resume (removed, counted as a miss)."""
        while True:
            with self._cond:
                members = self._ready.get(template)
                member = members.pop(0) if members else None
                left = len(members or ())
                self._cond.notify_all()  # the refill thread: one to make
            if member is None:
                self.metrics.inc("herovm_serve_pool_misses_total", template=template)
                self.log(f"pool {template}: miss (empty): restoring a VM for this create")
                return None
            started = time.monotonic()
            try:
                self.manager.resume(member.vm)
            except HeroVMError as e:
                self.log(f"pool {template}: {member.vm} would not resume ({e}): removing it")
                with contextlib.suppress(HeroVMError):
                    self.manager.down(member.vm)
                continue
            self.metrics.inc("herovm_serve_pool_claims_total", template=template)
            took = time.monotonic() - started
            self.log(f"pool {template}: claimed {member.vm} in {took:.2f}s ({left} left)")
            return member

    # ------------------------------------------------------------------------------------ refill

    def _wanted(self) -> tuple[str | None, float]:
        """(a template to refill now, or None; seconds until one may be due). Caller holds the lock."""
        now = time.monotonic()
        wait = 3600.0
        for template, n in sorted(self.targets.items(), key=lambda kv: len(self._ready[kv[0]]) - kv[1]):
            if len(self._ready[template]) >= n:
                continue
            if self._retry_at[template] <= now:
                return template, 0.0
            wait = min(wait, self._retry_at[template] - now)
        return None, wait

    def _refill_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    template, wait = self._wanted()
                    if template is not None:
                        break
                    self._cond.wait(wait)
                self._filling = template
            try:
                self._fill(template)
            finally:
                with self._cond:
                    self._filling = None

    def _fill(self, template: str) -> None:
        from .sandboxes import new_id

        sb_id = new_id()
        member = Member(sb_id, template, 1, 1024)
        started = time.monotonic()
        try:
            vm = self.manager.up(member.vm, template=template)
            try:
                s = vm.record.settings
                if s is not None:
                    member.cpus, member.memory_mb = int(s.cpus or 1), int(s.memory or 1 << 30) >> 20
                if self.ready_vm is not None:
                    self.ready_vm(member.vm)
            finally:
                vm.close()
            self.manager.pause(member.vm)
        except Exception as e:  # noqa: BLE001 (a refill never takes the server down)
            with contextlib.suppress(HeroVMError):
                self.manager.down(member.vm)
            self.metrics.inc("herovm_serve_pool_refill_failures_total", template=template)
            with self._cond:
                self._failures[template] += 1
                pause = RETRY_S[min(self._failures[template], len(RETRY_S)) - 1]
                self._retry_at[template] = time.monotonic() + pause
            self.log(f"pool {template}: could not make a VM ({e}); trying again in {pause:.0f}s")
            return
        took = time.monotonic() - started
        self.metrics.inc("herovm_serve_pool_refills_total", template=template)
        self.metrics.observe("herovm_serve_pool_refill_seconds", took, template=template)
        with self._cond:
            self._failures[template] = 0
            self._ready[template].append(member)
            n = len(self._ready[template])
        self.log(f"pool {template}: refilled {member.vm} in {took:.2f}s ({n}/{self.targets[template]} ready)")
