"""The parsed form of a script: Playbook -> Action -> Params."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import HeroScriptError
from .values import (
    parse_bool,
    parse_duration,
    parse_int,
    parse_list,
    parse_percentage,
    parse_size,
)

KINDS = ("dal", "sal", "macro", "wal")  # one to four leading `!`

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "<required>"


MISSING: Any = _Missing()


@dataclass
class ParamEntry:
    """One parameter as read: value plus where it was (positions are 1-based)."""

    value: str
    line: int = 0
    col: int = 0
    comment: str | None = None  # `//` lines just above it in the block, joined with "\n"
    raw: str | None = None  # the value as written, when variables changed it (parse(variables=...))


class Params:
    """Ordered key -> str value, with the source position (and comment) of each key.

    Typed readers raise HeroScriptError pointing at the parameter (or at the action when it is missing).
    """

    def __init__(
        self,
        items: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        *,
        file: str = "<string>",
        line: int = 0,
        col: int = 0,
        owner: str = "",
    ) -> None:
        self._entries: dict[str, ParamEntry] = {}
        # earlier occurrences of a repeated key: (key, line, col)
        self.repeated: list[tuple[str, int, int]] = []
        self.file = file
        self.line = line
        self.col = col
        self.owner = owner
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            for key, value in pairs:
                self.set(key, value)

    # --- building ---------------------------------------------------------------------------------
    def set(self, key: str, value: str, *, line: int = 0, col: int = 0, comment: str | None = None) -> None:
        """Set a value; a repeated key keeps its first place in the order, the last value wins."""
        old = self._entries.get(key)
        if old is not None:
            self.repeated.append((key, old.line, old.col))
        self._entries[key] = ParamEntry(value, line, col, comment)

    # --- mapping protocol --------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> str:
        return self._entries[key].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[str]:
        return [e.value for e in self._entries.values()]

    def items(self) -> list[tuple[str, str]]:
        return [(k, e.value) for k, e in self._entries.items()]

    def entry(self, key: str) -> ParamEntry:
        return self._entries[key]

    def entries(self) -> list[tuple[str, ParamEntry]]:
        return list(self._entries.items())

    def comment(self, key: str) -> str | None:
        return self._entries[key].comment

    def position(self, key: str) -> tuple[int, int]:
        e = self._entries[key]
        return e.line, e.col

    def to_dict(self) -> dict[str, str]:
        return {k: e.value for k, e in self._entries.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Params):
            return NotImplemented
        mine = [(k, e.value, e.comment) for k, e in self._entries.items()]
        theirs = [(k, e.value, e.comment) for k, e in other._entries.items()]
        return mine == theirs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Params({self.to_dict()!r})"

    # --- typed readers -----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        e = self._entries.get(key)
        return default if e is None else e.value

    def _read(self, key: str, default: Any, reader: Callable[[str], T], empty_is_default: bool = False) -> T:
        e = self._entries.get(key)
        if e is None or (empty_is_default and e.value.strip() == "" and default is not MISSING):
            if default is MISSING:
                where = f"{self.owner}: " if self.owner else ""
                raise HeroScriptError(
                    f"{where}missing parameter '{key}'",
                    file=self.file,
                    line=self.line,
                    col=self.col,
                    hint=f"add {key}:VALUE",
                )
            return default
        try:
            return reader(e.value)
        except ValueError as exc:
            raise HeroScriptError(f"{key}: {exc}", file=self.file, line=e.line, col=e.col) from None

    def get_str(self, key: str, default: Any = MISSING) -> str:
        return self._read(key, default, str)

    def get_int(self, key: str, default: Any = MISSING) -> int:
        return self._read(key, default, parse_int)

    def get_bool(self, key: str, default: Any = MISSING) -> bool:
        return self._read(key, default, parse_bool, empty_is_default=True)

    def get_size(self, key: str, default: Any = MISSING) -> int:
        return self._read(key, default, parse_size)

    def get_duration(self, key: str, default: Any = MISSING) -> float:
        return self._read(key, default, parse_duration)

    def get_list(self, key: str, default: Any = MISSING) -> list[str]:
        return self._read(key, default, parse_list)

    def get_percentage(self, key: str, default: Any = MISSING) -> float:
        return self._read(key, default, parse_percentage)


@dataclass
class Action:
    """One `!!actor.name ...` block. Equality ignores where it was read."""

    kind: str
    actor: str
    name: str
    params: Params = field(default_factory=Params)
    args: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    file: str = field(default="<string>", compare=False)
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)
    arg_positions: list[tuple[int, int]] = field(default_factory=list, compare=False, repr=False)
    # the variables substituted into its values (parse(variables=...)), for values that are scripts or lists
    variables: dict[str, str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Params):
            self.params = Params(self.params)
        if not self.params.owner:
            self.params.owner = self.fullname
        if self.params.line == 0:
            self.params.file, self.params.line, self.params.col = self.file, self.line, self.col

    @property
    def fullname(self) -> str:
        return f"{self.actor}.{self.name}"

    def arg_position(self, index: int) -> tuple[int, int]:
        if index < len(self.arg_positions):
            return self.arg_positions[index]
        return self.line, self.col


@dataclass
class Dropped:
    """Text that the parser read but a Playbook cannot hold (prose, orphan comments); fmt refuses it."""

    line: int
    col: int
    what: str


@dataclass
class Playbook:
    actions: list[Action] = field(default_factory=list)
    path: str | None = field(default=None, compare=False)
    shebang: str | None = field(default=None, compare=False)
    dropped: list[Dropped] = field(default_factory=list, compare=False, repr=False)

    def __iter__(self) -> Iterator[Action]:
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, index: int) -> Action:
        return self.actions[index]

    @property
    def file(self) -> str:
        return os.fspath(self.path) if self.path else "<string>"
