"""Readers for typed values. Each raises ValueError with a one-line message."""

from __future__ import annotations

import re

_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})

_INT_RE = re.compile(r"-?[0-9]+")
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE_RE = re.compile(rf"({_NUMBER})[ \t]*([a-z]*)", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BARE_NUMBER_RE = re.compile(rf"-?{_NUMBER}")
_PERCENT_RE = re.compile(rf"(-?{_NUMBER})[ \t]*%")


def parse_bool(text: str) -> bool:
    """`true/false`, `yes/no`, `y/n`, `1/0`, any case."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean; use true/false, yes/no, y/n or 1/0")


def parse_int(text: str) -> int:
    """Plain decimal, optionally with a leading `-`."""
    s = text.strip()
    if not _INT_RE.fullmatch(s):
        raise ValueError(f"{text!r} is not an integer; give plain digits, e.g. 2")
    return int(s)


def parse_size(text: str) -> int:
    """A size in bytes: `512MB`, `1.5GiB`, `2G` (1024-based); a bare number is rejected."""
    s = text.strip()
    m = _SIZE_RE.fullmatch(s)
    if m is None:
        raise ValueError(f"{text!r} is not a size; give a unit, e.g. 512MB")
    number, unit = m.groups()
    if not unit:
        raise ValueError(f"{text!r} is not a size; give a unit, e.g. 512MB")
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"{text!r} is not a size; give a unit, e.g. 512MB")
    if "." in number:
        # exact arithmetic so that 1.5GB is exactly 1610612736 bytes
        whole, _, frac = number.partition(".")
        scale = 10 ** len(frac)
        return (int(whole or "0") * scale + int(frac or "0")) * factor // scale
    return int(number) * factor


def parse_duration(text: str) -> float:
    """A duration in seconds: `30s`, `5m`, `2h`, `1h30m`, `500ms`, `1d`; a bare number is rejected."""
    s = text.strip().lower()
    if not s or _BARE_NUMBER_RE.fullmatch(s):
        raise ValueError(f"{text!r} is not a duration; give a unit, e.g. 30s")
    total = 0.0
    pos = 0
    for m in _DURATION_PART_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"{text!r} is not a duration; use s, m, h or d, e.g. 30s or 1h30m")
    return total


def parse_percentage(text: str) -> float:
    """`75%` is 0.75."""
    m = _PERCENT_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a percentage; give a percent sign, e.g. 75%")
    return float(m.group(1)) / 100.0


def parse_list(text: str) -> list[str]:
    """Comma-separated items: `git, curl`, `[a,b]`, `['8.8.8.8', "8.8.4.4"]`.

    Spaces around commas go, empty items are dropped; commas inside quotes do not split; brackets
    around the whole value and quotes around each item are stripped.
    """
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    items: list[str] = []
    buf: list[str] = []
    quote = ""
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\" and i + 1 < n and s[i + 1] == quote:
                buf.append(c + quote)
                i += 2
                continue
            if c == quote:
                quote = ""
            buf.append(c)
        elif c in "'\"":
            quote = c
            buf.append(c)
        elif c == ",":
            items.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    items.append("".join(buf))
    out: list[str] = []
    for raw in items:
        item = raw.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            q = item[0]
            item = item[1:-1].replace("\\" + q, q)
        if item:
            out.append(item)
    return out


def parse_str(text: str) -> str:
    return text


READERS = {
    "str": parse_str,
    "int": parse_int,
    "bool": parse_bool,
    "size": parse_size,
    "duration": parse_duration,
    "list": parse_list,
    "percentage": parse_percentage,
}
