"""HeroScript on the host: `!!vm.*` playbooks, run by `herovm run PLAY.hero` or :func:`run_playbook`.

    !!vm.create name:box memory:512MB bootstrap:setup.hero
    !!vm.exec name:box cmd:'test -f /run/ready' expect_exit:0
    !!vm.copy src:./app dst:box:/srv/app
    !!vm.delete name:box

A playbook is parsed and checked whole (actions, parameters, bootstrap files, the bootstrap's own guest
actions) before anything runs; then its actions run in file order. The actions are idempotent: creating a VM
that already runs with the same settings does nothing, deleting a VM that does not exist does nothing.
Relative paths (a bootstrap file, the local side of a copy) are relative to the playbook's file (to the
current directory for a playbook read from stdin).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AlreadyExists, HeroVMError, NotFound
from .heroscript import (
    Action,
    ActionFailed,
    ActionResult,
    Call,
    HeroScriptError,
    Param,
    Playbook,
    Problem,
    Registry,
    parse,
    referenced,
    validate,
)
from .heroscript import run as run_actions
from .progress import Progress, Reporter, silent
from .settings import Setting, VMSettings, declared, size_text

OUTPUT_TAIL = 2000
_registry = Registry()
_describers: dict[str, Callable[[Call], str]] = {}


def host_registry() -> Registry:
    """The host's actions (`vm.*`); merge it with the guest's for `herovm script check`."""
    return _registry


# ------------------------------------------------------------------------------------ run context


@dataclass
class PlayContext:
    """What the actions of one run share: one Manager (made on first use, on `backend`: see
    herovm.backends.get_backend) and one VM handle per VM, so guest connections are reused. `plan=True`: the
    actions only say what they would do."""

    manager_factory: Callable[[], Any] | None = None
    progress: Reporter = silent
    plan: bool = False
    close_manager: bool = True
    backend: str | None = None
    uri: str | None = None
    _manager: Any = None
    _vms: dict[str, Any] = field(default_factory=dict)

    def manager(self):
        if self._manager is None:
            if self.manager_factory is not None:
                self._manager = self.manager_factory()
            else:
                from .manager import Manager

                self._manager = Manager(self.backend, uri=self.uri, progress=self.progress)
        return self._manager

    def vm(self, name: str):
        handle = self._vms.get(name)
        if handle is None:
            handle = self._vms[name] = self.manager().get(name)
        return handle

    def remember(self, vm) -> None:
        old = self._vms.get(vm.name)
        if old is not None and old is not vm:
            old.close()
        self._vms[vm.name] = vm

    def forget(self, name: str) -> None:
        handle = self._vms.pop(name, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        for name in list(self._vms):
            with contextlib.suppress(Exception):
                self.forget(name)
        if self._manager is not None and self.close_manager:
            with contextlib.suppress(Exception):
                self._manager.close()
        self._manager = None

    def __enter__(self) -> PlayContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- helpers


def _problem_at(call: Call, key: str, message: str, hint: str | None = None) -> HeroScriptError:
    """An error at the parameter `key` (at the action when it was not given)."""
    action = call.action
    line, col = action.params.position(key) if key in action.params else (action.line, action.col)
    return HeroScriptError(f"{action.fullname}: {message}", file=action.file, line=line, col=col, hint=hint)


def _check_name(call: Call, key: str = "name", value: str | None = None) -> None:
    from .state import validate_name

    try:
        validate_name(call.values[key] if value is None else value)
    except HeroVMError as e:
        raise _problem_at(call, key, e.message, e.hint) from None


def _pairs(call: Call, key: str, *, secret: bool = False) -> dict[str, str]:
    """NAME=VALUE items of a list parameter. A secret item is never repeated in an error."""
    out: dict[str, str] = {}
    for n, item in enumerate(call.values[key] or [], 1):
        name, sep, value = item.partition("=")
        if not sep or not name:
            what = f"item {n} of {key}" if secret else repr(item)
            raise _problem_at(call, key, f"{what} is not NAME=VALUE", f"e.g. {key}:'USER=agent, PORT=8080'")
        out[name] = value
    return out


def _bootstrap_inputs(call: Call) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """vm.create's bootstrap (resolved), its variables and its secrets. An inline bootstrap is a script: the
    playbook's variables are not pasted into its text (a value could add actions to it), they are passed on
    to it as variables, like vars: (which wins), for the names it uses."""
    action = call.action
    value = call.values["bootstrap"]
    inherited: dict[str, str] = {}
    written = action.params.entry("bootstrap").raw if "bootstrap" in action.params else None
    if written is not None:
        if is_inline(written):
            playbook_vars = action.variables or {}
            value = written
            inherited = {k: playbook_vars[k] for k in referenced(written, playbook_vars)}
        elif is_inline(value):
            raise _problem_at(
                call,
                "bootstrap",
                "a variable turned this bootstrap into an inline script",
                "write the script inline (variables are then substituted into its values), or give a file",
            )
    secret_vars = _pairs(call, "secrets", secret=True)
    variables = {k: v for k, v in inherited.items() if k not in secret_vars} | _pairs(call, "vars")
    return resolve_bootstrap(value, action.file), variables, secret_vars


def _positive(call: Call, key: str) -> None:
    from .settings import seconds

    if call.values[key] is not None:
        try:
            seconds(call.values[key], key)
        except HeroVMError as e:
            raise _problem_at(call, key, e.message, e.hint) from None


def is_inline(value: str) -> bool:
    """A bootstrap value is an inline script when it has a newline or starts with `!`."""
    return "\n" in value or value.lstrip().startswith("!")


def resolve_bootstrap(value: str | None, playbook_file: str) -> str | None:
    """Inline script or URL as given; a file path relative to the playbook's directory."""
    if not value or is_inline(value) or value.startswith(("http://", "https://")):
        return value or None
    return os.path.join(os.path.dirname(playbook_file), os.path.expanduser(value))


