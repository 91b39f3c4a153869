"""A VM's bootstrap on the host: read it (a file, a URL pinned by sha256, inline text), fetch it for guests
without egress, check it against the guest's actions before any VM exists, and keep the values of its
secrets out of everything shown (`redact`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidInput
from .protocol import BOOTSTRAP_LIMIT, BOOTSTRAP_NAME

if TYPE_CHECKING:
    from .heroscript import Playbook, Problem
    from .settings import VMSettings


@dataclass
class Bootstrap:
    """A bootstrap as the guest will get it: inline text, or a URL pinned by sha256."""

    name: str = BOOTSTRAP_NAME
    script: str | None = None
    url: str | None = None
    sha256: str | None = None

    @property
    def digest(self) -> str | None:
        return hashlib.sha256(self.script.encode()).hexdigest() if self.script is not None else self.sha256

    def drive_entry(self) -> dict | None:
        if self.script is not None:
            return {"script": self.script, "name": self.name}
        if self.url:
            return {"url": self.url, "sha256": self.sha256, "name": self.name}
        return None


def load_bootstrap(
    source: str | os.PathLike | None,
    sha256: str | None = None,
    *,
    variables: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
    allow_empty: bool = False,
) -> Bootstrap:
    """Read a bootstrap from a file, a URL (needs sha256) or inline text (contains a newline or starts with
    `!`), and check it against the guest's actions before any VM exists. None or "" is no bootstrap; a
    bootstrap that is given but has no action is refused unless `allow_empty` (a shell script, a data file
    given by mistake would otherwise boot as an empty bootstrap)."""
    if source is None or source == "":
        return Bootstrap()
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        if not sha256 or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
            raise InvalidInput(
                f"bootstrap URL {text} needs --bootstrap-sha256 with its 64-hex-digit sha256",
                hint="compute it with `sha256sum FILE`; herovm never runs unpinned content",
            )
        return Bootstrap(
            name=Path(urllib.parse.urlparse(text).path).name or BOOTSTRAP_NAME,
            url=text,
            sha256=sha256.lower(),
        )
    if "\n" in text or text.lstrip().startswith("!"):
        bootstrap = Bootstrap(script=text)
    else:
        path = Path(text)
        data = read_bootstrap_file(path)
        bootstrap = Bootstrap(name=path.name, script=data.decode("utf-8", "replace"))
    if sha256 and bootstrap.digest != sha256.lower():
        raise InvalidInput(f"bootstrap sha256 is {bootstrap.digest}, not the {sha256} given")
    check_bootstrap(
        bootstrap.script or "", bootstrap.name, variables, secrets=secrets, allow_empty=allow_empty
    )
    return bootstrap


def bootstrap_of(settings: VMSettings) -> Bootstrap:
    """The bootstrap a VM's settings give, read and checked by `load_bootstrap`."""
    return load_bootstrap(
        settings.bootstrap,
        settings.bootstrap_sha256,
        variables=settings.variables,
        secrets=settings.secrets,
        allow_empty=settings.allow_empty,
    )


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_bootstrap_file(path: Path, limit: int = BOOTSTRAP_LIMIT) -> bytes:
    """A bootstrap file's bytes. Looked at before it is opened: only a regular file of at most `limit` bytes
    is read (a FIFO would block, a device never ends), and never more than `limit` + 1 bytes of it."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise InvalidInput(f"cannot read bootstrap {path}: {why}", hint="give a .hero file or a URL") from e
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a file")
        raise InvalidInput(f"bootstrap {path} is {kind}, not a regular file")
    if st.st_size > limit:
        raise InvalidInput(f"bootstrap {path} is larger than {limit} bytes")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(f"cannot read bootstrap {path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            raise InvalidInput(f"bootstrap {path} was replaced while it was read")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidInput(f"bootstrap {path} is larger than {limit} bytes")
    return data


def fetch_on_host(
    boot: Bootstrap,
    variables: Mapping[str, str] | None,
    timeout: float,
    *,
    secrets: Mapping[str, str] | None = None,
    allow_empty: bool = False,
) -> Bootstrap:
    """Fetch a URL bootstrap on the host (for guests without egress), verify its sha256, inline it. The
    whole fetch (connect, redirects, headers, body) has `timeout` seconds."""
    import http.client

    assert boot.url is not None
    try:
        data = fetch_url(boot.url, BOOTSTRAP_LIMIT, timeout)
    except TimeoutError as e:
        raise InvalidInput(
            f"cannot fetch bootstrap {boot.url}: no complete answer within {timeout:g}s",
            hint="is the server up and fast enough? --timeout bounds the fetch too",
        ) from e
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise InvalidInput(f"cannot fetch bootstrap {boot.url}: {e}") from e
    if len(data) > BOOTSTRAP_LIMIT:
        raise InvalidInput(f"bootstrap {boot.url} is larger than the limit of {BOOTSTRAP_LIMIT} bytes")
    got = hashlib.sha256(data).hexdigest()
    if got != boot.sha256:
        raise InvalidInput(f"bootstrap {boot.url}: sha256 {got} does not match the pinned {boot.sha256}")
    fetched = Bootstrap(name=boot.name, script=data.decode("utf-8", "replace"))
    check_bootstrap(fetched.script or "", fetched.name, variables, secrets=secrets, allow_empty=allow_empty)
    return fetched


def fetch_url(url: str, limit: int, timeout: float) -> bytes:
    """GET an http(s) URL, redirects followed: at most `limit` + 1 bytes, and the whole of it within `timeout`
    seconds (TimeoutError after that). A socket timeout alone bounds each read, not their sum: a server that
    sends a byte a second would hold the caller for ever. The fetch runs in a thread that the caller stops
    waiting for at the deadline; its connection is shut down then, which ends any read it is blocked in."""
    import http.client
    import threading
    import urllib.request

    deadline = time.monotonic() + timeout
    connections: list[http.client.HTTPConnection] = []
    given_up = threading.Event()
    finished = threading.Event()
    outcome: dict[str, object] = {}

    class Deadline:
        """Mixed into http.client's connections: each connect gets what is left of the deadline."""

        timeout: float | None

        def connect(self) -> None:
            left = deadline - time.monotonic()
            if left <= 0 or given_up.is_set():
                raise TimeoutError("the deadline passed")
            self.timeout = left
            connections.append(self)  # type: ignore[arg-type]
            super().connect()  # type: ignore[misc]

    class HTTP(Deadline, http.client.HTTPConnection):
        pass

    class HTTPS(Deadline, http.client.HTTPSConnection):
        pass

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(HTTPS, req, context=self._context)  # type: ignore[attr-defined]

    def fetch() -> None:
        try:
            opener = urllib.request.build_opener(HTTPHandler, HTTPSHandler)
            with opener.open(url, timeout=timeout) as resp:
                chunks: list[bytes] = []
                size = 0
                while size <= limit and not given_up.is_set():
                    chunk = resp.read1(min(65536, limit + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            outcome["data"] = b"".join(chunks)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome["error"] = e
        finally:
            finished.set()

    worker = threading.Thread(target=fetch, name="herovm-fetch", daemon=True)
    worker.start()
    if not finished.wait(max(0.0, deadline - time.monotonic())):
        given_up.set()
        for conn in connections:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        raise TimeoutError(f"no complete answer within {timeout:g}s")
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    return outcome["data"]  # type: ignore[return-value]


def check_bootstrap(
    script: str,
    name: str,
    variables: Mapping[str, str] | None,
    *,
    secrets: Mapping[str, str] | None = None,
    allow_empty: bool = False,
) -> None:
    """Parse and validate a bootstrap as the guest will (variables and secrets substituted into the parsed
    values); a secret's value never appears in the error. No action at all is an error unless allow_empty."""
    from .guest.registry import guest_registry
    from .heroscript import HeroScriptError, parse, validate

    given = {**(variables or {}), **(secrets or {})}
    try:
        playbook = parse(script, path=name, variables=given or None, resolve_includes=False)
    except HeroScriptError as e:
        raise InvalidInput(redact(f"bootstrap does not parse: {e}", secrets)) from None
    include = next(iter(bootstrap_include_problems(playbook)), None)
    if include is not None:
        where = f"{include.file}:{include.line}:{include.col}"
        raise InvalidInput(redact(f"{where}: {include.message}", secrets), hint=include.hint)
    errors = [p for p in validate(playbook, guest_registry()) if p.severity == "error"]
    if errors:
        raise InvalidInput(redact("bootstrap is invalid:\n" + "\n".join(str(p) for p in errors), secrets))
    if not playbook.actions and not allow_empty:
        raise InvalidInput(
            f"bootstrap {name} has no actions (no `!!actor.name` line): is it a HeroScript file?",
            hint="to boot with an empty bootstrap anyway: --allow-empty (allow_empty:true in !!vm.create)",
        )


def bootstrap_include_problems(playbook: Playbook) -> list[Problem]:
    """An include in a bootstrap (parsed with resolve_includes=False): the guest gets the one script, without
    the files next to it, so the host must not read them either."""
    from .heroscript import Problem

    return [
        Problem(
            a.file,
            a.line,
            a.col,
            "!!play.include in a bootstrap: the guest gets this one script, not the files it includes",
            hint="includes work in playbooks; inline the file",
        )
        for a in playbook.actions
        if a.fullname == "play.include"
    ]


def redact(text: str, secrets: Mapping[str, str] | None) -> str:
    """`text` with every secret's value replaced by `[secret NAME]` (longest values first)."""
    for key, value in sorted((secrets or {}).items(), key=lambda kv: -len(kv[1])):
        if value:
            text = text.replace(value, f"[secret {key}]")
    return text


def redacted(obj: object, secrets: Mapping[str, str]) -> object:
    """`obj` (strings, and dicts, lists and tuples of them) with `redact` applied to every string in it."""
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {k: redacted(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redacted(v, secrets) for v in obj)
    return obj
