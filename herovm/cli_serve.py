"""`herovm serve`: the E2B-compatible sandbox server (herovm/serve/, docs/serve.md)."""

from __future__ import annotations

import ipaddress
import sys
from typing import Annotated

import typer

from .errors import HeroVMError, InvalidInput

DEFAULT_LISTEN = "127.0.0.1:3000"


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); InvalidInput otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--listen {listen!r} is not HOST:PORT", hint="e.g. --listen 127.0.0.1:3000")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on")] = DEFAULT_LISTEN,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="TLS certificate (PEM)")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="TLS private key (PEM)")] = None,
    insecure_listen: Annotated[
        bool, typer.Option("--insecure-listen", help="allow plain HTTP on an address other than loopback")
    ] = False,
    max_sandboxes: Annotated[
        int | None, typer.Option("--max-sandboxes", min=1, help="refuse creates past this many (429)")
    ] = None,
    pool: Annotated[
        list[str] | None,
        typer.Option(
            "--pool",
            metavar="TEMPLATE=N",
            help="keep N VMs of herovm template TEMPLATE restored and paused for creates, on each host "
            "with a copy of it (TEMPLATE@HOST=N: on that host; repeatable)",
        ),
    ] = None,
    place_on: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            metavar="HOST",
            help="place sandboxes on this host (herovm host ls; repeatable); default: every host",
        ),
    ] = None,
    create_wait: Annotated[
        float,
        typer.Option(
            "--create-wait",
            min=0,
            help="seconds a create past --max-sandboxes waits for a slot before its 429 (default: none)",
        ),
    ] = 0.0,
) -> None:
    """Serve E2B's sandbox API: E2B's SDKs and agents use herovm with E2B_API_URL and E2B_SANDBOX_URL
    set to this server's URL (docs/serve.md)."""
    from .cli import _fail

    try:
        host, port = parse_listen(listen)
        if bool(tls_cert) != bool(tls_key):
            raise InvalidInput("--tls-cert and --tls-key go together", hint="give both, or neither")
        if not is_loopback(host) and not tls_cert and not insecure_listen:
            raise InvalidInput(
                f"{host} is not a loopback address: keys and tokens would cross the network in clear",
                hint="give --tls-cert and --tls-key, or --insecure-listen if something else encrypts it",
            )
        try:
            from .serve.app import run as run_server
            from .serve.auth import key_file, load_keys
            from .serve.pool import parse_pools
        except ImportError as e:
            raise InvalidInput(
                f"herovm serve needs its extra packages ({e.name} is missing)",
                hint="pip install 'herovm[serve]'",
            ) from None
        try:
            pools = parse_pools(pool or [])
        except ValueError as e:
            raise InvalidInput(str(e), hint="e.g. --pool base=2 (a herovm template and how many)") from None
        hosts = list(dict.fromkeys(place_on)) if place_on else None
        keys, made = load_keys()
    except HeroVMError as e:
        _fail(e)
    if made:
        typer.echo(f"made an API key (kept in {key_file()}, shown once):\n  E2B_API_KEY={made}", err=True)
    scheme = "https" if tls_cert else "http"
    url = f"{scheme}://{listen}"

    def ready(kept: list[str]) -> None:
        typer.echo(f"herovm serve: {url} ({len(kept)} sandboxes kept from before)", err=True)
        typer.echo(f"  export E2B_API_URL={url} E2B_SANDBOX_URL={url}", err=True)

    try:
        run_server(
            f"{'[' + host + ']' if ':' in host else host}:{port}",
            keys,
            certfile=tls_cert,
            keyfile=tls_key,
            max_sandboxes=max_sandboxes,
            pools=pools,
            create_wait_s=create_wait,
            hosts=hosts,
            on_ready=ready,
        )
    except HeroVMError as e:
        _fail(e)
    except OSError as e:
        _fail(InvalidInput(f"cannot listen on {listen}: {e.strerror or e}", hint="is another server there?"))
    sys.exit(0)
