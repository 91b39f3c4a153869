"""`herovm port`: where a VM's published guest ports are on this host, and publishing one more (herovm.ports;
docs/ports.md). Registered by herovm.cli, whose helpers it uses.

    herovm port NAME GUEST_PORT                   127.0.0.1:PORT (exit 3: not published, or no such VM)
    herovm port ls NAME                           every published port of the VM
    herovm port add NAME GUEST_PORT [--host-port N]
"""

from __future__ import annotations

from typing import Annotated

import typer

from .cli import JsonOpt, _fail, _manager, _print_json, app
from .errors import HeroVMError, InvalidInput
from .ports import HOST

USAGE = "herovm port NAME GUEST_PORT | herovm port ls NAME | herovm port add NAME GUEST_PORT [--host-port N]"


def _guest_port(text: str) -> int:
    from .ports import parse_spec

    if not text.strip().isdigit():
        raise InvalidInput(f"guest port {text!r} is not a port from 1 to 65535", hint=USAGE)
    return parse_spec(int(text)).guest


def _row(name: str, host: str, host_port: int, guest_port: int) -> dict:
    return {
        "name": name,
        "guest_port": guest_port,
        "host": host,
        "host_port": host_port,
        "address": f"{host}:{host_port}",
    }


@app.command(name="port")
def port(
    args: Annotated[list[str], typer.Argument(metavar="[ls|add] NAME [GUEST_PORT]", show_default=False)],
    host_port: Annotated[
        int | None, typer.Option("--host-port", help="port add: the port on 127.0.0.1 (default: a free one)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Where a VM's published guest port is on this host (127.0.0.1:PORT; exit 3 if it is not published);
    `port ls NAME`: all of them; `port add NAME GUEST_PORT`: publish one more (docs/ports.md)."""
    verb = args[0] if args and args[0] in ("ls", "add") and not (len(args) == 2 and args[1].isdigit()) else ""
    rest = args[1:] if verb else args
    try:
        if verb == "ls":
            if len(rest) != 1:
                raise InvalidInput("port ls takes one VM name", hint=USAGE)
            if host_port is not None:
                raise InvalidInput("--host-port belongs to port add", hint=USAGE)
            with _manager(json_out) as m:
                rows = [_row(rest[0], HOST, h, g) for h, g in m.record(rest[0]).ports]
            if json_out:
                _print_json(rows)
            elif not rows:
                typer.echo(f"{rest[0]} publishes no port (herovm port add {rest[0]} GUEST_PORT)")
            for r in [] if json_out else rows:
                typer.echo(f"{r['guest_port']}/tcp -> {r['address']}")
            return
        if len(rest) != 2:
            raise InvalidInput("name a VM and a guest port", hint=USAGE)
        name, guest = rest[0], _guest_port(rest[1])
        if verb != "add" and host_port is not None:
            raise InvalidInput("--host-port belongs to port add", hint=USAGE)
        with _manager(json_out) as m:
            host, found = m.publish(name, guest, host_port) if verb == "add" else m.port(name, guest)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(_row(name, host, found, guest))
    else:
        typer.echo(f"{host}:{found}")