def resolve_local(path: str, playbook_file: str) -> str:
    return os.path.join(os.path.dirname(playbook_file), os.path.expanduser(path))


def split_remote(arg: str) -> tuple[str | None, str]:
    """`NAME:/path` -> (NAME, /path); anything else is a local path."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head:
        return head, tail
    return None, arg


def _tail(data: bytes | str, limit: int = OUTPUT_TAIL) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else "..." + text[-limit:]


def _host(
    fullname: str,
    *,
    help: str,
    example: str,
    params: list[Param],
    describe: Callable[[Call], str],
    check: Callable[[Call], None] | None = None,
) -> Callable[[Callable[[Call, PlayContext], Any]], Callable]:
    """Register a host action. The handler gets (call, context); herovm's errors become ActionFailed; in a
    plan the handler is not called and the action's description is its value."""

    def deco(fn: Callable[[Call, PlayContext], Any]) -> Callable:
        def handler(call: Call) -> Any:
            ctx = call.context if isinstance(call.context, PlayContext) else PlayContext(plan=True)
            if ctx.plan:
                return {"plan": describe(call)}
            try:
                return fn(call, ctx)
            except HeroVMError as e:
                raise ActionFailed(
                    e.message + (f" (hint: {e.hint})" if e.hint else ""),
                    exit_code=e.details.get("exit_code")
                    if isinstance(e.details.get("exit_code"), int)
                    else None,
                    output=str(e.details.get("output") or ""),
                ) from e

        _registry.add(fullname, handler, help=help, example=example, params=params, check=check)
        _describers[fullname] = describe
        return fn

    return deco


# ------------------------------------------------------------------------------------------ vm.create


