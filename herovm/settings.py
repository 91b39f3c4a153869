"""A VM's settings, declared once: `VMSettings`, one frozen value whose fields carry their type, default,
help and check. `herovm up`'s options (cli.py), `!!vm.create`'s parameters (playbook.py) and `Manager.up`'s
keyword arguments are all made from it, so a setting is written, explained and checked in one place, with
one message for one mistake.

Each field's `Setting` says how the setting is written (`kind`: str, int, bool, size, duration, list, pairs:
NAME=VALUE items), what its default looks like to a person (`given`: "1GB"), and the check that turns what
was given into the field's value (`1 << 30`) or raises InvalidInput; `option` and `param` are its names on
the command line and in a playbook where they differ from the field's. A VMSettings is checked whole when it
is made, so one that exists is valid; an error says which setting it is about in `details["setting"]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .backends.base import NET_MODES
from .errors import InvalidInput
from .ports import PortSpec, parse_publish

MIN_MEMORY, MAX_MEMORY = 128 << 20, 1 << 40
MIN_DISK, MAX_DISK = 1 << 30, 64 << 40
MAX_CPUS = 64


@dataclass(frozen=True)
class Setting:
    """How one field of VMSettings is written, explained and checked (see the module's docstring)."""

    help: str
    kind: str
    given: Any
    check: Callable[[Any, str], Any]
    option: str = ""
    param: str = ""
    secret: bool = False  # its values are never shown; `herovm up` takes NAME alone from the environment


def size_in_bytes(value: str | int, what: str, minimum: int, maximum: int) -> int:
    """A size given as text ("512MB") or bytes, within [minimum, maximum]."""
    from .heroscript import parse_size

    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInput(f"{what} {value!r} is not a size", hint="e.g. 1GB or 512MB")
    if isinstance(value, int):
        n, shown = value, size_text(value)
    else:
        try:
            n, shown = parse_size(value), value
        except ValueError as e:
            raise InvalidInput(f"{what}: {e}", hint="e.g. 1GB or 512MB") from e
    if n < minimum:
        raise InvalidInput(f"{what} {shown} is below the minimum of {minimum >> 20} MiB")
    if n > maximum:
        raise InvalidInput(f"{what} {shown} is above the maximum of {maximum >> 40} TiB")
    return n


def seconds(value: str | float, what: str) -> float:
    """A duration given as text ("5m") or seconds, longer than zero."""
    from .heroscript import parse_duration

    if isinstance(value, int | float) and not isinstance(value, bool):
        n = float(value)
    else:
        try:
            n = parse_duration(str(value))
        except ValueError as e:
            raise InvalidInput(f"{what}: {e}", hint="e.g. 30s or 5m") from e
    if n <= 0:
        raise InvalidInput(f"{what} must be longer than zero", hint="e.g. 30s or 5m")
    return n


def size_text(n: int) -> str:
    """`n` bytes in the largest unit that divides it (2 GiB, 512 MiB)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


# ------------------------------------------------------------------------------------ the checks


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} {value!r} is not text")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} {value!r} is not true or false")
    return value


def _image(value: Any, what: str) -> str:
    from .resources import check_recipe_name  # a recipe name becomes a path: only a plain name gets through

    return check_recipe_name(value)


def _cpus(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CPUS:
        raise InvalidInput(f"cpus {value!r} must be a whole number from 1 to {MAX_CPUS}")
    return value


def _memory(value: Any, what: str) -> int:
    return size_in_bytes(value, what, MIN_MEMORY, MAX_MEMORY)


def _disk(value: Any, what: str) -> int:
    return size_in_bytes(value, what, MIN_DISK, MAX_DISK)


def _bootstrap(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | os.PathLike):
        raise InvalidInput(f"bootstrap {value!r} is not a file, a URL or a script")
    return os.fspath(value)


def _sha256(value: Any, what: str) -> str | None:
    if value is None:
        return None
    return _text(value, what).lower() or None


def _names_to_strings(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidInput("variables and secrets must map names to strings")
    return dict(value)


def _accel(value: Any, what: str) -> str:
    from .accel import ACCELS

    if value is None or value == "":
        return "auto"
    if value not in ("auto", *ACCELS):
        raise InvalidInput(f"unknown accelerator {value!r}", hint="use kvm, tcg or auto")
    return value


def _net(value: Any, what: str) -> str:
    if value not in NET_MODES:
        raise InvalidInput(f"unknown network mode {value!r}", hint=f"use one of: {', '.join(NET_MODES)}")
    return value


def _kernel_args(value: Any, what: str) -> str:
    text = _text(value, what)
    if not text.isprintable():
        raise InvalidInput("kernel_args must be one line of printable characters")
    return text


def _template(value: Any) -> str:
    from .state import validate_name

    return validate_name(_text(value, "template"), "template", "py311")


def _host(value: Any) -> str:
    from .state import validate_name

    return validate_name(_text(value, "host"), "host", "node2")


# What a VM restored from a template takes from it, so cannot be given with `template`.
FROM_TEMPLATE = ("image", "cpus", "memory", "disk", "bootstrap", "bootstrap_sha256", "variables", "secrets")
FROM_TEMPLATE += ("allow_empty", "accel", "net", "kernel_args")


def _default(name: str, s: Setting) -> Any:
    return s.check(s.given, name) if s.given is not None else None


def _setting(
    given: Any,
    help: str,
    check: Callable[[Any, str], Any],
    *,
    kind: str = "str",
    option: str = "",
    param: str = "",
    secret: bool = False,
) -> Any:
    """A VMSettings field. Its default is `given`, checked (made typed) like any value when a VMSettings is
    made: nothing is parsed when this module is imported (the CLI imports it for every command)."""
    meta = {"setting": Setting(help, kind, given, check, option, param, secret)}
    if isinstance(given, dict):  # a secret's values stay out of the repr, and so out of tracebacks and logs
        return field(default_factory=dict, metadata=meta, repr=not secret)
    return field(default=given, metadata=meta, repr=not secret)


# ------------------------------------------------------------------------------ the declaration


@dataclass(frozen=True)
class VMSettings:
    """What a VM is made with. Fields are checked, and made typed (bytes, seconds), when it is made:
    `VMSettings(memory="512MB").memory == 512 << 20`."""

    image: str = _setting("default", "image recipe", _image)
    cpus: int = _setting(1, "virtual CPUs", _cpus, kind="int")
    memory: int = _setting("1GB", "memory, e.g. 1GB", _memory, kind="size")
    disk: int = _setting(
        "10GB", "disk size, e.g. 20GB; never less than the image's root (10GB)", _disk, kind="size"
    )
    bootstrap: str | None = _setting(
        None,
        "HeroScript bootstrap: a .hero file (in a playbook, relative to it), a URL, or an inline script",
        _bootstrap,
    )
    bootstrap_sha256: str | None = _setting(None, "sha256 the bootstrap must have (a URL needs one)", _sha256)
    variables: Mapping[str, str] = _setting(
        {}, "K=V substituted into the bootstrap", _names_to_strings, kind="pairs", option="var", param="vars"
    )
    secrets: Mapping[str, str] = _setting(
        {},
        "K=V substituted like a variable, but kept out of the VM's metadata, vm.json, logs and output "
        "(herovm up: K alone takes the environment variable K)",
        _names_to_strings,
        kind="pairs",
        option="secret",
        secret=True,
    )
    allow_empty: bool = _setting(
        False, "accept a bootstrap with no actions (refused otherwise)", _flag, kind="bool"
    )
    timeout: float = _setting("5m", "how long to wait for ready, e.g. 5m", seconds, kind="duration")
    accel: str = _setting("auto", "kvm, tcg or auto", _accel)
    net: str = _setting("default", "network: default (no host access), restricted, none or nat", _net)
    kernel_args: str = _setting("", "extra kernel command line arguments", _kernel_args)
    publish: tuple[PortSpec, ...] = _setting(
        (),
        "[HOST_PORT:]GUEST_PORT: forward 127.0.0.1:HOST_PORT (a free port if not given) to the guest's port, "
        "in every --net mode but none; repeatable (docs/ports.md)",
        parse_publish,
        kind="list",
    )
    template: str | None = _setting(
        None,
        "restore the VM from this template (herovm template create) instead of booting it; the image, "
        "sizes, network and bootstrap are the template's",
        lambda v, what: None if v is None or v == "" else _template(v),
    )
    ttl: float | None = _setting(
        None,
        "remove the VM this long after it is made, e.g. 30m: its guest powers itself off then, and "
        "`herovm gc` removes it",
        lambda v, what: None if v is None or v == "" else seconds(v, what),
        kind="duration",
    )
    host: str | None = _setting(
        None,
        "the host to run it on (herovm host ls); without it, the host with the most room (docs/hosts.md)",
        lambda v, what: None if v is None or v == "" else _host(v),
    )
    keep_failed: bool = _setting(
        False, "keep the VM even when it never got to run the bootstrap", _flag, kind="bool"
    )

    def __post_init__(self) -> None:
        for name, s in declared():
            try:
                object.__setattr__(self, name, s.check(getattr(self, name), name))
            except InvalidInput as e:
                e.details["setting"] = name
                raise
        both = sorted(set(self.variables) & set(self.secrets))
        if both:
            raise InvalidInput(
                f"{', '.join(both)}: given both as a variable and as a secret", setting="secrets"
            )
        if self.template is not None:
            fixed = [n for n, s in declared() if n in FROM_TEMPLATE and getattr(self, n) != _default(n, s)]
            if fixed:
                raise InvalidInput(
                    f"{fixed[0]} is the template's: it cannot be given with a template", setting=fixed[0]
                )
        if self.publish and self.net == "none":
            raise InvalidInput(
                "publish: --net none has no network to forward to",
                hint="--net restricted forwards ports and gives no egress",
                setting="publish",
            )
        if self.bootstrap_sha256 and self.bootstrap is None:
            raise InvalidInput("bootstrap_sha256 without a bootstrap", setting="bootstrap_sha256")

    @classmethod
    def of(cls, options: Mapping[str, Any], base: VMSettings | None = None) -> VMSettings:
        """`base` (the defaults) with `options`, keyed by field name; an unknown name is an error."""
        known = {name for name, _ in declared()}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidInput(
                f"unknown VM setting {unknown[0]!r}", hint=f"the settings: {', '.join(sorted(known))}"
            )
        return replace(base or cls(), **options)


def declared() -> list[tuple[str, Setting]]:
    """VMSettings's fields and their declarations, in order."""
    return [(f.name, f.metadata["setting"]) for f in fields(VMSettings)]
