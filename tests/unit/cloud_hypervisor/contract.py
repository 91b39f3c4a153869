"""Cloud Hypervisor's OpenAPI document as a checker: which operations exist, and whether a request body fits.

The document is tests/data/cloud-hypervisor/cloud-hypervisor.yaml (unchanged from Cloud Hypervisor), or
HEROVM_CH_OPENAPI. Schemas are checked strictly: an object schema that lists its properties gets
`additionalProperties: false`, so a misspelt field is an error here (Cloud Hypervisor would ignore it or
refuse it). Used by the tests and by the stand-in VMM (fake_cloud_hypervisor.py) alike.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

ROOT = "/api/v1"
SPEC = Path(
    os.environ.get("HEROVM_CH_OPENAPI")
    or Path(__file__).resolve().parents[2] / "data/cloud-hypervisor/cloud-hypervisor.yaml"
)


def available() -> str | None:
    """None if the contract can be checked here, else why not."""
    if not SPEC.is_file():
        return f"the OpenAPI document {SPEC} is not here (set HEROVM_CH_OPENAPI)"
    try:
        import jsonschema  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        return f"contract tests need jsonschema and PyYAML: {e}"
    return None


@functools.cache
def document() -> dict:
    import yaml

    return yaml.safe_load(SPEC.read_text())


def _strict(node: object) -> object:
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def _registry():
    from referencing import Registry
    from referencing.jsonschema import DRAFT7

    return Registry().with_resource("urn:ch", DRAFT7.create_resource(_strict(copy.deepcopy(document()))))


def operation(method: str, path: str) -> dict | None:
    """The OpenAPI operation for e.g. ("PUT", "/api/v1/vm.create"), or None if the document has none."""
    if not path.startswith(ROOT + "/"):
        return None
    item = document()["paths"].get(path[len(ROOT) :])
    if item is None:
        return None
    return item.get(method.lower())


def schema_errors(ref: str, value: object) -> list[str]:
    """Problems of `value` against a schema reference like "#/components/schemas/VmConfig"."""
    from jsonschema import Draft7Validator

    validator = Draft7Validator({"$ref": "urn:ch" + ref}, registry=_registry())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
        for e in validator.iter_errors(value)
    ]


def request_problems(method: str, path: str, body: object | None) -> list[str]:
    """Why this request does not follow the document ([] if it does). `body` is the parsed JSON or None."""
    op = operation(method, path)
    if op is None:
        return [f"{method} {path} is not an operation of the Cloud Hypervisor API"]
    rb = op.get("requestBody")
    if rb is None:
        return [] if body is None else [f"{method} {path} takes no request body"]
    if body is None:
        return [f"{method} {path} needs a request body"] if rb.get("required") else []
    ref = rb["content"]["application/json"]["schema"]["$ref"]
    return [f"{method} {path}: {p}" for p in schema_errors(ref, body)]


def response_statuses(method: str, path: str) -> set[int]:
    op = operation(method, path) or {}
    return {int(code) for code in op.get("responses", {})}
