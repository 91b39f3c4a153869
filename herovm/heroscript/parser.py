"""Reading HeroScript text into a Playbook (the language: docs/heroscript.md)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from .errors import HeroScriptError
from .model import KINDS, Action, Dropped, Params, Playbook

_WS = " \t"
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_,./")
_KEY_RE = re.compile(r"[A-Za-z0-9_,./]+")
_WORD_RE = re.compile(r"[^ \t:]+")
_NONWS_RE = re.compile(r"[^ \t]+")
_PARAM_LIKE_RE = re.compile(r"[A-Za-z0-9_,./]+:")
_NAME_DROP_RE = re.compile(r"[^a-z0-9_]+")
_NAME_TO_UNDERSCORE = str.maketrans({"-": "_", ";": "_", ":": "_", ".": "_", " ": "_"})
_MULTILINE_OPENERS = ("'''", '"""', "'", '"')
INCLUDE_ACTION = "play.include"


def normalize_name(part: str) -> str:
    """Lower-case; `- ; : .` and space become `_`; anything else outside [a-z0-9_] is dropped."""
    return _NAME_DROP_RE.sub("", part.lower().translate(_NAME_TO_UNDERSCORE))


def _norm_comment(text: str) -> str:
    # like the reference: the text after `//`, leading slashes and spaces removed
    # (and no trailing carriage return: written back, it would read as the line's end)
    return text.lstrip("/" + _WS).rstrip(_WS + "\r")


def dedent_content(lines: list[str]) -> str:
    """Multi-line value content: remove the common leading white space, keep relative indentation."""
    margin: str | None = None
    for ln in lines:
        stripped = ln.lstrip(_WS)
        if not stripped:
            continue
        lead = ln[: len(ln) - len(stripped)]
        margin = lead if margin is None else _common_prefix(margin, lead)
        if not margin:
            break
    if margin is None:  # only blank lines: they share whatever white space they all have
        for ln in lines:
            if ln:
                margin = ln if margin is None else _common_prefix(margin, ln)
    if not margin:
        return "\n".join(lines)
    cut = len(margin)
    return "\n".join(ln[cut:] if ln.startswith(margin) else "" for ln in lines)


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def _variable_pattern(variables: Mapping[str, str]) -> re.Pattern[str]:
    return re.compile(r"\$?\{(" + "|".join(re.escape(k) for k in variables) + r")\}")


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """Replace `${NAME}` and `{NAME}` for the given names only, in one pass (a value is never read again)."""
    if not variables:
        return text
    return _variable_pattern(variables).sub(lambda m: str(variables[m.group(1)]), text)


def referenced(text: str, variables: Mapping[str, str]) -> list[str]:
    """The names of `variables` that `text` refers to (`${NAME}` or `{NAME}`), in order, once each."""
    if not variables:
        return []
    return list(dict.fromkeys(m.group(1) for m in _variable_pattern(variables).finditer(text)))


def apply_variables(actions: list[Action], variables: Mapping[str, str] | None) -> None:
    """Substitute variables into parsed values: parameter values and arguments, never the script's text, so
    a value can neither end a quote nor start a line, and cannot add an action, a parameter or an argument.
    A parameter whose value changed keeps what was written in `ParamEntry.raw`."""
    if not variables:
        return
    pattern = _variable_pattern(variables)

    def sub(m: re.Match[str]) -> str:
        return str(variables[m.group(1)])

    for action in actions:
        action.variables = dict(variables)
        for _key, entry in action.params.entries():
            if "{" in entry.value:
                value = pattern.sub(sub, entry.value)
                if value != entry.value:
                    entry.raw, entry.value = entry.value, value
        action.args = [pattern.sub(sub, a) if "{" in a else a for a in action.args]


