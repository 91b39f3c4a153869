"""The host-guest contract (docs/protocol.md) in one module, imported by both sides: by the host as
`herovm.protocol`, and by the guest agent as the same file, which herovm/images.py copies into the image
beside `herovm.heroscript`. Every constant of the wire is written here once: the channel's names and ports,
the config drive (its label, file, version and document shape, with the check both sides run), the event
vocabulary and each event's fields, the exec framing and its handshake, the limits and the exec base
environment. tests/unit/test_protocol_doc.py holds docs/protocol.md's tables equal to what is written here.

Why it imports nothing (but `__future__`, for its annotations). The agent imports this module on its boot
path, before `ready`, where it loads only C modules (tests/unit/test_agent_boot_path.py): `json` imports
`re`; `enum`, `dataclasses`, `typing`, `functools` and `collections` pull in each other; together they cost
0.35 s at boot under TCG, more than Python's own start-up (docs/architecture.md, "Boot path"). So the
vocabularies here are plain classes of string constants (`Stage.ACTION`, and `Stage.ALL` for the whole
set), not `enum.StrEnum`; the config drive's objects are small classes described by a table of keys, not
dataclasses; each side parses JSON with its own parser (the agent's C-only `jsonio`, the host's `json`) and
gives this module the decoded value; and the exec handshake's HMAC runs on the interpreter's built-in
SHA-256, imported at its first use, since `hashlib` loads OpenSSL's libcrypto first (~50 ms of the first
exec at boot). Importing this module costs ~0.5 ms natively, about as much as the agent's system.py.

What only the host needs is herovm/protocol_host.py, which never goes into the image: the decoder that reads
guest-written lines as hostile input (it needs `json` and `re`), the story of one boot, and rendering events
for a terminal.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is a cost at boot
if TYPE_CHECKING:
    from typing import Any, ClassVar


class _Closed:
    """A closed vocabulary: the upper-case class attributes of a subclass, all of them in `ALL`, in order.
    A plain class (not an enum, see above): its members are the strings that go over the wire."""

    ALL: ClassVar[tuple[Any, ...]] = ()

    def __init_subclass__(cls) -> None:
        members = (v for k, v in vars(cls).items() if k.isupper() and k != "ALL")
        cls.ALL = tuple(dict.fromkeys(members))  # PING and PONG are one frame kind: listed once


# ------------------------------------------------------------------------------------------------ transport

# The event channel: a virtio-serial port of this name (a unix socket on the host), or, where there is none
# (Cloud Hypervisor), this AF_VSOCK port.
AGENT_PORT_NAME = "org.herovm.agent.0"
AGENT_VSOCK_PORT = 1024
SSH_PORT = 22  # the guest's SSH port (the agent hands it to `sshd -i`) and exec port; on vsock too
CONSOLE_PREFIX = "@herovm "  # a console line mirroring an event: this, then the event's JSON


class Command(_Closed):
    """A host command's `op` (host to guest, one JSON object a line on the channel)."""

    HELLO = "hello"  # replay this boot's events, then stream
    STATUS = "status"  # answer with a `status` event
    POWEROFF = "poweroff"
    CLOCK = "clock"  # {"op": "clock", "time": T}: set the guest's clock to T (the host's, seconds since 1970)
    # Before a template's snapshot: the agent refuses every exec and SSH connection and removes the SSH keys,
    # so that the template's memory and disk hold no live credential; it answers with a `sealed` event.
    SEAL = "seal"
    # After a restore into a new VM (a template's clone, a fork): {"op": "identity", ...} (`Identity`). The
    # agent takes the VM's own identity, then reports `boot` with its nonce and `ready` (docs/protocol.md).
    IDENTITY = "identity"
    # {"op": "deadline", "deadline": T}: the VM's time is up at T (seconds since 1970), or never (null);
    # replaces the config drive's (`herovm ttl`, herovm serve's set_timeout)
    DEADLINE = "deadline"


# ------------------------------------------------------------------------------------------------- events


class Kind(_Closed):
    """Every event the agent sends (its `event` field)."""

    BOOT = "boot"
    SETUP = "setup"
    BOOTSTRAP = "bootstrap"
    ACTION_START = "action.start"
    ACTION_END = "action.end"
    READY = "ready"
    FAILED = "failed"
    SERVICE = "service"
    STATUS = "status"
    SHUTDOWN = "shutdown"
    SEALED = "sealed"  # the answer to Command.SEAL


