"""JSON schemas of the kinds applications send (flat records, nesting, arrays, enums,
bounded numbers), each with documents that satisfy it: what bench_grammar walks its
matchers through and what bench_structured asks the server for."""

from __future__ import annotations

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 40},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "active"],
    "additionalProperties": False,
}

ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "maxLength": 12},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24}, "city": {"type": "string", "maxLength": 20}},
            "required": ["name", "city"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 10},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["order_id", "customer", "items"],
    "additionalProperties": False,
}

REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "rating": {"type": "number", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["price", "quality", "service", "delivery"]}, "maxItems": 3},
    },
    "required": ["sentiment", "rating", "tags"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "forecast": {
            "type": "array",
            "minItems": 2,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                    "high": {"type": "integer", "minimum": -50, "maximum": 130},
                    "low": {"type": "integer", "minimum": -50, "maximum": 130},
                },
                "required": ["day", "high", "low"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["city", "unit", "forecast"],
    "additionalProperties": False,
}

# name -> (schema, documents that satisfy it)
SCHEMAS: dict[str, tuple[dict, list[dict]]] = {
    "person": (PERSON, [
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "active": True},
        {"name": "Alan Turing", "age": 41, "email": "alan.turing@example.org", "active": False},
    ]),
    "order": (ORDER, [
        {"order_id": "A-1042", "customer": {"name": "Grace Hopper", "city": "Arlington"},
         "items": [{"sku": "KB-201", "quantity": 2}, {"sku": "MS-77", "quantity": 1}]},
        {"order_id": "B-7", "customer": {"name": "Linus", "city": "Helsinki"},
         "items": [{"sku": "SSD-1TB", "quantity": 4}]},
    ]),
    "review": (REVIEW, [
        {"sentiment": "positive", "rating": 4.5, "tags": ["quality", "service"]},
        {"sentiment": "negative", "rating": 1, "tags": ["delivery"]},
    ]),
    "weather": (WEATHER, [
        {"city": "Lisbon", "unit": "celsius",
         "forecast": [{"day": "mon", "high": 24, "low": 15}, {"day": "tue", "high": 22, "low": 14}]},
        {"city": "Denver", "unit": "fahrenheit",
         "forecast": [{"day": "sat", "high": 71, "low": 40}, {"day": "sun", "high": 60, "low": 35}]},
    ]),
}
