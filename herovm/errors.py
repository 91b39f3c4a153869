"""herovm's errors: one line that says what went wrong and what to do next.

Each error carries a process exit code, so the CLI can map it without a table of its own.
255 is the generic herovm failure (exec reserves 0-254 for the remote command).

    HeroVMError 255
    ├── InvalidInput 2
    │   └── Unsupported 2      the backend lacks an optional capability (names the backend)
    ├── NotFound 3
    ├── AlreadyExists 4
    ├── Busy 4
    ├── BackendUnavailable 5
    ├── ImageError 6
    ├── BootFailed 7
    └── GuestError 255
"""

from __future__ import annotations


class HeroVMError(Exception):
    exit_code = 255

    def __init__(self, message: str, hint: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_json(self) -> dict[str, object]:
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint, **self.details}


class InvalidInput(HeroVMError):
    exit_code = 2


class Unsupported(InvalidInput):
    """The backend has no such capability (herovm.backends.base: Pausable, Snapshots)."""


class NotFound(HeroVMError):
    exit_code = 3


class AlreadyExists(HeroVMError):
    exit_code = 4


class Busy(HeroVMError):
    """Another herovm process holds the VM (e.g. a second `up` of the same name)."""

    exit_code = 4


class BackendUnavailable(HeroVMError):
    exit_code = 5


class ImageError(HeroVMError):
    exit_code = 6


class BootFailed(HeroVMError):
    """The guest came up but its bootstrap failed, or it never became ready."""

    exit_code = 7


class GuestError(HeroVMError):
    """Talking to a running guest failed (SSH, channel)."""

    exit_code = 255
