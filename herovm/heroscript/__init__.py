"""HeroScript: the script language herovm reads (the reference: docs/heroscript.md).

Standard library only: this package is copied into VM guests where only python3 exists.
"""

from .errors import HeroScriptError, Problem
from .model import Action, Params, Playbook
from .parser import apply_variables, load, normalize_name, parse, referenced, substitute
from .registry import (
    ActionFailed,
    ActionResult,
    ActionSpec,
    Call,
    Param,
    Registry,
    repeated_key_warnings,
    run,
    validate,
)
from .values import parse_bool, parse_duration, parse_int, parse_list, parse_percentage, parse_size
from .writer import dumps

__all__ = [
    "Action",
    "ActionFailed",
    "ActionResult",
    "ActionSpec",
    "Call",
    "HeroScriptError",
    "Param",
    "Params",
    "Playbook",
    "Problem",
    "Registry",
    "apply_variables",
    "dumps",
    "load",
    "normalize_name",
    "parse",
    "parse_bool",
    "parse_duration",
    "parse_int",
    "parse_list",
    "parse_percentage",
    "parse_size",
    "referenced",
    "repeated_key_warnings",
    "run",
    "substitute",
    "validate",
]