# A boot ends in exactly one of these: the first one the boot sends decides it, and nothing after it does.
TERMINAL = frozenset((Kind.READY, Kind.FAILED))
AFTER_END = frozenset((Kind.SERVICE, Kind.STATUS, Kind.SHUTDOWN))  # what a boot still says after its end


class Step(_Closed):
    """A `setup` event's `step`: the machine set-up the agent does before the bootstrap, in this order."""

    DISK = "disk"  # the root file system grown to fill its disk, when the disk is larger
    NETWORK = "network"
    HOSTNAME = "hostname"
    SSH = "ssh"


class Source(_Closed):
    """A `bootstrap` event's `source`: where the bootstrap came from."""

    DRIVE = "drive"  # inline on the config drive
    URL = "url"  # fetched, and its pinned sha256 checked
    NONE = "none"  # there was none
    DONE = "done"  # this disk ran it already: only env.set, service.start and system.hostname run again


class Stage(_Closed):
    """A `failed` event's `stage`: where the boot failed."""

    INITRAMFS = "initramfs"  # written by herovm/_data/initramfs/init itself, on the console only
    DRIVE = "drive"  # the config drive is missing or not a valid config
    SETUP = "setup"  # one of the `Step`s
    FETCH = "fetch"
    VALIDATE = "validate"
    ACTION = "action"  # a bootstrap action failed: the only stage after which actions have run
    AGENT = "agent"  # the agent itself failed


class ServiceState(_Closed):
    """A `service` event's `state`."""

    STARTED = "started"
    EXITED = "exited"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class Type(_Closed):
    """A field's JSON type."""

    STR = "string"
    INT = "integer"
    COUNT = "integer >= 0"
    NUMBER = "finite number"
    BOOL = "boolean"
    OBJECT = "object"
    NULL = "null"
    STRINGS = "list of strings"  # an op's argv


class Field:
    """One field of an event: its name, the JSON types it may have, whether the event is valid without it,
    and, for a closed vocabulary, the values the agent sends."""

    __slots__ = ("name", "required", "types", "values")

    def __init__(self, name: str, types: tuple[str, ...], required: bool, values: tuple[str, ...]) -> None:
        self.name, self.types, self.required, self.values = name, types, required, values

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.types!r}, required={self.required})"


def _req(name: str, *types: str, values: tuple[str, ...] = ()) -> Field:
    return Field(name, types, True, values)


def _opt(name: str, *types: str) -> Field:
    return Field(name, types, False, ())


STR, INT, COUNT, NUM = Type.STR, Type.INT, Type.COUNT, Type.NUMBER
BOOL, OBJ, NULL = Type.BOOL, Type.OBJECT, Type.NULL

# Every event has these (the initramfs's own `failed` line too): `seq` counts a boot's events from 0, `t` is
# the guest's uptime in seconds.
COMMON = (_req("event", STR), _req("seq", COUNT), _req("t", NUM))

# Per kind, what the agent sends besides COMMON. Required: what the host decides on or shows; the agent sends
# the optional ones too wherever it has them.
SCHEMA: dict[str, tuple[Field, ...]] = {
    Kind.BOOT: (
        _req("nonce", STR, NULL),
        _opt("agent", STR),
        _opt("kernel", STR),
        _opt("pid", INT),
        _opt("restored", BOOL),  # true: a clone's identity handover, not a kernel boot (Command.IDENTITY)
    ),
    Kind.SETUP: (
        _req("step", STR, values=Step.ALL),
        _req("ok", BOOL),
        _opt("seconds", NUM),
        _opt("error", STR),
    ),
    Kind.BOOTSTRAP: (
        _req("source", STR, values=Source.ALL),
        _req("actions", COUNT),
        _opt("sha256", STR, NULL),
    ),
    Kind.ACTION_START: (_req("index", COUNT), _req("action", STR), _req("line", INT), _opt("file", STR)),
    Kind.ACTION_END: (
        _req("index", COUNT),
        _req("action", STR),
        _req("line", INT),
        _req("ok", BOOL),
        _req("seconds", NUM),
        _opt("exit_code", INT, NULL),
        _opt("output", STR),
        _opt("error", STR, NULL),
    ),
    Kind.READY: (_opt("actions", COUNT), _opt("seconds", NUM)),
    Kind.FAILED: (
        _req("stage", STR, values=Stage.ALL),
        _req("error", STR),
        _opt("action", STR),
        _opt("line", INT),
        _opt("file", STR),
        _opt("exit_code", INT, NULL),
        _opt("output", STR),
    ),
    Kind.SERVICE: (
        _req("name", STR),
        _req("state", STR, values=ServiceState.ALL),
        _opt("pid", INT),
        _opt("exit_code", INT),
        _opt("restarts", COUNT),
    ),
    Kind.STATUS: (_req("status", OBJ),),
    Kind.SHUTDOWN: (_req("reason", STR),),
    Kind.SEALED: (),
}

