"""Who may call `herovm serve`: API keys for the REST API, a per-sandbox access token for the in-sandbox API.

API keys: `HEROVM_API_KEY` (one key), else the file `$HEROVM_HOME/api-keys` (one key a line, `#` comments;
0600). At the first start without either, the file is made with one random key, which the server prints
once. Keys are compared in constant time; a key never appears in a log line or an error.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from .. import state
from ..errors import InvalidInput

KEY_FILE = "api-keys"
ENV_KEY = "HEROVM_API_KEY"


def key_file() -> Path:
    return state.home() / KEY_FILE


def new_key() -> str:
    return "e2b_" + secrets.token_hex(20)  # E2B's keys start e2b_: tools that check the prefix accept it


def load_keys(environ: Mapping[str, str] | None = None) -> tuple[list[str], str | None]:
    """(the accepted keys, a key made just now or None). A key file readable by others is refused."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_KEY):
        return [environ[ENV_KEY].strip()], None
    path = key_file()
    if not path.exists():
        state.ensure_dir(path.parent, 0o711)
        key = new_key()
        state.write_private(path, f"# API keys of herovm serve, one a line\n{key}\n")
        return [key], key
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise InvalidInput(f"{path} is readable by others (mode {mode:o})", hint=f"chmod 600 {path}")
    keys = [line.strip() for line in path.read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise InvalidInput(
            f"{path} holds no API key", hint="add one a line, or remove the file to get a new one"
        )
    return keys, None


def matches(given: str | None, accepted: Iterable[str]) -> bool:
    """Whether `given` is one of `accepted`, in time that does not depend on where they differ."""
    if not given:
        return False
    ok = False
    for key in accepted:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def basic_user(authorization: str | None, default: str) -> str:
    """The user named by envd's `Authorization: Basic base64("user:")` header, else `default`."""
    if not authorization or not authorization.lower().startswith("basic "):
        return default
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("malformed Authorization header") from None
    user = decoded.split(":", 1)[0]
    return user or default
