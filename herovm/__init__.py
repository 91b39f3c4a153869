"""herovm: real, isolated Linux machines for agents, scripts and CI, up in seconds and gone when done.

    import herovm
    with herovm.Manager() as m:
        vm = m.up("box", memory="1GB", bootstrap="setup.hero")
        print(vm.exec(["uname", "-a"]).stdout.decode())
        m.down("box")

Imports are lazy: `herovm.heroscript` must load without libvirt (it runs inside guests too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Manager",
    "VM",
    "VMSettings",
    "HeroVMError",
    "BootFailed",
    "NotFound",
    "InvalidInput",
    "AlreadyExists",
    "GuestError",
]

if TYPE_CHECKING:
    from .errors import AlreadyExists, BootFailed, GuestError, HeroVMError, InvalidInput, NotFound
    from .manager import VM, Manager
    from .settings import VMSettings


def __getattr__(name: str) -> Any:
    if name in ("Manager", "VM"):
        from . import manager

        return getattr(manager, name)
    if name == "VMSettings":
        from .settings import VMSettings

        return VMSettings
    if name in __all__:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(name)