OUTPUT_TAIL = 4096  # the last characters of an action's output that an event carries

# ------------------------------------------------------------------------------------------- config drive

DRIVE_LABEL = "HEROVM"  # the ISO9660 volume identifier the agent looks for
DRIVE_FILE = "config.json"  # in the root directory, by this name (Rock Ridge, Joliet)
DRIVE_FILE_ISO9660 = "CONFIG.JSON;1"  # and by this ISO9660 name, which the agent reads in place
DRIVE_VERSION = 1  # config.json's `v`
DRIVE_MAX_BYTES = 4 << 20  # the most of config.json the agent reads
BOOTSTRAP_LIMIT = 1 << 20  # bytes of a bootstrap, inline or fetched
FETCH_TIMEOUT_S = 30.0  # how long the guest waits for a bootstrap URL to answer
BOOTSTRAP_NAME = "bootstrap.hero"  # a bootstrap's name when it has none (errors say FILE:LINE)


_HEX = frozenset("0123456789abcdef")


class Key:
    """One key of a config-drive object: its type (str, int, float for any finite number, list for a list
    of strings, dict for an object of strings, or a Record), whether it must be there, its default, and a
    further check with what it asks for ("an integer from 68 to 65535")."""

    __slots__ = ("check", "default", "kind", "name", "required")

    def __init__(
        self, name: str, kind: Any, *, required: bool = False, default: Any = None, check: Any = None
    ) -> None:
        self.name, self.kind, self.required, self.default, self.check = name, kind, required, default, check

    def take(self, value: object, where: str) -> Any:
        """`value`, decoded JSON, as this key's value; ValueError naming the key where it is wrong."""
        kind = self.kind
        if isinstance(kind, type) and issubclass(kind, Record):
            return kind.from_json(value, where + self.name + ".")
        if kind is str:
            ok, what = isinstance(value, str), "a string"
        elif kind is list:
            ok, what = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
        elif kind is dict:
            ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            what = "an object of strings"  # JSON keys are strings already
        elif isinstance(value, bool):  # JSON's true is no number
            ok, what = False, "an integer" if kind is int else "a number"
        elif kind is int:
            ok, what = isinstance(value, int), "an integer"
        else:
            ok, what = isinstance(value, int | float) and value - value == 0, "a number"  # finite
        if ok and self.check is not None:
            ok, what = self.check[0](value), self.check[1]
        if not ok:
            raise ValueError(f"config drive: {where}{self.name} must be {what}")
        return value

    def fresh_default(self) -> Any:
        default = self.default
        if isinstance(default, type):  # a Record: its defaults
            return default()
        return default.copy() if isinstance(default, list | dict) else default


class Record:
    """An object of the config drive as a typed value, described by KEYS. `from_json` checks a decoded
    value whole: ValueError naming the first key that is wrong, never another exception, whatever the value.
    A key that is not required may be absent or null (both: its default); keys not in KEYS are ignored."""

    KEYS: ClassVar[tuple[Key, ...]] = ()

    def __init__(self, **values: Any) -> None:
        for key in self.KEYS:
            setattr(self, key.name, values.pop(key.name) if key.name in values else key.fresh_default())
        if values:
            raise TypeError(f"{type(self).__name__} has no key {next(iter(values))!r}")

    @classmethod
    def from_json(cls, value: object, where: str = "") -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"config drive: {where.rstrip('.') or DRIVE_FILE} must be an object")
        values = {}
        for key in cls.KEYS:
            v = value.get(key.name)
            if v is not None:
                values[key.name] = key.take(v, where)
            elif key.required:
                raise ValueError(f"config drive: {where}{key.name} is missing")
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _within(low: float, high: float) -> tuple[Any, str]:
    return (lambda v: low <= v <= high), f"an integer from {low} to {high}"


