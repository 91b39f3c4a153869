"""E2B sandboxes as herovm VMs.

A sandbox is an ordinary herovm VM named `e2b-<sandbox id>` (`herovm ls` shows it, `herovm down` removes
it), or `e2b-pool-<sandbox id>` when it was claimed from a warm pool (herovm/serve/pool.py). What E2B says
about it and herovm does not keep (its template name, metadata, environment variables, end time, access
token, its VM's name) is in `$HEROVM_HOME/serve/sandboxes/<id>.json` (0600, in a 0700 directory). A
restarted server reads those files and keeps the ones whose VM libvirt still has, so running and paused
sandboxes outlive the server; a file whose VM is gone is removed.

Everything here blocks (libvirt, the guest): the server calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import state
from ..errors import HeroVMError, NotFound
from ..manager import Manager
from ..settings import VMSettings
from .metrics import Metrics
from .pool import Pool

PREFIX = "e2b-"
DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 86_400  # E2B's longest sandbox life: 24 h
ENVD_VERSION = "0.5.7"  # the envd behaviour the SDKs should expect (multipart and octet-stream uploads)
DEFAULT_USER = "user"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

# E2B's default user: made in the guest when the sandbox is created, if its template lacks it. A template
# made with `!!user.add name:user` skips useradd (~1 s under TCG): one exec of builtins and `id`.
ENSURE_USER = (
    "if id -u user >/dev/null 2>&1 && [ -d /home/user ]; then echo present; exit 0; fi; "
    "id -u user >/dev/null 2>&1 || useradd --create-home --shell /bin/bash user >/dev/null 2>&1; "
    "mkdir -p /home/user && chown user:user /home/user"
)


class ApiError(Exception):
    """An error the REST API answers with: E2B's shape, {"code": status, "message": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict[str, object]:
        return {"code": self.status, "message": self.message}


def new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def serve_dir() -> Path:
    return state.ensure_dir(state.home() / "serve" / "sandboxes", 0o700)


@dataclass
class Sandbox:
    id: str
    template: str
    token: str  # the per-sandbox envd access token (X-Access-Token)
    started_at: float
    end_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    cpus: int = 1
    memory_mb: int = 1024
    disk_mb: int = 0
    on_timeout: str = "kill"  # or "pause" (autoPause)
    state: str = "running"  # running | paused
    vm_name: str = ""  # the VM, where not e2b-<id>: a pool VM keeps its name (e2b-pool-<id>)
    source: str = "cold"  # how it was made: pool (claimed), template (restored), cold (booted)

    @property
    def vm(self) -> str:
        return self.vm_name or PREFIX + self.id

    def save(self) -> None:
        state.write_private(serve_dir() / f"{self.id}.json", json.dumps(asdict(self), indent=1))

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (serve_dir() / f"{self.id}.json").unlink()

    @classmethod
    def load(cls, path: Path) -> Sandbox:
        facts = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in facts.items() if k in known})


