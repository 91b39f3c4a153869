"""Hosts: the libvirt daemons herovm runs VMs on (docs/hosts.md).

The local libvirt is the host `local`, always there. Others are added with `herovm host add NAME URI` (a
`qemu+ssh://USER@HOST[:PORT]/system` or `/session` URI) and reached through libvirt's own remote protocol,
over SSH: herovm talks to their daemon with libvirt's ssh transport, and to their guests' ports through a
tunnel beside it (paramiko), with the same key and the same pinned host key. A host's key is never trusted
on first use: `host add` takes it from `--host-key`, or from the user's ~/.ssh/known_hosts, where it was
checked before; herovm keeps it in a known_hosts file of that host's (HEROVM_HOME/hosts/NAME.known_hosts,
0600).

Where a VM is made (`up --host NAME`, or the placement rule of `place`) is recorded in its directory, so
every verb finds it there; the host's libvirt keeps the rest, as for local VMs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import state
from .errors import AlreadyExists, Busy, HeroVMError, InvalidInput, NotFound

LOCAL = "local"
SCHEMES = ("qemu+ssh", "qemu+libssh")
SYSTEM_POOL = "/var/lib/herovm/pool"
SESSION_POOL = ".local/share/herovm/pool"  # under the remote user's home
TIMEOUT_S = (
    10.0  # how long a call waits for another host before calling it unreachable ($HEROVM_HOST_TIMEOUT)
)
RESERVE = 256 << 20  # free memory placement leaves to each host itself


@dataclass(frozen=True)
class Host:
    """A libvirt host herovm may run VMs on, as `herovm host add` recorded it."""

    name: str
    uri: str  # as given: qemu+ssh://USER@HOST[:PORT]/system or /session
    identity: str | None = None  # the SSH private key (None: the local host)
    pool: str | None = None  # the directory of herovm's storage pool on the host
    accel: str = "tcg"  # what its guests run with: kvm only where `host add` found (or was told) it works
    max_memory: int | None = None  # how much guest memory herovm may place there; None: what is free
    added: str | None = None

    @property
    def local(self) -> bool:
        return self.name == LOCAL

    @property
    def address(self) -> tuple[str, str, int, str]:
        """(user, host, port, path) of a remote host's URI."""
        return parse_uri(self.uri)

    def known_hosts_name(self) -> str:
        """How the host is named in known_hosts: `host`, or `[host]:port` off port 22 (OpenSSH's form)."""
        _, address, port, _ = self.address
        return address if port == 22 else f"[{address}]:{port}"

    def _netloc(self) -> str:
        user, address, port, _ = self.address
        return f"{user}@{f'[{address}]' if ':' in address else address}:{port}"

    def libvirt_uri(self) -> str:
        """The URI herovm opens: libvirt's ssh transport, running OpenSSH through herovm's wrapper
        (`ssh_command`): this host's key, its pinned known_hosts (an unknown or changed key is refused,
        never added), a connect timeout and dead-peer detection. (libvirt's libssh transport crashed here
        when its connection was used from another thread than the one that opened it.)"""
        if self.local:
            return self.uri
        from urllib.parse import quote

        path = self.address[3]
        query = f"keyfile={quote(str(self.identity))}&command={quote(str(ssh_command(self.name)))}&no_tty=1"
        return f"qemu+ssh://{self._netloc()}{path}?{query}"

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "uri": self.uri, "accel": self.accel, "max_memory": self.max_memory}


