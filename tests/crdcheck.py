"""A structural check of a manifest against a (trimmed) KubeRay CRD schema: the OpenAPI v3 subset Kubernetes
uses for CRDs - types, properties (unknown fields are errors, as the API server prunes/rejects them), required,
items, enums, patterns, bounds, int-or-string, additionalProperties; a required field with a default is filled
in by the API server before validation, so it may be left out.  CEL rules (x-kubernetes-validations) are
not evaluated.  Subtrees marked `x-disagg-core` (pod templates) are collected for kubernetes-validate."""
from __future__ import annotations

import re
from typing import Any

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def check(value: Any, schema: dict, path: str = "spec") -> tuple[list[str], list[tuple[str, str, Any]]]:
    """(errors, core objects as (path, kind, value)) of `value` against `schema`."""
    errors: list[str] = []
    core: list[tuple[str, str, Any]] = []
    _check(value, schema, path, errors, core)
    return errors, core


def _check(value: Any, schema: dict, path: str, errors: list[str], core: list) -> None:
    if "x-disagg-core" in schema:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object")
        else:
            core.append((path, schema["x-disagg-core"], value))
        return
    if "anyOf" in schema and not schema.get("x-kubernetes-int-or-string"):
        trials = []
        for option in schema["anyOf"]:
            sub: list[str] = []
            _check(value, {**{k: v for k, v in schema.items() if k != "anyOf"}, **option}, path, sub, core)
            trials.append(sub)
        if all(trials):
            errors.append(f"{path}: matches none of anyOf ({trials[0][0]})")
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, (int, str)) and not isinstance(value, bool)):
            errors.append(f"{path}: expected an integer or a string, got {value!r}")
        return
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind in _TYPES:
        ok = isinstance(value, _TYPES[kind])
    else:
        ok = True
    if not ok:
        errors.append(f"{path}: expected {kind}, got {type(value).__name__} {value!r}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: length {len(value)} out of bounds")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), f"{path}[{i}]", errors, core)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value and "default" not in props.get(name, {}):  # the API server defaults first
                errors.append(f"{path}: missing required field {name!r}")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                _check(item, props[key], f"{path}.{key}", errors, core)
            elif isinstance(extra, dict):
                _check(item, extra, f"{path}.{key}", errors, core)
            elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
                errors.append(f"{path}: unknown field {key!r}")
