"""The `herovm` command: a thin typer shell over herovm.Manager. No logic of its own beyond rendering.

Exit codes: 0 ok; `exec` passes the remote command's code through (124 on --timeout) and keeps 255 for
herovm's own failures; other commands exit with the error's code (2 bad input, 3 not found, 4 exists,
5 libvirt unavailable, 6 image, 7 boot failed, 130 interrupted, 143 terminated (SIGTERM: cleaned up as
Ctrl-C is), 255 other).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer

from . import __version__
from .errors import HeroVMError, InvalidInput
from .progress import Progress

app = typer.Typer(
    help="herovm: real, isolated Linux sandboxes in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
image_app = typer.Typer(help="Build, list and remove guest images.", no_args_is_help=True)
app.add_typer(image_app, name="image")

_options: dict[str, object] = {}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (an `up` removes its half-made VM), but exiting 143."""


_terminated = False  # click turns the interrupt into Abort: remember which one it was


def _on_sigterm(signum: int, frame: object) -> None:
    global _terminated
    _terminated = True
    raise _Terminated


JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _global(
    connect: Annotated[
        str | None,
        typer.Option(
            "--connect",
            "-c",
            help="libvirt URI (default: $HEROVM_LIBVIRT_URI, else qemu:///system as root, qemu:///session "
            "otherwise)",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", help="print the version", callback=_print_version, is_eager=True)
    ] = False,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend", help="libvirt or cloud-hypervisor (default: $HEROVM_BACKEND, else libvirt)"
        ),
    ] = None,
) -> None:
    _options["uri"] = connect
    _options["backend"] = backend


def _manager(json_out: bool = False):
    from .config import configured_backend
    from .manager import Manager

    backend = _options.get("backend") or configured_backend()
    return Manager(backend, uri=_options.get("uri"), progress=_reporter(json_out))  # type: ignore[arg-type]


def _reporter(json_out: bool):
    started = time.monotonic()
    tty = sys.stderr.isatty()

    def report(p: Progress) -> None:
        if json_out:
            if tty:
                return
            print(json.dumps({"progress": p.stage, "message": p.message}), file=sys.stderr, flush=True)
            return
        stamp = f"{time.monotonic() - started:6.2f}s"
        if tty:
            sys.stderr.write(f"\r\033[2m{stamp}\033[0m {p.message}\033[K\n")
        else:
            sys.stderr.write(f"{stamp} {p.message}\n")
        sys.stderr.flush()

    return report


def _fail(e: HeroVMError, json_out: bool = False, code: int | None = None) -> NoReturn:
    if json_out:
        typer.echo(json.dumps(e.to_json(), default=str))
    else:
        typer.echo(f"herovm: error: {e.message}", err=True)
        for line in (e.details.get("console") or [])[-8:]:
            typer.echo(f"  console| {line}", err=True)
        output = e.details.get("output")
        if isinstance(output, str) and output.strip():  # a failed action's output (the guest's: shown inert)
            from .protocol_host import printable

            for line in printable(output.replace("\r\n", "\n")).rstrip().splitlines()[-20:]:
                typer.echo(f"  output| {line}", err=True)
        if e.hint:
            typer.echo(f"  hint: {e.hint}", err=True)
    raise typer.Exit(code if code is not None else e.exit_code)


def _kv(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def _secrets(items: list[str] | None) -> dict[str, str]:
    """`--secret NAME=VALUE`, or `--secret NAME` for the value of the environment variable NAME (which keeps
    it out of the process list). Errors never repeat what was given: it may be the secret itself."""
    out = {}
    for n, item in enumerate(items or [], 1):
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidInput(f"--secret number {n} is not NAME=VALUE or NAME")
        if not sep:
            if key not in os.environ:
                raise InvalidInput(
                    f"--secret number {n} names an environment variable that is not set",
                    hint="--secret NAME takes the value of the environment variable NAME",
                )
            value = os.environ[key]
        out[key] = value
    return out


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# The option's type for each kind of VM setting (herovm.settings): sizes and durations are read as text.
_UP_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "bool": bool,
    "size": str,
    "duration": str,
    "pairs": list[str] | None,
    "list": list[str],
}


