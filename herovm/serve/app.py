"""The ASGI application of `herovm serve`: one listener for both of E2B's APIs.

A request that carries `E2b-Sandbox-Id` (what the SDK sends when `E2B_SANDBOX_URL` points here) is for the
in-sandbox API of that sandbox and must carry its access token (`X-Access-Token`); any other request is for
the REST API and must carry an API key (`X-API-KEY`). A sandbox's token opens that sandbox only.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette

from .api import Api, error
from .auth import matches
from .envd import Envd
from .metrics import Metrics
from .pool import Pool, per_host
from .sandboxes import Sandboxes

ENVD_PORT = 49983
REAP_EVERY_S = 1.0


def _log_stderr(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class ServeApp:
    """The ASGI app: routing, authentication, the timeout reaper (started by the server's lifespan)."""

    def __init__(
        self,
        sandboxes: Sandboxes,
        api_keys: list[str],
        *,
        log: Callable[[str], None] = _log_stderr,
        workers: int = 64,
        pool: Pool | None = None,
    ) -> None:
        """`pool`: the warm pools, started and stopped (their waiting VMs removed) with the server."""
        self.sandboxes = sandboxes
        self.api_keys = api_keys
        self.log = log
        self.pool = pool
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="herovm-serve")
        self.api = Api(sandboxes, self.executor, log, pool=pool)
        self.rest = Starlette(routes=self.api.routes())
        self.envd = Envd(sandboxes, self.executor)
        self.files = Starlette(routes=self.envd.file_routes())  # /files, streamed; /health
        self._reaper: asyncio.Task | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        sandbox_id = headers.get("e2b-sandbox-id")
        if sandbox_id is None:
            key = headers.get("x-api-key")
            if key is None and scope.get("path") == "/metrics":  # what Prometheus sends: a bearer token
                auth = headers.get("authorization", "")
                key = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if not matches(key, self.api_keys):
                await error(401, "invalid API key")(scope, receive, send)
                return
            await self.rest(scope, receive, send)
            return
        sb = self.sandboxes.find(sandbox_id)
        # Unknown sandbox and wrong token answer alike: a token holder learns nothing about other ids.
        if sb is None or not matches(headers.get("x-access-token"), [sb.token]):
            await error(401, "invalid access token for this sandbox")(scope, receive, send)
            return
        if headers.get("e2b-sandbox-port", str(ENVD_PORT)) != str(ENVD_PORT):
            await error(502, "only the sandbox's envd port is served by herovm serve")(scope, receive, send)
            return
        if sb.state != "running":
            await error(502, f"sandbox {sb.id} is {sb.state}")(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith("/process.Process/"):
            await self.envd.process_app(scope, receive, send)
        elif path.startswith("/filesystem.Filesystem/"):
            await self.envd.filesystem_app(scope, receive, send)
        else:
            await self.files(scope, receive, send)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._reaper = asyncio.create_task(self._reap())
                if self.pool is not None:
                    self.pool.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reaper is not None:
                    self._reaper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._reaper
                if self.pool is not None:
                    await asyncio.to_thread(self.pool.stop)
                self.executor.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _reap(self) -> None:
        """Enforce timeouts: a running sandbox past its end is killed (or paused, if made with autoPause)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            for sb in self.sandboxes.expired():
                self.log(f"{sb.id} timed out: {'pausing' if sb.on_timeout == 'pause' else 'killing'} it")
                try:
                    await loop.run_in_executor(self.executor, self.sandboxes.expire, sb)
                except Exception as e:  # the reaper goes on whatever one sandbox did
                    self.log(f"could not expire {sb.id}: {e}")


_LOCK_FD: list[int] = []  # the pool lock's descriptor, open for the process's life


def _pool_lock() -> int | None:
    """Take `$HEROVM_HOME/serve/pools.lock` for this process: None when taken, else the pid of the server
    that holds it. Its holder alone keeps pools and adopts or removes `e2b-pool-*` VMs at start: two such
    servers in one home would remove each other's waiting pool VMs. A server without --pool touches none."""
    import fcntl
    import os

    from .. import state

    path = state.ensure_dir(state.home() / "serve", 0o700) / "pools.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        return int(holder) if holder.isdigit() else -1
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCK_FD.append(fd)
    return None


def run(
    listen: str,
    api_keys: list[str],
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    max_sandboxes: int | None = None,
    pools: dict[str, int] | None = None,
    create_wait_s: float = 0.0,
    hosts: list[str] | None = None,
    log: Callable[[str], None] | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (blocking), with warm pools (`pools`: TEMPLATE[@HOST] -> N, per host:
    herovm.serve.pool.per_host; each template must exist) and creates that wait `create_wait_s` for a slot,
    placing sandboxes on `hosts` (None: every host; herovm.hosts). `on_ready` gets the sandboxes kept."""
    import signal

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from ..errors import Busy, NotFound
    from ..manager import Manager

    log = log or _log_stderr
    manager = Manager()
    try:
        metrics = Metrics()
        pool = None
        if hosts is not None:
            from .. import hosts as hosts_mod

            for name in hosts:
                hosts_mod.get(name)  # NotFound, with its hint
            manager.allowed_hosts = list(hosts)
        if pools:
            copies = {t["name"]: t["hosts"] for t in manager.templates()}
            try:
                pools = per_host(pools, copies, manager.allowed_hosts)
            except ValueError as e:
                raise NotFound(str(e), hint="see `herovm template ls` and `herovm host ls`") from None
        sandboxes = Sandboxes(manager, max_sandboxes, metrics=metrics, create_wait_s=create_wait_s)
        kept = sandboxes.rebuild()
        if pools:
            owner = _pool_lock()  # held while this server runs: the home's pools are its
            if owner is not None:
                raise Busy(
                    f"another herovm serve (pid {owner}) keeps warm pools in this herovm home",
                    hint="stop it, or run one server with --pool per HEROVM_HOME",
                )
            pool = Pool(manager, pools, metrics, log, ready_vm=sandboxes.ready_pool_vm)
            sandboxes.pool = pool
            # pool VMs a killed server left: adopted (paused, of a pooled template, up to N) or removed
            pool.adopt({sb.vm for sb in sandboxes.all()})
        app = ServeApp(sandboxes, api_keys, log=log, pool=pool)
        config = Config()
        config.bind = [listen]
        config.certfile, config.keyfile = certfile, keyfile
        config.accesslog = None
        config.errorlog = "-"
        config.h2_max_concurrent_streams = 200
        config.keep_alive_timeout = 75  # the SDK keeps connections in its pool for minutes
        config.graceful_timeout = 2
        config.shutdown_timeout = 180  # removing the waiting pool VMs, after a refill under way ends
        if on_ready is not None:
            on_ready(kept)
        if pool is not None and pools:
            log("pools: " + ", ".join(f"{t}={n}" for t, n in pools.items()) + " (filling in the background)")

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

        asyncio.run(main())
    finally:
        manager.close()
