"""Backends run machines; they know nothing of HeroScript, SSH or images. See base.py."""

from __future__ import annotations

import os
from typing import TypeVar

from .base import CAPABILITIES, Backend, Machine, MachineSpec

__all__ = ["BACKENDS", "Backend", "Machine", "MachineSpec", "get_backend", "require"]
T = TypeVar("T")

BACKENDS = ("libvirt", "cloud-hypervisor")
_ALIASES = {"ch": "cloud-hypervisor"}


def get_backend(kind: str | None = None, *, uri: str | None = None, **options: object) -> Backend:
    """The backend herovm uses, decided here and nowhere else (the CLI's --backend, `herovm run`, the
    playbook API, the pytest plugin and Manager() all come here): `kind` if given, else $HEROVM_BACKEND, else
    libvirt. `uri` is libvirt's (else $HEROVM_LIBVIRT_URI, else qemu:///system as root, qemu:///session
    otherwise); another backend refuses one. With hosts added (herovm.hosts) and no `uri`, libvirt is a
    Fleet: the local libvirt and those hosts behind one backend. `options` go to the backend's constructor."""
    chosen = kind or os.environ.get("HEROVM_BACKEND") or "libvirt"
    chosen = _ALIASES.get(chosen, chosen)
    from ..errors import InvalidInput

    if chosen == "libvirt":
        from .libvirt import LibvirtBackend

        local = LibvirtBackend(uri, **options)  # type: ignore[arg-type]
        if uri is None:  # the hosts added with `herovm host add` (herovm.hosts): one backend over them all
            from ..hosts import remote_hosts

            if added := remote_hosts():
                from .fleet import Fleet

                return Fleet(local, added)  # type: ignore[return-value]
        return local
    if chosen not in BACKENDS:
        raise InvalidInput(f"unknown backend {chosen!r}", hint=f"use {' or '.join(BACKENDS)}")
    if uri:
        raise InvalidInput(
            f"a libvirt URI ({uri}) was given, but the backend is {chosen}",
            hint="drop --connect, or use --backend libvirt",
        )
    from .cloud_hypervisor import CloudHypervisorBackend

    return CloudHypervisorBackend(**options)  # type: ignore[arg-type]


def require(backend: Backend, capability: type[T]) -> T:
    """`backend` as having `capability` (herovm.backends.base: Pausable, Snapshots), checked by type; a
    backend without it is Unsupported, in an error that names it and the backends that have it."""
    if isinstance(backend, capability):
        return backend
    from ..errors import Unsupported
    from .cloud_hypervisor import CloudHypervisorBackend
    from .libvirt import LibvirtBackend

    able = [cls.name for cls in (LibvirtBackend, CloudHypervisorBackend) if issubclass(cls, capability)]
    raise Unsupported(
        f"the {backend.name} backend cannot {CAPABILITIES[capability]}",
        hint=f"the backends that can: {', '.join(able)} (--backend)" if able else None,
    )
