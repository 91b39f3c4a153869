"""Action handlers: declaring them (Registry), checking a playbook (validate), running it (run)."""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import HeroScriptError, Problem
from .model import Action, Playbook
from .parser import substitute
from .values import READERS, parse_list

PARAM_TYPES = tuple(READERS)
_WHOLE_VARIABLE = re.compile(r"\$?\{([^{}]*)\}")


@dataclass
class Param:
    """A declared parameter. `default` may be typed (1024, False) or text ("1GB").

    `check(value)` judges a value given in the script once it is read as its type, and raises ValueError to
    refuse it (reported at the value, as `NAME: message`); a default is not checked. `unique`: no two
    actions of this kind in one script may give the same value (a service's name)."""

    name: str
    type: str = "str"
    required: bool = False
    default: Any = None
    help: str = ""
    check: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)
    unique: bool = False

    def __post_init__(self) -> None:
        if self.type not in READERS:
            raise ValueError(f"parameter {self.name!r}: unknown type {self.type!r}; use one of {PARAM_TYPES}")
        if isinstance(self.default, str) and self.type != "str":
            self.default = READERS[self.type](self.default)


@dataclass
class Call:
    """What a handler receives."""

    action: Action
    values: dict[str, Any]
    args: list[str]
    context: Any = None


@dataclass
class ActionSpec:
    fullname: str
    handler: Callable[[Call], Any]
    help: str = ""
    example: str = ""
    params: list[Param] = field(default_factory=list)
    args: bool = False
    check: Callable[[Call], None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


class Registry:
    """Handlers by `actor.name`."""

    def __init__(self) -> None:
        self._specs: dict[str, ActionSpec] = {}

    def action(
        self,
        fullname: str,
        *,
        help: str = "",
        example: str = "",
        params: Iterable[Param] = (),
        args: bool = False,
        check: Callable[[Call], None] | None = None,
    ) -> Callable[[Callable[[Call], Any]], Callable[[Call], Any]]:
        """Decorator registering a handler. `check(call)` may raise ValueError to reject values early."""

        def deco(fn: Callable[[Call], Any]) -> Callable[[Call], Any]:
            self.add(fullname, fn, help=help, example=example, params=params, args=args, check=check)
            return fn

        return deco

    def add(
        self,
        fullname: str,
        handler: Callable[[Call], Any],
        *,
        help: str = "",
        example: str = "",
        params: Iterable[Param] = (),
        args: bool = False,
        check: Callable[[Call], None] | None = None,
    ) -> ActionSpec:
        if fullname.count(".") != 1:
            raise ValueError(f"action name {fullname!r} must be actor.name")
        if fullname in self._specs:
            raise ValueError(f"action {fullname!r} is already registered")
        plist = list(params)
        names = [p.name for p in plist]
        if len(set(names)) != len(names):
            raise ValueError(f"action {fullname!r}: a parameter is declared twice")
        spec = ActionSpec(fullname, handler, help, example, plist, args, check)
        self._specs[fullname] = spec
        return spec

    def get(self, fullname: str) -> ActionSpec | None:
        return self._specs.get(fullname)

    def __contains__(self, fullname: object) -> bool:
        return fullname in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ActionSpec]:
        return [self._specs[n] for n in sorted(self._specs)]

    def copy(self) -> Registry:
        new = Registry()
        new._specs = dict(self._specs)
        return new

    def merge(self, *others: Registry) -> Registry:
        """A new registry with this one's actions and the others'; a name in two of them is an error."""
        new = self.copy()
        for other in others:
            for name, spec in other._specs.items():
                if name in new._specs and new._specs[name] is not spec:
                    raise ValueError(f"action {name!r} is registered twice")
                new._specs[name] = spec
        return new


