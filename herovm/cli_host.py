"""`herovm host`: the libvirt hosts herovm runs VMs on (herovm.hosts; docs/hosts.md). Registered by
herovm.cli, whose helpers it uses.

    herovm host add NAME qemu+ssh://USER@HOST[:PORT]/system|session [--identity KEY] [--host-key KEY]
    herovm host ls                                 reachable or not, accelerator, CPUs, memory, VMs, images
    herovm host set NAME --max-memory SIZE|none   how much guest memory herovm may place there
    herovm host prune NAME                         remove the images no VM there lies on
    herovm host rm NAME
"""

from __future__ import annotations

from typing import Annotated

import typer

from .cli import JsonOpt, _fail, _listing, _manager, _print_json, app
from .errors import HeroVMError

host_app = typer.Typer(
    help="The libvirt hosts VMs run on: `local`, and others reached over SSH (docs/hosts.md).",
    no_args_is_help=True,
)
app.add_typer(host_app, name="host")


def _size(text: str | None) -> int | None:
    from .settings import _memory

    return None if text in (None, "", "none") else _memory(text, "max-memory")


@host_app.command("add")
def host_add(
    name: str,
    uri: Annotated[str, typer.Argument(help="qemu+ssh://USER@HOST[:PORT]/system or /session")],
    identity: Annotated[
        str | None, typer.Option("--identity", help="the SSH private key (default ~/.ssh/id_ed25519)")
    ] = None,
    host_key: Annotated[
        str | None,
        typer.Option(
            "--host-key",
            help="the host's SSH public key, 'ssh-ed25519 AAAA...' (default: ~/.ssh/known_hosts)",
        ),
    ] = None,
    pool: Annotated[
        str | None, typer.Option("--pool", help="herovm's pool directory there (default: see docs/hosts.md)")
    ] = None,
    accel: Annotated[
        str, typer.Option("--accel", help="kvm, tcg or auto (what its libvirt offers)")
    ] = "auto",
    max_memory: Annotated[
        str | None, typer.Option("--max-memory", help="guest memory herovm may place there, e.g. 16GB")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a host: it must answer over SSH with the pinned host key; herovm's storage pool is made there."""
    from . import hosts

    try:
        added = hosts.add(
            name,
            uri,
            identity=identity,
            host_key=host_key,
            pool=pool,
            accel=accel,
            max_memory=_size(max_memory),
        )
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(added.row())
    else:
        typer.echo(f"host {name} added: {uri} ({added.accel}, pool {added.pool})")


@host_app.command("ls")
def host_ls(json_out: JsonOpt = False) -> None:
    """Every host: reachable or not, accelerator, CPUs, free memory, room, herovm VMs running, images."""

    def line(h: dict) -> str:
        if not h["reachable"]:
            return f"{h['name']:<12} {'unreachable':<12} {h['error']}"
        return (
            f"{h['name']:<12} {'ok':<12} {h['accel'] or '-':<6} {h['cpus'] or '-':>4} "
            f"{(h['memory_free'] or 0) >> 20:>7}M {h['room'] >> 20:>7}M {h['vms_running']:>4}  "
            f"{', '.join(h['images']) or '-'}"
        )

    head = f"{'NAME':<12} {'STATE':<12} {'ACCEL':<6} {'CPUS':>4} {'FREE':>8} {'ROOM':>8} {'VMS':>4}  IMAGES"
    _listing(json_out, lambda m: m.hosts(), "no hosts", head, line)


@host_app.command("set")
def host_set(
    name: str,
    max_memory: Annotated[
        str, typer.Option("--max-memory", help="guest memory herovm may place there (none: no limit)")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Change a host's limit (`local` too)."""
    from . import hosts

    try:
        changed = hosts.set_limit(name, _size(max_memory))
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(changed.row())
    else:
        limit = f"{changed.max_memory >> 20} MiB" if changed.max_memory else "no limit"
        typer.echo(f"host {name}: {limit}")


@host_app.command("prune")
def host_prune(name: str, json_out: JsonOpt = False) -> None:
    """Remove from a host the images no VM there lies on (uploaded by `up`; uploaded again when needed)."""
    try:
        with _manager(json_out) as m:
            removed = m.prune_host(name)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"host": name, "removed": removed})
    else:
        typer.echo("\n".join(f"removed {v} from {name}" for v in removed) or f"nothing to remove on {name}")


@host_app.command("rm")
def host_rm(name: str, json_out: JsonOpt = False) -> None:
    """Forget a host (refused while VMs of this home are on it). Its pool and images stay there."""
    from . import hosts

    try:
        hosts.remove(name)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"removed": name})
    else:
        typer.echo(f"host {name} removed")