class _Parser:
    def __init__(self, text: str, file: str) -> None:
        self.file = file
        if text.startswith("\ufeff"):
            text = text[1:]
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
        self.lines = lines
        self.linenos = list(range(1, len(lines) + 1))
        # lead[i]: index of the first non-blank character; -1 for blank lines
        lead: list[int] = []
        width: list[int] = []
        for ln in lines:
            stripped = ln.lstrip(_WS)
            if not stripped:
                lead.append(-1)
                width.append(0)
                continue
            k = len(ln) - len(stripped)
            lead.append(k)
            width.append(k + 3 * ln.count("\t", 0, k))
        margin = min((w for w, k in zip(width, lead, strict=True) if k >= 0), default=0)
        self.lead = lead
        self.indent = [w - margin if k >= 0 else -1 for w, k in zip(width, lead, strict=True)]
        self.pb = Playbook(path=None if file == "<string>" else file)
        self._pending: list[str] = []  # `//` comments inside a block waiting for the next parameter
        self._pending_pos: tuple[int, int] = (0, 0)

    # --- errors -------------------------------------------------------------------------------------
    def error(self, i: int, col0: int, message: str, hint: str | None = None) -> HeroScriptError:
        return HeroScriptError(message, file=self.file, line=self.linenos[i], col=col0 + 1, hint=hint)

    # --- top level ------------------------------------------------------------------------------------
    def parse(self) -> Playbook:
        lines, lead = self.lines, self.lead
        n = len(lines)
        comments: list[str] = []
        comments_at: tuple[int, int] | None = None
        i = 0
        while i < n:
            k = lead[i]
            if k < 0:
                i += 1
                continue
            line = lines[i]
            c = line[k]
            if c == "!" and not line.startswith("![", k):
                i = self._action(i, comments)
                comments = []
                comments_at = None
                continue
            if c == "/" and line.startswith("//", k):
                if not comments:
                    comments_at = (self.linenos[i], k + 1)
                comments.append(_norm_comment(line[k + 2 :]))
                i += 1
                continue
            if c == "<" and line.startswith("<!--", k):
                self.pb.dropped.append(Dropped(self.linenos[i], k + 1, "<!-- comment -->"))
                i, _ = self._skip_html(i, k)
                i += 1
                continue
            # ignored text (prose, headings, code fences, a shebang); it separates comments from actions
            if comments and comments_at is not None:
                self.pb.dropped.append(Dropped(*comments_at, "// comment not attached to an action"))
                comments = []
                comments_at = None
            if i == 0 and line.startswith("#!"):
                self.pb.shebang = line
            else:
                self.pb.dropped.append(Dropped(self.linenos[i], k + 1, "text outside actions"))
            i += 1
        if comments and comments_at is not None:
            self.pb.dropped.append(Dropped(*comments_at, "// comment not attached to an action"))
        return self.pb

    def _skip_html(self, i: int, k: int) -> tuple[int, int]:
        """`<!--` at lines[i][k]; return (line index, column index) just after the closing `-->`."""
        start = i
        pos = k + 4
        n = len(self.lines)
        while i < n:
            end = self.lines[i].find("-->", pos)
            if end >= 0:
                return i, end + 3
            i += 1
            pos = 0
        raise self.error(start, k, "unclosed <!-- comment", hint="close it with -->")

    # --- actions ----------------------------------------------------------------------------------------
    def _action(self, i: int, comments: list[str]) -> int:
        line = self.lines[i]
        k = self.lead[i]
        j = k
        n = len(line)
        while j < n and line[j] == "!":
            j += 1
        bangs = j - k
        if bangs > 4:
            raise self.error(
                i,
                k,
                f"{bangs} '!' start this line; an action starts with 1 to 4",
                hint="use !! for an action",
            )
        m = _NONWS_RE.match(line, j)
        raw = m.group() if m else ""
        if not raw:
            raise self.error(i, j, "action name missing after '" + "!" * bangs + "'", hint="e.g. !!vm.create")
        parts = raw.split(".")
        if len(parts) > 2:
            raise self.error(
                i,
                j,
                f"action name '{raw}' has {len(parts)} dotted parts; use actor.name",
                hint="an action name is actor.name or just name",
            )
        if len(parts) == 1:
            actor, name = "core", normalize_name(parts[0])
        else:
            actor, name = normalize_name(parts[0]), normalize_name(parts[1])
        if not actor or not name:
            raise self.error(i, j, f"action name '{raw}' has an empty part", hint="e.g. !!vm.create")
        lineno = self.linenos[i]
        action = Action(
            kind=KINDS[bangs - 1],
            actor=actor,
            name=name,
            params=Params(file=self.file, line=lineno, col=k + 1, owner=f"{actor}.{name}"),
            args=[],
            comments=list(comments),
            file=self.file,
            line=lineno,
            col=k + 1,
        )
        self._pending = []
        nxt = self._scan(action, i, j + len(raw))
        while True:
            b = self._next_block_line(nxt)
            if b is None:
                break
            nxt = self._scan(action, b, self.lead[b])
        if self._pending:
            self.pb.dropped.append(Dropped(*self._pending_pos, "// comment not followed by a parameter"))
            self._pending = []
        self.pb.actions.append(action)
        return nxt

    def _next_block_line(self, j: int) -> int | None:
        """Index of the next continuation line of the current block at or after j, or None if it ended."""
        lines, lead, indent = self.lines, self.lead, self.indent
        n = len(lines)
        blank_seen = False
        while j < n:
            k = lead[j]
            if k < 0:
                blank_seen = True
                j += 1
                continue
            line = lines[j]
            if line[k] == "!":
                return None
            ind = indent[j]
            if ind >= 2:
                return j
            if ind == 1:
                raise self.error(
                    j,
                    k,
                    "line indented by 1 space inside an action block",
                    hint="indent parameter lines by 2 or more spaces, or not at all to end the action",
                )
            if not blank_seen and _PARAM_LIKE_RE.match(line, k):
                raise self.error(
                    j,
                    k,
                    "parameter lines must be indented by 2 spaces",
                    hint="indent this line, or put a blank line above it if it is not part of the action",
                )
            return None
        return None

    # --- parameter text -----------------------------------------------------------------------------------
    def _scan(self, action: Action, i: int, pos: int) -> int:
        """Read parameters and arguments from lines[i][pos:]; return the index of the next unread line."""
        line = self.lines[i]
        n = len(line)
        while True:
            while pos < n and line[pos] in _WS:
                pos += 1
            if pos >= n:
                return i + 1
            c = line[pos]
            if c == "/" and line.startswith("//", pos):
                if not self._pending:
                    self._pending_pos = (self.linenos[i], pos + 1)
                self._pending.append(_norm_comment(line[pos + 2 :]))
                return i + 1
            if c == "<" and line.startswith("<!--", pos):
                self.pb.dropped.append(Dropped(self.linenos[i], pos + 1, "<!-- comment -->"))
                i, pos = self._skip_html(i, pos)
                line = self.lines[i]
                n = len(line)
                continue
            if c == "#":
                raise self.error(
                    i, pos, "'#' does not start a comment in HeroScript", hint="use // for comments"
                )
            if c == ":":
                raise self.error(i, pos, "a parameter needs a name before ':'", hint="write name:value")
            if c == "'" or c == '"':
                at = (self.linenos[i], pos + 1)
                value, i, pos = self._quoted(i, pos)
                action.args.append(value.strip(_WS))
                action.arg_positions.append(at)
                line = self.lines[i]
                n = len(line)
                continue
            m = _WORD_RE.match(line, pos)
            assert m is not None
            word = m.group()
            end = m.end()
            if end >= n or line[end] != ":":
                action.args.append(word)
                action.arg_positions.append((self.linenos[i], pos + 1))
                pos = end
                continue
            if not _KEY_RE.fullmatch(word):
                bad = next(idx for idx, ch in enumerate(word) if ch not in _KEY_CHARS)
                fixed = "".join(ch if ch in _KEY_CHARS else "_" for ch in word).lower()
                raise self.error(
                    i,
                    pos + bad,
                    f"invalid character {word[bad]!r} in parameter name '{word}'",
                    hint=f"parameter names use letters, digits and _ , . / (e.g. {fixed}:)",
                )
            key = word.lower()
            key_line, key_col = self.linenos[i], pos + 1
            i, pos, value = self._value(i, end + 1, key)
            line = self.lines[i] if i < len(self.lines) else ""
            n = len(line)
            comment = "\n".join(self._pending) if self._pending else None
            self._pending = []
            action.params.set(key, value, line=key_line, col=key_col, comment=comment)
            if pos < 0:  # a multi-line value consumed lines up to (not including) i
                return i

    def _value(self, i: int, pos: int, key: str) -> tuple[int, int, str]:
        """Read the value after `key:`; returns (line index, position, value); position -1 means
        the value ended a line and line index is the next unread line."""
        line = self.lines[i]
        n = len(line)
        p = pos
        while p < n and line[p] in _WS:
            p += 1
        if p >= n:
            return i, p, ""
        c = line[p]
        if p > pos and (line.startswith("//", p) or line.startswith("<!--", p)):
            return i, p, ""
        if c == "'" or c == '"':
            rest = line[p:].rstrip(_WS)
            if rest in _MULTILINE_OPENERS:
                return self._multiline(i, p, rest, key)
            value, i, p = self._quoted(i, p)
        elif c == "[":
            value, i, p = self._bracket(i, p)
        else:
            m = _NONWS_RE.match(line, p)
            assert m is not None
            value = m.group()
            end = m.end()
            if value.endswith(","):
                q = end
                while q < n and line[q] in _WS:
                    q += 1
                if q < n and not line.startswith("//", q) and not line.startswith("<!--", q):
                    word = _NONWS_RE.match(line, q)  # not str.split(): that splits at \u2028 too
                    nxt = word.group() if word else ""
                    raise self.error(
                        i,
                        q,
                        f"{key}: the value '{value}' ends with a comma and is followed by '{nxt}'",
                        hint=f"a list with spaces must be quoted: {key}:'{value} {nxt}'",
                    )
            p = end
        value = value.strip(_WS)
        if "<BR>" in value:
            value = value.replace("<BR>", "\n")
        return i, p, value

    def _quoted(self, i: int, p: int) -> tuple[str, int, int]:
        """A quoted value or argument at lines[i][p]; it may run on over following block lines."""
        open_i, open_p = i, p
        line = self.lines[i]
        q = line[p]
        start = p + 1
        parts: list[str] = []
        while True:
            k = line.find(q, start)
            while k > start and line[k - 1] == "\\":
                k = line.find(q, k + 1)
            if k >= 0:
                parts.append(line[start:k])
                after = k + 1
                if after < len(line) and line[after] not in _WS:
                    raise self.error(
                        i,
                        after,
                        f"expected white space after the closing quote, found {line[after]!r}",
                        hint="separate parameters with spaces; quote the whole value",
                    )
                text = " ".join(parts)
                if "\\" in text:
                    text = text.replace("\\" + q, q)
                return text, i, after
            parts.append(line[start:].rstrip(_WS))
            j = self._next_block_line(i + 1)
            if j is None:
                raise self.error(
                    open_i,
                    open_p,
                    f"unclosed quote {q}",
                    hint=f"close it with {q}; for a multi-line value put {q} alone at the end of the line",
                )
            i = j
            line = self.lines[i]
            start = self.lead[i]

    def _bracket(self, i: int, p: int) -> tuple[str, int, int]:
        """An unquoted `[...]` value: runs to the matching `]`, quotes respected."""
        open_i, open_p = i, p
        line = self.lines[i]
        parts: list[str] = []
        depth = 0
        quote = ""
        start = p
        k = p
        while True:
            n = len(line)
            while k < n:
                c = line[k]
                if quote:
                    if c == quote and line[k - 1] != "\\":
                        quote = ""
                elif c == "'" or c == '"':
                    quote = c
                elif c == "[":
                    depth += 1
                elif c == "]":
                    depth -= 1
                    if depth == 0:
                        parts.append(line[start : k + 1])
                        after = k + 1
                        if after < n and line[after] not in _WS:
                            raise self.error(
                                i,
                                after,
                                f"expected white space after ']', found {line[after]!r}",
                                hint="quote the whole value",
                            )
                        return " ".join(parts), i, after
                k += 1
            parts.append(line[start:].rstrip(_WS))
            j = self._next_block_line(i + 1)
            if j is None:
                raise self.error(open_i, open_p, "unclosed '['", hint="close the list with ]")
            i = j
            line = self.lines[i]
            start = k = self.lead[i]

    def _multiline(self, i: int, p: int, delim: str, key: str) -> tuple[int, int, str]:
        lines = self.lines
        n = len(lines)
        j = i + 1
        while j < n:
            if lines[j].strip(_WS) == delim:
                return j + 1, -1, dedent_content(lines[i + 1 : j])
            j += 1
        raise self.error(
            i,
            p,
            f"multi-line value of '{key}' is never closed",
            hint=f"end it with a line holding only {delim}",
        )