def _settings_command(
    command: Callable[..., None], exclude: tuple[str, ...] = ()
) -> tuple[Callable[..., None], Callable[[dict[str, Any]], dict[str, Any]]]:
    """`command(name, json_out, **given)` with one option per VM setting (herovm.settings.VMSettings) but
    `exclude`, each with its help and default, as `--var`/`--secret` where the option's name differs from
    the setting's; and the function that turns what was given into VMSettings's keyword arguments."""
    from .settings import declared

    options = {}  # the command's parameter name -> the setting's name and declaration
    params = [inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    for field, setting in declared():
        if field in exclude:
            continue
        option = setting.option or field
        annotation = _UP_TYPES[setting.kind] if setting.given is not None else _UP_TYPES[setting.kind] | None
        default = None if setting.kind == "pairs" else setting.given
        options[option] = (field, setting)
        params.append(
            inspect.Parameter(
                option,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(default, help=setting.help),
                annotation=annotation,
            )
        )
    params.append(
        inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOpt)
    )

    def values(given: dict[str, Any]) -> dict[str, Any]:
        """What was given, as VMSettings's keyword arguments; an option left at its default takes the
        config file's or the environment's value where there is one (herovm.config)."""
        import click
        from click.core import ParameterSource

        from .config import setting_defaults
        from .settings import FROM_TEMPLATE

        ctx = click.get_current_context()
        configured = setting_defaults()
        if given.get("template"):  # a template's VM takes its image and sizes from the template
            configured = {k: v for k, v in configured.items() if k not in FROM_TEMPLATE}
        out = {}
        for option, value in given.items():
            field, setting = options[option]
            if field in configured and ctx.get_parameter_source(option) == ParameterSource.DEFAULT:
                value = configured[field].value
            if setting.kind == "pairs":
                value = _secrets(value) if setting.secret else _kv(value, f"--{option}")
            out[field] = value
        return out

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command, values


def _up_command() -> None:
    """`herovm up NAME`, its options made from herovm.settings.VMSettings."""

    def up(name: str, json_out: bool = False, **given: Any) -> None:
        """Create and boot a VM (or restore it from a template); return when its bootstrap has run and it
        answers exec."""
        started = time.monotonic()
        try:
            with _manager(json_out) as m:
                vm = m.up(name, **values(given))
                status = m.status(vm.name)
        except HeroVMError as e:
            _fail(e, json_out)
        except KeyboardInterrupt as e:
            typer.echo("herovm: interrupted; the half-made VM was removed", err=True)
            raise typer.Exit(143 if isinstance(e, _Terminated) else 130) from None
        if json_out:
            _print_json(status)
        else:
            took = time.monotonic() - started  # what the user waited for, not the guest's boot alone
            typer.echo(f"{name} is ready in {took:.1f}s: herovm exec {name} -- CMD, herovm ssh {name}")

    up, values = _settings_command(up)
    app.command()(up)


_up_command()


