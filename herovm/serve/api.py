"""The REST sandbox API E2B's SDKs call (`E2B_API_URL`): create, list, get, kill, timeout, pause,
resume/connect, metrics; and the server's own Prometheus metrics (`GET /metrics`). Written from E2B's
published OpenAPI document: paths, field names, status codes, and the error shape
{"code": status, "message": ...}.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import AlreadyExists, Busy, HeroVMError, InvalidInput, NotFound
from .metrics import CONTENT_TYPE
from .pool import Pool
from .sandboxes import DEFAULT_TIMEOUT_S, ENVD_VERSION, MAX_TIMEOUT_S, ApiError, Sandbox, Sandboxes

CLIENT_ID = "herovm"
MAX_BODY = 1 << 20  # a create's JSON: metadata and environment are small

# The fields of a create (NewSandbox / NewSandboxV2). Known but not served: refused when set.
_CREATE_FIELDS = {
    "templateID", "timeout", "autoPause", "autoPauseMemory", "autoResume", "allow_internet_access",
    "network", "metadata", "envVars", "mcp", "iam", "volumeMounts", "secure",
}  # fmt: skip
_NOT_SERVED = ("mcp", "iam", "volumeMounts", "network", "autoResume")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _common(sb: Sandbox) -> dict[str, Any]:
    return {
        "templateID": sb.template,
        "alias": sb.template,
        "sandboxID": sb.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
    }


def created_json(sb: Sandbox) -> dict[str, Any]:
    """The Sandbox object of a create, connect or resume: what the SDK needs to reach it."""
    return {**_common(sb), "envdAccessToken": sb.token, "trafficAccessToken": None, "domain": None}


def listed_json(sb: Sandbox) -> dict[str, Any]:
    return {
        **_common(sb),
        "startedAt": _iso(sb.started_at),
        "endAt": _iso(sb.end_at),
        "cpuCount": sb.cpus,
        "memoryMB": sb.memory_mb,
        "diskSizeMB": sb.disk_mb,
        "state": sb.state,
        "metadata": sb.metadata,
    }


def detail_json(sb: Sandbox) -> dict[str, Any]:
    return {
        **listed_json(sb),
        "envdAccessToken": sb.token,
        "domain": None,
        "lifecycle": {"onTimeout": sb.on_timeout, "autoResume": False},
    }


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ApiError(400, f"{what} must be an object of strings")
    if len(value) > 1000 or sum(len(k) + len(v) for k, v in value.items()) > 256 << 10:
        raise ApiError(400, f"{what} is too large")
    return dict(value)


def _timeout(value: Any, default: int | None = DEFAULT_TIMEOUT_S) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMEOUT_S:
        raise ApiError(400, f"timeout must be a whole number of seconds from 0 to {MAX_TIMEOUT_S}")
    return value


async def _body(request: Request, required: bool = True) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, "request body too large")
    if not raw.strip():
        if required:
            raise ApiError(400, "a JSON body is required")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def parse_create(body: dict[str, Any]) -> dict[str, Any]:
    """The create's arguments for Sandboxes.create, or ApiError(400)."""
    unknown = sorted(set(body) - _CREATE_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    for name in _NOT_SERVED:
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by herovm serve")
    if body.get("allow_internet_access") is False:
        raise ApiError(400, "'allow_internet_access: false' is not supported by herovm serve yet")
    template = body.get("templateID")
    if not isinstance(template, str) or not template:
        raise ApiError(400, "templateID is required")
    auto_pause = body.get("autoPause") or False
    if not isinstance(auto_pause, bool):
        raise ApiError(400, "autoPause must be true or false")
    return {
        "template": template,
        "timeout": _timeout(body.get("timeout")),
        "metadata": _str_map(body.get("metadata"), "metadata"),
        "envs": _str_map(body.get("envVars"), "envVars"),
        "on_timeout": "pause" if auto_pause else "kill",
    }


def parse_metadata_query(raw: str | None) -> dict[str, str]:
    """`metadata=k1%3Dv1%26k2%3Dv2`: the SDK URL-encodes an encoded query string."""
    if not raw:
        return {}
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


class Api:
    def __init__(
        self,
        sandboxes: Sandboxes,
        executor: ThreadPoolExecutor,
        log: Callable[[str], None],
        pool: Pool | None = None,
    ) -> None:
        self.sandboxes = sandboxes
        self.executor = executor
        self.log = log
        self.pool = pool

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, lambda: fn(*args))
        except ApiError:
            raise
        except InvalidInput as e:
            raise ApiError(400, str(e)) from None
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except (AlreadyExists, Busy) as e:
            raise ApiError(409, str(e)) from None
        except HeroVMError as e:
            raise ApiError(500, str(e)) from None

    def routes(self) -> list[Route]:
        def handler(fn: Callable[..., Any]) -> Callable[[Request], Any]:
            async def wrapped(request: Request) -> Response:
                try:
                    return await fn(request)
                except ApiError as e:
                    return error(e.status, e.message)

            return wrapped

        return [
            Route("/sandboxes", handler(self.create), methods=["POST"]),
            Route("/v2/sandboxes", handler(self.create), methods=["POST"]),
            Route("/sandboxes", handler(self.list), methods=["GET"]),
            Route("/v2/sandboxes", handler(self.list), methods=["GET"]),
            Route("/sandboxes/{id}", handler(self.get), methods=["GET"]),
            Route("/sandboxes/{id}", handler(self.kill), methods=["DELETE"]),
            Route("/sandboxes/{id}/timeout", handler(self.timeout), methods=["POST"]),
            Route("/sandboxes/{id}/refreshes", handler(self.refresh), methods=["POST"]),
            Route("/sandboxes/{id}/pause", handler(self.pause), methods=["POST"]),
            Route("/sandboxes/{id}/resume", handler(self.resume), methods=["POST"]),
            Route("/sandboxes/{id}/connect", handler(self.connect), methods=["POST"]),
            Route("/v2/sandboxes/{id}/connect", handler(self.connect), methods=["POST"]),
            Route("/sandboxes/{id}/metrics", handler(self.metrics), methods=["GET"]),
            Route("/metrics", handler(self.server_metrics), methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response:
        args = parse_create(await _body(request))
        started = time.monotonic()
        sb = await self._run(lambda: self.sandboxes.create(**args))
        took = time.monotonic() - started
        self.log(
            f"created {sb.id} ({sb.vm}) from {sb.template} ({sb.source}) in {took:.2f}s, "
            f"timeout {args['timeout']}s"
        )
        return JSONResponse(created_json(sb), status_code=201)

    async def list(self, request: Request) -> Response:
        want = parse_metadata_query(request.query_params.get("metadata"))
        states = {s for s in (request.query_params.get("state") or "running,paused").split(",") if s}
        if states - {"running", "paused"}:
            raise ApiError(400, "state must be running and/or paused")
        rows = [
            sb
            for sb in self.sandboxes.all()
            if sb.state in states and all(sb.metadata.get(k) == v for k, v in want.items())
        ]
        rows.sort(key=lambda sb: sb.started_at, reverse=request.query_params.get("order") != "asc")
        return JSONResponse([listed_json(sb) for sb in rows])

    async def get(self, request: Request) -> Response:
        return JSONResponse(detail_json(self.sandboxes.get(request.path_params["id"])))

    async def kill(self, request: Request) -> Response:
        sb_id = request.path_params["id"]
        self.sandboxes.get(sb_id)
        await self._run(self.sandboxes.kill, sb_id)
        self.log(f"killed {sb_id}")
        return Response(status_code=204)

    async def timeout(self, request: Request) -> Response:
        body = await _body(request)
        seconds = _timeout(body.get("timeout"), default=None)
        if seconds is None:
            raise ApiError(400, "timeout is required")
        self.sandboxes.set_timeout(request.path_params["id"], seconds)
        return Response(status_code=204)

    async def refresh(self, request: Request) -> Response:
        body = await _body(request, required=False)
        seconds = _timeout(body.get("duration"), default=DEFAULT_TIMEOUT_S)
        self.sandboxes.set_timeout(request.path_params["id"], seconds or 0, only_extend=True)
        return Response(status_code=204)

    async def pause(self, request: Request) -> Response:
        sb_id = request.path_params["id"]
        self.sandboxes.get(sb_id)
        if not await self._run(self.sandboxes.pause, sb_id):
            raise ApiError(409, f"sandbox {sb_id} is already paused")
        self.log(f"paused {sb_id}")
        return Response(status_code=204)

    async def resume(self, request: Request) -> Response:
        body = await _body(request, required=False)
        sb_id = request.path_params["id"]
        if self.sandboxes.get(sb_id).state != "paused":
            raise ApiError(409, f"sandbox {sb_id} is already running")
        sb, _ = await self._run(self.sandboxes.resume, sb_id, _timeout(body.get("timeout"), default=None))
        return JSONResponse(created_json(sb), status_code=201)

    async def connect(self, request: Request) -> Response:
        body = await _body(request, required=False)
        sb_id = request.path_params["id"]
        self.sandboxes.get(sb_id)
        sb, resumed = await self._run(
            self.sandboxes.resume, sb_id, _timeout(body.get("timeout"), default=None)
        )
        if resumed:
            self.log(f"resumed {sb_id}")
        return JSONResponse(created_json(sb), status_code=201 if resumed else 200)

    async def metrics(self, request: Request) -> Response:
        self.sandboxes.get(request.path_params["id"])
        return JSONResponse([])  # not collected yet: an empty series is a valid answer

    async def server_metrics(self, request: Request) -> Response:
        """The server's metrics in Prometheus's text format: sandboxes, creates and their latency, pools."""
        gauges = self.sandboxes.gauges() + (self.pool.gauges() if self.pool is not None else [])
        return Response(self.sandboxes.metrics.render(gauges), media_type=CONTENT_TYPE)
