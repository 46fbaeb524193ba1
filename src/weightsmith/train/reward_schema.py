"""The json reward's check of a row's JSON Schema, before the model loads (rewards.check_rows).

A schema comes from a data file, so it is untrusted: `schema_problem` refuses what jsonschema
would run without a bound (`pattern`, `patternProperties`: Python's re has no time limit) and
what would fail only while a completion is scored (a `$ref` that points to nothing, or outside
the schema, where following it would need the network), then asks jsonschema whether it is
a valid schema of its draft. Every walk is iterative: any nesting depth is bounded work.

Not here: scoring (rewards.json_reward).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from weightsmith.errors import ConfigError


def json_kind(value: Any) -> str:
    """The JSON kind of `value`, for messages."""
    names = {str: "a string", bool: "a boolean", list: "a list", dict: "an object", type(None): "null"}
    return "a number" if type(value) in (int, float) else names.get(type(value), type(value).__name__)


def _regex_keyword(schema: Any) -> str | None:
    """The first regular-expression keyword (`pattern`, `patternProperties`) anywhere in
    `schema`, or None."""
    for node in _nodes(schema):
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                return "pattern"
            if isinstance(node.get("patternProperties"), dict):
                return "patternProperties"
    return None


def _nodes(schema: Any) -> Iterator[Any]:
    """Every dict and list in `schema`, walked without recursion (bounded work at any depth)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            yield node
            stack.extend(node)


def _ref_problem(schema: dict) -> str | None:
    """Why a `$ref` in `schema` cannot be followed, or None: each must be a JSON Pointer into the
    schema itself ("#/$defs/item"), which is found now rather than when a completion is scored
    (jsonschema raises then; a reference outside would need the network)."""
    for node in _nodes(schema):
        if not isinstance(node, dict):
            continue
        if node is not schema and "$id" in node:
            return "gives a nested '$id': the json reward follows only '$ref's into the schema itself"
        ref = node.get("$ref", node.get("$dynamicRef"))
        if ref is None:
            continue
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            return f"refers to {str(ref)[:80]!r}: only a JSON Pointer into the schema itself ('#/...') can be followed"
        target: Any = schema
        for part in ref[2:].split("/") if ref != "#" else []:
            key = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                return f"has '$ref' {ref[:80]!r}, which points to nothing in the schema"
    return None


def schema_problem(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"is {json_kind(value)}, not a JSON Schema object"
    refs = _ref_problem(value)
    if refs is not None:
        return refs
    keyword = _regex_keyword(value)
    if keyword is not None:  # Python's re has no time limit: (a+)+$ on 30 characters takes minutes
        return (
            f"uses '{keyword}': a regular expression from a data file can take exponential time to match, "
            "so the json reward does not run them; drop it"
        )
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:
        raise ConfigError(
            "the json reward needs the jsonschema package to check 'schema': pip install jsonschema"
        ) from None

    try:
        validator_for(value).check_schema(value)
    except SchemaError as exc:
        return "is not a valid JSON Schema: " + " ".join(str(exc.message).split())[:200]
    return None
