"""Writing a Playbook in canonical HeroScript (docs/heroscript.md, "Tools": `herovm script fmt`)."""

from __future__ import annotations

import re

from .model import KINDS, Action, Playbook

_WS = " \t"
_INLINE_MAX = 25
_NAME_RE = re.compile(r"[a-z0-9_]+")
_KEY_RE = re.compile(r"[a-z0-9_,./]+")
_MULTILINE_DELIMS = ("'", "'''", '"', '"""')
_PARAM_INDENT = "    "
_CONTENT_INDENT = "        "


def _needs_quotes(value: str) -> bool:
    if value == "" or value[0] == "[" or value.endswith(","):
        return True
    if "//" in value or "<!--" in value:
        return True
    return any(c in " \t:'\"" or not c.isprintable() for c in value)


def _is_plain_bracket(value: str) -> bool:
    """True when `value` is a `[...]` list that the parser reads back exactly as written."""
    if not (value.startswith("[") and value.endswith("]")) or "\n" in value or "<BR>" in value:
        return False
    depth = 0
    quote = ""
    for k, c in enumerate(value):
        if quote:
            if c == quote and value[k - 1] != "\\":
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return k == len(value) - 1 and all(ch.isprintable() or ch in _WS for ch in value)
    return False


def format_value(value: str) -> str | None:
    """The one-line form of a value, or None when it needs the multi-line form."""
    if "\n" in value or "<BR>" in value or value != value.strip(_WS):
        return None
    if not _needs_quotes(value):
        return value
    if _is_plain_bracket(value):
        return value
    if value.endswith("\\"):  # `\'` would read as an escaped quote
        return None
    return "'" + value.replace("'", "\\'") + "'"


def format_arg(arg: str) -> str:
    if arg and not _needs_quotes(arg) and arg[0] not in "#!" and not arg.startswith("<!--"):
        return arg
    if "\n" in arg or arg != arg.strip(_WS):
        raise ValueError(f"argument {arg!r} cannot be written in HeroScript")
    # A closing quote after a backslash would read as an escaped quote; the parser strips white space
    # inside the quotes, so a space between them keeps the value as it is.
    return "'" + arg.replace("'", "\\'") + (" '" if arg.endswith("\\") else "'")


def _br_form(value: str) -> str | None:
    """A value with newlines on one line, written as `<BR>`: for lines ending in a carriage return, which the
    multi-line form cannot keep (the parser reads them as line ends). None when it cannot be written so."""
    if "<BR>" in value or value != value.strip(_WS):
        return None
    text = value.replace("'", "\\'").replace("\n", "<BR>")
    return "'" + text + (" '" if text.endswith("\\") else "'")


def _multiline(key: str, value: str) -> list[str]:
    lines = value.split("\n")
    if any(ln.endswith("\r") for ln in lines):
        one_line = _br_form(value)
        if one_line is None:
            raise ValueError(f"{key}: a line ends with a carriage return and the value holds <BR>")
        return [f"{_PARAM_INDENT}{key}:{one_line}"]
    stripped = {ln.strip(_WS) for ln in lines}
    delim = next((d for d in _MULTILINE_DELIMS if d not in stripped), None)
    if delim is None:
        raise ValueError(f"{key}: the value has lines ' and ''' and \" and \"\"\"; no delimiter is left")
    out = [f"{_PARAM_INDENT}{key}:{delim}"]
    out.extend(_CONTENT_INDENT + ln if ln else "" for ln in lines)
    out.append(_PARAM_INDENT + delim)
    return out


def _check_name(what: str, text: str, pattern: re.Pattern[str]) -> None:
    if not pattern.fullmatch(text) or text.startswith("//"):
        raise ValueError(f"{what} {text!r} cannot be written in HeroScript")


def dump_action(action: Action) -> list[str]:
    """The lines of one action in canonical form."""
    if action.kind not in KINDS:
        raise ValueError(f"unknown action kind {action.kind!r}; expected one of {', '.join(KINDS)}")
    _check_name("actor", action.actor, _NAME_RE)
    _check_name("action name", action.name, _NAME_RE)
    out = [f"// {c}" if c else "//" for comment in action.comments for c in comment.split("\n")]
    head = ["!" * (KINDS.index(action.kind) + 1) + action.fullname]
    head.extend(format_arg(a) for a in action.args)
    below: list[str] = []
    inline = True
    for key, entry in action.params.entries():
        _check_name("parameter name", key, _KEY_RE)
        value = entry.value
        one_line = format_value(value)
        if inline and one_line is not None and entry.comment is None and len(value) <= _INLINE_MAX:
            head.append(f"{key}:{one_line}")
            continue
        inline = False
        if entry.comment is not None:
            below.extend(
                f"{_PARAM_INDENT}// {c}" if c else f"{_PARAM_INDENT}//" for c in entry.comment.split("\n")
            )
        if one_line is None:
            below.extend(_multiline(key, value))
        else:
            below.append(f"{_PARAM_INDENT}{key}:{one_line}")
    out.append(" ".join(head))
    out.extend(below)
    return out


def dumps(playbook: Playbook) -> str:
    """Canonical HeroScript for a playbook; ends with a newline (empty playbook: empty string)."""
    out: list[str] = []
    if playbook.shebang:
        out.append(playbook.shebang)
        out.append("")
    prev_multi = False
    for idx, action in enumerate(playbook.actions):
        lines = dump_action(action)
        multi = len(lines) > 1
        if idx > 0 and (multi or prev_multi):
            out.append("")
        out.extend(lines)
        prev_multi = multi
    return "\n".join(out) + "\n" if out else ""
