"""Defaults without flags: a config file and environment variables for the settings people repeat.

    # ~/.config/herovm/config.toml (platformdirs' user config directory; HEROVM_CONFIG names another file)
    image = "default"
    cpus = 2
    memory = "2GB"
    disk = "20GB"
    net = "restricted"
    backend = "libvirt"

Each key can also come from the environment: HEROVM_IMAGE, HEROVM_CPUS, HEROVM_MEMORY, HEROVM_DISK,
HEROVM_NET, HEROVM_BACKEND. What wins: a command-line option, then the environment, then the file, then
herovm's own default. Values are checked as the options are (herovm.settings), and a bad one is an error
that names where it came from. `herovm config` shows each value and where it came from. The file is read
with tomllib (the standard library); its place comes from platformdirs, the well-kept library for it (XDG
on Linux).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInput

KEYS = ("image", "cpus", "memory", "disk", "net", "backend")
SETTING_KEYS = KEYS[:-1]  # VMSettings fields; `backend` is the global --backend


@dataclass(frozen=True)
class Value:
    key: str
    value: Any
    source: str  # "default", "environment HEROVM_X", "config file PATH"


def path() -> Path:
    """The config file: $HEROVM_CONFIG, else config.toml in the user's config directory."""
    if env := os.environ.get("HEROVM_CONFIG"):
        return Path(env)
    import platformdirs  # only a command that reads the config pays for it

    return Path(platformdirs.user_config_dir("herovm")) / "config.toml"


def read_file(file: Path | None = None) -> dict[str, Any]:
    """The config file's values ({} when there is none); InvalidInput for a file that is not valid TOML or
    holds a key herovm does not know."""
    file = file or path()
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read the config file {file}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"the config file {file} is not valid TOML: {e}", hint="see docs/config.md") from e
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise InvalidInput(
            f"the config file {file} has an unknown key {unknown[0]!r}", hint=f"the keys: {', '.join(KEYS)}"
        )
    return data


def values() -> dict[str, Value]:
    """Each key's value and where it came from (the environment over the file over the default)."""
    from .settings import declared

    defaults = {name: s.given for name, s in declared() if name in SETTING_KEYS}
    defaults["backend"] = "libvirt"
    file = path()
    from_file = read_file(file)
    out = {}
    for key in KEYS:
        env = f"HEROVM_{key.upper()}"
        if os.environ.get(env):
            out[key] = Value(key, os.environ[env], f"environment {env}")
        elif key in from_file:
            out[key] = Value(key, from_file[key], f"config file {file}")
        else:
            out[key] = Value(key, defaults[key], "default")
    return out


def setting_defaults() -> dict[str, Value]:
    """The VM settings the environment or the config file give (not herovm's own defaults), checked."""
    from .settings import VMSettings

    given = {k: v for k, v in values().items() if k in SETTING_KEYS and v.source != "default"}
    for key, v in given.items():
        value = int(v.value) if key == "cpus" and isinstance(v.value, str) and v.value.isdigit() else v.value
        try:
            VMSettings.of({key: value})
        except InvalidInput as e:
            raise InvalidInput(f"{key} from the {v.source}: {e.message}", hint=e.hint) from None
        given[key] = Value(key, value, v.source)
    return given


def configured_backend() -> str | None:
    """The backend the config file names, when neither --backend nor HEROVM_BACKEND does (None: the
    default). Every command asks (exec too: its VM may be Cloud Hypervisor's): ~3 ms, the file read only if
    it exists."""
    if os.environ.get("HEROVM_BACKEND"):
        return None
    file = path()
    if not file.exists():
        return None
    backend = read_file(file).get("backend")
    return backend if isinstance(backend, str) else None