class Sandboxes:
    """The server's sandboxes: made, found, timed out and removed through one herovm Manager."""

    def __init__(
        self,
        manager: Manager,
        max_sandboxes: int | None = None,
        *,
        pool: Pool | None = None,
        metrics: Metrics | None = None,
        create_wait_s: float = 0.0,
    ) -> None:
        """`create_wait_s`: how long a create past `max_sandboxes` waits for a slot before its 429."""
        self.manager = manager
        self.max_sandboxes = max_sandboxes
        self.pool = pool
        self.metrics = metrics or Metrics()
        self.create_wait_s = create_wait_s
        self._lock = threading.Condition()
        self._by_id: dict[str, Sandbox] = {}
        self._creating = 0
        self._has_user: set[tuple[str, object]] = set()  # (template, created): its clones have `user`

    # ------------------------------------------------------------------------------------- state

    def rebuild(self) -> list[str]:
        """Read the sandboxes this home holds from their files and libvirt; returns the ids kept."""
        machines = self.manager.own_machines()
        found: dict[str, Sandbox] = {}
        for path in sorted(serve_dir().glob("*.json")):
            try:
                sb = Sandbox.load(path)
            except (OSError, ValueError, TypeError):
                continue
            machine = machines.get(sb.vm)
            if machine is None or machine.state not in ("running", "paused"):
                if machine is not None:  # stopped or crashed: no use to an E2B client
                    with contextlib.suppress(HeroVMError):
                        self.manager.down(sb.vm)
                sb.forget()
                continue
            sb.state = machine.state
            found[sb.id] = sb
        with self._lock:
            self._by_id = found
        return sorted(found)

    def get(self, sandbox_id: str) -> Sandbox:
        with self._lock:
            sb = self._by_id.get(sandbox_id)
        if sb is None:
            raise ApiError(404, f"sandbox {sandbox_id} not found")
        return sb

    def find(self, sandbox_id: str) -> Sandbox | None:
        with self._lock:
            return self._by_id.get(sandbox_id)

    def all(self) -> list[Sandbox]:
        with self._lock:
            return list(self._by_id.values())

    # ---------------------------------------------------------------------------------- verbs

    def gauges(self) -> list[tuple[str, str, list[tuple[tuple[tuple[str, str], ...], float]]]]:
        """What /metrics shows of the sandboxes now."""
        with self._lock:
            rows = list(self._by_id.values())
            creating = self._creating
        by_state = [
            ((("state", st),), float(sum(sb.state == st for sb in rows))) for st in ("running", "paused")
        ]
        limit = [((), float(self.max_sandboxes))] if self.max_sandboxes is not None else []
        return [
            ("herovm_serve_sandboxes", "sandboxes the server holds, by state", by_state),
            ("herovm_serve_creating", "creates under way", [((), float(creating))]),
            ("herovm_serve_max_sandboxes", "the --max-sandboxes limit", limit),
        ]

    def _admit(self) -> None:
        """Take a slot for a create: at the limit, wait up to create_wait_s for one, then 429."""
        deadline = time.monotonic() + self.create_wait_s
        with self._lock:
            while self.max_sandboxes is not None and len(self._by_id) + self._creating >= self.max_sandboxes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(429, f"the limit of {self.max_sandboxes} sandboxes is reached")
                self._lock.wait(left)
            self._creating += 1

    def create(
        self,
        template: str,
        timeout: int,
        metadata: dict[str, str],
        envs: dict[str, str],
        on_timeout: str = "kill",
    ) -> Sandbox:
        """A new running sandbox: a member of the template's warm pool (resumed), else a VM restored from
        herovm template `template`, or for `base` (without such a template) a cold VM of the default image."""
        pooled = self.pool is not None and self.pool.serves(template)
        templates = {} if pooled else {t["name"]: t for t in self.manager.templates()}
        if not pooled and template != "base" and template not in templates:
            raise ApiError(404, f"template '{template}' not found (see `herovm template ls`)")
        self._admit()
        started = time.monotonic()
        source = "pool"
        try:
            member = self.pool.claim(template) if pooled and self.pool is not None else None
            if member is not None:
                now = time.time()
                sb = Sandbox(
                    id=member.id,
                    template=template,
                    token=secrets.token_urlsafe(32),
                    started_at=now,
                    end_at=now + timeout,
                    metadata=dict(metadata),
                    envs=dict(envs),
                    cpus=member.cpus,
                    memory_mb=member.memory_mb,
                    on_timeout=on_timeout,
                    vm_name=member.vm,
                    source="pool",
                )
                try:
                    sb.save()
                except BaseException:
                    with contextlib.suppress(HeroVMError):
                        self.manager.down(member.vm)
                    raise
                with self._lock:
                    self._by_id[sb.id] = sb
                self.sync_ttl(sb)
                self._count(template, source, started)
                return sb
            if pooled:
                templates = {t["name"]: t for t in self.manager.templates()}
                if template not in templates:
                    raise ApiError(404, f"template '{template}' not found (see `herovm template ls`)")
            source = "template" if template in templates else "cold"
            sb = self._create_vm(template, templates, timeout, metadata, envs, on_timeout)
            sb.source = source
            self.sync_ttl(sb)
            self._count(template, source, started)
            return sb
        except BaseException:
            self.metrics.inc("herovm_serve_creates_total", template=template, source=source, outcome="error")
            raise
        finally:
            with self._lock:
                self._creating -= 1
                self._lock.notify_all()

    def _count(self, template: str, source: str, started: float) -> None:
        self.metrics.inc("herovm_serve_creates_total", template=template, source=source, outcome="ok")
        self.metrics.observe(
            "herovm_serve_create_seconds", time.monotonic() - started, template=template, source=source
        )

    def ready_pool_vm(self, vm_name: str) -> None:
        """What a pool VM gets before it is paused: E2B's user `user`, and one command and one file lookup
        as that user through the agent's ops, as a sandbox's first command will do (a restored guest reads
        its memory in from the template as it touches it: the first command pays for it, ~0.2 s under TCG,
        so the claim's first command does not)."""
        vm = self.manager.get(vm_name)
        try:
            result = vm.exec(["sh", "-c", ENSURE_USER], timeout=30)
            if result.exit_code != 0:
                raise ApiError(500, f"could not make the user 'user' in the VM: {result.stderr[-200:]!r}")
            with contextlib.suppress(Exception):  # best effort: an older image's agent has no ops
                ops = vm.ops
                home = f"/home/{DEFAULT_USER}"  # the SDK's commands.run: a login bash in the user's home
                ops.start_process(["/bin/bash", "-l", "-c", "true"], user=DEFAULT_USER, cwd=home).wait()
                ops.stat(home, user=DEFAULT_USER)
        finally:
            vm.close()

    def _create_vm(
        self,
        template: str,
        templates: dict[str, dict],
        timeout: int,
        metadata: dict[str, str],
        envs: dict[str, str],
        on_timeout: str,
    ) -> Sandbox:
        sb_id = new_id()
        known: tuple[str, object] | None = None
        if template in templates:
            vm = self.manager.up(PREFIX + sb_id, template=template)
            row = templates[template]
            cpus, memory = row.get("cpus") or 1, row.get("memory") or (1 << 30)
            known = (template, row.get("created"))
        else:
            settings = VMSettings.of({})
            vm = self.manager.up(PREFIX + sb_id, settings)
            cpus, memory = settings.cpus, settings.memory
        try:
            if known not in self._has_user:  # every clone of a template that has the user has it: no exec
                result = vm.exec(["sh", "-c", ENSURE_USER], timeout=30)
                if result.exit_code != 0:
                    raise ApiError(
                        500, f"could not make the user 'user' in the sandbox: {result.stderr[-200:]!r}"
                    )
                if known is not None and result.stdout.strip() == b"present":
                    self._has_user.add(known)
            now = time.time()
            sb = Sandbox(
                id=sb_id,
                template=template,
                token=secrets.token_urlsafe(32),
                started_at=now,
                end_at=now + timeout,
                metadata=dict(metadata),
                envs=dict(envs),
                cpus=int(cpus),
                memory_mb=int(memory) >> 20,
                on_timeout=on_timeout,
            )
            sb.save()
        except BaseException:
            with contextlib.suppress(HeroVMError):
                self.manager.down(PREFIX + sb_id)
            raise
        finally:
            vm.close()
        with self._lock:
            self._by_id[sb.id] = sb
        return sb

    def kill(self, sandbox_id: str) -> None:
        sb = self.get(sandbox_id)
        try:
            self.manager.down(sb.vm)
        except NotFound:
            pass
        finally:
            sb.forget()
            with self._lock:  # its slot is free once its VM is gone
                self._by_id.pop(sb.id, None)
                self._lock.notify_all()  # a create waiting for a slot

    def set_timeout(self, sandbox_id: str, timeout: int, only_extend: bool = False) -> Sandbox:
        sb = self.get(sandbox_id)
        end = time.time() + timeout
        if not only_extend or end > sb.end_at:
            sb.end_at = end
            sb.save()
            self.sync_ttl(sb)
        return sb

    def sync_ttl(self, sb: Sandbox) -> None:
        """The sandbox's end as its VM's time limit (herovm's `--ttl`): the guest powers itself off then and
        `herovm gc` removes it, so a sandbox ends on time even while no server runs. One that pauses at its
        timeout (autoPause) has none: pausing is the server's. Best effort: the server's reaper still acts."""
        ttl = max(1.0, sb.end_at - time.time()) if sb.on_timeout == "kill" else None
        with contextlib.suppress(HeroVMError):
            self.manager.set_ttl(sb.vm, ttl)

    def pause(self, sandbox_id: str) -> bool:
        """Pause; False if it was paused already."""
        sb = self.get(sandbox_id)
        if sb.state == "paused":
            return False
        self.manager.pause(sb.vm)
        sb.state = "paused"
        sb.save()
        return True

    def resume(self, sandbox_id: str, timeout: int | None) -> tuple[Sandbox, bool]:
        """Make it run (resuming a paused one) with at least `timeout` seconds left; (sandbox, resumed)."""
        sb = self.get(sandbox_id)
        resumed = False
        if sb.state == "paused":
            self.manager.resume(sb.vm)
            sb.state = "running"
            resumed = True
            sb.end_at = time.time() + (timeout if timeout is not None else DEFAULT_TIMEOUT_S)
        elif timeout is not None:
            sb.end_at = max(sb.end_at, time.time() + timeout)
        sb.save()
        self.sync_ttl(sb)
        return sb, resumed

    def expired(self, now: float | None = None) -> list[Sandbox]:
        """Running sandboxes past their end time."""
        now = time.time() if now is None else now
        return [sb for sb in self.all() if sb.state == "running" and sb.end_at <= now]

    def expire(self, sb: Sandbox) -> None:
        """What a sandbox's timeout does: kill it, or pause it where it was created with autoPause."""
        if sb.on_timeout == "pause":
            with contextlib.suppress(ApiError):
                self.pause(sb.id)
            return
        with contextlib.suppress(ApiError):
            self.kill(sb.id)