class Network(Record):
    """The guest's static IPv4 settings (no DHCP on the boot path)."""

    address: str  # with its prefix: 10.0.2.15/24
    gateway: str
    dns: list[str]
    mtu: int
    KEYS = (
        Key("address", str, required=True),
        Key("gateway", str, required=True),
        Key("dns", list, default=[]),
        Key("mtu", int, default=1500, check=_within(68, 65535)),
    )


class SSH(Record):
    host_key: str  # the OpenSSH private key the host generated and pins
    authorized_keys: list[str]
    port: int
    exec_token: str | None  # 64 hex: the key of the exec handshake's HMAC (below); never on the wire
    KEYS = (
        Key("host_key", str, required=True),
        Key("authorized_keys", list, default=[]),
        Key("port", int, default=SSH_PORT, check=_within(1, 65535)),
        Key("exec_token", str),
    )


class BootstrapSpec(Record):
    """Inline (`script`), or fetched from `url` and checked against its pinned `sha256`; or neither."""

    script: str | None
    url: str | None
    sha256: str | None
    name: str
    KEYS = (Key("script", str), Key("url", str), Key("sha256", str), Key("name", str, default=BOOTSTRAP_NAME))


class Limits(Record):
    bootstrap_bytes: int
    fetch_timeout: float
    KEYS = (
        Key("bootstrap_bytes", int, default=BOOTSTRAP_LIMIT, check=((lambda v: v >= 0), "an integer >= 0")),
        Key("fetch_timeout", float, default=FETCH_TIMEOUT_S, check=((lambda v: v > 0), "a number > 0")),
    )


class DriveConfig(Record):
    """config.json: what the host tells one boot. Only `nonce` changes from boot to boot; the rest is the
    VM's (`secrets` too: the host keeps them in the VM's secrets/ and writes them on every boot)."""

    name: str
    hostname: str | None  # the hostname to set: `name` when absent
    nonce: str | None  # random per boot, echoed in the `boot` event
    network: Network | None  # None: no NIC
    ssh: SSH | None
    bootstrap: BootstrapSpec | None
    vars: dict[str, str]  # substituted into the bootstrap's parsed values, never into its text
    secrets: dict[str, str]  # like vars, and redacted from every event
    limits: Limits
    deadline: float | None  # when the VM's time is up (`--ttl`): the agent powers the guest off then
    KEYS = (
        Key("name", str, required=True),
        Key("hostname", str),
        Key("nonce", str),
        Key("network", Network),
        Key("ssh", SSH),
        Key("bootstrap", BootstrapSpec),
        Key("vars", dict, default={}),
        Key("secrets", dict, default={}),
        Key("limits", Limits, default=Limits),
        Key("deadline", float, check=((lambda v: v > 0), "a time since 1970")),
    )

    @classmethod
    def from_json(cls, value: object, where: str = "") -> DriveConfig:
        """A decoded config.json as a DriveConfig; ValueError ("config drive: ...") for anything else."""
        version = value.get("v") if isinstance(value, dict) else None
        if type(version) is not int or version != DRIVE_VERSION:  # type(): JSON's true == 1
            raise ValueError(f"config drive: {DRIVE_FILE} is not a version {DRIVE_VERSION} herovm config")
        return super().from_json(value, where)


def _is_seed(value: str) -> bool:
    return len(value) >= 64 and len(value) % 2 == 0 and set(value) <= _HEX


class Identity(Record):
    """Command.IDENTITY: what makes a clone its own VM. Checked like the config drive (from_json)."""

    name: str
    hostname: str | None
    nonce: str  # the new VM's, echoed in the `boot` event that begins its story
    ssh: SSH  # its own host key, authorized key and exec token
    seed: str  # >= 64 hex characters from the host's CSPRNG, mixed into the guest's, which is then reseeded
    time: float  # the host's clock (seconds since 1970)
    deadline: float | None  # the clone's own (`--ttl`), replacing the snapshotted VM's; None: none
    KEYS = (
        Key("name", str, required=True),
        Key("hostname", str),
        Key("nonce", str, required=True),
        Key("ssh", SSH, required=True),
        Key("seed", str, required=True, check=(_is_seed, "64 or more lowercase hex digits")),
        Key("time", float, required=True, check=((lambda v: 1e9 < v < 1e11), "a time since 1970")),
        Key("deadline", float, check=((lambda v: v > 0), "a time since 1970")),
    )