def parse_uri(uri: str) -> tuple[str, str, int, str]:
    """(user, host, port, path) of `qemu+ssh://USER@HOST[:PORT]/system|session`; InvalidInput otherwise."""
    example = "qemu+ssh://user@node2/system, or qemu+ssh://user@node2:2222/session"
    try:
        parts = urlsplit(uri)
        port = parts.port or 22
    except ValueError as e:
        raise InvalidInput(f"host URI {uri!r} is not a URI: {e}", hint=f"e.g. {example}") from e
    if parts.scheme not in SCHEMES:
        raise InvalidInput(
            f"host URI {uri!r}: herovm reaches other hosts through libvirt over SSH ({' or '.join(SCHEMES)}://)",
            hint=f"e.g. {example}",
        )
    if parts.password is not None:
        raise InvalidInput(
            "host URI holds a password: herovm logs in with a key only, and would keep the password",
            hint=f"drop it and give the key with --identity, e.g. {example}",
        )
    if parts.port == 0:
        raise InvalidInput(f"host URI {uri!r}: port 0", hint=f"e.g. {example}")
    if not parts.hostname or not parts.username:
        raise InvalidInput(f"host URI {uri!r} names no user and host", hint=f"e.g. {example}")
    if parts.path not in ("/system", "/session") or parts.query or parts.fragment:
        raise InvalidInput(f"host URI {uri!r} must end in /system or /session", hint=f"e.g. {example}")
    for text in (parts.username, parts.hostname):
        if not text.replace(".", "").replace("-", "").replace("_", "").replace(":", "").isalnum():
            raise InvalidInput(f"host URI {uri!r}: {text!r} is not a user or host name", hint=example)
    return parts.username, parts.hostname, port, parts.path


# ----------------------------------------------------------------------------------------- the registry


def answer_timeout() -> float:
    """Seconds a call waits for another host: $HEROVM_HOST_TIMEOUT, else 10."""
    text = os.environ.get("HEROVM_HOST_TIMEOUT", "")
    try:
        return float(text) if text and float(text) > 0 else TIMEOUT_S
    except ValueError:
        return TIMEOUT_S


def hosts_dir() -> Path:
    return state.ensure_dir(state.ensure_dir(state.home(), 0o711) / "hosts", 0o700)


def known_hosts_file(name: str) -> Path:
    """Host `name`'s pinned key, in a file of its own: a host added under another name for the same address
    (or a failed `host add`) never touches it."""
    return hosts_dir() / f"{name}.known_hosts"


SSH_OPTIONS = {
    "GlobalKnownHostsFile": "/dev/null",
    "StrictHostKeyChecking": "yes",
    "BatchMode": "yes",
    "IdentitiesOnly": "yes",
    # A host that stops answering ends the connection in ~6 s: without it a call waits for TCP's
    # retransmissions (minutes) and resumes silently if the host comes back
    "ServerAliveInterval": "2",
    "ServerAliveCountMax": "3",
}


def ssh_command(name: str) -> Path:
    """The ssh libvirt runs for host `name`: OpenSSH with a config of herovm's (that host's known_hosts, no
    prompts, timeouts), written here (0700) whenever it is asked for."""
    import shlex

    config = hosts_dir() / f"{name}.ssh_config"
    known = known_hosts_file(name)
    if '"' in str(known):
        raise InvalidInput(f"HEROVM_HOME holds a double quote ({known}): ssh's config cannot name it")
    lines = [
        f'UserKnownHostsFile "{known}"',  # quoted: OpenSSH splits an unquoted path at its spaces
        f"ConnectTimeout {max(1, round(answer_timeout()))}",
        *(f"{k} {v}" for k, v in SSH_OPTIONS.items()),
    ]
    if not config.exists() or config.read_text() != "".join(f"{x}\n" for x in lines):
        state.write_private(config, "".join(f"{x}\n" for x in lines))
    wrapper = hosts_dir() / f"{name}.ssh"
    text = f'#!/bin/sh\nexec ssh -F {shlex.quote(str(config))} "$@"\n'
    if not wrapper.exists() or wrapper.read_text() != text:
        state.write_private(wrapper, text)
    os.chmod(wrapper, 0o700)
    return wrapper


def _registry() -> Path:
    return hosts_dir() / "hosts.json"


def local_host() -> Host:
    from .backends.libvirt import default_uri

    saved = _load().get(LOCAL, {})
    return Host(LOCAL, default_uri(), max_memory=saved.get("max_memory"))


