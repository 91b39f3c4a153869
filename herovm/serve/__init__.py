"""`herovm serve`: a sandbox server that speaks E2B's API, so E2B-speaking agents use herovm unchanged.

`app` (the ASGI application and its routing), `api` (the REST sandbox API), `envd` (the in-sandbox Connect
services and file endpoints), `sandboxes` (sandbox <-> herovm VM), `auth` (API keys and access tokens),
`envd_pb` (envd's message schema). Needs the `serve` extra: `pip install 'herovm[serve]'`.
See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable


def run(
    listen: str,
    api_keys: list[str],
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    max_sandboxes: int | None = None,
    log: Callable[[str], None] | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (blocking). `on_ready` gets the sandboxes found at start."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from ..manager import Manager
    from .app import ServeApp, _log_stderr
    from .sandboxes import Sandboxes

    manager = Manager()
    sandboxes = Sandboxes(manager, max_sandboxes=max_sandboxes)
    kept = sandboxes.rebuild()
    app = ServeApp(sandboxes, api_keys, log=log or _log_stderr)
    config = Config()
    config.bind = [listen]
    config.certfile, config.keyfile = certfile, keyfile
    config.accesslog = None
    config.errorlog = "-"
    config.h2_max_concurrent_streams = 200
    config.keep_alive_timeout = 75  # the SDK keeps connections in its pool for minutes
    config.graceful_timeout = 2
    if on_ready is not None:
        on_ready(kept)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    try:
        asyncio.run(main())
    finally:
        manager.close()