def _create_settings(call: Call) -> VMSettings:
    """vm.create's VMSettings; a setting that is refused is reported at its parameter."""
    source, variables, secret_vars = _bootstrap_inputs(call)
    given = {field: call.values[s.param or field] for field, s in declared() if s.kind != "pairs"}
    try:
        return VMSettings(**{**given, "bootstrap": source, "variables": variables, "secrets": secret_vars})
    except HeroVMError as e:
        setting = dict(declared()).get(str(e.details.get("setting")))
        key = (setting.param if setting else "") or str(e.details.get("setting", "name"))
        raise _problem_at(call, key, e.message, e.hint) from None


def _check_create(call: Call) -> None:
    from .bootstrap import bootstrap_of

    _check_name(call)
    settings = _create_settings(call)
    source = settings.bootstrap
    if source is None:
        return
    if is_inline(source):
        _check_inline(call, source, {**settings.variables, **settings.secrets}, settings.secrets)
    elif not source.startswith(("http://", "https://")) and not os.path.isfile(source):
        raise _problem_at(
            call,
            "bootstrap",
            f"bootstrap file {source} does not exist",
            "a bootstrap path is relative to the playbook's directory",
        )
    try:
        bootstrap_of(settings)
    except HeroVMError as e:
        raise _problem_at(call, "bootstrap", e.message, e.hint) from None


def _check_inline(
    call: Call, script: str, variables: dict[str, str], secret_vars: dict[str, str] | None = None
) -> None:
    """Check an inline bootstrap against the guest's actions, reporting at the playbook's lines (a secret's
    value shown as `[secret NAME]`)."""
    from .bootstrap import bootstrap_include_problems, redact
    from .guest.registry import guest_registry

    action = call.action
    line0, _ = action.params.position("bootstrap")
    multiline = "\n" in script
    source_lines: list[str] = []
    with contextlib.suppress(OSError, UnicodeDecodeError):
        source_lines = Path(action.file).read_text(encoding="utf-8").split("\n")
    content = script.split("\n")

    def moved(p: Problem) -> Problem:
        p = Problem(p.file, p.line, p.col, redact(p.message, secret_vars), p.hint, p.severity)
        if not multiline:
            return Problem(action.file, line0, p.col, f"inline bootstrap: {p.message}", p.hint, p.severity)
        line = line0 + p.line
        col = p.col
        if 0 < line <= len(source_lines) and 0 < p.line <= len(content):
            text, inner = source_lines[line - 1].rstrip("\r"), content[p.line - 1]
            if inner and text.endswith(inner):
                col += len(text) - len(inner)
        return Problem(action.file, line, col, f"inline bootstrap: {p.message}", p.hint, p.severity)

    try:
        bootstrap = parse(script, variables=variables or None, resolve_includes=False)
        problems = bootstrap_include_problems(bootstrap) or validate(bootstrap, guest_registry())
    except HeroScriptError as e:
        problems = e.problems
    errors = [moved(p) for p in problems if p.is_error]
    if errors:
        raise HeroScriptError.from_problems(errors)


def _no_value(s: Setting) -> Any:
    """A setting's value when none is given: "" for text (as the CLI's), None for what has no empty form."""
    return "" if s.kind == "str" else None


def _setting_params() -> list[Param]:
    """vm.create's parameters for the VM's settings, from their declaration (herovm.settings): NAME=VALUE
    pairs are a list, and no value is an empty one."""
    return [
        Param(
            s.param or field,
            "list" if s.kind == "pairs" else s.kind,
            default=[] if s.kind in ("pairs", "list") else _no_value(s) if s.given is None else s.given,
            help=s.help,
        )
        for field, s in declared()
    ]


def _describe_create(call: Call) -> str:
    v = call.values
    boot = v["bootstrap"]
    if boot:
        boot = "inline bootstrap" if is_inline(boot) else f"bootstrap {boot}"
    parts = [
        f"image {v['image']}",
        f"{v['cpus']} CPU",
        size_text(v["memory"]),
        f"disk {size_text(v['disk'])}",
        *([boot] if boot else []),
    ]
    tail = "replace it if it differs" if v["replace"] else "keep it if it already runs with these settings"
    return f"create VM {v['name']} ({', '.join(parts)}); {tail}"


