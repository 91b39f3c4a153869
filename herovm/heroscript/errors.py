"""Diagnostics: one Problem per finding, HeroScriptError when something must stop."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One diagnostic at FILE:LINE:COL (1-based)."""

    file: str
    line: int
    col: int
    message: str
    hint: str | None = None
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        label = "warning: " if self.severity == "warning" else ""
        text = f"{self.file}:{self.line}:{self.col}: {label}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class HeroScriptError(Exception):
    """A script that cannot be read or run; str() is `FILE:LINE:COL: message` (+ `  hint: ...`)."""

    def __init__(
        self,
        message: str,
        *,
        file: str = "<string>",
        line: int = 0,
        col: int = 0,
        hint: str | None = None,
        problems: Iterable[Problem] | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.col = col
        self.message = message
        self.hint = hint
        self.problems: list[Problem] = (
            list(problems) if problems is not None else [Problem(file, line, col, message, hint)]
        )
        super().__init__(self._text())

    @classmethod
    def from_problems(cls, problems: Iterable[Problem]) -> HeroScriptError:
        """One error listing every problem; file/line/col/message/hint are those of the first."""
        probs = list(problems)
        if not probs:
            raise ValueError("from_problems needs at least one problem")
        first = probs[0]
        return cls(
            first.message, file=first.file, line=first.line, col=first.col, hint=first.hint, problems=probs
        )

    @property
    def problem(self) -> Problem:
        return Problem(self.file, self.line, self.col, self.message, self.hint)

    def _text(self) -> str:
        if len(self.problems) > 1:
            return "\n".join(str(p) for p in self.problems)
        return str(self.problem)

    def __str__(self) -> str:
        return self._text()

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working with keyword args
        return (_rebuild, (self.message, self.file, self.line, self.col, self.hint, self.problems))


def _rebuild(message, file, line, col, hint, problems) -> HeroScriptError:
    return HeroScriptError(message, file=file, line=line, col=col, hint=hint, problems=problems)
