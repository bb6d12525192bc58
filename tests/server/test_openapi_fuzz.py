"""schemathesis against the server's own OpenAPI document, on a live server: generated
requests, valid and invalid, to every operation. Zero 5xx, and every response (status,
content type, body) as the document describes it."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.conftest import start_server

pytestmark = pytest.mark.server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Generated completions are bounded by the context (prompt + output <= 32 tokens), so
# n=128 and a long max_tokens stay cheap on two cores.
MAX_MODEL_LEN = "32"
CASES_PER_OPERATION_AND_MODE = 50


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    live = start_server(tmp_path_factory.mktemp("fuzz"), "--max-model-len", MAX_MODEL_LEN)
    yield live
    live.stop()


def test_every_operation_answers_as_documented(fuzzed_server):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=CASES_PER_OPERATION_AND_MODE, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def answers_as_documented(case):
                response = case.call_and_validate(base_url=fuzzed_server.url, checks=CHECKS, timeout=300)
                statuses[response.status_code] += 1

            try:
                answers_as_documented()
            except Unsatisfiable:
                # An operation without parameters or body has no invalid request to make.
                assert mode is GenerationMode.NEGATIVE, operation.label
    print(f"schemathesis: {len(operations)} operations, {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert statuses[200] > 0 and sum(statuses.values()) >= len(operations) * 2
