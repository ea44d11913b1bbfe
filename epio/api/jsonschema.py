"""A small validator for the subset of JSON Schema (2020-12) the API uses.

The OpenAPI document (3.1, whose schemas are JSON Schema) is the one
description of every body; the API validates request bodies with it and the
tests validate responses with it.  Supported keywords: ``type`` (a name or a
list), ``enum``, ``const``, ``properties``, ``required``,
``additionalProperties`` (bool or schema), ``patternProperties``, ``items``,
``minItems``, ``maxItems``, ``contains``, ``minProperties``, ``maxProperties``, ``minLength``, ``maxLength``, ``pattern``,
``minimum``, ``maximum``, ``anyOf``, ``oneOf`` and local ``$ref``
(``#/components/schemas/NAME``).  Unknown keywords (``description``,
``format``, ``example``...) are annotations and ignored, except the extension
``x-error``: when a value does not match a schema that has it, the error's
message is that text (one answer for every way a value can be wrong, e.g. a
hostname that must not reveal why it was refused).  ``pattern`` follows
ECMA-262 as JSON Schema says: ``$`` matches only at the very end (Python's
``$`` would also match before a final newline, letting ``"name\n"`` through).

A second extension, ``x-errors``, gives one keyword's failure a human sentence and a
stable code instead of the generic text: ``{"pattern": {"code": "invalid_app_name",
"message": "{value!r} is not a valid app name: ..."}}``; ``{value}`` is the offending
value (for ``additionalProperties``, the field's name).  Without it the message is the
generic one (``must match ^...$``) and the code None (the API answers
``validation_failed``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    """``pattern`` with each ``$`` outside a character class made ECMA's end of input."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(r"\Z" if c == "$" and not in_class else c)
        i += 1
    return re.compile("".join(out))


class SchemaError(ValueError):
    """The instance does not match; ``path`` says where (``body.name``)."""

    def __init__(self, path: str, message: str, code: str | None = None,
                 human: str | None = None) -> None:
        self.path = path
        self.message = message
        self.code = code
        self.human = human
        super().__init__(f"{path}: {message}")

    def sentence(self) -> str:
        """The human sentence when the schema gives one, else ``path message``."""
        return self.human or f"{self.path} {self.message}"


def _fail(schema: Mapping[str, Any], keyword: str, path: str, message: str,
          value: Any) -> SchemaError:
    """The error for ``keyword`` failing, with the schema's ``x-errors`` sentence if any."""
    custom = schema.get("x-errors", {}).get(keyword)
    if custom is None:
        return SchemaError(path, message)
    return SchemaError(path, message, custom["code"], custom["message"].format(value=value))


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref are supported, not {ref!r}")
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def validate(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
             path: str = "body") -> None:
    """Raise :class:`SchemaError` at the first mismatch of ``instance``."""
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    if "x-error" in schema:
        try:
            _validate(instance, schema, root, path)
        except SchemaError:
            raise SchemaError(path, schema["x-error"]) from None
        return
    _validate(instance, schema, root, path)


def _validate(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any],
              path: str) -> None:
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES[k](instance) for k in kinds):
            raise SchemaError(path, f"must be of type {' or '.join(kinds)}")
    if "const" in schema and instance != schema["const"]:
        raise SchemaError(path, f"must be {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        raise SchemaError(path, "must be one of " + ", ".join(map(str, schema["enum"])))
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf", schema.get("oneOf"))
        matches = 0
        for option in options:
            try:
                validate(instance, option, root, path)
            except SchemaError:
                continue
            matches += 1
        if matches == 0 or ("oneOf" in schema and matches > 1):
            raise SchemaError(path, "does not match any allowed form")
    if isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            raise _fail(schema, "minLength", path,
                        f"must be at least {schema['minLength']} characters", instance)
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            raise _fail(schema, "maxLength", path,
                        f"must be at most {schema['maxLength']} characters", instance)
        if "pattern" in schema and not _compile(schema["pattern"]).search(instance):
            raise _fail(schema, "pattern", path, f"must match {schema['pattern']}", instance)
    if _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            raise SchemaError(path, f"must be >= {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            raise SchemaError(path, f"must be <= {schema['maximum']}")
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            raise SchemaError(path, f"must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            raise SchemaError(path, f"must have at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(instance):
                validate(item, schema["items"], root, f"{path}[{i}]")
        if "contains" in schema:
            for item in instance:
                try:
                    validate(item, schema["contains"], root, path)
                except SchemaError:
                    continue
                break
            else:
                raise SchemaError(path, "has no item that matches what it must contain")
    if isinstance(instance, dict):
        if "minProperties" in schema and len(instance) < schema["minProperties"]:
            raise SchemaError(path, f"must have at least {schema['minProperties']} fields")
        if "maxProperties" in schema and len(instance) > schema["maxProperties"]:
            raise SchemaError(path, f"must have at most {schema['maxProperties']} fields")
        for name in schema.get("required", ()):
            if name not in instance:
                raise SchemaError(f"{path}.{name}", "is required")
        props = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        extra = schema.get("additionalProperties", True)
        for name, value in instance.items():
            where = f"{path}.{name}"
            if name in props:
                validate(value, props[name], root, where)
                continue
            matched = False
            for pattern, sub in patterns.items():
                if _compile(pattern).search(name):
                    matched = True
                    validate(value, sub, root, where)
            if matched:
                continue
            if extra is False:
                raise _fail(schema, "additionalProperties", where, "is not an allowed field",
                            name)
            if isinstance(extra, Mapping):
                validate(value, extra, root, where)