@app.command()
def down(
    name: Annotated[str | None, typer.Argument()] = None,
    all_: Annotated[bool, typer.Option("--all", help="remove every herovm VM")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="no error if the VM does not exist; a VM on a host that cannot be reached is forgotten here",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove a VM: its domain, disk, keys and state. Nothing is left."""
    from .errors import NotFound

    if not name and not all_:
        _fail(InvalidInput("name a VM or give --all"), json_out)
    try:
        with _manager(json_out) as m:
            removed = (
                m.down_all() if all_ else ([m.down(name, forget_unreachable=force) or name] if name else [])
            )
    except NotFound as e:
        if not force:
            _fail(e, json_out)
        removed = []
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"removed": removed})
    elif all_:
        typer.echo(f"removed {len(removed)} VM(s)" + (f": {', '.join(removed)}" if removed else ""))


@app.command(name="exec")
def exec_(
    name: str,
    command: Annotated[list[str], typer.Argument(help="the command and its arguments (after --)")],
    timeout: Annotated[str | None, typer.Option(help="kill the command after this long, e.g. 30s")] = None,
    env: Annotated[list[str] | None, typer.Option(help="K=V for the command")] = None,
    cwd: Annotated[str | None, typer.Option(help="working directory in the guest")] = None,
    interactive: Annotated[bool, typer.Option("-i", "--interactive", help="pass stdin through")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="print {exit_code, stdout, stderr, timed_out} when it ends")
    ] = False,
) -> None:
    """Run a command in the VM (served by its agent); exit with its exit code. herovm's own failures: 2 bad
    input, 3 no such VM, 255 anything else (the VM is not running, its agent does not answer).

    One argument is a shell line (bash), several are the program and its arguments, run as they are."""
    from .settings import seconds

    out, err = sys.stdout.buffer, sys.stderr.buffer
    captured: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    def write(stream, key: str):
        def w(data: bytes) -> None:
            if json_out:
                captured[key] += data
                return
            stream.write(data)
            stream.flush()

        return w

    try:
        with _manager() as m:
            vm = m.attach(name)
            result = vm.exec(
                command if len(command) > 1 else command[0],
                env=_kv(env, "--env"),
                cwd=cwd,
                timeout=seconds(timeout, "timeout") if timeout else None,
                stdin=sys.stdin.buffer if interactive else None,
                on_stdout=write(out, "stdout"),
                on_stderr=write(err, "stderr"),
            )
            vm.close()
    except HeroVMError as e:
        _fail(e, json_out, code=_own_failure(e))
    code = result.exit_code if 0 <= result.exit_code < 255 or result.timed_out else 255
    if json_out:
        _print_json(
            {
                "exit_code": result.exit_code,
                "timed_out": result.timed_out,
                **{k: v.decode("utf-8", "replace") for k, v in captured.items()},
            }
        )
    elif result.timed_out:
        typer.echo(f"herovm: {name}: command timed out after {timeout}", err=True)
    raise typer.Exit(code)


def _own_failure(e: HeroVMError) -> int:
    """The exit code of a command whose codes are its guest command's (exec, ssh): herovm's own bad input
    (2) and missing VM (3) keep theirs, everything else is 255."""
    from .errors import NotFound

    return e.exit_code if isinstance(e, InvalidInput | NotFound) else 255


@app.command()
def ssh(name: str) -> None:
    """An interactive shell in the VM."""
    try:
        with _manager() as m:
            code = m.get(name).connection().shell()
    except HeroVMError as e:
        _fail(e, code=_own_failure(e))
    raise typer.Exit(code)


@app.command()
def cp(src: str, dst: str, json_out: JsonOpt = False) -> None:
    """Copy files or directories: NAME:/path on either side. From a guest, what cannot be copied safely
    (links out of the tree, special files) is skipped, each with a line."""

    def split(arg: str) -> tuple[str | None, str]:
        head, sep, tail = arg.partition(":")
        if sep and head and "/" not in head:
            return head, tail
        return None, arg

    (src_vm, src_path), (dst_vm, dst_path) = split(src), split(dst)
    try:
        if (src_vm is None) == (dst_vm is None):
            raise InvalidInput("exactly one side of cp must be NAME:/path", hint="herovm cp ./f box:/tmp/f")
        skipped: list[str] = []
        with _manager(json_out) as m:
            if dst_vm:
                with m.get(dst_vm) as vm:
                    vm.put(src_path, dst_path)
            else:
                with m.get(src_vm) as vm:  # type: ignore[arg-type]
                    skipped = vm.get(src_path, dst_path)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"src": src, "dst": dst, "skipped": skipped})


@app.command()
def gc(json_out: JsonOpt = False) -> None:
    """Remove what crashed or killed herovm runs left behind (never a running VM)."""
    try:
        with _manager(json_out) as m:
            removed = m.gc()
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"removed": removed})
    else:
        typer.echo("\n".join(f"removed {r}" for r in removed) or "nothing to remove")


def _listing(
    json_out: bool, fetch: Callable[[Any], list[dict]], empty: str, head: str, line: Callable[[dict], str]
) -> None:
    """A list command: `fetch(manager)`'s rows as JSON, or a header and a line each, or `empty`."""
    try:
        with _manager(json_out) as m:
            rows = fetch(m)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(rows)
    elif not rows:
        typer.echo(empty)
    else:
        typer.echo(head)
        for r in rows:
            typer.echo(line(r))


@app.command(name="ls")
def ls_(json_out: JsonOpt = False) -> None:
    """List herovm's VMs."""

    def line(r: dict) -> str:
        mem = f"{r['memory'] >> 20}M" if r["memory"] else "-"
        port = f"127.0.0.1:{r['ssh_port']}" if r["ssh_port"] else "-"
        port += "".join(f" {p['guest_port']}->{p['address']}" for p in r.get("ports") or [])
        return (
            f"{r['name']:<20} {r['state']:<11} {r.get('host') or '-':<10} {'yes' if r['ready'] else 'no':<6} "
            f"{r['image'] or '-':<10} {r['accel'] or '-':<6} {r['cpus'] or '-':>4} {mem:>8} {port}"
        )

    head = (
        f"{'NAME':<20} {'STATE':<11} {'HOST':<10} {'READY':<6} {'IMAGE':<10} {'ACCEL':<6} {'CPUS':>4} "
        f"{'MEMORY':>8} SSH"
    )
    _listing(json_out, lambda m: m.ls(), "no VMs (create one with `herovm up NAME`)", head, line)


@app.command()
def status(names: Annotated[list[str], typer.Argument(metavar="NAME...")], json_out: JsonOpt = False) -> None:
    """State, settings and the bootstrap steps of VMs (--json: an object for one VM, a list for several)."""
    try:
        with _manager(json_out) as m:
            facts = [m.status(name) for name in names]
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(facts[0] if len(facts) == 1 else facts)
        return
    for n, st in enumerate(facts):
        if n:
            typer.echo("")
        _print_status(st)


def _print_status(st: dict) -> None:
    from .protocol_host import printable  # what the guest wrote is shown, never obeyed by the terminal

    s = st["settings"] or {}
    if st["state"] == "running":
        typer.echo(f"{st['name']}: {st['state']}, agent {st['agent']}")
    else:  # nothing answers now: say how its last boot ended, not "ready"
        typer.echo(f"{st['name']}: {st['state']} (its last boot: {st['agent']})")
    typer.echo(
        f"  image {st['image']}/{st['image_id']}, {s.get('accel')}, {s.get('cpus')} CPU, "
        f"{(s.get('memory') or 0) >> 20} MiB, disk {(s.get('disk') or 0) >> 30} GiB"
    )
    if st.get("host") not in (None, "local"):
        typer.echo(f"  on host {st['host']}")
    if st["ssh_port"]:
        where = "127.0.0.1" if st.get("host") in (None, "local") else f"{st['host']}'s 127.0.0.1"
        typer.echo(f"  ssh {where}:{st['ssh_port']}")
    for p in st.get("ports") or []:
        typer.echo(f"  port {p['guest_port']} published on {p['address']}")
    if o := st.get("origin"):
        typer.echo(
            f"  forked from {o['fork']}" if "fork" in o else f"  restored from template {o.get('template')}"
        )
    if st["bootstrap"]:
        typer.echo(f"  bootstrap {st['bootstrap']}")
    if st.get("expires"):
        typer.echo(f"  its time is up at {st['expires']} (--ttl): it powers off, and `herovm gc` removes it")
    if st.get("paused_since"):
        typer.echo(f"  paused since {st['paused_since']}")
    if r := st.get("restored"):
        typer.echo(f"  restored to snapshot {r.get('snapshot')} (taken {r.get('taken')}) at {r.get('at')}")
    if st.get("events") == "cut":
        typer.echo("  the start of this boot is no longer in the console log: its steps are unknown")
    for step in st["steps"]:
        mark = "ok" if step["ok"] else f"FAILED ({printable(step.get('error'), one_line=True)})"
        typer.echo(
            f"  [{step['index'] + 1}] line {step['line']:<4} {printable(step['action'], one_line=True):<16} "
            f"{mark} {step['seconds']:.2f}s"
        )
    if st["failure"]:
        f = st["failure"]
        typer.echo(f"  failed in {printable(f.get('stage'), True)}: {printable(f.get('error'), True)}")
        if f.get("output"):
            lines = printable(f["output"].replace("\r\n", "\n")).splitlines()[-20:]
            typer.echo("  output:\n" + "\n".join("    " + line for line in lines))


@app.command()
def logs(
    name: str,
    console: Annotated[bool, typer.Option("--console", help="the raw serial console")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing as it grows")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="the events as JSON lines (the console's lines as JSON strings)")
    ] = False,
) -> None:
    """The agent's events (or the raw console with --console), from the newest MiB of the console log.

    Events the guest wrote that do not count (after its boot's `ready` or `failed`, or a second `boot`) are
    shown marked "ignored": a process in the guest can write anything to the console."""
    from .guest.events import follow_console, read_console
    from .protocol_host import Story, console_event, describe_event, printable

    try:
        with _manager(json_out) as m:
            vm = m.get(name)
            if follow and vm.record.host:
                raise InvalidInput(
                    f"--follow: {name} runs on host {vm.record.host}: its console is copied here when asked",
                    hint=f"run `herovm logs {name}` again to see what is new",
                )
            redact = m.redactor(name)
            path = m.logs(name, console=True)  # a VM on another host: its console copied here first
    except HeroVMError as e:
        _fail(e, json_out)
    story = Story(vm.record.last_boot.nonce)
    window = read_console(path)
    tty = sys.stdout.isatty()

    def show(line: str) -> None:
        if json_out:  # one JSON value a line: an event with `counts` (this boot's story or not), or a line
            event = None if console else console_event(line)
            if event is not None:
                verdict = story.take(event)
                event = {**event, "counts": verdict in (Story.THIS, Story.EARLIER), "verdict": verdict}
                sys.stdout.write(redact(json.dumps(event)) + "\n")
            elif console:
                sys.stdout.write(redact(json.dumps(line)) + "\n")
            sys.stdout.flush()
            return
        if console:  # raw, as asked; on a terminal its control characters are shown, not obeyed
            sys.stdout.write(redact(printable(line) if tty else line) + "\n")
        elif (event := console_event(line)) is not None:
            verdict = story.take(event)
            ignored = "" if verdict in (Story.THIS, Story.EARLIER) else f"ignored ({verdict}): "
            typer.echo(redact(f"{event['t']:8.2f}s {ignored}{describe_event(event)}"))
            if not ignored and event["event"] == "action.end" and event.get("output"):
                output = redact(event["output"].replace("\r\n", "\n"))
                lines = printable(output).rstrip().splitlines()[-20:]
                typer.echo("\n".join("          | " + x for x in lines))
        sys.stdout.flush()

    for line in window.lines():
        show(line)
    if follow:
        for line in follow_console(path, window.end):
            show(line)


def _change_state(name: str, json_out: bool, act: Callable[[Any], None]) -> None:
    """`act(manager)` on VM `name`, then say the state it is in (pause, resume, stop)."""
    try:
        with _manager(json_out) as m:
            act(m)
            machine = m.machine(name)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"name": name, "state": machine.state})
    else:
        typer.echo(f"{name} is {machine.state}")


@app.command()
def pause(name: str, json_out: JsonOpt = False) -> None:
    """Freeze a running VM: it uses no CPU; memory, processes and files stay until `herovm resume`."""
    _change_state(name, json_out, lambda m: m.pause(name))


@app.command()
def resume(name: str, json_out: JsonOpt = False) -> None:
    """Let a paused VM run on from where it was."""
    _change_state(name, json_out, lambda m: m.resume(name))


snapshot_app = typer.Typer(
    help="Snapshots of a VM: its disk and, while it runs, its memory (docs/snapshots.md).",
    no_args_is_help=True,
)
app.add_typer(snapshot_app, name="snapshot")


def _snapshot_line(r: dict) -> str:
    memory = f"{r['memory_bytes'] >> 20} MiB" if r["memory_bytes"] is not None else "-"
    disk = f"{r['disk_bytes'] >> 20} MiB" if r["disk_bytes"] is not None else "-"
    return (
        f"{r['vm']:<20} {r['name']:<20} {r['kind']:<7} {r['created'] or '-':<26} {memory:>9} {disk:>9} "
        f"{r['seconds'] if r['seconds'] is not None else '-'}"
    )


@snapshot_app.command("create")
def snapshot_create(name: str, snap: str, json_out: JsonOpt = False) -> None:
    """Snapshot VM NAME as SNAP: its disk, and while it runs (or is paused) its memory and device state; it
    runs on. A stopped VM: its disk."""
    try:
        with _manager(json_out) as m:
            row = m.snapshot(name, snap)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(row)
    else:
        what = "memory and disk" if row["kind"] == "memory" else "disk"
        typer.echo(f"snapshot {snap} of {name} taken in {row['seconds']:.2f}s ({what})")


@snapshot_app.command("ls")
def snapshot_ls(name: Annotated[str | None, typer.Argument()] = None, json_out: JsonOpt = False) -> None:
    """List the snapshots of VM NAME, or of every VM."""
    _listing(
        json_out,
        lambda m: m.snapshots(name),
        f"no snapshots (take one with `herovm snapshot create {name or 'NAME'} SNAP`)",
        f"{'VM':<20} {'SNAPSHOT':<20} {'KIND':<7} {'CREATED':<26} {'MEMORY':>9} {'DISK':>9} SECONDS",
        _snapshot_line,
    )


@snapshot_app.command("restore")
def snapshot_restore(name: str, snap: str, json_out: JsonOpt = False) -> None:
    """Roll VM NAME back to its snapshot SNAP: its disk, and for a memory snapshot its running state. A disk
    snapshot leaves it stopped."""
    started = time.monotonic()
    try:
        with _manager(json_out) as m:
            row = m.restore(name, snap)
    except HeroVMError as e:
        _fail(e, json_out)
    took = time.monotonic() - started
    if json_out:
        _print_json({**row, "restore_seconds": round(took, 3)})
    elif row["vm_state"] == "stopped":
        typer.echo(f"{name} restored to {snap} in {took:.2f}s: stopped (`herovm start {name}` boots it)")
    else:
        typer.echo(f"{name} restored to {snap} in {took:.2f}s: {row['vm_state']}")


@snapshot_app.command("rm")
def snapshot_rm(name: str, snap: str, json_out: JsonOpt = False) -> None:
    """Remove VM NAME's snapshot SNAP."""
    try:
        with _manager(json_out) as m:
            m.remove_snapshot(name, snap)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"removed": snap, "vm": name})
    else:
        typer.echo(f"removed snapshot {snap} of {name}")


