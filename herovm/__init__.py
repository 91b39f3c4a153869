"""herovm: real, isolated Linux machines for agents, scripts and CI, up in seconds and gone when done.

    import herovm
    with herovm.Manager() as m:
        vm = m.up("box", memory="1GB", bootstrap="setup.hero")
        print(vm.exec(["uname", "-a"]).stdout.decode())
        vm.write_file("/root/notes.txt", "hello")
        vm.down()

The public API is what `__all__` names: `Manager` and its `VM` handles (herovm.manager, herovm.vm), the
settings a VM is made with (`VMSettings`), typed results (herovm.api_types), the errors (herovm.errors,
each with its exit code) and the asyncio form (`AsyncManager`, `AsyncVM`: herovm.aio). docs/python.md
has an example of each verb.

Imports are lazy: `herovm.heroscript` must load without libvirt (it runs inside guests too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    # the verbs
    "Manager",
    "VM",
    "VMSettings",
    "AsyncManager",
    "AsyncVM",
    # typed results
    "VMStatus",
    "VMInfo",
    "PortInfo",
    "BootStep",
    "SnapshotInfo",
    "TemplateInfo",
    "ForkResult",
    "CloneInfo",
    "ExecResult",
    "EntryInfo",
    "ProcessHandle",
    "Output",
    "End",
    # errors
    "HeroVMError",
    "InvalidInput",
    "Unsupported",
    "NotFound",
    "AlreadyExists",
    "Busy",
    "BackendUnavailable",
    "ImageError",
    "BootFailed",
    "GuestError",
    "OpError",
]

if TYPE_CHECKING:
    from .aio import AsyncManager, AsyncVM
    from .api_types import (
        BootStep,
        CloneInfo,
        End,
        EntryInfo,
        ExecResult,
        ForkResult,
        Output,
        PortInfo,
        ProcessHandle,
        SnapshotInfo,
        TemplateInfo,
        VMInfo,
        VMStatus,
    )
    from .errors import (
        AlreadyExists,
        BackendUnavailable,
        BootFailed,
        Busy,
        GuestError,
        HeroVMError,
        ImageError,
        InvalidInput,
        NotFound,
        Unsupported,
    )
    from .guest.ops import OpError
    from .manager import VM, Manager
    from .settings import VMSettings

# Where each public name lives: imported on first use only.
_HOMES = {
    "Manager": "manager",
    "VM": "vm",
    "VMSettings": "settings",
    "AsyncManager": "aio",
    "AsyncVM": "aio",
    "OpError": "guest.ops",
    **dict.fromkeys(
        ("VMStatus", "VMInfo", "PortInfo", "BootStep", "SnapshotInfo", "TemplateInfo", "ForkResult"),
        "api_types",
    ),
    **dict.fromkeys(("CloneInfo", "ExecResult", "EntryInfo", "ProcessHandle", "Output", "End"), "api_types"),
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        from importlib import import_module

        module = import_module(f".{_HOMES.get(name, 'errors')}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'herovm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
