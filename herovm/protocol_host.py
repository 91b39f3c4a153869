"""How the host reads what a guest writes: the contract's events (herovm/protocol.py), as hostile input.
Host only: this module imports `json` and `re`, which the guest agent keeps off its boot path, so it is not
copied into the image (herovm/protocol.py says why the contract itself imports nothing).

Any process in the guest can write to the serial console, where the agent's events are mirrored as
`@herovm {json}` lines, and the agent itself runs code the bootstrap chose. So every event the host reads,
from the agent channel or from the console log, goes through `decode_event`, and nothing else parses event
JSON:

- a line is at most `MAX_LINE` bytes, nests at most `MAX_DEPTH` deep and holds at most `MAX_CONTAINERS`
  objects and arrays, checked before the JSON parser sees it;
- its `event` is one of `Kind`, and every field `SCHEMA` names for that kind has its type (required fields
  are there); fields the schema does not name are dropped, so nothing the host shows or decides on is
  unchecked; lone surrogates in strings become U+FFFD (they could not be printed). A value outside a
  field's vocabulary (a `stage` the host does not know) is kept: an older or newer agent's failure must not
  be lost over a word;
- anything else is None: ignored, never an exception.

Which events count is `Story`'s business: the events of the boot with this boot's nonce, from its `boot`
event to its first `ready` or `failed` (`TERMINAL`). Afterwards only `service`, `status` and `shutdown`
(`AFTER_END`) are news; anything else (a second `boot`, a late `failed`) is something a guest process
wrote, and changes nothing.

`describe_event` and `printable` render events for a terminal: guest strings never carry control characters
(escape sequences) to the user's terminal.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .protocol import AFTER_END, COMMON, CONSOLE_PREFIX, SCHEMA, TERMINAL, Kind, Type

MAX_LINE = 256 << 10  # bytes in one event line; the agent's largest (an action's 4 KiB output tail) fit 5x
MAX_DEPTH = 16  # nesting of objects and arrays; the agent's deepest (a `status` answer) nests 4
MAX_CONTAINERS = 4096  # objects and arrays in one line


# ------------------------------------------------------------------------------------------------ decoding


def decode_event(line: bytes | str) -> dict | None:
    """The event one line holds, checked against the schema; None for anything else (never raises)."""
    if len(line) > MAX_LINE:  # str: characters, each at least one byte of the line
        return None
    if isinstance(line, bytes | bytearray):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not _shallow(line):
        return None
    try:
        value = json.loads(line, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # RecursionError: cannot happen past _shallow; never let it out
        return None
    return validate_event(value)


def console_event(line: str) -> dict | None:
    """The event a console line mirrors (`@herovm {json}`, anywhere in the line: the kernel may have written
    before it on the same line), or None."""
    idx = line.find(CONSOLE_PREFIX)
    return decode_event(line[idx + len(CONSOLE_PREFIX) :]) if idx >= 0 else None


def validate_event(value: object) -> dict | None:
    """`value` as an event: the fields the schema names for its kind, each of its type; or None."""
    if not isinstance(value, dict):
        return None
    kind = value.get("event")
    if not isinstance(kind, str) or kind not in SCHEMA:
        return None
    event: dict = {}
    for f in (*COMMON, *SCHEMA[kind]):
        if f.name not in value:
            if f.required:
                return None
            continue
        v = value[f.name]
        if not any(_is(v, t) for t in f.types):
            return None
        event[f.name] = _clean(v) if isinstance(v, str) else v
    return event


def _is(v: object, t: str) -> bool:
    if t == Type.STR:
        return isinstance(v, str)
    if t == Type.BOOL:
        return isinstance(v, bool)
    if t == Type.NULL:
        return v is None
    if t == Type.OBJECT:
        return isinstance(v, dict)
    if isinstance(v, bool):  # JSON's true is no number
        return False
    if t == Type.INT:
        return isinstance(v, int)
    if t == Type.COUNT:
        return isinstance(v, int) and v >= 0
    return isinstance(v, int | float) and math.isfinite(v)  # NUMBER


def _clean(s: str) -> str:
    """`s` without lone surrogates (JSON's "\\ud800" decodes to one; no terminal or file can take it)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return s


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity


_STRINGS = re.compile(r'"[^"]*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def _shallow(text: str) -> bool:
    """Whether the JSON parser, reading `text`, would nest at most MAX_DEPTH deep and meet at most
    MAX_CONTAINERS objects and arrays. Linear, with no recursion: the parser never gets a line that would
    take it deeper (json.loads recurses once per level)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return True  # cannot nest deeper than it has brackets
    # Brackets inside strings do not nest: drop escaped backslashes, then escaped quotes, then strings. Up to
    # the first place where the text stops being JSON (where the parser stops), this leaves exactly the
    # parser's own brackets; what comes after can only make the check stricter.
    structure = _STRINGS.sub("", text.replace("\\\\", "").replace('\\"', ""))
    brackets = _NOT_BRACKETS.sub("", structure)
    if len(brackets) > 2 * MAX_CONTAINERS:  # JSON closes what it opens: twice the containers at most
        return False
    depth = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


# --------------------------------------------------------------------------------------------- one boot


@dataclass
class Story:
    """Which events of a stream (the agent channel, or the console log in the order the guest wrote it) tell
    the story of the boot with `nonce`. Feed every event to `take`, in order.

    The story begins at the first `boot` event with this nonce and ends at its first `ready` or `failed`;
    after that only `service`, `status` and `shutdown` events count (services keep running, the host may ask,
    the guest powers off). A boot with another nonce before this one's is an earlier boot (the console log
    keeps every boot of the VM); after this one began, none can come: the nonce is the VM's last boot's.
    With `nonce=None` no boot is this one. `unnamed`: a `boot` event without a nonce (the agent could not
    read its config drive) begins this boot; only the agent channel, which only this boot's agent can write,
    may say that."""

    nonce: str | None
    unnamed: bool = False
    events: list[dict] = field(default_factory=list)  # this boot's events, in order
    begun: bool = False  # this boot's `boot` event was seen
    outcome: str | None = None  # its first `ready` or `failed`

    THIS = "this boot"
    EARLIER = "an earlier boot"

    def __post_init__(self) -> None:
        self._reading: str | None = None  # whose events come now: THIS, EARLIER, or None (no boot seen)
        self._ended: str | None = None  # the terminal event of the boot being read

    def take(self, event: dict) -> str:
        """THIS (kept in `events`), EARLIER, or why the event is ignored ("after ready", ...)."""
        kind = event["event"]
        if kind == Kind.BOOT:
            if self.begun:
                return "a boot event after this boot's own"
            nonce = event.get("nonce")
            if (self.nonce is not None and nonce == self.nonce) or (self.unnamed and nonce is None):
                self.begun, self._reading, self._ended = True, self.THIS, None
                self.events.append(event)
                return self.THIS
            self._reading, self._ended = self.EARLIER, None
            return self.EARLIER
        if self._reading is None:
            return "before any boot event"
        if self._ended is not None and kind not in AFTER_END:
            return f"after {self._ended}"
        if kind in TERMINAL and self._ended is None:
            self._ended = kind
            if self._reading == self.THIS:
                self.outcome = kind
        if self._reading == self.THIS:
            self.events.append(event)
        return self._reading

    @property
    def failure(self) -> dict | None:
        """The `failed` event that ended this boot, if one did."""
        return self.events_of(Kind.FAILED)[0] if self.outcome == Kind.FAILED else None

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


# -------------------------------------------------------------------------------------------- rendering

# C0 controls but newline and tab, DEL, C1 controls: written as \xNN, so that they show instead of acting.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}
_CONTROLS_ONE_LINE = {**_CONTROLS, ord("\n"): "\\n", ord("\t"): "\\t"}


def printable(value: object, one_line: bool = False) -> str:
    """`value` as text safe for a terminal: guest-chosen control characters (escape sequences, carriage
    returns) are shown as \\xNN; with `one_line`, newlines and tabs too."""
    return str(value).translate(_CONTROLS_ONE_LINE if one_line else _CONTROLS)


def describe_event(e: dict) -> str:
    """One line for a person (used by `up`'s progress, `status` and `logs`). `e` is a decoded event."""
    kind = e["event"]

    def s(key: str) -> str:
        return printable(e.get(key), one_line=True)

    if kind == Kind.ACTION_START:
        return f"[{e['index'] + 1}] {s('action')} (line {e['line']}) ..."
    if kind == Kind.ACTION_END:
        result = "ok" if e["ok"] else f"FAILED: {s('error')}"
        return f"[{e['index'] + 1}] {s('action')} {result} in {e['seconds']:.2f}s"
    if kind == Kind.SETUP:
        return f"setup {s('step')} {'ok' if e['ok'] else 'FAILED: ' + s('error')}"
    if kind == Kind.BOOT:
        if e.get("restored") is True:
            return f"agent {s('agent')} restored at {e['t']:.2f}s guest time: taking this VM's identity"
        return f"agent {s('agent')} started at {e['t']:.2f}s (kernel {s('kernel')})"
    if kind == Kind.BOOTSTRAP:
        return f"bootstrap from {s('source')}: {e['actions']} actions"
    if kind == Kind.READY:
        return f"ready at {e['t']:.2f}s guest time"
    if kind == Kind.FAILED:
        where = f" at line {e['line']} ({s('action')})" if e.get("line") else ""
        return f"FAILED in {s('stage')}{where}: {s('error')}"
    if kind == Kind.SERVICE:
        extra = []
        if "pid" in e:
            extra.append(f"pid {e['pid']}")
        if "exit_code" in e:
            extra.append(f"exit code {e['exit_code']}")
        if e.get("restarts"):
            extra.append(f"restart {e['restarts']}")
        return f"service {s('name')} {s('state')}" + (f" ({', '.join(extra)})" if extra else "")
    if kind == Kind.SHUTDOWN:
        return f"shutting down: {s('reason')}"
    if kind == Kind.SEALED:
        return "sealed: its exec and SSH credentials no longer answer"
    if kind == Kind.STATUS:
        return f"status: {s('status')}"
    return json.dumps(e)  # ASCII only: no control character gets through unescaped