template_app = typer.Typer(
    help="Templates: a VM booted and bootstrapped once, kept as its memory and disk; `herovm up NAME "
    "--template T` restores new VMs from it instead of booting (docs/templates.md).",
    no_args_is_help=True,
)
app.add_typer(template_app, name="template")
# registers `herovm host` and `herovm port`, which use the helpers above
from . import cli_host, cli_port  # noqa: E402, F401


def _with_option(command: Callable[..., None], name: str, annotation: Any, default: Any) -> inspect.Signature:
    """`command`'s signature with one more keyword option, before --json."""
    sig = inspect.signature(command)
    params = list(sig.parameters.values())
    extra = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    return sig.replace(parameters=[*params[:-1], extra, params[-1]])


def _template_create_command() -> None:
    def create(name: str, json_out: bool = False, **given: Any) -> None:
        """Make template NAME: boot a VM with these settings, run its bootstrap, keep its memory and disk,
        remove the VM."""
        try:
            hosts = [h.strip() for h in (given.pop("host", None) or "").split(",") if h.strip()]
            with _manager(json_out) as m:
                row = m.create_template(name, hosts=hosts or None, **values(given))
        except HeroVMError as e:
            _fail(e, json_out)
        except KeyboardInterrupt as e:
            typer.echo("herovm: interrupted; `herovm gc` removes what was half made", err=True)
            raise typer.Exit(143 if isinstance(e, _Terminated) else 130) from None
        if json_out:
            _print_json(row)
        else:
            typer.echo(
                f"template {name} made in {row['seconds']:.1f}s "
                f"({(row['on_disk_bytes'] or 0) >> 20} MiB on disk): "
                f"herovm up NAME --template {name}"
            )

    create, values = _settings_command(create, exclude=("template", "keep_failed", "ttl", "host"))
    create.__signature__ = _with_option(  # type: ignore[attr-defined]
        create,
        "host",
        str | None,
        typer.Option(
            None,
            help="the host(s) to keep it on, comma-separated (herovm host ls): a copy is made on each, and "
            "its clones are placed among them (docs/templates.md); default: this host",
        ),
    )
    template_app.command("create")(create)