@_host(
    "vm.create",
    help="Create and boot a VM, returning once its bootstrap ran and it answers exec. A VM that already "
    "runs with the same settings is kept as it is; with other settings it is an error unless replace:true.",
    example="!!vm.create name:box memory:512MB bootstrap:setup.hero",
    params=[
        Param("name", "str", required=True, help="the VM's name: a-z, 0-9 and '-'"),
        *_setting_params(),
        Param("replace", "bool", default=False, help="recreate the VM if it exists with other settings"),
    ],
    describe=_describe_create,
    check=_check_create,
)
def vm_create(call: Call, ctx: PlayContext) -> dict:
    v = call.values
    name = v["name"]
    m = ctx.manager()
    settings = _create_settings(call)
    existing = m.backend.get(name)
    if existing is not None and existing.state != "running":
        ctx.progress(Progress("play", f"{name} exists but is {existing.state}: starting it"))
        ctx.forget(name)
        m.start(name, v["timeout"])
    try:
        vm = m.up(name, settings)
        changed = existing is None
    except AlreadyExists as e:
        if not v["replace"]:
            raise ActionFailed(
                f"{e.message}; add replace:true to recreate it, or delete it first with !!vm.delete"
            ) from e
        ctx.progress(Progress("play", f"{name} has other settings: replacing it"))
        ctx.forget(name)
        m.down(name)
        vm = m.up(name, settings)
        changed = True
    ctx.remember(vm)
    return {"name": name, "changed": changed, "ssh_port": vm.ssh_port, "created": vm.record.created}


# ------------------------------------------------------------------------------- start, stop, delete


def _check_named(call: Call) -> None:
    _check_name(call)
    if "timeout" in call.values:
        _positive(call, "timeout")


@_host(
    "vm.start",
    help="Boot a stopped VM (its bootstrap does not run again); a running VM is left as it is.",
    example="!!vm.start name:box",
    params=[
        Param("name", "str", required=True, help="the VM"),
        Param("timeout", "duration", default="5m", help="how long to wait for ready"),
    ],
    describe=lambda call: f"start VM {call.values['name']} if it is stopped",
    check=_check_named,
)
def vm_start(call: Call, ctx: PlayContext) -> dict:
    name = call.values["name"]
    m = ctx.manager()
    machine = m.backend.get(name)
    if machine is None:
        raise NotFound(f"VM {name} not found", hint="create it with !!vm.create")
    changed = machine.state != "running"
    if changed:
        ctx.forget(name)
    ctx.remember(m.start(name, call.values["timeout"]))
    return {"name": name, "changed": changed}


@_host(
    "vm.stop",
    help="Power a VM off, keeping its disk; a stopped VM is left as it is.",
    example="!!vm.stop name:box timeout:20s",
    params=[
        Param("name", "str", required=True, help="the VM"),
        Param("timeout", "duration", default="20s", help="then it is stopped hard"),
    ],
    describe=lambda call: f"stop VM {call.values['name']} if it runs",
    check=_check_named,
)
def vm_stop(call: Call, ctx: PlayContext) -> dict:
    name = call.values["name"]
    m = ctx.manager()
    machine = m.machine(name)
    ctx.forget(name)
    m.stop(name, call.values["timeout"])
    return {"name": name, "changed": machine.state != "stopped"}


@_host(
    "vm.delete",
    help="Remove a VM: its domain, disk, keys and state. A VM that does not exist is not an error.",
    example="!!vm.delete name:box",
    params=[Param("name", "str", required=True, help="the VM")],
    describe=lambda call: f"delete VM {call.values['name']} if it exists",
    check=_check_named,
)
def vm_delete(call: Call, ctx: PlayContext) -> dict:
    name = call.values["name"]
    ctx.forget(name)
    try:
        ctx.manager().down(name)
    except NotFound:
        return {"name": name, "changed": False}
    return {"name": name, "changed": True}