# --------------------------------------------------------------------------------------------------- exec

EXEC_MAGIC = b"HEROVM-EXEC/2\n"  # what a client sends first on the SSH port to be served by the agent


class Frame(_Closed):
    """An exec frame's kind: 1 byte, then the payload's length (4 bytes, big-endian), then the payload."""

    HELLO = b"H"  # host to agent: {"nonce": "<64 hex>"}, sent with the magic
    CHALLENGE = b"C"  # agent to host: {"challenge": "<64 hex>", "proof": "<64 hex>"}
    AUTH = b"A"  # host to agent: {"answer": "<64 hex>"}
    REQUEST = b"R"  # host to agent: a request (JSON)
    STDIN = b"0"  # host to agent: stdin for the running command; empty: its end
    KILL = b"K"  # host to agent: SIGKILL the running command's process group
    PING = b"P"  # host to agent
    PONG = b"P"  # agent to host
    STDOUT = b"1"
    STDERR = b"2"
    EXIT = b"X"  # {"exit_code": N}
    ERROR = b"E"  # {"error": "<one line>"}, then the agent hangs up
    # Ops (below): each op ends in exactly one RESULT or FAILED; a streamed op sends EVENTs (and STDOUT,
    # STDERR: a process's output, a file's bytes) before it. In an op, STDIN carries a file's bytes to the
    # agent (empty: their end) and KILL stops a stream (the process it follows runs on).
    RESULT = b"O"  # an op's result (JSON): it ended
    EVENT = b"V"  # an event of a streamed op (JSON)
    FAILED = b"F"  # {"error": <OpError>, "message": "<one line>"}: the op failed; the connection stays usable


FRAME_HEADER_SIZE = 5
MAX_HANDSHAKE = 256  # HELLO and AUTH: all the agent reads before the host has proved it holds the token
MAX_CHALLENGE = 512  # CHALLENGE: all the host reads before the agent has proved it
MAX_REQUEST = 1 << 20
MAX_CHUNK = 64 << 10  # STDIN, STDOUT, STDERR
MAX_REPLY = 1 << 20  # RESULT, EVENT: all the host reads of one
MAX_FAILURE = 4096  # FAILED

