"""The guest's HeroScript actions. Each is registered with its parameter schema, so a bootstrap is checked
whole before any of it runs (on the host before boot, and again here)."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import signal
import subprocess
import threading
from dataclasses import dataclass, field

from herovm.heroscript import ActionFailed, HeroScriptError, Param, Problem, Registry
from herovm.protocol import GUEST_PATH, OUTPUT_TAIL

from .processes import Processes, Service, Services

registry = Registry()


@dataclass
class GuestContext:
    processes: Processes
    services: Services
    env: dict[str, str] = field(
        default_factory=lambda: {
            "PATH": GUEST_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TERM": "xterm",
        }
    )
    log_dir: str = "/var/log/herovm"


# --- the forms of values ---------------------------------------------------------------------------------
# Each raises ValueError with what is wrong with the value. The registry runs them on the host when a
# bootstrap is checked (`herovm script check`, `herovm up`: before any VM exists) and again in the guest
# before the first action runs, so a value of the wrong form never fails a bootstrap halfway. What only the
# guest can know (whether an owner exists: an earlier user.add may create it) is checked by the handler,
# before it changes anything.

_MODE = re.compile(r"[0-7]{1,5}")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")  # a user or group name, as passwd/group hold them
_SERVICE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESTART_POLICIES = ("always", "on-failure", "never")
OWNER_HELP = "user or user:group; it must exist when the action runs (an earlier user.add can add it)"


def check_absolute(path: str) -> None:
    if "\0" in path:
        raise ValueError(f"{path!r} contains a NUL character")
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must be absolute")


def check_mode(mode: str) -> None:
    if mode and (not _MODE.fullmatch(mode) or int(mode, 8) > 0o7777):
        raise ValueError(f"{mode!r} is not an octal file mode, e.g. 0644")


def check_owner(owner: str) -> None:
    user, sep, group = owner.partition(":")
    if owner and (not _ACCOUNT.fullmatch(user) or (sep and not _ACCOUNT.fullmatch(group))):
        raise ValueError(f"{owner!r} is not a user or user:group name")


def check_service_name(name: str) -> None:
    if not _SERVICE.fullmatch(name):
        raise ValueError(f"{name!r} is not a service name; use letters, digits, '-' and '_'")


def check_service_names(names: list[str]) -> None:
    for name in names:
        check_service_name(name)


def check_restart(restart: str) -> None:
    if restart not in RESTART_POLICIES:
        raise ValueError(f"{restart!r} is not a restart policy; use always, on-failure or never")


def check_hostname(name: str) -> None:
    if not _HOSTNAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a hostname; use letters, digits and '-' (not first or last), at most 63"
        )


def check_variable_name(name: str) -> None:
    if name and not _VARIABLE.fullmatch(name):
        raise ValueError(f"{name!r} is not a variable name; use letters, digits and '_'")


def check_env_entry(item: str) -> None:
    key, sep, _ = item.partition("=")
    if not sep or not _VARIABLE.fullmatch(key):
        raise ValueError(f"entry {item!r} is not NAME=VALUE")


def check_env_entries(items: list[str]) -> None:
    for item in items:
        check_env_entry(item)


def check_package_names(names: list[str]) -> None:
    for name in names:
        if not name or name.startswith("-") or any(c.isspace() for c in name):
            raise ValueError(f"{name!r} is not a package name or a .deb file")


def _args_check(check):
    """A registry `check` that runs `check(arg)` on each bare argument, reporting at that argument."""

    def run(call) -> None:
        problems = []
        for i, arg in enumerate(call.args):
            try:
                check(arg)
            except ValueError as exc:
                line, col = call.action.arg_position(i)
                problems.append(Problem(call.action.file, line, col, f"{call.action.fullname}: {exc}"))
        if problems:
            raise HeroScriptError.from_problems(problems)

    return run


def _valid(check, value, what: str) -> None:
    """In a handler: `check(value)`, its refusal an ActionFailed."""
    try:
        check(value)
    except ValueError as exc:
        raise ActionFailed(f"{what} {exc}") from None


def _mode(call) -> int | None:
    """The mode given, or None."""
    raw = call.values["mode"]
    if raw in (None, ""):
        return None
    _valid(check_mode, str(raw), "mode")
    return int(str(raw), 8)


def _owner(owner: str) -> tuple[int, int] | None:
    """(uid, gid) of `user` or `user:group`, or None when no owner is given."""
    if not owner:
        return None
    _valid(check_owner, owner, "owner")
    user, _, group = owner.partition(":")
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as e:
        raise ActionFailed(f"owner {owner!r}: no such user or group") from e
    return entry.pw_uid, gid


def _absolute(path: str) -> str:
    _valid(check_absolute, path, "path")
    return path


def _existing_mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


@registry.action(
    "file.write",
    help="Write a file, creating its directory.",
    example="!!file.write path:/etc/motd mode:0644 content:'welcome'",
    params=[
        Param("path", "str", required=True, help="absolute path", check=check_absolute),
        Param("content", "str", default="", help="the text to write"),
        Param(
            "mode",
            "str",
            default="",
            help="octal mode, e.g. 0644 (default: 0644 for a new file; an existing file keeps its mode)",
            check=check_mode,
        ),
        Param("owner", "str", default="", help=OWNER_HELP, check=check_owner),
        Param("append", "bool", default=False, help="append instead of replacing"),
    ],
)
def file_write(call) -> dict:
    # everything that can refuse the action is looked at before anything is written
    path = _absolute(call.values["path"])
    mode = _mode(call)
    ids = _owner(call.values["owner"])
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    old = _existing_mode(path)
    content = call.values["content"]
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if call.values["append"] else os.O_TRUNC) | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)  # a new file is the owner's alone until it has its mode
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
        f.flush()
        if ids is not None:
            os.fchown(fd, *ids)  # before the mode: a chown clears set-user-ID and set-group-ID
        os.fchmod(fd, mode if mode is not None else old if old is not None else 0o644)
    return {"bytes": len(content.encode())}


@registry.action(
    "dir.create",
    help="Create a directory and its parents.",
    example="!!dir.create path:/srv/app mode:0755 owner:agent",
    params=[
        Param("path", "str", required=True, help="absolute path", check=check_absolute),
        Param(
            "mode",
            "str",
            default="",
            help="octal mode, e.g. 0755 (default: 0755 for a new directory; an existing one keeps its mode)",
            check=check_mode,
        ),
        Param("owner", "str", default="", help=OWNER_HELP, check=check_owner),
    ],
)
def dir_create(call) -> None:
    path = _absolute(call.values["path"])
    mode = _mode(call)
    ids = _owner(call.values["owner"])
    old = _existing_mode(path) if os.path.isdir(path) else None
    os.makedirs(path, exist_ok=True)
    if ids is not None:
        os.chown(path, *ids)
    final = mode if mode is not None else old if old is not None else 0o755
    if ids is not None or final != old:
        os.chmod(path, final)


def run_command(
    ctx: GuestContext,
    cmd: str,
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    log_name: str = "bootstrap",
) -> tuple[int | None, str]:
    """Run `sh -c cmd` in its own process group; return (exit code or None on timeout, output tail)."""
    proc = ctx.processes.spawn(
        ["/bin/sh", "-c", cmd],
        cwd=cwd or "/root",
        env={**ctx.env, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tail = bytearray()

    def drain() -> None:
        with open(os.path.join(ctx.log_dir, f"{log_name}.log"), "ab") as log:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                log.write(chunk)
                tail.extend(chunk)
                del tail[:-OUTPUT_TAIL]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    code = ctx.processes.wait(proc, timeout)
    if code is None:
        os.killpg(proc.pid, signal.SIGKILL)
        ctx.processes.wait(proc)
    reader.join(5)
    return code, tail.decode("utf-8", "replace")


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        _valid(check_env_entry, item, "env")
        key, _, value = item.partition("=")
        env[key] = value
    return env


@registry.action(
    "cmd.run",
    help="Run a shell command; its output is captured and reported.",
    example="!!cmd.run cmd:'echo ready > /run/ready' timeout:30s",
    params=[
        Param("cmd", "str", required=True, help="shell command (sh -c)"),
        Param("cwd", "str", default="/root", help="working directory", check=check_absolute),
        Param("env", "list", default=[], help="NAME=VALUE entries, comma separated", check=check_env_entries),
        Param("timeout", "duration", default=600.0, help="kill the command (exit 124) after this long"),
        Param("ignore_error", "bool", default=False, help="a non-zero exit does not fail the boot"),
    ],
)
def cmd_run(call) -> dict:
    ctx: GuestContext = call.context
    code, output = run_command(
        ctx,
        call.values["cmd"],
        cwd=call.values["cwd"],
        env=_env_pairs(call.values["env"]),
        timeout=call.values["timeout"],
    )
    if code is None:
        raise ActionFailed(f"timed out after {call.values['timeout']:g}s", exit_code=124, output=output)
    if code != 0 and not call.values["ignore_error"]:
        raise ActionFailed(f"exited with {code}", exit_code=code, output=output)
    return {"exit_code": code, "output": output}


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@registry.action(
    "user.add",
    help="Add a user, optionally with sudo and SSH keys.",
    example="!!user.add name:agent sudo:true ssh_keys:'ssh-ed25519 AAAA... me'",
    params=[
        Param("name", "str", required=True, help="the user's name"),
        Param("sudo", "bool", default=False, help="passwordless sudo"),
        Param("ssh_keys", "list", default=[], help="public keys for ~/.ssh/authorized_keys"),
        Param("shell", "str", default="/bin/bash", help="login shell", check=check_absolute),
        Param(
            "home",
            "str",
            default="",
            help="home directory (default /home/NAME)",
            check=lambda home: home and check_absolute(home),
        ),
    ],
)
def user_add(call) -> dict:
    ctx: GuestContext = call.context
    name = call.values["name"]
    home = call.values["home"] or f"/home/{name}"
    if not _user_exists(name):
        shell = shlex.quote(call.values["shell"])
        cmd = (
            f"useradd --create-home --home-dir {shlex.quote(home)} --shell {shell} -p '*' {shlex.quote(name)}"
        )
        code, output = run_command(ctx, cmd)
        if code != 0:
            raise ActionFailed(f"useradd {name} failed", exit_code=code, output=output)
    entry = pwd.getpwnam(name)
    if call.values["sudo"]:
        path = f"/etc/sudoers.d/90-herovm-{name}"
        with open(path, "w") as f:
            f.write(f"{name} ALL=(ALL) NOPASSWD:ALL\n")
        os.chmod(path, 0o440)
    if call.values["ssh_keys"]:
        ssh_dir = os.path.join(entry.pw_dir, ".ssh")
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        keys_file = os.path.join(ssh_dir, "authorized_keys")
        with open(keys_file, "a") as f:
            f.writelines(k.strip() + "\n" for k in call.values["ssh_keys"])
        os.chmod(keys_file, 0o600)
        for p in (ssh_dir, keys_file):
            os.chown(p, entry.pw_uid, entry.pw_gid)
    return {"uid": entry.pw_uid, "home": entry.pw_dir}


NOTHING_TO_SET = "nothing to set: give NAME=VALUE arguments or name: and value:"


def _check_env_set(call) -> None:
    _args_check(check_env_entry)(call)
    if not call.args and not call.values["name"]:
        raise ValueError(NOTHING_TO_SET)


@registry.action(
    "env.set",
    help="Set environment variables for later actions, services and login shells.",
    example="!!env.set NAME=value OTHER=x",
    args=True,
    params=[
        Param("name", "str", default="", help="one variable's name", check=check_variable_name),
        Param("value", "str", default="", help="its value"),
    ],
    check=lambda call: _check_env_set(call),
)
def env_set(call) -> dict:
    ctx: GuestContext = call.context
    pairs = _env_pairs(call.args)
    if call.values["name"]:
        _valid(check_variable_name, call.values["name"], "name")
        pairs[call.values["name"]] = call.values["value"]
    if not pairs:
        raise ActionFailed(NOTHING_TO_SET)
    ctx.env.update(pairs)
    with open("/etc/profile.d/herovm-env.sh", "a") as f:
        f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in pairs.items())
    return {"set": sorted(pairs)}


@registry.action(
    "service.start",
    help="Start a supervised service, restarted by its policy. Each service has a name of its own: a script "
    "that starts one name twice is refused when it is checked.",
    example="!!service.start name:web cmd:'python3 -m http.server 8080' restart:always",
    params=[
        Param(
            "name",
            "str",
            required=True,
            help="the service's name: letters, digits, - and _; unique in the script",
            check=check_service_name,
            unique=True,
        ),
        Param("cmd", "str", required=True, help="shell command (sh -c), run in its own session"),
        Param("env", "list", default=[], help="NAME=VALUE entries for the service", check=check_env_entries),
        Param(
            "restart", "str", default="on-failure", help="always, on-failure or never", check=check_restart
        ),
        Param(
            "after",
            "list",
            default=[],
            help="services that must already be running",
            check=check_service_names,
        ),
    ],
)
def service_start(call) -> dict:
    ctx: GuestContext = call.context
    name, restart = call.values["name"], call.values["restart"]
    _valid(check_restart, restart, "restart")
    _valid(check_service_name, name, "service name")
    for dep in call.values["after"]:
        if ctx.services.services.get(dep) is None:
            raise ActionFailed(f"service {name} is to start after {dep!r}, which was not started before it")
    service = Service(name, call.values["cmd"], {**ctx.env, **_env_pairs(call.values["env"])}, restart)
    try:
        ctx.services.start(service)
    except ValueError as exc:  # the name is taken
        raise ActionFailed(str(exc)) from None
    return {"pid": service.pid}


def _check_pkg_install(call) -> None:
    _args_check(lambda name: check_package_names([name]))(call)
    if not call.args and not call.values["names"]:
        raise ValueError("no packages named")


@registry.action(
    "pkg.install",
    help="Install Debian packages with apt.",
    example="!!pkg.install git curl",
    args=True,
    params=[
        Param(
            "names",
            "list",
            default=[],
            help="packages, besides the bare arguments",
            check=check_package_names,
        ),
        Param("update", "bool", default=False, help="run apt-get update first"),
        Param("timeout", "duration", default=900.0, help="give up on apt after this long"),
    ],
    check=lambda call: _check_pkg_install(call),
)
def pkg_install(call) -> dict:
    ctx: GuestContext = call.context
    names = list(call.args) + list(call.values["names"])
    if not names:
        raise ActionFailed("no packages named")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    cmd = "apt-get install -y --no-install-recommends -q " + " ".join(shlex.quote(n) for n in names)
    if call.values["update"]:
        cmd = "apt-get update -q && " + cmd
    code, output = run_command(ctx, cmd, env=env, timeout=call.values["timeout"])
    if code != 0:
        raise ActionFailed(
            "apt-get failed" if code is not None else "apt-get timed out",
            exit_code=code if code is not None else 124,
            output=output,
        )
    return {"installed": names}


@registry.action(
    "system.hostname",
    help="Set the hostname.",
    example="!!system.hostname name:web1",
    params=[
        Param(
            "name",
            "str",
            required=True,
            help="the new hostname: letters, digits and - (not first or last), 63 at most",
            check=check_hostname,
        )
    ],
)
def system_hostname(call) -> None:
    from .system import set_hostname

    name = call.values["name"]
    _valid(check_hostname, name, "hostname")
    set_hostname(name)