_template_create_command()


@template_app.command("ls")
def template_ls(json_out: JsonOpt = False) -> None:
    """List the templates."""
    _listing(
        json_out,
        lambda m: m.templates(),
        "no templates (make one with `herovm template create NAME --bootstrap FILE`)",
        f"{'TEMPLATE':<20} {'HOSTS':<12} {'IMAGE':<10} {'CPUS':>4} {'MEMORY':>7} {'NET':<10} "
        f"{'CREATED':<26} USED BY",
        lambda r: (
            f"{r['name']:<20} {','.join(r['hosts']):<12} {r['image'] or '-':<10} {r['cpus'] or '-':>4} "
            f"{(r['memory'] or 0) >> 20:>4}MiB {r['net'] or '-':<10} {r['created'] or '-':<26} "
            f"{', '.join(r['used_by'] or []) or '-'}"
        ),
    )


@template_app.command("rm")
def template_rm(
    name: str,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="forget its copy on a host that does not answer (gone for good); it stays there"
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove template NAME, on every host with a copy (refused while a VM's disk lies on it)."""
    try:
        with _manager(json_out) as m:
            forgotten = m.remove_template(name, force=force)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"removed": name, "forgotten_on": forgotten})
    else:
        left = f" (its copy on {', '.join(forgotten)} was forgotten, not removed there)" if forgotten else ""
        typer.echo(f"removed template {name}{left}")