def _load() -> dict[str, dict]:
    path = state.home() / "hosts" / "hosts.json"  # not made by reading: most homes have no hosts
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise HeroVMError(
            f"cannot read {path}: {e}", hint="fix or remove it; `herovm host add` rewrites it"
        ) from e
    return data if isinstance(data, dict) else {}


def remote_hosts() -> dict[str, Host]:
    """The hosts added with `host add`, by name (not `local`)."""
    out = {}
    for name, item in _load().items():
        if name == LOCAL or not isinstance(item, dict):
            continue
        known = {k: v for k, v in item.items() if k in Host.__dataclass_fields__ and k != "name"}
        out[name] = Host(name, **known)
    return out


def every_host() -> dict[str, Host]:
    """`local` first, then the others by name."""
    return {LOCAL: local_host(), **dict(sorted(remote_hosts().items()))}


def get(name: str) -> Host:
    """The host `name`; NotFound if there is none."""
    found = every_host().get(name)
    if found is None:
        raise NotFound(f"no host {name!r}", hint="see `herovm host ls`; add one with `herovm host add`")
    return found


def _save(entries: Mapping[str, dict]) -> None:
    state.write_private(_registry(), json.dumps(dict(entries), indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------- host keys


def _pinned_line(host: Host, key: str | None) -> str:
    """The known_hosts line for `host`: from `key` ("ssh-ed25519 AAAA...", or a known_hosts line), or else
    from ~/.ssh/known_hosts; never from the host itself (that would trust whoever answers first)."""
    import paramiko

    name = host.known_hosts_name()
    if key:
        fields_ = key.split()
        if len(fields_) >= 3 and not fields_[0].startswith(("ssh-", "ecdsa-")):
            fields_ = fields_[1:]  # a known_hosts line: drop its host names
        try:
            paramiko.PKey.from_type_string(fields_[0], __import__("base64").b64decode(fields_[1]))
        except Exception as e:  # noqa: BLE001 - paramiko raises several kinds for a bad key
            raise InvalidInput(
                f"--host-key is not an SSH public key: {e}", hint="e.g. --host-key 'ssh-ed25519 AAAA...'"
            ) from e
        return f"{name} {fields_[0]} {fields_[1]}"
    mine = paramiko.HostKeys()
    user_file = Path.home() / ".ssh" / "known_hosts"
    if user_file.exists():
        mine.load(str(user_file))
    found = mine.lookup(name)
    if not found:
        raise InvalidInput(
            f"no host key of {name} is known: herovm never trusts a host's key the first time it sees it",
            hint="check the key on the host (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there), "
            f"then pass it: --host-key 'ssh-ed25519 AAAA...', or add it to {user_file}",
        )
    kind = "ssh-ed25519" if "ssh-ed25519" in found else sorted(found.keys())[0]
    return f"{name} {kind} {found[kind].get_base64()}"


def _files_of(name: str) -> list[Path]:
    return [known_hosts_file(name), hosts_dir() / f"{name}.ssh_config", hosts_dir() / f"{name}.ssh"]


# --------------------------------------------------------------------------------------------- verbs


def add(
    name: str,
    uri: str,
    *,
    identity: str | Path | None = None,
    host_key: str | None = None,
    pool: str | None = None,
    accel: str = "auto",
    max_memory: int | None = None,
    timeout: float | None = None,
) -> Host:
    """Record host `name` at `uri` and make herovm's storage pool there; the host must answer (through
    libvirt over SSH, with its key pinned) within `timeout`. Returns the host as recorded."""
    with _registry_lock():
        return _add(name, uri, identity, host_key, pool, accel, max_memory, timeout)


def _registry_lock() -> Any:
    """hosts.json is read, changed and written again under this lock: two `host` commands at once lose
    neither's change."""
    return state.named_lock("hosts", wait=120, what="another `herovm host` command")


def _add(
    name: str,
    uri: str,
    identity: str | Path | None,
    host_key: str | None,
    pool: str | None,
    accel: str,
    max_memory: int | None,
    timeout: float | None,
) -> Host:
    state.validate_name(name, "host", "node2")
    if name == LOCAL:
        raise InvalidInput("`local` is this machine's libvirt, always there", hint="pick another name")
    entries = _load()
    if name in entries:
        raise AlreadyExists(f"host {name} exists already", hint=f"remove it first: `herovm host rm {name}`")
    parse_uri(uri)
    key = Path(identity).expanduser() if identity else Path.home() / ".ssh" / "id_ed25519"
    if not key.is_file():
        raise InvalidInput(f"SSH key {key} does not exist", hint="give the key that logs in: --identity FILE")
    if accel not in ("auto", "kvm", "tcg"):
        raise InvalidInput(f"unknown accelerator {accel!r}", hint="use kvm, tcg or auto")
    host = Host(name, uri, str(key.resolve()), pool, added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    state.write_private(known_hosts_file(name), _pinned_line(host, host_key) + "\n")
    from .backends.remote import RemoteLibvirtBackend

    backend = RemoteLibvirtBackend(host, timeout=timeout)
    try:
        pool_path = pool or backend.default_pool_path()
        backend.close()
        backend = RemoteLibvirtBackend(host := replace(host, pool=pool_path), timeout=timeout)
        backend.ensure_pool()
        found = accel if accel != "auto" else backend.accel()
        host = replace(host, accel=found, max_memory=max_memory)
    except BaseException:
        for path in _files_of(name):
            path.unlink(missing_ok=True)
        raise
    finally:
        backend.close()
    entries[name] = {k: v for k, v in asdict(host).items() if k != "name"}
    _save(entries)
    return host


def set_limit(name: str, max_memory: int | None) -> Host:
    """Set how much guest memory herovm may place on host `name` (`local` too); None: no limit."""
    with _registry_lock():
        entries = _load()
        if name != LOCAL and name not in entries:
            get(name)  # NotFound, with its hint
        entries.setdefault(name, {})["max_memory"] = max_memory
        _save(entries)
    return get(name)


def remove(name: str) -> None:
    """Forget host `name`; refused (Busy) while VMs or templates of this home are recorded on it."""
    if name == LOCAL:
        raise InvalidInput("`local` is this machine's libvirt: it cannot be removed")
    with _registry_lock():
        entries = _load()
        if name not in entries:
            get(name)
        on_it = vms_on(name)
        if on_it:
            raise Busy(
                f"host {name} holds VMs of this home: {', '.join(on_it)}",
                hint=f"remove them first (`herovm down {on_it[0]}`)",
            )
        from .templates import all_templates

        kept = [t.name for t in all_templates() if name in t.hosts]
        if kept:
            raise Busy(
                f"host {name} holds templates of this home: {', '.join(kept)}",
                hint=f"remove them first (`herovm template rm {kept[0]}`)",
            )
        entries.pop(name)
        _save(entries)
        for path in _files_of(name):
            path.unlink(missing_ok=True)


def host_of_vm(name: str) -> str:
    """The host a VM of this home was made on, as its directory records it (`local` when it says none)."""
    try:
        meta = state.VMDir(name).read_meta()
    except (OSError, ValueError, HeroVMError):
        return LOCAL
    host = meta.get("host") if isinstance(meta, dict) else None
    return host if isinstance(host, str) and host else LOCAL


def vms_on(host: str) -> list[str]:
    """The VMs of this home whose directories say they are on `host`."""
    return sorted(n for n in state.list_vm_dirs() if host_of_vm(n) == host)


# ------------------------------------------------------------------------------------- facts, placement


@dataclass
class HostFacts:
    """What `host ls` shows of a host, and what placement decides with."""

    name: str
    uri: str
    reachable: bool
    error: str | None = None
    accel: str | None = None
    cpus: int | None = None
    memory_free: int | None = None  # bytes, as the host's libvirt says
    max_memory: int | None = None
    used_memory: int = 0  # guest memory of herovm's running VMs there (every home's)
    vms_running: int = 0
    images: list[str] = field(default_factory=list)  # image ids present there
    seconds: float = 0.0

    def room(self) -> int:
        """Guest memory a new VM may still take there: free memory less a reserve, and no more than its
        `max_memory` less what herovm's running VMs use."""
        if not self.reachable or self.memory_free is None:
            return 0
        room = self.memory_free - RESERVE
        if self.max_memory is not None:
            room = min(room, self.max_memory - self.used_memory)
        return max(0, room)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "room": self.room()}


def at_once(calls: Mapping[str, Callable[[], Any]], timeout: float) -> dict[str, Any]:
    """Each call in a daemon thread of its own, waited for together until `timeout` seconds: name -> its
    result, the exception it raised, or a TimeoutError while it still runs. A call left running (into a host
    that went away: it returns when libvirt gives up) never holds the process up at its exit."""
    import threading

    done: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> None:
        try:
            done[name] = call()
        except Exception as e:  # noqa: BLE001 - handed to the caller
            done[name] = e

    threads = [
        threading.Thread(target=run, args=item, name=f"host-{item[0]}", daemon=True) for item in calls.items()
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return {name: done.get(name, TimeoutError(f"no answer in {timeout:g}s")) for name in calls}


def facts_of(backends: Mapping[str, Any], timeout: float | None = None) -> list[HostFacts]:
    """Every host's facts, asked at once; a host that does not answer within `timeout`, or fails, is
    unreachable (at_once)."""
    timeout = timeout if timeout is not None else answer_timeout()
    hosts = {n: h for n, h in every_host().items() if n in backends}
    found = at_once({n: (lambda h=h: _facts(h, backends[h.name])) for n, h in hosts.items()}, timeout)
    out = []
    for name, result in found.items():
        if isinstance(result, HostFacts):
            out.append(result)
        else:
            why = result.message if isinstance(result, HeroVMError) else str(result) or type(result).__name__
            out.append(HostFacts(name, hosts[name].uri, False, why))
    return out


def _facts(host: Host, backend: Any) -> HostFacts:
    from .record import VMRecord

    t0 = time.monotonic()
    info = backend.node_facts()
    used = running = 0
    for m in backend.list():
        if m.state in ("running", "paused"):
            running += 1
            settings = VMRecord.from_json(m.name, m.metadata).settings
            used += settings.memory if settings else 0
    return HostFacts(
        host.name,
        host.uri,
        True,
        accel=host.accel if not host.local else info.get("accel"),
        cpus=info.get("cpus"),
        memory_free=info.get("memory_free"),
        max_memory=host.max_memory,
        used_memory=used,
        vms_running=running,
        images=info.get("images", []),
        seconds=round(time.monotonic() - t0, 3),
    )


def place(facts: list[HostFacts], memory: int, allowed: Callable[[str], str | None] = lambda _: None) -> str:
    """The placement rule (docs/hosts.md): among the hosts that answer and may take the VM (`allowed`
    returns why not, or None), the one with the most room (`HostFacts.room`) that is at least the VM's
    `memory`; on a tie the first in `host ls` order (`local` first). HeroVMError, naming each host's
    reason, when none has room."""
    why: list[str] = []
    best: HostFacts | None = None
    for f in facts:
        reason = allowed(f.name) or (None if f.reachable else f"unreachable ({f.error})")
        if reason is None and f.room() < memory:
            reason = f"room for {f.room() >> 20} MiB"
        if reason is not None:
            why.append(f"{f.name}: {reason}")
            continue
        if best is None or f.room() > best.room():
            best = f
    if best is None:
        raise HeroVMError(
            f"no host has room for a VM of {memory >> 20} MiB ({'; '.join(why)})",
            hint="free memory, pick a host with --host, or add one (`herovm host add`)",
        )
    return best.name


def default_pool(path: str, home: str | None) -> str:
    """herovm's pool directory on a host: /var/lib/herovm/pool for /system, ~/.local/share/herovm/pool of
    the remote user for /session."""
    if path == "/system":
        return SYSTEM_POOL
    if not home or not home.startswith("/"):
        raise HeroVMError("could not learn the remote user's home directory", hint="give it: --pool DIR")
    return os.path.join(home, SESSION_POOL)