# ------------------------------------------------------------------------------------------- vm.exec


def _check_exec(call: Call) -> None:
    _check_name(call)
    _pairs(call, "env")
    _positive(call, "timeout")
    if not 0 <= call.values["expect_exit"] <= 255:
        raise _problem_at(call, "expect_exit", "expect_exit must be from 0 to 255")


def _describe_exec(call: Call) -> str:
    v = call.values
    cmd = v["cmd"] if len(v["cmd"]) <= 60 and "\n" not in v["cmd"] else v["cmd"].split("\n")[0][:57] + "..."
    return f"run `{cmd}` in VM {v['name']}, expect exit {v['expect_exit']}"


@_host(
    "vm.exec",
    help="Run a shell command in a VM; fails when its exit code is not expect_exit (stdout and stderr "
    "tails are reported).",
    example="!!vm.exec name:box cmd:'test -f /run/ready' expect_exit:0 timeout:30s",
    params=[
        Param("name", "str", required=True, help="the VM"),
        Param("cmd", "str", required=True, help="shell command line"),
        Param("timeout", "duration", default=None, help="kill the command after this long (exit 124)"),
        Param("env", "list", default=[], help="NAME=VALUE entries, comma separated"),
        Param("cwd", "str", default="", help="working directory in the guest"),
        Param("expect_exit", "int", default=0, help="the exit code that counts as success"),
    ],
    describe=_describe_exec,
    check=_check_exec,
)
def vm_exec(call: Call, ctx: PlayContext) -> dict:
    v = call.values
    vm = ctx.vm(v["name"])
    r = vm.exec(v["cmd"], env=_pairs(call, "env"), cwd=v["cwd"] or None, timeout=v["timeout"])
    out, err = _tail(r.stdout), _tail(r.stderr)
    result = {"name": v["name"], "exit_code": r.exit_code, "stdout": out, "stderr": err, "seconds": r.seconds}
    if r.exit_code != v["expect_exit"] or (r.timed_out and v["expect_exit"] != 124):
        what = f"timed out after {v['timeout']:g}s" if r.timed_out else f"exited with {r.exit_code}"
        output = "".join(
            f"{label}:\n{text.rstrip()}\n"
            for label, text in (("stdout", out), ("stderr", err))
            if text.strip()
        )
        raise ActionFailed(f"{what}, expected {v['expect_exit']}", exit_code=r.exit_code, output=output)
    return result


# ------------------------------------------------------------------------------------------- vm.copy


def _check_copy(call: Call) -> None:
    (src_vm, _), (dst_vm, _) = split_remote(call.values["src"]), split_remote(call.values["dst"])
    if (src_vm is None) == (dst_vm is None):
        raise _problem_at(
            call, "src", "exactly one of src and dst must be NAME:/path", "e.g. src:./app dst:box:/srv/app"
        )
    key = "src" if src_vm else "dst"
    _check_name(call, key, src_vm or dst_vm)


@_host(
    "vm.copy",
    help="Copy a file or directory into a VM or out of it: NAME:/path on one side. A local path is relative "
    "to the playbook; a local destination's directory is created.",
    example="!!vm.copy src:./check.sh dst:box:/root/check.sh",
    params=[
        Param("src", "str", required=True, help="NAME:/path or a local path"),
        Param("dst", "str", required=True, help="NAME:/path or a local path"),
    ],
    describe=lambda call: f"copy {call.values['src']} to {call.values['dst']}",
    check=_check_copy,
)
def vm_copy(call: Call, ctx: PlayContext) -> dict:
    (src_vm, src), (dst_vm, dst) = split_remote(call.values["src"]), split_remote(call.values["dst"])
    if dst_vm:
        ctx.vm(dst_vm).put(resolve_local(src, call.action.file), dst)
    else:
        local = resolve_local(dst, call.action.file)
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        ctx.vm(src_vm).get(src, local)
    return {"src": call.values["src"], "dst": call.values["dst"]}