@app.command()
def fork(source: str, new: Annotated[list[str], typer.Argument()], json_out: JsonOpt = False) -> None:
    """New VMs NEW... from the running VM SOURCE: each holds its memory and disk as they were at the fork,
    with an identity of its own. SOURCE runs on (it is paused while its memory is saved)."""
    try:
        with _manager(json_out) as m:
            result = m.fork(source, new)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(result)
        return
    for c in result["clones"]:
        typer.echo(f"{c['name']} is ready in {c['seconds']:.1f}s: forked from {source}")
    typer.echo(f"{source} was paused {result['source_pause_seconds']:.2f}s for the fork")


@app.command()
def stop(
    name: str,
    timeout: Annotated[str, typer.Option(help="how long the guest may take to power off, e.g. 20s")] = "20s",
    json_out: JsonOpt = False,
) -> None:
    """Power a VM off, keeping its disk (hard, after --timeout)."""
    from .settings import seconds

    _change_state(name, json_out, lambda m: m.stop(name, seconds(timeout, "timeout")))


@app.command()
def start(name: str, timeout: Annotated[str, typer.Option()] = "5m", json_out: JsonOpt = False) -> None:
    """Boot a stopped VM again (its bootstrap does not run twice; its services start again)."""
    try:
        with _manager(json_out) as m:
            m.start(name, timeout)
            st = m.status(name)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(st)
    else:
        typer.echo(f"{name} is ready")


