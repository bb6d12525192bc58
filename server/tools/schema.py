"""A function's `parameters`: a JSON schema of an object, checked before anything runs.

The meta-schema check catches what a grammar library may silently skip (a `required`
that is not a list, a misspelt type); server/tools/grammar.py then checks that
xgrammar can compile it, which also refuses schemas no value satisfies.
"""

from __future__ import annotations

from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

# Omitted `parameters` mean a function without arguments (OpenAI's meaning).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def check_parameters_schema(schema: dict[str, Any]) -> None:
    """Raises ValueError saying what is wrong."""
    if not isinstance(schema.get("$schema", ""), str):
        raise ValueError("$schema must be a string (the URI of a JSON Schema dialect)")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(f"not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}") from None
    if schema.get("type") != "object":
        raise ValueError('must be a JSON schema of type "object" (the arguments are one JSON object)')