TO_AGENT, TO_HOST, BOTH = "host to agent", "agent to host", "both"
# Each kind, who sends it, and its payload's limit in bytes (None: none of its own). After the handshake
# the agent refuses any other kind, and any frame over its limit, from the header alone.
FRAMES = (
    (Frame.HELLO, TO_AGENT, MAX_HANDSHAKE),
    (Frame.CHALLENGE, TO_HOST, MAX_CHALLENGE),
    (Frame.AUTH, TO_AGENT, MAX_HANDSHAKE),
    (Frame.REQUEST, TO_AGENT, MAX_REQUEST),
    (Frame.STDIN, TO_AGENT, MAX_CHUNK),
    (Frame.KILL, TO_AGENT, 0),
    (Frame.PING, BOTH, 0),
    (Frame.STDOUT, TO_HOST, MAX_CHUNK),
    (Frame.STDERR, TO_HOST, MAX_CHUNK),
    (Frame.EXIT, TO_HOST, None),
    (Frame.ERROR, TO_HOST, None),
    (Frame.RESULT, TO_HOST, MAX_REPLY),
    (Frame.EVENT, TO_HOST, MAX_REPLY),
    (Frame.FAILED, TO_HOST, MAX_FAILURE),
)
# What the agent reads once the host has proved itself: every frame the host sends but the handshake's.
AUTHENTICATED_LIMITS = {
    kind: limit for kind, way, limit in FRAMES if way != TO_HOST and kind not in (Frame.HELLO, Frame.AUTH)
}


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame, header and payload."""
    return kind + len(payload).to_bytes(4, "big") + payload


def frame_header(header: bytes) -> tuple[bytes, int]:
    """The kind and payload length that FRAME_HEADER_SIZE bytes announce."""
    return bytes(header[:1]), int.from_bytes(header[1:FRAME_HEADER_SIZE], "big")


# A request: exactly one of argv (run as is, looked up on PATH), shell (`bash -c`) and kill_session (the
# challenge of another connection, whose command to kill); env, cwd and stdin with argv or shell.
REQUEST_COMMANDS = ("argv", "shell", "kill_session")
REQUEST_FIELDS = frozenset((*REQUEST_COMMANDS, "env", "cwd", "stdin"))
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXEC_HOME = "/root"  # the command's cwd, and what a relative cwd is relative to
EXEC_ENV = {  # every command's environment, which the request's env adds to (never changed: copy it)
    "PATH": GUEST_PATH,
    "HOME": EXEC_HOME,
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
}

# ---------------------------------------------------------------------------------------------------- ops
# A request with `op` instead of argv, shell or kill_session (docs/protocol.md, "Ops"): what an E2B-style
# server needs of a sandbox, on the same authenticated connection. Processes that outlive the connection,
# files and directory watches, each file op as a guest user.

OP_FIELD = "op"


class Op(_Closed):
    """An op request's `op`."""

    PROC_START = "proc.start"  # stream: EVENT start, STDOUT/STDERR, EVENT dropped; RESULT end
    PROC_CONNECT = "proc.connect"  # the same stream, of a process started before, from now on
    PROC_LIST = "proc.list"
    PROC_INPUT = "proc.input"
    PROC_CLOSE_STDIN = "proc.close_stdin"
    PROC_SIGNAL = "proc.signal"
    FILE_READ = "file.read"  # stream: STDOUT (the bytes); RESULT
    FILE_WRITE = "file.write"  # then STDIN frames from the host, an empty one last; RESULT
    FILE_STAT = "file.stat"
    FILE_LIST = "file.list"  # stream: EVENT {"entries": [...]}; RESULT
    FILE_MKDIR = "file.mkdir"
    FILE_MOVE = "file.move"
    FILE_REMOVE = "file.remove"
    FILE_WATCH = "file.watch"  # stream: EVENT watching, EVENT {"events": [...]}, until KILL; RESULT


class OpError(_Closed):
    """A FAILED frame's `error`: what went wrong, as a closed set (its `message` says the rest)."""

    NOT_FOUND = "not_found"
    EXISTS = "exists"
    PERMISSION = "permission"
    NOT_A_DIRECTORY = "not_a_directory"
    IS_A_DIRECTORY = "is_a_directory"
    INVALID = "invalid"  # the request is wrong (and nothing ran): a bad field, an unknown user, a limit
    OTHER = "other"