@app.command(name="run")
def run_(
    playbook: Annotated[
        str | None, typer.Argument(help="a HeroScript playbook of !!vm.* actions; - for stdin")
    ] = None,
    var: Annotated[list[str] | None, typer.Option(help="K=V substituted into the playbook")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="say what would happen; do nothing")] = False,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="run on after a failed action")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="show every boot step")] = False,
    interactive: Annotated[
        bool,
        typer.Option(
            "-i",
            "--interactive",
            help="a session: run each action from stdin as it completes, one JSON line each",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a playbook: check it whole, then run its actions in file order (exit 1 at the first failure,
    2 if the playbook is invalid: then nothing was done). With -i, a session for agents: each action read
    from stdin runs when it is complete (a blank line or the next action ends it) and is answered with one
    JSON line; a failure does not end the session (exit 1 at its end if one failed)."""
    from .playbook import cli_run

    try:
        variables = _kv(var, "--var")
        if interactive == (playbook is not None):
            raise InvalidInput("give a playbook, or -i for a session on stdin", hint="herovm run play.hero")
    except HeroVMError as e:
        _fail(e, json_out)
    if interactive:
        from .session import serve

        raise typer.Exit(
            serve(
                sys.stdin,
                sys.stdout,
                variables,
                backend=_options.get("backend"),  # type: ignore[arg-type]
                uri=_options.get("uri"),  # type: ignore[arg-type]
            )
        )
    raise typer.Exit(
        cli_run(
            playbook,
            variables,
            plan=plan,
            json_out=json_out,
            keep_going=keep_going,
            verbose=verbose,
            backend=_options.get("backend"),  # type: ignore[arg-type]
            uri=_options.get("uri"),  # type: ignore[arg-type]
        )
    )


@app.command()
def ttl(
    name: str,
    duration: Annotated[str, typer.Argument(help="from now, e.g. 30m; `never` removes the limit")],
    json_out: JsonOpt = False,
) -> None:
    """Set when VM NAME's time is up (as `up --ttl`): its guest powers itself off then, and `herovm gc`
    removes it."""
    try:
        with _manager(json_out) as m:
            expires = m.set_ttl(name, None if duration == "never" else duration)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"name": name, "expires": expires})
    else:
        typer.echo(f"{name}'s time is up at {expires}" if expires else f"{name} has no time limit")


@app.command()
def config(json_out: JsonOpt = False) -> None:
    """The defaults `up` takes without flags (image, cpus, memory, disk, net, backend), and where each came
    from: the environment (HEROVM_MEMORY, ...), the config file, or herovm's own (docs/config.md)."""
    from . import config as config_mod

    try:
        found = config_mod.values()
        config_mod.setting_defaults()  # a bad value is an error here too, naming where it came from
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json(
            {
                "file": str(config_mod.path()),
                "values": {k: {"value": v.value, "source": v.source} for k, v in found.items()},
            }
        )
        return
    typer.echo(f"config file: {config_mod.path()}")
    for v in found.values():
        typer.echo(f"  {v.key:<8} {v.value!s:<12} {v.source}")


@app.command()
def doctor(json_out: JsonOpt = False) -> None:
    """Check what herovm needs on this host and say how to fix what is missing."""
    from .doctor import run_checks

    checks = run_checks(_options.get("uri"))  # type: ignore[arg-type]
    if json_out:
        _print_json([c.__dict__ for c in checks])
    else:
        for c in checks:
            mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[c.status]
            typer.echo(f"[{mark}] {c.name}: {c.detail}")
            if c.fix and c.status != "ok":
                typer.echo(f"       fix: {c.fix}")
    raise typer.Exit(1 if any(c.status == "fail" for c in checks) else 0)


@image_app.command("build")
def image_build(
    recipe: Annotated[str, typer.Argument()] = "default",
    force: Annotated[
        bool, typer.Option(help="rebuild even if cached: the Debian packages too (refused while in use)")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Build an image from its recipe (herovm/_data/images/RECIPE.toml; cached: built once, reused)."""
    from . import images

    report = _reporter(json_out)
    try:
        img = images.build(recipe, report, force=force)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"recipe": recipe, "id": img.id, "path": str(img.path), "built": img.manifest["built"]})
    else:
        typer.echo(f"{recipe}/{img.id}: {img.path}")


@image_app.command("ls")
def image_ls(json_out: JsonOpt = False) -> None:
    """List cached images."""
    from . import images

    rows = [
        {
            "recipe": i.recipe,
            "id": i.id,
            "path": str(i.path),
            "built": i.manifest.get("built"),
            "kernel": i.manifest.get("kernel_version"),
            "bytes": sum(f["bytes"] for f in i.manifest.get("files", {}).values()),
        }
        for i in images.list_images()
    ]
    if json_out:
        _print_json(rows)
        return
    for r in rows:
        typer.echo(
            f"{r['recipe']:<12} {r['id']:<14} {r['bytes'] >> 20:>6} MiB  {r['built']}  kernel {r['kernel']}"
        )
    if not rows:
        typer.echo("no images cached (herovm image build, or herovm up builds the default)")


@image_app.command("rm")
def image_rm(
    recipe: str, image_id: Annotated[str | None, typer.Argument()] = None, json_out: JsonOpt = False
) -> None:
    """Remove cached images of a recipe (refused while a VM, template or fork layer lies on one)."""
    from . import images

    try:
        removed = images.remove(recipe, image_id)
    except HeroVMError as e:
        _fail(e, json_out)
    if json_out:
        _print_json({"removed": [str(p) for p in removed]})
    else:
        for path in removed:
            typer.echo(f"removed {path}")


def action_sections() -> list:
    from .guest.registry import guest_registry
    from .playbook import host_registry

    return [
        ("In the guest: bootstrap actions", guest_registry()),
        ("On the host: playbook actions", host_registry()),
    ]


def _script_app() -> typer.Typer:
    from .cli_script import actions_markdown, make_app

    def registry():
        from .guest.registry import guest_registry
        from .playbook import host_registry

        return guest_registry().merge(host_registry())

    app = make_app(registry)

    @app.command("actions")
    def actions(
        markdown: Annotated[bool, typer.Option("--markdown", help="the reference as Markdown")] = False,
    ) -> None:
        """Every action herovm knows, with its parameters and an example."""
        if markdown:
            typer.echo(actions_markdown(action_sections()), nl=False)
            return
        for title, reg in action_sections():
            typer.echo(title)
            for spec in reg.specs():
                params = " ".join(f"{p.name}{'' if p.required else '?'}:{p.type}" for p in spec.params)
                typer.echo(f"  !!{spec.fullname:<16} {params}")
                typer.echo(f"      {spec.help}  e.g. {spec.example}")

    return app


app.add_typer(_script_app(), name="script", help="Check, parse and format HeroScript files.")
app.command(name="serve")(__import__("herovm.cli_serve", fromlist=["serve"]).serve)  # herovm serve


def main() -> None:
    """The `herovm` command. Usage errors are one line and a hint, like herovm's own errors (click's boxed
    panels are not), exit 2; Ctrl-C exits 130, SIGTERM 143."""
    import click

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = typer.main.get_command(app).main(prog_name="herovm", standalone_mode=False)
    except click.UsageError as e:
        if not e.format_message():  # no arguments at all: the help was shown
            sys.exit(2)
        where = e.ctx.command_path if e.ctx is not None else "herovm"
        typer.echo(f"herovm: error: {e.format_message()}", err=True)
        typer.echo(f"  hint: see `{where} --help`", err=True)
        sys.exit(2)
    except click.ClickException as e:
        typer.echo(f"herovm: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.Abort) as e:
        sys.exit(143 if isinstance(e, _Terminated) or _terminated else 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    # `python -m herovm.cli`: the module proper, where cli_host and cli_port registered their commands
    from herovm.cli import main as _main

    _main()
