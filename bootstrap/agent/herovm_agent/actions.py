"""The guest's HeroScript actions. Each is registered with its parameter schema, so a bootstrap is checked
whole before any of it runs (on the host before boot, and again here)."""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import signal
import subprocess
import threading
from dataclasses import dataclass, field

from herovm.heroscript import ActionFailed, Param, Registry

from .processes import Processes, Service, Services

OUTPUT_TAIL = 4096
registry = Registry()


@dataclass
class GuestContext:
    processes: Processes
    services: Services
    env: dict[str, str] = field(
        default_factory=lambda: {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TERM": "xterm",
        }
    )
    log_dir: str = "/var/log/herovm"


def _mode(call, default: int) -> int:
    raw = call.values["mode"]
    if raw in (None, ""):
        return default
    try:
        return int(str(raw), 8)
    except ValueError:
        raise ActionFailed(f"mode {raw!r} is not an octal file mode, e.g. 0644") from None


def _chown(path: str, owner: str) -> None:
    if not owner:
        return
    user, _, group = owner.partition(":")
    try:
        uid = pwd.getpwnam(user).pw_uid
        gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(user).pw_gid
    except KeyError as e:
        raise ActionFailed(f"owner {owner!r}: no such user or group") from e
    os.chown(path, uid, gid)


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ActionFailed(f"path {path!r} must be absolute")
    return path


@registry.action(
    "file.write",
    help="Write a file, creating its directory.",
    example="!!file.write path:/etc/motd mode:0644 content:'welcome'",
    params=[
        Param("path", "str", required=True, help="absolute path"),
        Param("content", "str", default="", help="the text to write"),
        Param("mode", "str", default="", help="octal mode, e.g. 0644 (default 0644 for new files)"),
        Param("owner", "str", default="", help="user or user:group"),
        Param("append", "bool", default=False, help="append instead of replacing"),
    ],
)
def file_write(call) -> dict:
    path = _absolute(call.values["path"])
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    content = call.values["content"]
    with open(path, "a" if call.values["append"] else "w") as f:
        f.write(content)
    os.chmod(path, _mode(call, 0o644))
    _chown(path, call.values["owner"])
    return {"bytes": len(content.encode())}


@registry.action(
    "dir.create",
    help="Create a directory and its parents.",
    example="!!dir.create path:/srv/app mode:0755 owner:agent",
    params=[
        Param("path", "str", required=True, help="absolute path"),
        Param("mode", "str", default="", help="octal mode, e.g. 0755 (default 0755)"),
        Param("owner", "str", default="", help="user or user:group"),
    ],
)
def dir_create(call) -> None:
    path = _absolute(call.values["path"])
    os.makedirs(path, exist_ok=True)
    os.chmod(path, _mode(call, 0o755))
    _chown(path, call.values["owner"])


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
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ActionFailed(f"env entry {item!r} is not NAME=VALUE")
        env[key] = value
    return env


@registry.action(
    "cmd.run",
    help="Run a shell command; its output is captured and reported.",
    example="!!cmd.run cmd:'echo ready > /run/ready' timeout:30s",
    params=[
        Param("cmd", "str", required=True, help="shell command (sh -c)"),
        Param("cwd", "str", default="/root", help="working directory"),
        Param("env", "list", default=[], help="NAME=VALUE entries, comma separated"),
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
        Param("shell", "str", default="/bin/bash", help="login shell"),
        Param("home", "str", default="", help="home directory (default /home/NAME)"),
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


@registry.action(
    "env.set",
    help="Set environment variables for later actions, services and login shells.",
    example="!!env.set NAME=value OTHER=x",
    args=True,
    params=[
        Param("name", "str", default="", help="one variable's name"),
        Param("value", "str", default="", help="its value"),
    ],
)
def env_set(call) -> dict:
    ctx: GuestContext = call.context
    pairs = _env_pairs(call.args)
    if call.values["name"]:
        if not call.values["name"].isidentifier():
            raise ActionFailed(f"{call.values['name']!r} is not a variable name")
        pairs[call.values["name"]] = call.values["value"]
    if not pairs:
        raise ActionFailed("nothing to set: give NAME=VALUE arguments or name: and value:")
    ctx.env.update(pairs)
    with open("/etc/profile.d/herovm-env.sh", "a") as f:
        f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in pairs.items())
    return {"set": sorted(pairs)}


@registry.action(
    "service.start",
    help="Start a supervised service, restarted by its policy.",
    example="!!service.start name:web cmd:'python3 -m http.server 8080' restart:always",
    params=[
        Param("name", "str", required=True, help="the service's name: letters, digits, - and _"),
        Param("cmd", "str", required=True, help="shell command (sh -c), run in its own session"),
        Param("env", "list", default=[], help="NAME=VALUE entries for the service"),
        Param("restart", "str", default="on-failure", help="always, on-failure or never"),
        Param("after", "list", default=[], help="services that must already be running"),
    ],
)
def service_start(call) -> dict:
    ctx: GuestContext = call.context
    name, restart = call.values["name"], call.values["restart"]
    if restart not in ("always", "on-failure", "never"):
        raise ActionFailed(f"restart {restart!r}: use always, on-failure or never")
    if not name.replace("-", "_").isidentifier():
        raise ActionFailed(f"service name {name!r}: use letters, digits, '-' and '_'")
    for dep in call.values["after"]:
        if ctx.services.services.get(dep) is None:
            raise ActionFailed(f"service {name} is to start after {dep!r}, which was not started before it")
    service = Service(name, call.values["cmd"], {**ctx.env, **_env_pairs(call.values["env"])}, restart)
    ctx.services.start(service)
    return {"pid": service.pid}


@registry.action(
    "pkg.install",
    help="Install Debian packages with apt.",
    example="!!pkg.install git curl",
    args=True,
    params=[
        Param("names", "list", default=[], help="packages, besides the bare arguments"),
        Param("update", "bool", default=False, help="run apt-get update first"),
        Param("timeout", "duration", default=900.0, help="give up on apt after this long"),
    ],
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
    params=[Param("name", "str", required=True, help="the new hostname: letters, digits and -")],
)
def system_hostname(call) -> None:
    from .system import set_hostname

    name = call.values["name"]
    if not name or len(name) > 63 or not all(c.isalnum() or c == "-" for c in name):
        raise ActionFailed(f"hostname {name!r}: use letters, digits and '-'")
    set_hostname(name)
