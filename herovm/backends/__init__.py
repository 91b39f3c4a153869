"""Backends run machines; they know nothing of HeroScript, SSH or images. See base.py."""

from .base import Backend, Machine, MachineSpec

__all__ = ["Backend", "Machine", "MachineSpec", "get_backend"]


def get_backend(kind: str = "libvirt", **options: object) -> Backend:
    if kind == "libvirt":
        from .libvirt import LibvirtBackend

        return LibvirtBackend(**options)  # type: ignore[arg-type]
    if kind in ("cloud-hypervisor", "ch"):
        from .cloud_hypervisor import CloudHypervisorBackend  # type: ignore[import-not-found]

        return CloudHypervisorBackend(**options)
    from ..errors import InvalidInput

    raise InvalidInput(f"unknown backend {kind!r}", hint="use libvirt or cloud-hypervisor")
