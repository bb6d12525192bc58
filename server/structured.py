"""`response_format` and `structured_outputs` -> the engine's StructuredOutput, checked.

What vLLM 0.32's server accepts: OpenAI's `response_format` (text, json_object,
json_schema) on both endpoints, and its own `structured_outputs` extra field with one
of json, regex, choice or json_object. A response_format other than text sets the
constraint, keeping structured_outputs' options (disable_any_whitespace); both setting
one is a conflict. vLLM's former guided_json / guided_regex / guided_choice fields are
gone from vLLM (it ignores them with a warning); here they are unknown fields and get a
400 naming them, like any other.

Every spec is parsed by the grammar library the engine compiles with, so a schema or
regex it cannot take is a 400 here, never an engine error. A JSON schema is also checked
for keywords that library compiles without enforcing (`not`, `uniqueItems`, `contains`,
`if`/`then`/`else`, dependencies, an `allOf` of several schemas, a `$ref` outside the
schema or beside other constraints): refused by name rather than silently dropped, since
outputs could then break the schema. `oneOf` is enforced as `anyOf`.
"""

from __future__ import annotations

import functools
import json

from engine.grammar.compiler import GrammarError, parse
from engine.messages import StructuredOutput
from server import errors
from server.protocol import GenerationRequest, ResponseFormat, StructuredOutputs

_UNSUPPORTED = ("grammar", "structural_tag", "whitespace_pattern")
# JSON schema keywords xgrammar compiles without enforcing (checked against jsonschema
# on xgrammar 0.2.9): output under them could fail the schema, so they are refused.
_UNENFORCED = ("not", "uniqueItems", "contains", "minContains", "maxContains", "if", "then", "else",
               "dependentRequired", "dependentSchemas", "dependencies", "$dynamicRef")
# Where subschemas sit: maps of names to schemas, lists of schemas, one schema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames")
# What may stand beside a $ref: xgrammar follows the reference and drops the rest.
_ANNOTATIONS = {"$ref", "title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                "writeOnly"}
_CONSTRAINTS = ("json_schema", "regex", "choice", "json_object")
# What a JSON object with no schema is (OpenAI's json_object: any JSON object).
_ANY_OBJECT = json.dumps({"type": "object"})


def structured_output(body: GenerationRequest) -> StructuredOutput | None:
    """The request's constraint, or None; raises a 400 naming the field at fault."""
    options = body.structured_outputs
    any_whitespace = not (options and options.disable_any_whitespace)
    from_format = _from_response_format(body.response_format, any_whitespace)
    from_options = _from_structured_outputs(options, any_whitespace) if options is not None else None
    if from_format is not None and from_options is not None:
        raise errors.bad_request(
            "response_format and structured_outputs each ask for a constraint; send one", "structured_outputs"
        )
    if from_format is not None:
        _check(*from_format)
        return from_format[0]
    if from_options is not None:
        _check(*from_options)
        return from_options[0]
    if options is not None:
        raise errors.bad_request(
            "structured_outputs needs one of json, regex, choice or json_object", "structured_outputs"
        )
    return None


def _from_response_format(fmt: ResponseFormat | None, any_whitespace: bool) -> tuple[StructuredOutput, str] | None:
    if fmt is not None and fmt.type != "json_schema" and fmt.json_schema is not None:
        raise errors.bad_request(
            f"response_format.json_schema is only used with type json_schema, not {fmt.type}",
            "response_format.json_schema",
        )
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json", _ANY_OBJECT, any_whitespace), "response_format"
    if fmt.json_schema is None:
        raise errors.bad_request("response_format of type json_schema needs json_schema", "response_format.json_schema")
    if fmt.json_schema.json_schema is None:
        raise errors.bad_request(
            "response_format.json_schema needs a schema", "response_format.json_schema.schema"
        )
    # OpenAI names the whole response_format when the schema is at fault.
    return StructuredOutput("json", json.dumps(fmt.json_schema.json_schema), any_whitespace), "response_format"


def _from_structured_outputs(
    options: StructuredOutputs, any_whitespace: bool
) -> tuple[StructuredOutput, str] | None:
    for name in _UNSUPPORTED:
        if getattr(options, name) is not None:
            raise errors.bad_request(f"structured_outputs.{name} is not supported", f"structured_outputs.{name}")
    given = [name for name in _CONSTRAINTS if getattr(options, name) not in (None, False)]
    if len(given) > 1:
        raise errors.bad_request(
            "structured_outputs takes one kind of constraint (json, regex, choice or json_object)", "structured_outputs"
        )
    if not given:
        return None
    if options.json_object:
        return StructuredOutput("json", _ANY_OBJECT, any_whitespace), "structured_outputs.json_object"
    if options.regex is not None:
        return StructuredOutput("regex", options.regex), "structured_outputs.regex"
    if options.choice is not None:
        return StructuredOutput("choice", json.dumps(options.choice)), "structured_outputs.choice"
    schema = options.json_schema
    if isinstance(schema, str):  # vLLM takes the schema as JSON text too
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise errors.bad_request(f"structured_outputs.json is not JSON: {exc}", "structured_outputs.json") from None
    if not isinstance(schema, dict):
        raise errors.bad_request("structured_outputs.json must be a JSON schema object", "structured_outputs.json")
    return StructuredOutput("json", json.dumps(schema), any_whitespace), "structured_outputs.json"


def _check(spec: StructuredOutput, param: str) -> None:
    try:
        _parse_once(spec)
    except GrammarError as exc:
        what = {"json": "JSON schema", "regex": "regex", "choice": "choice list"}[spec.kind]
        raise errors.bad_request(f"Invalid {what} for {param}: {exc}", param) from None


@functools.lru_cache(maxsize=256)
def _parse_once(spec: StructuredOutput) -> None:
    """Parsing a schema is ~1 ms; a client repeats its few schemas (a failure raises
    and is not cached)."""
    if spec.kind == "json":
        check_enforceable(json.loads(spec.spec))
    parse(spec)


def check_enforceable(schema: object) -> None:
    """Raises GrammarError where the schema uses what the grammar would not enforce."""
    problem = _unenforced(schema, ())
    if problem is not None:
        path, why = problem
        where = f" at {'/'.join(map(str, path))}" if path else ""
        raise GrammarError(f"{why}{where}: not enforced by the grammar library, so outputs could break it")


def _unenforced(schema: object, path: tuple) -> tuple[tuple, str] | None:
    if not isinstance(schema, dict):
        return None
    for key in _UNENFORCED:
        if key in schema:
            return path, f"keyword {key!r}"
    ref = schema.get("$ref")
    if ref is not None:
        if not (isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))):
            return path, f"$ref {ref!r} (only references inside the schema, # or #/...)"
        if beside := sorted(set(schema) - _ANNOTATIONS):
            return path, f"$ref beside {beside[0]!r}"
    if len(schema.get("allOf") or []) > 1:
        return path, "allOf of more than one schema"
    children: list[tuple[tuple, object]] = []
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            children += [((*path, key, name), sub) for name, sub in schema[key].items()]
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            children += [((*path, key, i), sub) for i, sub in enumerate(schema[key])]
    for key in _SCHEMA_ONE:
        if key in schema:
            children.append(((*path, key), schema[key]))
    for child_path, child in children:
        problem = _unenforced(child, child_path)
        if problem is not None:
            return problem
    return None
