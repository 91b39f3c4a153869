"""JSON for the agent, straight from the C accelerator (`_json`) that the standard `json` module wraps.

`import json` pulls in `re`, and with it `enum` and the regex compiler: ~0.1 s at boot under emulation, on
the path to `ready`. The output is what `json.dumps(obj, separators=(",", ":"), default=str)` writes, and
`loads` accepts what `json.loads` accepts (tests/unit/test_agent_jsonio.py holds both to that).
"""

from __future__ import annotations

import _json

_WHITESPACE = " \t\n\r"


def _encoder(separators: tuple[str, str]):
    # (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan).
    # No markers: they would be shared by threads, and nothing the agent writes refers to itself.
    return _json.make_encoder(None, str, _json.encode_basestring_ascii, None, separators[1], separators[0],
                              False, False, True)  # fmt: skip


_compact = _encoder((",", ":"))
_spaced = _encoder((", ", ": "))


def dumps(obj: object, compact: bool = True) -> str:
    """`obj` as JSON text, ASCII only; anything JSON has no type for is written as its str()."""
    return "".join((_compact if compact else _spaced)(obj, 0))


class _Decoding:
    # The attributes the C scanner reads from its context (as json.JSONDecoder has them).
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


_scan = _json.make_scanner(_Decoding())


def loads(text: str | bytes) -> object:
    """The value `text` holds; ValueError when it is not exactly one JSON value."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as e:
        raise ValueError(f"not JSON: expecting a value at character {e.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"not JSON: extra data at character {end}")
    return value
