"""`herovm serve`: a sandbox server that speaks E2B's API, so E2B-speaking agents use herovm unchanged.

`app` (the ASGI application, its routing and `run`), `api` (the REST sandbox API), `envd` (the in-sandbox
Connect services and file endpoints), `sandboxes` (sandbox <-> herovm VM), `auth` (API keys and access
tokens), `envd_pb` (envd's message schema), `pool` (warm pools), `metrics`. Needs the `serve` extra:
`pip install 'herovm[serve]'`. See docs/serve.md.
"""

from __future__ import annotations

from .app import run

__all__ = ["run"]  # app.run: serve until SIGINT or SIGTERM (`herovm serve` calls it)
