"""Warm pools (`herovm serve --pool TEMPLATE=N`): N VMs of a herovm template, restored, readied and paused,
so a create of that template is a resume (~0.1 s) instead of a restore (~1 s) or a boot (~4 s). Pools are
per host (herovm.hosts): N on each host holding a copy of the template, or `TEMPLATE@HOST=N` on one; a
create claims from the host whose pool of its template holds the most.

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
    host: str = "local"

    @property
    def vm(self) -> str:
        return POOL_PREFIX + self.id


def parse_pools(specs: list[str]) -> dict[str, int]:
    """`TEMPLATE=N` (N on each host with a copy of the template) and `TEMPLATE@HOST=N` options ->
    {"TEMPLATE" or "TEMPLATE@HOST": N}; ValueError naming the bad one."""
    from ..state import validate_name
    from ..templates import validate_template_name

    pools: dict[str, int] = {}
    for spec in specs:
        name, sep, count = spec.partition("=")
        if not sep or not count.strip().isdigit() or not 0 < int(count) <= MAX_POOL:
            raise ValueError(f"--pool {spec!r} is not TEMPLATE[@HOST]=N with N from 1 to {MAX_POOL}")
        template, at, host = name.strip().partition("@")
        validate_template_name(template)
        if at:
            validate_name(host, "host", "node2")
        if name.strip() in pools:
            raise ValueError(f"--pool names {name.strip()!r} twice")
        pools[name.strip()] = int(count)
    return pools


def per_host(
    pools: dict[str, int], copies: dict[str, list[str]], allowed: list[str] | None
) -> dict[str, int]:
    """The pools per host: `TEMPLATE=N` is N on each host holding a copy of the template (`copies`:
    template -> its hosts) that the server may use (`allowed`; None: all), `TEMPLATE@HOST=N` N on that
    host alone; {"TEMPLATE@HOST": N}. ValueError for a template or copy that is not there."""
    found: dict[str, int] = {}
    for name, n in pools.items():
        template, _, host = name.partition("@")
        if template not in copies:
            raise ValueError(f"--pool {name}: no herovm template {template}")
        hosts = [host] if host else [h for h in copies[template] if allowed is None or h in allowed]
        for h in hosts:
            if h not in copies[template]:
                raise ValueError(f"--pool {name}: template {template} has no copy on host {h}")
            found[f"{template}@{h}"] = n
    if not found and pools:
        raise ValueError("--pool: none of its templates has a copy on the hosts this server uses")
    return found


def _split(key: str) -> tuple[str, str]:
    template, _, host = key.partition("@")
    return template, host


class Pool:
    """The server's warm pools. `claim` is called from request threads, the refill runs in its own."""

    def __init__(
        self,
        manager: Manager,
        targets: dict[str, int],  # "TEMPLATE@HOST" -> N (per_host)
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
        return any(_split(key)[0] == template for key in self.targets)

    def ready(self, template: str) -> int:
        with self._cond:
            return sum(len(ms) for key, ms in self._ready.items() if _split(key)[0] == template)

    def members(self) -> list[Member]:
        with self._cond:
            return [m for ms in self._ready.values() for m in ms]

    def gauges(self) -> list[tuple[str, str, list[tuple[tuple[tuple[str, str], ...], float]]]]:
        def labels(key: str) -> tuple[tuple[str, str], ...]:
            template, host = _split(key)
            return (("template", template), ("host", host))

        with self._cond:
            ready = [(labels(k), float(len(ms))) for k, ms in sorted(self._ready.items())]
            filling = [(labels(k), float(self._filling == k)) for k in sorted(self.targets)]
        target = [(labels(k), float(n)) for k, n in sorted(self.targets.items())]
        return [
            ("herovm_serve_pool_ready", "pool VMs waiting to be claimed, by template and host", ready),
            ("herovm_serve_pool_target", "pool size asked for (--pool), by template and host", target),
            ("herovm_serve_pool_filling", "1 while a pool VM of the template is being made there", filling),
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
            template, host = None, "local"
            with contextlib.suppress(HeroVMError, KeyError, TypeError):
                record = self.manager.record(name)
                template, host = (record.origin or {}).get("template"), record.host or "local"
            key = f"{template}@{host}"
            keep = (
                machine.state == "paused"
                and key in self.targets
                and template in templates
                and len(self._ready[key]) < self.targets[key]
            )
            if keep:
                assert template is not None
                row = templates[template]
                member = Member(
                    name.removeprefix(POOL_PREFIX),
                    template,
                    int(row.get("cpus") or 1),
                    int(row.get("memory") or 1 << 30) >> 20,
                    host,
                )
                with self._cond:
                    self._ready[key].append(member)
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
            with self._cond:  # from the host whose pool of it holds the most (spreads the claims)
                keys = [k for k in sorted(self.targets) if _split(k)[0] == template]
                key = max(keys, key=lambda k: len(self._ready[k]), default=None)
                members = self._ready.get(key) if key is not None else None
                member = members.pop(0) if members else None
                left = sum(len(self._ready[k]) for k in keys)
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
            self.log(f"pool {template}: claimed {member.vm} on {member.host} in {took:.2f}s ({left} left)")
            return member

    # ------------------------------------------------------------------------------------ refill

    def _wanted(self) -> tuple[str | None, float]:
        """(a pool (TEMPLATE@HOST) to refill now, or None; seconds until one may be due). Caller holds the
        lock."""
        now = time.monotonic()
        wait = 3600.0
        for key, n in sorted(self.targets.items(), key=lambda kv: len(self._ready[kv[0]]) - kv[1]):
            if len(self._ready[key]) >= n:
                continue
            if self._retry_at[key] <= now:
                return key, 0.0
            wait = min(wait, self._retry_at[key] - now)
        return None, wait

    def _refill_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    key, wait = self._wanted()
                    if key is not None:
                        break
                    self._cond.wait(wait)
                self._filling = key
            try:
                self._fill(key)
            finally:
                with self._cond:
                    self._filling = None

    def _fill(self, key: str) -> None:
        from .sandboxes import new_id

        template, host = _split(key)
        sb_id = new_id()
        member = Member(sb_id, template, 1, 1024, host)
        started = time.monotonic()
        try:
            vm = self.manager.up(member.vm, template=template, host=host)
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
                self._failures[key] += 1
                pause = RETRY_S[min(self._failures[key], len(RETRY_S)) - 1]
                self._retry_at[key] = time.monotonic() + pause
            self.log(f"pool {template} on {host}: could not make a VM ({e}); trying again in {pause:.0f}s")
            return
        took = time.monotonic() - started
        self.metrics.inc("herovm_serve_pool_refills_total", template=template)
        self.metrics.observe("herovm_serve_pool_refill_seconds", took, template=template)
        with self._cond:
            self._failures[key] = 0
            self._ready[key].append(member)
            n = len(self._ready[key])
        self.log(
            f"pool {template} on {host}: refilled {member.vm} in {took:.2f}s ({n}/{self.targets[key]} ready)"
        )