class ActionFailed(Exception):
    """Raised by a handler to report a failure."""

    def __init__(self, message: str, exit_code: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.output = output


@dataclass
class ActionResult:
    action: Action
    index: int
    ok: bool
    seconds: float
    value: Any = None
    error: str | None = None
    exit_code: int | None = None
    output: str = ""


def _close(word: str, options: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)


def repeated_key_warnings(playbook: Playbook) -> list[Problem]:
    """A warning per repeated key (the last value wins), at the earlier occurrence."""
    out: list[Problem] = []
    for action in playbook.actions:
        for key, line, col in action.params.repeated:
            last_line, last_col = action.params.position(key)
            out.append(
                Problem(
                    action.file,
                    line,
                    col,
                    f"{action.fullname}: parameter '{key}' is given again at {last_line}:{last_col}; "
                    "the last value wins",
                    hint="remove one of them",
                    severity="warning",
                )
            )
    return out


def _list_with_variables(written: str, variables: dict[str, str]) -> list[str]:
    """A list parameter as written, split into items before variables go in: a variable inside an item is
    part of that item, however many commas it holds (`env:'A=${X}'` is one item, whatever X is); a variable
    that is a whole item stands for items of its own (`names:'${PACKAGES}'` with PACKAGES=git,curl is two)."""
    out: list[str] = []
    for item in parse_list(written):
        whole = _WHOLE_VARIABLE.fullmatch(item)
        if whole is not None and whole.group(1) in variables:
            out.extend(parse_list(variables[whole.group(1)]))
        else:
            out.append(substitute(item, variables))
    return out


def _typed_values(action: Action, spec: ActionSpec, problems: list[Problem]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    params = action.params
    for p in spec.params:
        if p.name not in params:
            if p.required:
                problems.append(
                    Problem(
                        action.file,
                        action.line,
                        action.col,
                        f"{action.fullname}: missing parameter '{p.name}'",
                        hint=f"add {p.name}:VALUE" + (f" ({p.help})" if p.help else ""),
                    )
                )
            values[p.name] = list(p.default) if isinstance(p.default, list) else p.default
            continue
        raw = params[p.name]
        if p.type == "bool" and raw.strip() == "":
            values[p.name] = p.default
            continue
        try:
            written = params.entry(p.name).raw
            if p.type == "list" and written is not None and action.variables:
                values[p.name] = _list_with_variables(written, action.variables)
            else:
                values[p.name] = READERS[p.type](raw)
        except ValueError as exc:
            line, col = params.position(p.name)
            problems.append(Problem(action.file, line, col, f"{p.name}: {exc}"))
            continue
        if p.check is not None:
            try:
                p.check(values[p.name])
            except ValueError as exc:
                line, col = params.position(p.name)
                hint = (
                    "a variable given no value stays as written: give it one (herovm up --var NAME=VALUE)"
                    if "${" in str(values[p.name])
                    else None
                )
                problems.append(Problem(action.file, line, col, f"{p.name}: {exc}", hint=hint))
    return values


def _unique_problems(checked: list[tuple[Action, ActionSpec, dict[str, Any]]]) -> list[Problem]:
    """A value of a `unique` parameter given again by a later action of the same kind."""
    problems: list[Problem] = []
    seen: dict[tuple[str, str, Any], Action] = {}
    for action, spec, values in checked:
        for p in spec.params:
            if not p.unique or p.name not in action.params or values.get(p.name) in (None, ""):
                continue
            first = seen.setdefault((spec.fullname, p.name, str(values[p.name])), action)
            if first is not action:
                line, col = action.params.position(p.name)
                where = "{}:{}".format(*first.params.position(p.name))
                if first.file != action.file:
                    where = f"{first.file}:{where}"
                problems.append(
                    Problem(
                        action.file,
                        line,
                        col,
                        f"{spec.fullname}: {p.name} {values[p.name]!r} is already given at {where}",
                        hint=f"each !!{spec.fullname} needs its own {p.name}",
                    )
                )
    return problems


def _check_action(action: Action, registry: Registry, problems: list[Problem]) -> dict[str, Any] | None:
    spec = registry.get(action.fullname)
    if spec is None:
        close = _close(action.fullname, registry.names())
        problems.append(
            Problem(
                action.file,
                action.line,
                action.col,
                f"unknown action '{action.fullname}'",
                hint=f"did you mean {' or '.join(close)}?"
                if close
                else "see the list of actions in the docs",
            )
        )
        return None
    declared = [p.name for p in spec.params]
    for key in action.params:
        if key not in declared:
            line, col = action.params.position(key)
            close = _close(key, declared)
            if close:
                hint = f"did you mean {' or '.join(close)}?"
            elif declared:
                hint = f"{action.fullname} takes: {', '.join(declared)}"
            else:
                hint = f"{action.fullname} takes no parameters"
            problems.append(
                Problem(action.file, line, col, f"{action.fullname}: unknown parameter '{key}'", hint=hint)
            )
    if action.args and not spec.args:
        line, col = action.arg_position(0)
        problems.append(
            Problem(
                action.file,
                line,
                col,
                f"{action.fullname}: takes no bare arguments, got {' '.join(repr(a) for a in action.args)}",
                hint="write parameters as name:value",
            )
        )
    before = len(problems)
    values = _typed_values(action, spec, problems)
    if spec.check is not None and len(problems) == before:
        try:
            spec.check(Call(action, values, list(action.args)))
        except HeroScriptError as exc:
            problems.extend(exc.problems)
        except ValueError as exc:
            problems.append(Problem(action.file, action.line, action.col, f"{action.fullname}: {exc}"))
    return values


def validate(playbook: Playbook, registry: Registry) -> list[Problem]:
    """Every problem of every action (errors and warnings), in file order; nothing is run."""
    problems: list[Problem] = []
    checked: list[tuple[Action, ActionSpec, dict[str, Any]]] = []
    for action in playbook.actions:
        values = _check_action(action, registry, problems)
        spec = registry.get(action.fullname)
        if values is not None and spec is not None:
            checked.append((action, spec, values))
    problems.extend(_unique_problems(checked))
    problems.extend(repeated_key_warnings(playbook))
    problems.sort(key=lambda p: (p.file, p.line, p.col))
    return problems


def run(
    playbook: Playbook,
    registry: Registry,
    context: Any = None,
    *,
    on_start: Callable[[Action, int], Any] | None = None,
    on_end: Callable[[ActionResult], Any] | None = None,
    keep_going: bool = False,
) -> list[ActionResult]:
    """Validate everything, then run the actions in file order; stop at the first failure unless
    keep_going. Raises HeroScriptError listing every error if validation fails (nothing is run)."""
    problems: list[Problem] = []
    prepared: list[tuple[Action, ActionSpec, dict[str, Any]]] = []
    for action in playbook.actions:
        values = _check_action(action, registry, problems)
        spec = registry.get(action.fullname)
        if values is not None and spec is not None:
            prepared.append((action, spec, values))
    problems.extend(_unique_problems(prepared))
    errors = sorted((p for p in problems if p.is_error), key=lambda p: (p.file, p.line, p.col))
    if errors:
        raise HeroScriptError.from_problems(errors)
    results: list[ActionResult] = []
    for index, (action, spec, values) in enumerate(prepared):
        if on_start is not None:
            on_start(action, index)
        call = Call(action, values, list(action.args), context)
        t0 = time.perf_counter()
        try:
            value = spec.handler(call)
        except ActionFailed as exc:
            result = ActionResult(
                action, index, False, time.perf_counter() - t0, None, exc.message, exc.exit_code, exc.output
            )
        except Exception as exc:  # any handler bug is a failure of that action, not of the runner
            result = ActionResult(action, index, False, time.perf_counter() - t0, None, str(exc) or repr(exc))
        else:
            result = ActionResult(action, index, True, time.perf_counter() - t0, value)
        results.append(result)
        if on_end is not None:
            on_end(result)
        if not result.ok and not keep_going:
            break
    return results
