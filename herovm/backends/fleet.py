"""Several libvirt hosts as one backend (herovm.hosts): each call goes to the host the VM is on.

The Manager keeps to the Backend interface; this backend answers it for every host at once. A VM's host is
what its local directory records (`host` in vm.json, written before its machine is defined), so finding it
asks no host anything; `list` asks every host, and a host that does not answer in time lists the VMs its
directories name as `unreachable` instead of holding the caller up, and they are seen again when it answers.
Used only when hosts were added: with none, the Manager has the plain local backend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import hosts, state
from ..errors import InvalidInput, NotFound
from ..progress import Progress, Reporter, silent
from .base import UNREACHABLE, GuestConnector, Machine, MachineSpec, SavedState
from .libvirt import LibvirtBackend
from .remote import RemoteLibvirtBackend

LOCAL_ONLY = {  # what keeps a VM on the local host
    "net": "the default network mode (passt) runs on the local host only: use --net restricted or nat",
    "publish": "published ports are forwarded on the local host only",
    "template": "a template is made on the local host unless --host names another",
}


class Fleet:
    """The local libvirt backend and one RemoteLibvirtBackend per added host, behind one Backend."""

    name = "libvirt"

    def __init__(self, local: LibvirtBackend, remote: dict[str, hosts.Host], timeout: float | None = None):
        self.local = local
        self.hosts = remote
        self.timeout = timeout if timeout is not None else hosts.answer_timeout()
        self._remote: dict[str, RemoteLibvirtBackend] = {}
        # Where `list` found machines that no VM directory records (one `down --force` forgot, or a directory
        # lost): so that `gc` and `down` reach them on their host, not on the local one.
        self._seen: dict[str, str] = {}

    def on(self, host: str | None) -> LibvirtBackend:
        """The backend of host `host` (None: local); NotFound for a host that was never added."""
        if host in (None, hosts.LOCAL):
            return self.local
        if host not in self.hosts:
            raise NotFound(f"no host {host!r}", hint="see `herovm host ls`; add one with `herovm host add`")
        if host not in self._remote:
            self._remote[host] = RemoteLibvirtBackend(self.hosts[host], self.timeout)
        return self._remote[host]

    def host_of(self, name: str) -> str:
        """The VM's host: as its directory records it, else where `list` last found it, else local."""
        recorded = hosts.host_of_vm(name)
        return recorded if recorded != hosts.LOCAL else self._seen.get(name, hosts.LOCAL)

    def _for(self, name: str) -> LibvirtBackend:
        return self.on(self.host_of(name))

    # ------------------------------------------------------------------------------ Backend

    def define(self, spec: MachineSpec) -> None:
        self.on(spec.metadata.get("host")).define(spec)

    def start(self, name: str) -> None:
        self._for(name).start(name)

    def destroy(self, name: str) -> None:
        self._for(name).destroy(name)

    def undefine(self, name: str) -> None:
        self._for(name).undefine(name)

    def get(self, name: str) -> Machine | None:
        return self._for(name).get(name)

    def set_metadata(self, name: str, metadata: dict) -> None:
        self._for(name).set_metadata(name, metadata)

    def guest_connector(self, name: str, ssh_port: int | None) -> GuestConnector:
        return self._for(name).guest_connector(name, ssh_port)

    def close(self) -> None:
        self.local.close()
        for backend in self._remote.values():
            backend.close()

    def list(self) -> list[Machine]:
        """Every host's machines, asked at once. A host that does not answer within the timeout (or fails):
        the VMs of this home recorded on it, in state `unreachable`."""
        machines = list(self.local.list())
        found = hosts.at_once({h: self.on(h).list for h in sorted(self.hosts)}, self.timeout)
        for host, result in found.items():
            if not isinstance(result, BaseException):
                machines += result
                self._seen.update((m.name, host) for m in result)
                continue
            for name in hosts.vms_on(host):
                try:
                    meta = state.VMDir(name).read_meta()
                except (OSError, ValueError):
                    meta = {}
                machines.append(Machine(name, UNREACHABLE, meta if isinstance(meta, dict) else {}))
        return sorted(machines, key=lambda m: m.name)

    # ------------------------------------------------------------------- optional capabilities

    def pause(self, name: str) -> None:
        self._for(name).pause(name)

    def resume(self, name: str) -> None:
        self._for(name).resume(name)

    def publish(self, name: str, forward: tuple[int, int]) -> None:
        self._for(name).publish(name, forward)

    def snapshot(self, name: str, directory: Path) -> SavedState:
        return self._for(name).snapshot(name, directory)

    def restore(self, name: str, saved: SavedState) -> None:
        self._for(name).restore(name, saved)

    def disk(self, name: str) -> Path:
        return self._for(name).disk(name)

    def clone(self, spec: MachineSpec, memory: Path) -> None:
        self.on(spec.metadata.get("host")).clone(spec, memory)

    def save_device_state(self, name: str, path: Path) -> None:
        self._for(name).save_device_state(name, path)

    def freeze_template(self, name: str, tag: str) -> dict:
        backend = self._for(name)
        if not isinstance(backend, RemoteLibvirtBackend):
            raise InvalidInput(f"{name} is on the local host: its template is kept in HEROVM_HOME")
        return backend.freeze_template(name, tag)

    def remove_template(self, host: str, tag: str) -> list[str]:
        backend = self.on(host)
        if not isinstance(backend, RemoteLibvirtBackend):
            raise InvalidInput("the local host's templates are files in HEROVM_HOME")
        return backend.remove_template(tag)

    def copy_console(self, name: str, dest: Path) -> None:
        """A VM on another host: its console log copied here (`dest`), for status, logs and boot."""
        backend = self._for(name)
        if isinstance(backend, RemoteLibvirtBackend):
            backend.copy_console(name, dest)

    # --------------------------------------------------------------------------- placement

    def prepare(self, spec: MachineSpec, progress: Reporter = silent) -> None:
        """Put what `spec` boots from on its host first (the image, uploaded once), with progress."""
        backend = self.on(spec.metadata.get("host"))
        if isinstance(backend, RemoteLibvirtBackend):
            backend.prepare(spec, progress)

    def facts(self, names: list[str] | None = None) -> list[hosts.HostFacts]:
        """The hosts' facts (`host ls`), asked at once, each within the timeout."""
        backends: dict[str, Any] = {n: self.on(n) for n in [hosts.LOCAL, *sorted(self.hosts)]}
        if names is not None:
            backends = {n: b for n, b in backends.items() if n in names}
        return hosts.facts_of(backends, self.timeout)

    def place(
        self,
        host: str | None,
        memory: int,
        local_only: str | None = None,
        progress: Reporter = silent,
        among: list[str] | None = None,
    ) -> str:
        """Where a new VM goes: `host` if given (NotFound if unknown), else the placement rule
        (herovm.hosts.place) among the hosts that can take it (`among`, if given: the hosts holding its
        template, or a server's): the local one alone when `local_only` says why (the default network
        mode, published ports)."""
        if host is not None:
            self.on(host)
            if host != hosts.LOCAL and local_only:
                raise InvalidInput(f"host {host}: {local_only}")
            if among is not None and host not in among:
                raise InvalidInput(f"host {host} is not one of {', '.join(among) or 'no host'}")
            return host
        allowed = [hosts.LOCAL] + ([] if local_only else sorted(self.hosts))
        if among is not None:
            allowed = [h for h in allowed if h in among]
            if not allowed:
                raise InvalidInput(
                    f"no host can take it: {local_only or 'none of ' + ', '.join(among) + ' is usable'}"
                )
            if len(allowed) == 1:
                self.on(allowed[0])
                return allowed[0]
        if allowed == [hosts.LOCAL] and hosts.local_host().max_memory is None:
            return hosts.LOCAL  # nothing to weigh: no call to any host
        t0 = time.monotonic()
        facts = self.facts(allowed)
        chosen = hosts.place(facts, memory)
        rooms = ", ".join(
            f"{f.name} {f.room() >> 20} MiB" if f.reachable else f"{f.name} unreachable" for f in facts
        )
        progress(Progress("place", f"placed on {chosen} (room: {rooms}; {time.monotonic() - t0:.1f}s)"))
        return chosen


def local_backend_of(backend: Any) -> Any:
    """The local host's backend (a Fleet's `local`, else the backend itself)."""
    return backend.local if isinstance(backend, Fleet) else backend