def parse(
    text: str,
    *,
    path: str | os.PathLike[str] | None = None,
    variables: Mapping[str, str] | None = None,
    resolve_includes: bool = True,
) -> Playbook:
    """Parse HeroScript text. FILE in errors is `path`, or `<string>`.

    `variables` are substituted into the parsed values (parameters and arguments), not into the text.
    `!!play.include path:...` is replaced by the included file's actions (relative to `path`'s
    directory, or the current directory) unless resolve_includes is False.
    """
    file = os.fspath(path) if path is not None else "<string>"
    pb = _Parser(text, file).parse()
    apply_variables(pb.actions, variables)
    if resolve_includes:
        stack = [os.path.realpath(file)] if path is not None else []
        _resolve_includes(pb, variables, stack)
    return pb


def load(
    path: str | os.PathLike[str],
    *,
    variables: Mapping[str, str] | None = None,
    resolve_includes: bool = True,
) -> Playbook:
    """Read and parse a file (UTF-8)."""
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise HeroScriptError(f"cannot read {file}: {exc}", file=file, line=1, col=1) from None
    return parse(text, path=file, variables=variables, resolve_includes=resolve_includes)


def _resolve_includes(pb: Playbook, variables: Mapping[str, str] | None, stack: list[str]) -> None:
    if not any(a.actor == "play" and a.name == "include" for a in pb.actions):
        return
    out: list[Action] = []
    for action in pb.actions:
        if action.fullname != INCLUDE_ACTION:
            out.append(action)
            continue
        target = action.params.get_str("path")
        line, col = action.params.position("path")
        if not target:
            raise HeroScriptError("play.include: path is empty", file=action.file, line=line, col=col)
        if "\0" in target:
            raise HeroScriptError(
                "play.include: the path contains a NUL character",
                file=action.file,
                line=line,
                col=col,
                hint="a file name cannot contain NUL",
            )
        base = os.path.dirname(action.file) if action.file != "<string>" else os.getcwd()
        full = os.path.normpath(os.path.join(base, target))
        real = os.path.realpath(full)
        if real in stack:
            chain = " -> ".join([*stack[stack.index(real) :], real])
            raise HeroScriptError(
                f"play.include: include cycle: {chain}",
                file=action.file,
                line=line,
                col=col,
                hint="a file cannot include itself, directly or through other files",
            )
        try:
            with open(full, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise HeroScriptError(
                f"play.include: cannot read '{target}': {exc.strerror if isinstance(exc, OSError) else exc}",
                file=action.file,
                line=line,
                col=col,
                hint=f"the path is relative to {base}",
            ) from None
        sub = _Parser(text, full).parse()
        apply_variables(sub.actions, variables)
        _resolve_includes(sub, variables, [*stack, real])
        out.extend(sub.actions)
    pb.actions = out