# ------------------------------------------------------------------------------------------- vm.wait


@_host(
    "vm.wait",
    help="Wait until a VM runs and answers exec.",
    example="!!vm.wait name:box timeout:2m",
    params=[
        Param("name", "str", required=True, help="the VM"),
        Param("timeout", "duration", default="2m", help="how long to wait for exec to answer"),
    ],
    describe=lambda call: f"wait until VM {call.values['name']} answers exec",
    check=_check_named,
)
def vm_wait(call: Call, ctx: PlayContext) -> dict:
    name, timeout = call.values["name"], call.values["timeout"]
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = "no answer"
    while True:
        try:
            vm = ctx.vm(name)
            vm.manager.require_running(name)
            vm.connection(max(1.0, deadline - time.monotonic()))
            if vm.exec(["true"], timeout=max(1.0, deadline - time.monotonic())).ok:
                return {"name": name, "seconds": round(time.monotonic() - t0, 3)}
            last = "`true` did not succeed"
        except HeroVMError as e:
            last = e.message
            ctx.forget(name)
        if time.monotonic() >= deadline:
            raise ActionFailed(f"VM {name} did not answer exec within {timeout:g}s: {last}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------- Python API


def load_playbook(
    source: str | os.PathLike, *, variables: Mapping[str, str] | None = None, text: str | None = None
) -> Playbook:
    """Parse a playbook file (`-` reads stdin); with `text`, `source` is only the name used in messages
    and the base of relative paths. Raises HeroScriptError."""
    name = os.fspath(source)
    if text is None:
        if name == "-":
            text, name = sys.stdin.read(), "<stdin>"
        else:
            try:
                text = Path(name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise HeroScriptError(f"cannot read {name}: {e}", file=name, line=1, col=1) from None
    return parse(text, path=name, variables=dict(variables or {}) or None)


def check_playbook(playbook: Playbook, registry: Registry | None = None) -> list[Problem]:
    """Every problem (errors and warnings) of the playbook against the host actions; nothing is run."""
    return validate(playbook, registry or host_registry())


def run_playbook(
    playbook: Playbook | str | os.PathLike,
    *,
    variables: Mapping[str, str] | None = None,
    keep_going: bool = False,
    plan: bool = False,
    manager: Any = None,
    backend: str | None = None,
    uri: str | None = None,
    progress: Reporter = silent,
    on_start: Callable[[Action, int], Any] | None = None,
    on_end: Callable[[ActionResult], Any] | None = None,
) -> list[ActionResult]:
    """Check the whole playbook, then run it in file order (stop at the first failure unless keep_going).
    Raises HeroScriptError, with every problem, if the check fails: then nothing has run. With plan=True
    nothing runs and each result's value is {"plan": "what it would do"}. A given `manager` is used and left
    open; otherwise one is made on first use, on `backend` (and libvirt's `uri`: see
    herovm.backends.get_backend), and closed at the end."""
    if not isinstance(playbook, Playbook):
        playbook = load_playbook(playbook, variables=variables)
    ctx = PlayContext(
        manager_factory=(lambda: manager) if manager is not None else None,
        progress=progress,
        plan=plan,
        close_manager=manager is None,
        backend=backend,
        uri=uri,
    )
    with ctx:
        return run_actions(
            playbook, host_registry(), ctx, on_start=on_start, on_end=on_end, keep_going=keep_going
        )


def result_json(r: ActionResult) -> dict:
    return {
        "index": r.index,
        "action": r.action.fullname,
        "file": r.action.file,
        "line": r.action.line,
        "ok": r.ok,
        "seconds": round(r.seconds, 3),
        "value": r.value,
        "error": r.error,
        "exit_code": r.exit_code,
        "output": r.output,
    }


# ------------------------------------------------------------------------------------ `herovm run`


def _label(action: Action) -> str:
    if action.fullname == "vm.copy":
        return f"vm.copy {action.params.get('src')} -> {action.params.get('dst')}"
    return f"{action.fullname} {action.params.get('name') or ''}".rstrip()


def cli_run(
    source: str,
    variables: Mapping[str, str],
    *,
    plan: bool = False,
    json_out: bool = False,
    keep_going: bool = False,
    verbose: bool = False,
    backend: str | None = None,
    uri: str | None = None,
) -> int:
    """`herovm run`: 0 ok, 1 an action failed, 2 the playbook is invalid (nothing ran), 130 interrupted."""
    err = sys.stderr

    def say(text: str) -> None:
        err.write(text + "\n")
        err.flush()

    try:
        pb = load_playbook(source, variables=variables)
        problems = check_playbook(pb)
    except HeroScriptError as e:
        problems = e.problems
    errors = [p for p in problems if p.is_error]
    for p in problems:
        say(
            f"{p.file}:{p.line}:{p.col}: {p.severity}: {p.message}"
            + (f"\n  hint: {p.hint}" if p.hint else "")
        )
    if errors:
        say(f"herovm: {len(errors)} error(s) in the playbook; nothing was done")
        if json_out:
            print(
                json.dumps({"error": "InvalidPlaybook", "problems": [p.__dict__ for p in errors]}, indent=2)
            )
        return 2
    total = len(pb.actions)
    if plan:
        rows = []
        for i, r in enumerate(run_playbook(pb, plan=True)):
            a, text = r.action, r.value["plan"]
            rows.append({"index": i, "action": a.fullname, "file": a.file, "line": a.line, "plan": text})
            if not json_out:
                print(f"[{i + 1}/{total}] {a.file}:{a.line}: {text}")
        if json_out:
            print(json.dumps(rows, indent=2))
        return 0

    started = time.monotonic()

    def stamp() -> str:
        return f"{time.monotonic() - started:6.2f}s"

    def progress(p: Progress) -> None:
        if verbose:
            say(f"{stamp()}       {p.message}")

    def on_start(action: Action, index: int) -> None:
        say(f"{stamp()} [{index + 1}/{total}] {_label(action)} ({action.file}:{action.line}) ...")

    def on_end(r: ActionResult) -> None:
        head = f"{stamp()} [{r.index + 1}/{total}] {_label(r.action)}"
        if r.ok:
            changed = r.value.get("changed") if isinstance(r.value, dict) else None
            note = {True: ", changed", False: ", unchanged"}.get(changed, "")
            say(f"{head}: ok in {r.seconds:.1f}s{note}")
        else:
            say(f"{head}: FAILED in {r.seconds:.1f}s: {r.error}")
            for line in (r.output or "").rstrip().splitlines()[-20:]:
                say(f"    | {line}")

    ctx = PlayContext(progress=progress, backend=backend, uri=uri)
    results: list[ActionResult] = []
    try:
        with ctx:
            run_actions(
                pb,
                host_registry(),
                ctx,
                on_start=on_start,
                on_end=lambda r: (results.append(r), on_end(r)),
                keep_going=keep_going,
            )
    except KeyboardInterrupt:
        say("herovm: interrupted")
        if json_out:
            print(json.dumps([result_json(r) for r in results], indent=2, default=str))
        return 130
    if json_out:
        print(json.dumps([result_json(r) for r in results], indent=2, default=str))
    failed = [r for r in results if not r.ok]
    for r in failed:
        a = r.action
        say(f"herovm: error: {a.file}:{a.line}:{a.col}: {a.fullname} failed: {r.error}")
    if not failed:
        say(f"{stamp()} done: {len(results)} action(s) ok")
        return 0
    if len(results) < total:
        say(f"  hint: {total - len(results)} later action(s) did not run; --keep-going runs them anyway")
    return 1
