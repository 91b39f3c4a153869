"""The lifecycle of herovm VMs over a backend: up, exec, cp, stop, start, down, ls, status, logs.

The Manager knows images, keys, the config drive and the agent protocol; the backend knows the hypervisor.
Modules that only creating or booting a VM needs (images, keys, the config drive, HeroScript) are imported
where they are used: `herovm exec` pays for none of them (tens of ms per call).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import socket
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import accel as accel_mod
from . import state
from .backends import Backend, Machine, MachineSpec, get_backend
from .backends.base import GUEST_NET, NET_MODES
from .errors import AlreadyExists, BootFailed, Busy, GuestError, HeroVMError, InvalidInput, NotFound
from .guest.agent_exec import AgentExec
from .guest.events import AgentChannel, console_events, console_story, console_tail
from .guest.execution import ExecResult, open_tcp
from .progress import Progress, Reporter, silent, still_waiting
from .protocol import (
    AGENT_VSOCK_PORT,
    BOOTSTRAP_LIMIT,
    BOOTSTRAP_NAME,
    FETCH_TIMEOUT_S,
    SSH_PORT,
    TERMINAL,
    Command,
    Kind,
    Stage,
)
from .protocol_host import Story, describe_event, printable

if TYPE_CHECKING:
    from .guest.ssh import GuestConnection
    from .heroscript import Playbook, Problem
    from .images import Image

# Under TCG, QEMU finds translated code by virtual address, so address-space randomisation makes every new
# process translate its code (ld.so, libc) afresh: exec of /usr/bin/true 23 ms with it, 4 ms without;
# bash -c true 53 ms vs 10 ms. Guests under KVM keep ASLR. docs/benchmarks.md: how to turn it back on.
TCG_KERNEL_ARGS = "norandmaps"
SECRETS_FILE = "vars.json"  # in the VM's secrets/ (0700; the file 0600): `--secret` values, nowhere else


@dataclass
class Bootstrap:
    """A bootstrap as the guest will get it: inline text, or a URL pinned by sha256."""

    name: str = BOOTSTRAP_NAME
    script: str | None = None
    url: str | None = None
    sha256: str | None = None

    @property
    def digest(self) -> str | None:
        return hashlib.sha256(self.script.encode()).hexdigest() if self.script is not None else self.sha256

    def drive_entry(self) -> dict | None:
        if self.script is not None:
            return {"script": self.script, "name": self.name}
        if self.url:
            return {"url": self.url, "sha256": self.sha256, "name": self.name}
        return None


def load_bootstrap(
    source: str | os.PathLike | None,
    sha256: str | None = None,
    *,
    variables: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
    allow_empty: bool = False,
) -> Bootstrap:
    """Read a bootstrap from a file, a URL (needs sha256) or inline text (contains a newline or starts with
    `!`), and check it against the guest's actions before any VM exists. None or "" is no bootstrap; a
    bootstrap that is given but has no action is refused unless `allow_empty` (a shell script, a data file
    given by mistake would otherwise boot as an empty bootstrap)."""
    if source is None or source == "":
        return Bootstrap()
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        if not sha256 or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
            raise InvalidInput(
                f"bootstrap URL {text} needs --bootstrap-sha256 with its 64-hex-digit sha256",
                hint="compute it with `sha256sum FILE`; herovm never runs unpinned content",
            )
        return Bootstrap(
            name=Path(urllib.parse.urlparse(text).path).name or BOOTSTRAP_NAME,
            url=text,
            sha256=sha256.lower(),
        )
    if "\n" in text or text.lstrip().startswith("!"):
        bootstrap = Bootstrap(script=text)
    else:
        path = Path(text)
        data = read_bootstrap_file(path)
        bootstrap = Bootstrap(name=path.name, script=data.decode("utf-8", "replace"))
    if sha256 and bootstrap.digest != sha256.lower():
        raise InvalidInput(f"bootstrap sha256 is {bootstrap.digest}, not the {sha256} given")
    check_bootstrap(
        bootstrap.script or "", bootstrap.name, variables, secrets=secrets, allow_empty=allow_empty
    )
    return bootstrap


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_bootstrap_file(path: Path, limit: int = BOOTSTRAP_LIMIT) -> bytes:
    """A bootstrap file's bytes. Looked at before it is opened: only a regular file of at most `limit` bytes
    is read (a FIFO would block, a device never ends), and never more than `limit` + 1 bytes of it."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise InvalidInput(f"cannot read bootstrap {path}: {why}", hint="give a .hero file or a URL") from e
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a file")
        raise InvalidInput(f"bootstrap {path} is {kind}, not a regular file")
    if st.st_size > limit:
        raise InvalidInput(f"bootstrap {path} is larger than {limit} bytes")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(f"cannot read bootstrap {path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            raise InvalidInput(f"bootstrap {path} was replaced while it was read")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidInput(f"bootstrap {path} is larger than {limit} bytes")
    return data


def fetch_on_host(
    boot: Bootstrap,
    variables: Mapping[str, str] | None,
    timeout: float,
    *,
    secrets: Mapping[str, str] | None = None,
    allow_empty: bool = False,
) -> Bootstrap:
    """Fetch a URL bootstrap on the host (for guests without egress), verify its sha256, inline it. The
    whole fetch (connect, redirects, headers, body) has `timeout` seconds."""
    import http.client

    assert boot.url is not None
    try:
        data = fetch_url(boot.url, BOOTSTRAP_LIMIT, timeout)
    except TimeoutError as e:
        raise InvalidInput(
            f"cannot fetch bootstrap {boot.url}: no complete answer within {timeout:g}s",
            hint="is the server up and fast enough? --timeout bounds the fetch too",
        ) from e
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise InvalidInput(f"cannot fetch bootstrap {boot.url}: {e}") from e
    if len(data) > BOOTSTRAP_LIMIT:
        raise InvalidInput(f"bootstrap {boot.url} is larger than the limit of {BOOTSTRAP_LIMIT} bytes")
    got = hashlib.sha256(data).hexdigest()
    if got != boot.sha256:
        raise InvalidInput(f"bootstrap {boot.url}: sha256 {got} does not match the pinned {boot.sha256}")
    fetched = Bootstrap(name=boot.name, script=data.decode("utf-8", "replace"))
    check_bootstrap(fetched.script or "", fetched.name, variables, secrets=secrets, allow_empty=allow_empty)
    return fetched


def fetch_url(url: str, limit: int, timeout: float) -> bytes:
    """GET an http(s) URL, redirects followed: at most `limit` + 1 bytes, and the whole of it within `timeout`
    seconds (TimeoutError after that). A socket timeout alone bounds each read, not their sum: a server that
    sends a byte a second would hold the caller for ever. The fetch runs in a thread that the caller stops
    waiting for at the deadline; its connection is shut down then, which ends any read it is blocked in."""
    import http.client
    import threading
    import urllib.request

    deadline = time.monotonic() + timeout
    connections: list[http.client.HTTPConnection] = []
    given_up = threading.Event()
    finished = threading.Event()
    outcome: dict[str, object] = {}

    class Deadline:
        """Mixed into http.client's connections: each connect gets what is left of the deadline."""

        timeout: float | None

        def connect(self) -> None:
            left = deadline - time.monotonic()
            if left <= 0 or given_up.is_set():
                raise TimeoutError("the deadline passed")
            self.timeout = left
            connections.append(self)  # type: ignore[arg-type]
            super().connect()  # type: ignore[misc]

    class HTTP(Deadline, http.client.HTTPConnection):
        pass

    class HTTPS(Deadline, http.client.HTTPSConnection):
        pass

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(HTTPS, req, context=self._context)  # type: ignore[attr-defined]

    def fetch() -> None:
        try:
            opener = urllib.request.build_opener(HTTPHandler, HTTPSHandler)
            with opener.open(url, timeout=timeout) as resp:
                chunks: list[bytes] = []
                size = 0
                while size <= limit and not given_up.is_set():
                    chunk = resp.read1(min(65536, limit + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            outcome["data"] = b"".join(chunks)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome["error"] = e
        finally:
            finished.set()

    worker = threading.Thread(target=fetch, name="herovm-fetch", daemon=True)
    worker.start()
    if not finished.wait(max(0.0, deadline - time.monotonic())):
        given_up.set()
        for conn in connections:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        raise TimeoutError(f"no complete answer within {timeout:g}s")
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    return outcome["data"]  # type: ignore[return-value]


def check_bootstrap(
    script: str,
    name: str,
    variables: Mapping[str, str] | None,
    *,
    secrets: Mapping[str, str] | None = None,
    allow_empty: bool = False,
) -> None:
    """Parse and validate a bootstrap as the guest will (variables and secrets substituted into the parsed
    values); a secret's value never appears in the error. No action at all is an error unless allow_empty."""
    from .guest.registry import guest_registry
    from .heroscript import HeroScriptError, parse, validate

    given = {**(variables or {}), **(secrets or {})}
    try:
        playbook = parse(script, path=name, variables=given or None, resolve_includes=False)
    except HeroScriptError as e:
        raise InvalidInput(redact(f"bootstrap does not parse: {e}", secrets)) from None
    include = next(iter(bootstrap_include_problems(playbook)), None)
    if include is not None:
        where = f"{include.file}:{include.line}:{include.col}"
        raise InvalidInput(redact(f"{where}: {include.message}", secrets), hint=include.hint)
    errors = [p for p in validate(playbook, guest_registry()) if p.severity == "error"]
    if errors:
        raise InvalidInput(redact("bootstrap is invalid:\n" + "\n".join(str(p) for p in errors), secrets))
    if not playbook.actions and not allow_empty:
        raise InvalidInput(
            f"bootstrap {name} has no actions (no `!!actor.name` line): is it a HeroScript file?",
            hint="to boot with an empty bootstrap anyway: --allow-empty (allow_empty:true in !!vm.create)",
        )


def bootstrap_include_problems(playbook: Playbook) -> list[Problem]:
    """An include in a bootstrap (parsed with resolve_includes=False): the guest gets the one script, without
    the files next to it, so the host must not read them either."""
    from .heroscript import Problem

    return [
        Problem(
            a.file,
            a.line,
            a.col,
            "!!play.include in a bootstrap: the guest gets this one script, not the files it includes",
            hint="includes work in playbooks; inline the file",
        )
        for a in playbook.actions
        if a.fullname == "play.include"
    ]


def redact(text: str, secrets: Mapping[str, str] | None) -> str:
    """`text` with every secret's value replaced by `[secret NAME]` (longest values first)."""
    for key, value in sorted((secrets or {}).items(), key=lambda kv: -len(kv[1])):
        if value:
            text = text.replace(value, f"[secret {key}]")
    return text


def _redacted(obj: object, secrets: Mapping[str, str]) -> object:
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {k: _redacted(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_redacted(v, secrets) for v in obj)
    return obj


@dataclass
class BootReport:
    """What the agent said during one boot."""

    events: list[dict] = field(default_factory=list)

    @property
    def outcome(self) -> str | None:
        """The first `ready` or `failed`: what decides a boot (herovm.protocol.Story)."""
        return next((e["event"] for e in self.events if e["event"] in TERMINAL), None)

    def actions(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "action.end"]


class VM:
    """A handle on one VM: exec, cp, and its facts. Keeps one SSH connection for all its calls."""

    def __init__(self, manager: Manager, name: str, meta: dict) -> None:
        self.manager = manager
        self.name = name
        self.meta = meta
        self._conn: GuestConnection | None = None
        self._agent: AgentExec | None = None

    @property
    def ssh_port(self) -> int | None:
        return self.meta.get("ssh_port")

    def _guest_port(self) -> tuple[int, Callable[[float], socket.socket] | None]:
        """Where the guest's port 22 (sshd, and the agent's exec) is: the forward on 127.0.0.1, or else
        (timeout) -> a stream from the backend's connector (Cloud Hypervisor: vsock)."""
        connect = self.manager.guest_connector(self.name)
        if connect is None and not self.ssh_port:
            raise GuestError(
                f"VM {self.name} has no network (--net none), so no exec or SSH",
                hint="create it with another --net mode to exec into it",
            )
        if connect is None:
            return self.ssh_port, None
        return SSH_PORT, lambda timeout: connect(SSH_PORT, time.monotonic() + timeout)

    def connection(self, deadline_s: float = 30.0) -> GuestConnection:
        if self._conn is None or not self._conn.connected:
            port, sock_factory = self._guest_port()
            from .guest.ssh import GuestConnection  # paramiko: ~90 ms to import, only SSH needs it

            self._conn = GuestConnection(
                port=port,
                client_key=state.VMDir(self.name).client_key,
                host_key=self.meta.get("host_key") or "",
                sock_factory=sock_factory,
            )
            self._conn.connect(deadline_s)
        return self._conn

    def exec(
        self,
        command: Sequence[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | BinaryIO | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> ExecResult:
        agent = self._agent_exec()
        if agent is None:
            self.manager.require_running(self.name)
        runner = agent or self.connection()
        return runner.exec(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr
        )

    def _agent_exec(self) -> AgentExec | None:
        """Exec through the agent (no SSH), for VMs whose image's agent serves it."""
        if not self.meta.get("agent_exec"):
            return None
        if self._agent is None:
            port, sock_factory = self._guest_port()
            token = state.VMDir(self.name).exec_token.read_text().strip()
            self._agent = AgentExec(
                target=self.name,
                token=token,
                connect=sock_factory or (lambda timeout: open_tcp("127.0.0.1", port, timeout)),
                # Asked only when the agent does not answer: a stopped or vanished VM is said at once.
                on_unreachable=lambda: self.manager.require_running(self.name),
            )
        return self._agent

    def put(self, local: str | os.PathLike, remote: str) -> None:
        self.manager.require_running(self.name)
        self.connection().put(local, remote)

    def get(self, remote: str, local: str | os.PathLike) -> list[str]:
        """Copy from the guest (GuestConnection.get: nothing it sends is trusted); returns the skipped
        entries, each also reported through the manager's progress (the CLI prints them on stderr)."""
        self.manager.require_running(self.name)
        return self.connection().get(
            remote, local, on_skip=lambda line: self.manager.progress(Progress("cp", line))
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Manager:
    """with herovm.Manager() as m: vm = m.up("box", bootstrap="setup.hero"); vm.exec(["uname", "-a"])"""

    def __init__(
        self, backend: Backend | str = "libvirt", *, uri: str | None = None, progress: Reporter = silent
    ) -> None:
        if isinstance(backend, str):
            backend = get_backend(backend, **({"uri": uri} if uri else {}))
        self.backend = backend
        self.progress = progress
        self.fetch_timeout = FETCH_TIMEOUT_S  # seconds the guest waits for a bootstrap URL to answer

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- up

    def up(
        self,
        name: str,
        *,
        image: str = "default",
        cpus: int = 1,
        memory: str | int = "1GB",
        disk: str | int = "10GB",
        bootstrap: str | os.PathLike | None = None,
        bootstrap_sha256: str | None = None,
        variables: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        allow_empty: bool = False,
        timeout: str | float = "5m",
        accel: str | None = None,
        net: str = "default",
        kernel_args: str = "",
        keep_failed: bool = False,
    ) -> VM:
        """Create and boot a VM, returning once its bootstrap has run and it answers exec.

        An existing running VM with the same settings is returned as it is. If the boot fails before any
        bootstrap action ran (no agent, a bad drive, a refused bootstrap), the half-made VM is removed and
        the error carries the last console lines; if an action failed, the VM is kept for inspection.
        `keep_failed` keeps it in every case.

        `variables` and `secrets` are substituted into the bootstrap's parsed values (`${NAME}`, `{NAME}`).
        A secret reaches the guest (its config drive) and is kept in the VM's `secrets/` for later boots, but
        never in the domain's metadata, vm.json, progress or errors (its value is shown as `[secret NAME]`);
        the agent keeps it out of its events and so out of the console log. A bootstrap that is given but
        holds no action is refused unless `allow_empty`."""
        secret_vars = dict(secrets or {})
        both = sorted(set(variables or {}) & set(secret_vars))
        if both:
            raise InvalidInput(f"{', '.join(both)}: given both as a variable and as a secret")
        plain = dict(variables or {})
        pairs = (*plain.items(), *secret_vars.items())
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in pairs):
            raise InvalidInput("variables and secrets must map names to strings")
        args = (name, image, cpus, memory, disk, bootstrap, bootstrap_sha256, plain, secret_vars)
        more = (allow_empty, timeout, accel, net, kernel_args, keep_failed)
        if not secret_vars:
            return self._up(*args, *more)
        report = self.progress
        self.progress = lambda p: report(
            Progress(p.stage, redact(p.message, secret_vars), _redacted(p.data, secret_vars))  # type: ignore[arg-type]
        )
        try:
            return self._up(*args, *more)
        except HeroVMError as e:
            e.message = redact(e.message, secret_vars)
            e.hint = redact(e.hint, secret_vars) if e.hint else e.hint
            e.details = _redacted(e.details, secret_vars)  # type: ignore[assignment]
            e.args = (e.message,)
            raise
        finally:
            self.progress = report

    def _up(
        self,
        name: str,
        image: str,
        cpus: int,
        memory: str | int,
        disk: str | int,
        bootstrap: str | os.PathLike | None,
        bootstrap_sha256: str | None,
        variables: Mapping[str, str],
        secret_vars: dict[str, str],
        allow_empty: bool,
        timeout: str | float,
        accel: str | None,
        net: str,
        kernel_args: str,
        keep_failed: bool,
    ) -> VM:
        state.validate_name(name)
        memory_b = _size(memory, "memory", minimum=128 << 20, maximum=1 << 40)
        disk_b = _size(disk, "disk", minimum=1 << 30, maximum=64 << 40)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 64:
            raise InvalidInput(f"cpus {cpus!r} must be a whole number from 1 to 64")
        timeout_s = _duration(timeout, "timeout")
        if net not in NET_MODES:
            raise InvalidInput(f"unknown network mode {net!r}", hint=f"use one of: {', '.join(NET_MODES)}")
        boot = load_bootstrap(
            bootstrap, bootstrap_sha256, variables=variables, secrets=secret_vars, allow_empty=allow_empty
        )
        if boot.url and net in ("restricted", "none"):  # the guest itself has no egress
            fetch_started = time.monotonic()
            fetch_s = min(self.fetch_timeout, timeout_s)
            boot = fetch_on_host(boot, variables, fetch_s, secrets=secret_vars, allow_empty=allow_empty)
            timeout_s -= time.monotonic() - fetch_started  # one --timeout for the fetch and the boot
        if net == "nat":
            self.progress(
                Progress("up", "warning: --net nat lets the guest reach this host's loopback services")
            )
        choice = accel_mod.choose(accel)
        settings = {
            "image": image,
            "cpus": cpus,
            "memory": memory_b,
            "disk": disk_b,
            "accel": choice.accel,
            "bootstrap": boot.digest,
            "net": net,
            "vars": dict(sorted(variables.items())),
            "kernel_args": kernel_args,
        }
        if secret_vars:  # their names: the values stay in the VM's secrets/ directory
            settings["secrets"] = sorted(secret_vars)
        vmdir = state.VMDir(name)
        with vmdir.lock(wait=0):  # a second `up` of the same name fails at once instead of queueing
            existing = self.backend.get(name)
            if existing is not None:
                ready = (existing.metadata.get("last_boot") or {}).get("outcome") == "ready"
                same = existing.metadata.get("settings") == settings and _same_secrets(vmdir, secret_vars)
                if same and existing.state == "running" and ready:
                    self.progress(Progress("up", f"{name} is already up with these settings"))
                    return VM(self, name, existing.metadata)
                why = "with other settings" if not same else "but not ready"
                raise AlreadyExists(
                    f"VM {name} already exists ({existing.state}) {why}",
                    hint=f"pick another name or remove it with `herovm down {name}`",
                )
            from . import images

            img = images.ensure(image, self.progress)
            self._create(vmdir, img, settings, boot, dict(variables), secret_vars)
            try:
                meta = self._boot(vmdir, timeout_s)
            except KeyboardInterrupt:
                self.progress(Progress("up", f"interrupted: removing {name}"))
                self._remove(name)
                raise
            except BootFailed as e:
                if not keep_failed and e.details.get("stage") != Stage.ACTION:
                    self.progress(Progress("up", f"removing {name}: nothing to inspect"))
                    self._remove(name)
                    e.hint = "see the console lines above; `herovm up --keep-failed` keeps such a VM"
                raise
        return VM(self, name, meta)

    def _create(
        self,
        vmdir: state.VMDir,
        img: Image,
        settings: dict,
        boot: Bootstrap,
        variables: dict[str, str],
        secret_vars: dict[str, str] | None = None,
    ) -> None:
        name = vmdir.name
        if vmdir.exists():  # left by a crashed herovm: libvirt has no such VM, so it is garbage
            vmdir.remove()
        defined = False
        try:
            vmdir.create()
            from .guest import keys

            if secret_vars:  # for every boot's config drive; never in vm.json or the domain
                keys.write_secret(vmdir.secrets / SECRETS_FILE, json.dumps(secret_vars).encode())
            client_pub = keys.generate_keypair(vmdir.client_key, comment=f"herovm-client@{name}")
            host_pub = keys.generate_keypair(vmdir.host_key, comment=f"herovm-host@{name}")
            keys.generate_token(vmdir.exec_token)
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    str(img.disk),
                    str(vmdir.disk),
                    str(max(settings["disk"], img.manifest.get("root_size", 0))),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            os.chmod(vmdir.disk, 0o600)  # qemu-img honours the umask only: 0644 made the disk world-readable
            with state.named_lock("ports"):
                port = None
                if settings["net"] != "none":
                    port = state.allocate_port(
                        {m.metadata.get("ssh_port") for m in self.backend.list()} - {None}
                    )
                meta = {
                    "name": name,
                    "settings": settings,
                    "image": img.recipe,
                    "image_id": img.id,
                    "ssh_port": port,
                    "host_key": host_pub,
                    "client_key": client_pub,
                    "agent_exec": int(img.manifest.get("agent_version", "1")) >= 2,
                    "bootstrap": boot.url or boot.name if boot.drive_entry() else None,
                    "created": _now(),
                    "backend": self.backend.name,
                    "home": str(state.home()),  # every HEROVM_HOME shares libvirt: gc, ls keep to theirs
                }
                vmdir.write_meta({**meta, "bootstrap_entry": boot.drive_entry(), "vars": variables})
                spec = self._spec(vmdir, img, meta)
                self.progress(
                    Progress(
                        "define",
                        f"defining {name} ({settings['accel']}, {settings['memory'] >> 20} MiB, port {port})",
                    )
                )
                with still_waiting(
                    self.progress,
                    "define",
                    f"waiting for {self.backend.name} to define {name} (see herovm doctor)",
                ):
                    self.backend.define(spec)
                defined = True
        except BaseException as e:
            # Only what this call made is removed: a domain someone else defined meanwhile stays.
            if defined:
                self.backend.undefine(name)
            vmdir.remove()
            if isinstance(e, subprocess.CalledProcessError):
                raise HeroVMError(f"cannot create the disk of {name}: {e.stderr.strip()}") from e
            raise

    def _spec(self, vmdir: state.VMDir, img: Image, meta: dict) -> MachineSpec:
        s = meta["settings"]
        return MachineSpec(
            name=vmdir.name,
            cpus=s["cpus"],
            memory=s["memory"],
            kernel=img.kernel,
            initrd=img.initrd,
            cmdline=" ".join(
                arg
                for arg in (img.cmdline, TCG_KERNEL_ARGS if s["accel"] == "tcg" else "", s.get("kernel_args"))
                if arg
            ),
            disk=vmdir.disk,
            drive=vmdir.drive,
            console_log=vmdir.console_log,
            channel=vmdir.agent_socket,
            ssh_port=meta["ssh_port"],
            accel=s["accel"],
            metadata=meta,
            net=s.get("net", "nat"),
            net_dir=vmdir.net_dir,
        )

    def _write_drive(self, vmdir: state.VMDir, meta: dict) -> str:
        local = vmdir.read_meta()
        nonce = secrets.token_hex(16)
        from .guest import configdrive

        configdrive.write(
            vmdir.drive,
            {
                "name": vmdir.name,
                "hostname": vmdir.name,
                "nonce": nonce,
                "network": GUEST_NET if meta.get("ssh_port") else None,
                "ssh": {
                    "host_key": vmdir.host_key.read_text(),
                    "authorized_keys": [meta["client_key"]],
                    "port": SSH_PORT,
                    "exec_token": vmdir.exec_token.read_text() if vmdir.exec_token.exists() else None,
                },
                "bootstrap": local.get("bootstrap_entry"),
                "vars": local.get("vars") or {},
                "secrets": _read_secrets(vmdir),
                "limits": {"bootstrap_bytes": BOOTSTRAP_LIMIT, "fetch_timeout": self.fetch_timeout},
            },
        )
        return nonce

    def _boot(self, vmdir: state.VMDir, timeout_s: float) -> dict:
        """Start the machine with a fresh config drive and follow the agent until ready or failed."""
        name = vmdir.name
        machine = self.backend.get(name)
        if machine is None:
            raise NotFound(f"VM {name} not found")
        meta = machine.metadata
        nonce = self._write_drive(vmdir, meta)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        vmdir.agent_socket.unlink(missing_ok=True)
        console_start = vmdir.console_log.stat().st_size if vmdir.console_log.exists() else 0
        # The nonce is the domain's before the guest runs: `status` tells this boot's events from any other
        # (an earlier boot's, or a guest's forgery) even if this process is killed before the end.
        started = _now()
        self.backend.set_metadata(name, {**meta, "last_boot": {"nonce": nonce, "started": started}})
        self.progress(Progress("boot", f"starting {name}"))
        try:
            # QEMU binds the SSH forward as it starts: a port taken meanwhile makes the start fail, so a
            # started VM owns its port (the allocation lock keeps herovm's own VMs apart).
            with still_waiting(self.progress, "boot", f"waiting for {self.backend.name} to start {name}"):
                self.backend.start(name)
        except HeroVMError as e:
            raise BootFailed(f"{name} could not start: {e.message}", stage="start") from e
        report = self._follow(vmdir, nonce, deadline, t0, console_start)
        meta = {
            **meta,
            "last_boot": {
                "nonce": nonce,
                "started": started,
                "outcome": report.outcome,
                "seconds": round(time.monotonic() - t0, 3),
            },
        }
        self.backend.set_metadata(name, meta)
        if report.outcome == "ready":
            return meta
        failed = next((e for e in reversed(report.events) if e["event"] == Kind.FAILED), {})

        def said(key: str) -> str:  # what the guest said, safe to print
            return printable(failed.get(key), one_line=True)

        if failed.get("stage") == Stage.ACTION:
            raise BootFailed(
                f"bootstrap of {name} failed at {said('file')}:{failed.get('line')} "
                f"({said('action')}): {said('error')}",
                hint=f"the VM is kept for inspection: `herovm ssh {name}`, then `herovm down {name}`",
                stage=Stage.ACTION,
                action=failed.get("action"),
                line=failed.get("line"),
                output=failed.get("output", ""),
            )
        why = said("error") if failed.get("error") else "no answer"
        raise BootFailed(
            f"{name} did not become ready: {said('stage')}: {why}",
            hint=f"the VM is kept for inspection (`herovm logs {name} --console`); "
            f"remove it with `herovm down {name}`",
            stage=failed.get("stage"),
            console=console_tail(vmdir.console_log),
        )

    def _follow(
        self, vmdir: state.VMDir, nonce: str, deadline: float, t0: float, console_start: int
    ) -> BootReport:
        """Follow the agent's events until ready or failed. While the channel is quiet, look at this boot's
        console output too: the initramfs reports its failures there, before any agent exists."""
        report = BootReport()
        name = vmdir.name
        # Only this boot's agent writes the channel (the socket is new with each start), so a `boot` event
        # without a nonce (the agent could not read its drive) is this boot's too.
        story = Story(nonce, unnamed=True)

        def check_console() -> None:
            if story.begun:  # the agent speaks: what the console says now is no longer the initramfs
                return
            for event in console_events(vmdir.console_log, offset=console_start):
                if event["event"] == Kind.FAILED and event.get("stage") == Stage.INITRAMFS:
                    report.events.append(event)
                    raise _EarlyFailure

        try:
            channel = self._agent_channel(vmdir, deadline)
        except TimeoutError:
            self._fail_unanswered(name, vmdir, "its agent channel never appeared")
        except OSError as e:  # e.g. a socket path over the 107-byte limit under a deep HEROVM_HOME
            raise HeroVMError(
                f"cannot open the agent channel of {name}: {e}", hint="use a shorter HEROVM_HOME"
            ) from e
        try:
            for event in channel.events(deadline, on_idle=check_console):
                if story.take(event) != Story.THIS:
                    continue
                report.events.append(event)
                self.progress(
                    Progress(
                        "agent",
                        describe_event(event),
                        {**event, "host_seconds": round(time.monotonic() - t0, 3)},
                    )
                )
                if story.outcome is not None:
                    return report
        except _EarlyFailure:
            return report
        except TimeoutError:
            self._fail_unanswered(name, vmdir, f"no ready after {deadline - t0:.0f}s")
        finally:
            channel.close()
        self._fail_unanswered(name, vmdir, "the guest stopped before it was ready")
        return report  # not reached

    def guest_connector(self, name: str) -> Callable[[int, float], socket.socket] | None:
        """How to reach a guest port, as the backend says (None: agent socket and SSH forward)."""
        connector = getattr(self.backend, "guest_connector", None)
        return connector(name) if connector is not None else None

    def _agent_channel(self, vmdir: state.VMDir, deadline: float) -> AgentChannel:
        connect = self.guest_connector(vmdir.name)
        sock = connect(AGENT_VSOCK_PORT, deadline) if connect is not None else None
        return AgentChannel(vmdir.agent_socket, deadline, sock=sock)

    def _fail_unanswered(self, name: str, vmdir: state.VMDir, why: str) -> None:
        machine = self.backend.get(name)
        tail = console_tail(vmdir.console_log)
        raise BootFailed(
            f"{name}: {why} (state {machine.state if machine else 'gone'}); "
            f"last console line: {tail[-1] if tail else '(none)'}",
            hint=f"see `herovm logs {name} --console`; remove it with `herovm down {name}`",
            stage="boot",
            console=tail,
        )

    # ----------------------------------------------------------------------------- other verbs

    def machine(self, name: str) -> Machine:
        """The VM as the backend sees it (state, metadata); NotFound if there is none."""
        state.validate_name(name)
        machine = self.backend.get(name)
        if machine is None:
            raise NotFound(f"VM {name} not found", hint="see `herovm ls`")
        return machine

    def get(self, name: str) -> VM:
        return VM(self, name, self.machine(name).metadata)

    def attach(self, name: str) -> VM:
        """Like :meth:`get`, from the VM's local directory without asking the backend (the hot path of
        ``herovm exec``): a VM that is stopped or gone is reported at its first use."""
        vmdir = state.VMDir(name)
        if not vmdir.exists():
            return self.get(name)
        return VM(self, name, vmdir.read_meta())

    def require_running(self, name: str) -> None:
        machine = self.machine(name)
        if machine.state != "running":
            raise GuestError(f"VM {name} is {machine.state}", hint=f"start it with `herovm start {name}`")

    def stop(self, name: str, timeout: float = 20.0) -> None:
        """Power the guest off through its agent (services get TERM), or hard after `timeout`."""
        vmdir = state.VMDir(name)
        with vmdir.lock():
            machine = self.machine(name)
            if machine.state == "stopped":
                return
            self.progress(Progress("stop", f"stopping {name}"))
            deadline = time.monotonic() + timeout
            try:
                channel = self._agent_channel(vmdir, time.monotonic() + 2)
                channel.send({"op": Command.POWEROFF})
                channel.close()
                while time.monotonic() < deadline:
                    m = self.backend.get(name)
                    if m is None or m.state == "stopped":
                        return
                    time.sleep(0.1)
            except (TimeoutError, OSError):
                pass
            self.progress(Progress("stop", f"{name} did not power off in {timeout:g}s: stopping it hard"))
            self.backend.destroy(name)

    def start(self, name: str, timeout: str | float = "5m") -> VM:
        vmdir = state.VMDir(name)
        with vmdir.lock():
            machine = self.machine(name)
            if machine.state == "running":
                return VM(self, name, machine.metadata)
            meta = self._boot(vmdir, _duration(timeout, "timeout"))
        return VM(self, name, meta)

    def down(self, name: str, wait: float = 300.0) -> None:
        """Remove the VM: its domain, disk, drive, keys and state. Nothing is left.

        The guest is powered off before the lock is taken: an `up` of the same VM in another process then
        fails at once (its guest stopped) and lets go, instead of `down` waiting for its whole boot."""
        state.validate_name(name)
        vmdir = state.VMDir(name)
        machine = self.backend.get(name)
        if machine is None and not vmdir.exists():
            raise NotFound(f"VM {name} not found", hint="see `herovm ls`")
        if machine is not None and not self._ours(machine):
            raise NotFound(
                f"VM {name} belongs to another herovm home ({machine.metadata.get('home')})",
                hint="run herovm with HEROVM_HOME set to that directory to manage it",
            )
        self.backend.destroy(name)
        with vmdir.lock(wait=wait):
            self._remove(name)

    def _remove(self, name: str) -> None:
        self.progress(Progress("down", f"removing {name}"))
        self.backend.undefine(name)
        state.VMDir(name).remove()

    def _ours(self, machine: Machine) -> bool:
        """Whether a domain belongs to this HEROVM_HOME (domains made before homes were recorded: yes)."""
        home = machine.metadata.get("home")
        return home is None or os.path.realpath(home) == os.path.realpath(state.home())

    def _machines(self) -> dict[str, Machine]:
        return {m.name: m for m in self.backend.list() if self._ours(m)}

    def down_all(self) -> list[str]:
        names = sorted(set(self._machines()) | set(state.list_vm_dirs()))
        for name in names:
            self.down(name)
        return names

    def gc(self) -> list[str]:
        """Remove what crashed or killed herovm processes left behind: VM directories without a domain, and
        domains defined but never started whose directory is gone. Running VMs are never touched."""
        removed = []
        machines = self._machines()
        for name in state.list_vm_dirs():
            if name in machines:
                continue
            vmdir = state.VMDir(name)
            try:
                with vmdir.lock(wait=0):
                    machine = self.backend.get(name)
                    if machine is None or not self._ours(machine):  # another home's domain of that name
                        vmdir.remove()
                        removed.append(f"directory of {name} (no domain)")
            except Busy:
                continue  # an `up` is creating it right now
        for name, machine in machines.items():
            if machine.state == "running":
                continue
            vmdir = state.VMDir(name)
            if not vmdir.exists():
                self.backend.undefine(name)
                removed.append(f"domain of {name} (no directory)")
            elif not machine.metadata.get("last_boot"):
                try:
                    with vmdir.lock(wait=0):
                        self._remove(name)
                        removed.append(f"{name} (defined by an `up` that never booted it)")
                except Busy:
                    continue
        return removed

    def ls(self) -> list[dict]:
        rows = []
        for m in self._machines().values():
            s = m.metadata.get("settings", {})
            rows.append(
                {
                    "name": m.name,
                    "state": m.state,
                    "image": m.metadata.get("image"),
                    "accel": s.get("accel"),
                    "cpus": s.get("cpus"),
                    "memory": s.get("memory"),
                    "ssh_port": m.metadata.get("ssh_port"),
                    "ready": (m.metadata.get("last_boot") or {}).get("outcome") == "ready",
                }
            )
        known = {r["name"] for r in rows}
        for orphan in state.list_vm_dirs():
            if orphan not in known:
                rows.append(
                    {
                        "name": orphan,
                        "state": "orphaned",
                        "image": None,
                        "accel": None,
                        "cpus": None,
                        "memory": None,
                        "ssh_port": None,
                        "ready": False,
                    }
                )
        return sorted(rows, key=lambda r: r["name"])

    def status(self, name: str) -> dict:
        """The VM's facts, and what its last boot came to. The outcome is what `up` (or `start`) saw on the
        agent channel, recorded in the domain; if that process did not see the end (it was killed), the
        console decides: the first `ready` or `failed` of the boot with the recorded nonce. Nothing the guest
        writes after that, or with another nonce, counts (herovm.protocol.Story). When the beginning of the
        boot is no longer in the console (rotated away) the steps are unknown, and so is an outcome nobody
        recorded: `agent` is then "unknown" rather than a guess."""
        machine = self.machine(name)
        meta = machine.metadata
        vmdir = state.VMDir(name)
        last = meta.get("last_boot") or {}
        nonce = last.get("nonce") if isinstance(last.get("nonce"), str) else None
        story, whole = console_story(vmdir.console_log, nonce)
        recorded = last.get("outcome") if last.get("outcome") in TERMINAL else None
        agent = recorded or story.outcome or ("booting" if story.begun else "unknown")
        facts = {
            "name": name,
            "state": machine.state,
            "backend": self.backend.name,
            "image": meta.get("image"),
            "image_id": meta.get("image_id"),
            "settings": meta.get("settings"),
            "ssh_port": meta.get("ssh_port"),
            "bootstrap": meta.get("bootstrap"),
            "created": meta.get("created"),
            "last_boot": last,
            "agent": agent,
            # whole: the boot's events from its start; cut: its start is no longer in the console (a guest
            # that writes a lot: virtlogd rotates the log); none: the console holds nothing of this boot.
            "events": "whole" if story.begun else ("none" if whole else "cut"),
            "steps": [
                {k: e.get(k) for k in ("index", "action", "line", "ok", "seconds", "exit_code", "error")}
                for e in story.events_of("action.end")
            ],
            "failure": story.failure if agent == "failed" else None,
        }
        return _redacted(facts, _read_secrets(vmdir))  # type: ignore[return-value]

    def logs(self, name: str, console: bool = False) -> Path | list[dict]:
        """The events of the VM's last boot as the console mirrors them (see `status`), or with `console`
        the console log's path (raw: pass what you show of it through `redactor`)."""
        vm = self.get(name)
        vmdir = state.VMDir(name)
        if console:
            return vmdir.console_log
        nonce = (vm.meta.get("last_boot") or {}).get("nonce")
        events = console_story(vmdir.console_log, nonce if isinstance(nonce, str) else None)[0].events
        return _redacted(events, _read_secrets(vmdir))  # type: ignore[return-value]

    def redactor(self, name: str) -> Callable[[str], str]:
        """Replaces the VM's secret values by `[secret NAME]` in text read from the guest. The agent redacts
        its own events already; this also covers what a guest process wrote to the console itself."""
        secrets = _read_secrets(state.VMDir(state.validate_name(name)))
        return lambda text: redact(text, secrets)


class _EarlyFailure(Exception):
    """The boot failed before the agent ran (seen on the console)."""


def _read_secrets(vmdir: state.VMDir) -> dict[str, str]:
    """The VM's `--secret` values (its secrets/ directory), {} when it has none."""
    try:
        found = json.loads((vmdir.secrets / SECRETS_FILE).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise HeroVMError(f"cannot read the secrets of {vmdir.name}: {e}") from e
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise HeroVMError(f"the secrets file of {vmdir.name} is damaged")
    return found


def _same_secrets(vmdir: state.VMDir, secret_vars: Mapping[str, str]) -> bool:
    """Whether the VM was made with these secret values, compared without a timing leak."""
    import hmac

    try:
        kept = _read_secrets(vmdir)
    except HeroVMError:
        return False
    mine = json.dumps(dict(sorted(secret_vars.items()))).encode()
    return hmac.compare_digest(json.dumps(dict(sorted(kept.items()))).encode(), mine)


def _size(value: str | int, what: str, minimum: int, maximum: int) -> int:
    from .heroscript import parse_size

    if isinstance(value, int):
        n = value
    else:
        try:
            n = parse_size(str(value))
        except ValueError as e:
            raise InvalidInput(f"{what}: {e}", hint="e.g. 1GB or 512MB") from e
    if n < minimum:
        raise InvalidInput(f"{what} {value} is below the minimum of {minimum >> 20} MiB")
    if n > maximum:
        raise InvalidInput(f"{what} {value} is above the maximum of {maximum >> 40} TiB")
    return n


def _duration(value: str | float, what: str) -> float:
    from .heroscript import parse_duration

    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        try:
            seconds = parse_duration(str(value))
        except ValueError as e:
            raise InvalidInput(f"{what}: {e}", hint="e.g. 30s or 5m") from e
    if seconds <= 0:
        raise InvalidInput(f"{what} must be longer than zero", hint="e.g. 30s or 5m")
    return seconds


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
