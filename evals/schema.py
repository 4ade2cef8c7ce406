"""report.json's schema: its version and a validator for evals/schema.json.

The validator is a small subset of JSON Schema ($ref, anyOf, type, enum, const, bounds, pattern, required,
properties, additionalProperties, items, minItems), so no extra dependency.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from distill.errors import DataError

SCHEMA_VERSION = "1.5.0"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema.json"
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name: str) -> bool:
    if name in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        finite = not (isinstance(value, float) and math.isnan(value))
        return ok and finite and (name == "number" or float(value).is_integer())
    return isinstance(value, _TYPES[name])


def validate(instance, schema: dict | None = None, root: dict | None = None, path: str = "$") -> list[str]:
    """Errors of `instance` against `schema` (default: evals/schema.json) as 'path: problem' strings."""
    if schema is None:
        schema = json.loads(SCHEMA_PATH.read_text())
    root = root or schema
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return validate(instance, target, root, path)
    if "anyOf" in schema:
        if all(validate(instance, option, root, path) for option in schema["anyOf"]):
            return [f"{path}: matches none of the allowed forms"]
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(instance, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__}"]
    return _check_value(instance, schema, path) + _check_children(instance, schema, root, path)


def _check_value(value, schema: dict, path: str) -> list[str]:
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= exclusive minimum {schema['exclusiveMinimum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list) and len(value) < schema.get("minItems", 0):
        errors.append(f"{path}: fewer than {schema['minItems']} items")
    return errors


def _check_children(value, schema: dict, root: dict, path: str) -> list[str]:
    errors = []
    if isinstance(value, dict):
        errors += [f"{path}: missing required {key!r}" for key in schema.get("required", []) if key not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], root, f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                errors += validate(item, extra, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], root, f"{path}[{i}]")
    return errors


def check(report: dict) -> None:
    """Raise DataError naming the first problems if `report` does not follow the schema."""
    errors = validate(report)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError(f"report.json does not follow evals/schema.json: {'; '.join(errors[:3])}{more}; "
                        "re-run `distill eval` to write a fresh one.")