class EntryType(_Closed):
    """A file entry's `type` (lstat: a symlink is itself, with its `symlink_target`)."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"


class WatchType(_Closed):
    """A watch event's `type`, as inotify's events map onto E2B's (and fsnotify's)."""

    CREATE = "create"  # IN_CREATE, IN_MOVED_TO
    WRITE = "write"  # IN_MODIFY
    REMOVE = "remove"  # IN_DELETE, IN_DELETE_SELF
    RENAME = "rename"  # IN_MOVED_FROM, IN_MOVE_SELF
    CHMOD = "chmod"  # IN_ATTRIB


STRS = Type.STRINGS
_PROC = (_opt("pid", INT), _opt("tag", STR))  # which process: exactly one of them
_AS = (_opt("user", STR),)  # the guest user the op runs as (default root)
# Each op's fields besides `op`: what the agent accepts (any other field is refused), of these JSON types.
OP_FIELDS: dict[str, tuple[Field, ...]] = {
    Op.PROC_START: (
        _opt("argv", STRS),
        _opt("shell", STR),
        _opt("env", OBJ),
        _opt("cwd", STR),
        *_AS,
        _opt("tag", STR),
        _opt("stdin", BOOL),
    ),
    Op.PROC_CONNECT: (*_PROC, _opt("replay", BOOL)),
    Op.PROC_LIST: (),
    Op.PROC_INPUT: (*_PROC, _req("data", STR)),
    Op.PROC_CLOSE_STDIN: _PROC,
    Op.PROC_SIGNAL: (*_PROC, _req("signal", STR, INT)),
    Op.FILE_READ: (_req("path", STR), *_AS, _opt("offset", COUNT), _opt("limit", COUNT)),
    Op.FILE_WRITE: (_req("path", STR), *_AS, _opt("mode", COUNT)),
    Op.FILE_STAT: (_req("path", STR), *_AS),
    Op.FILE_LIST: (_req("path", STR), *_AS, _opt("depth", COUNT)),
    Op.FILE_MKDIR: (_req("path", STR), *_AS, _opt("parents", BOOL)),
    Op.FILE_MOVE: (_req("path", STR), _req("to", STR), *_AS),
    Op.FILE_REMOVE: (_req("path", STR), *_AS, _opt("recursive", BOOL)),
    Op.FILE_WATCH: (_req("path", STR), *_AS, _opt("recursive", BOOL)),
}
# A proc.signal's `signal`: one of these names (SIGTERM is "TERM"), or a number from 1 to 64.
SIGNALS = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")

MAX_PROCESSES = 64  # processes the agent keeps at once, running or ended (an ended one is dropped first)
PROCESS_OUTPUT_BUFFER = 1 << 20  # per process: its latest output, for followers behind and `replay`
PROCESS_STDIN_BUFFER = 1 << 20  # per process: stdin accepted, not yet read by it
ENDED_KEEP_S = 60.0  # how long an ended process stays known (connect, list) after its end
AFTER_EXIT_S = 1.0  # how long after its exit a process's output may still come (from what it left running)
MAX_TAG = 256  # characters of a tag
MAX_PATH = 4096  # bytes of a path, encoded
MAX_LIST_ENTRIES = 10_000  # entries of one file.list; more: `truncated`
MAX_LIST_DEPTH = 64
MAX_WATCHES = 8192  # directories one recursive watch follows
MAX_WATCH_STREAMS = 16  # watches at once
MAX_READ = 1 << 30  # the default `limit` of a file.read: what the host takes of one file
DEFAULT_USER = "root"


# The handshake proves the VM's exec token both ways, the agent first, each side with HMAC-SHA256 keyed with
# the token's 64 hex characters over both sides' fresh nonces. What each side's HMAC covers begins with its
# direction's label, so that neither proof can stand in for the other.
AGENT_PROOF_LABEL = b"herovm-exec/2 agent proof\n"
HOST_ANSWER_LABEL = b"herovm-exec/2 host answer\n"


def agent_proof(token: bytes, nonce: str, challenge: str) -> str:
    """The agent's proof that it holds `token`, over the host's nonce and its own challenge."""
    return hmac_sha256(token, AGENT_PROOF_LABEL + nonce.encode() + b" " + challenge.encode())


def host_answer(token: bytes, nonce: str, challenge: str) -> str:
    """The host's proof that it holds `token`, over the same two values, with the other label."""
    return hmac_sha256(token, HOST_ANSWER_LABEL + nonce.encode() + b" " + challenge.encode())


def same_digest(a: str, b: str) -> bool:
    """Whether two hex digests are equal, in time that does not depend on where they differ."""
    from _operator import _compare_digest  # what hmac.compare_digest is

    return _compare_digest(a.encode(), b.encode())


def is_hex64(value: object) -> bool:
    """Whether `value` is 64 lowercase hex digits: a nonce, a challenge, a proof."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def hmac_sha256(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 (RFC 2104), hex, on the interpreter's built-in SHA-256: `hmac` and `hashlib` load
    OpenSSL's libcrypto first, ~50 ms of the first exec at boot under emulation."""
    if not _HMAC:  # found on first use: nothing of it is needed before `ready`
        try:
            from _sha256 import sha256
        except ImportError:  # Python 3.12 and later have it in _sha2
            from _sha2 import sha256  # type: ignore[import-not-found, no-redef]
        # each byte of the key XOR 0x36 (inner) and 0x5C (outer), by bytes.translate
        _HMAC.extend((sha256, bytes(b ^ 0x36 for b in range(256)), bytes(b ^ 0x5C for b in range(256))))
    sha256, ipad, opad = _HMAC
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(key.translate(ipad) + message).digest()
    return sha256(key.translate(opad) + inner).hexdigest()


_HMAC: list = []  # the built-in SHA-256 type and the two pads
