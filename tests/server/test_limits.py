"""Request limits in-process: body size, completions in flight per owner, unfinished
jobs per owner, stored bytes per owner, and request fields that are refused, not dropped."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request

from server.api_keys import KeyRing
from server.errors import install_error_handlers
from server.finetune.job_request import CreateJobRequest
from server.limits import RequestLimits
from server.store import Store
from server.store.jobs import TooManyActiveJobs
from tests.server.conftest import TENANT_KEYS, write_keys_file

pytestmark = pytest.mark.server

LIMIT_BODY = 1000


def limited_app(keys: KeyRing, max_in_flight: int, release: asyncio.Event) -> FastAPI:
    """Behind RequestLimits: a completions route that answers once `release` is set, and an echo route."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def held(request: Request) -> dict:
        await release.wait()
        return {"bytes": len(await request.body())}

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    app.add_middleware(RequestLimits, keys=keys, max_body_bytes=LIMIT_BODY, max_in_flight_per_owner=max_in_flight)
    return app


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coserve")


def as_owner(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANT_KEYS[owner]}"}


def test_body_size_limit_declared_and_chunked():
    asyncio.run(_body_size_limit())


async def _body_size_limit():
    release = asyncio.Event()
    release.set()
    async with client_for(limited_app(KeyRing(None, None), 0, release)) as http:
        assert (await http.post("/v1/echo", content=b"x" * LIMIT_BODY)).json() == {"bytes": LIMIT_BODY}
        declared = await http.post("/v1/echo", content=b"x" * (LIMIT_BODY + 1))
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"
        assert f"max_request_body_bytes={LIMIT_BODY}" in declared.json()["error"]["message"]

        async def chunks(total: int):
            for _ in range(total // 100):
                yield b"y" * 100

        # No Content-Length: read up to the limit, then refused; under it, replayed whole.
        assert (await http.post("/v1/echo", content=chunks(LIMIT_BODY + 100))).status_code == 413
        assert (await http.post("/v1/echo", content=chunks(LIMIT_BODY))).json() == {"bytes": LIMIT_BODY}


def test_completions_in_flight_per_owner(tmp_path):
    asyncio.run(_in_flight_per_owner(KeyRing(write_keys_file(tmp_path / "keys.yaml"), None)))


async def _in_flight_per_owner(keys: KeyRing):
    release = asyncio.Event()
    async with client_for(limited_app(keys, 2, release)) as http:
        held = [asyncio.create_task(http.post("/v1/completions", json={}, headers=as_owner("team-a"))) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await http.post("/v1/completions", json={}, headers=as_owner("team-a"))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "too_many_concurrent_requests" and error["type"] == "rate_limit_error"
        assert "max_concurrent_requests_per_owner=2" in error["message"] and "team-a" in error["message"]
        # Another owner is not held back by team-a's requests; other routes are not counted.
        other = asyncio.create_task(http.post("/v1/completions", json={}, headers=as_owner("team-b")))
        assert (await http.post("/v1/echo", json={}, headers=as_owner("team-a"))).status_code == 200
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held, other)] == [200, 200, 200]
        # The slots are given back when the responses are done.
        assert (await http.post("/v1/completions", json={}, headers=as_owner("team-a"))).status_code == 200


def test_unfinished_jobs_per_owner(tmp_path):
    store = Store.open(tmp_path)
    try:
        fields = dict(model="m", training_file="file-x", hyperparameters={}, lora={}, seed=0, max_active=2)
        first = store.jobs.create("team-a", **fields)
        store.jobs.create("team-a", **fields)
        with pytest.raises(TooManyActiveJobs):
            store.jobs.create("team-a", **fields)
        store.jobs.create("team-b", **fields)  # another owner's count
        store.jobs.set_status(first.id, "cancelled")  # a finished job no longer counts
        store.jobs.create("team-a", **fields)
    finally:
        store.close()


def test_fine_tuning_fields_not_implemented_are_refused():
    with pytest.raises(ValueError, match="integrations"):
        CreateJobRequest.model_validate({"model": "m", "training_file": "f", "integrations": [{"type": "wandb"}]})


def test_message_fields_are_acted_on_or_refused():
    from server.errors import APIError
    from server.prompts import _template_message
    from server.protocol import ChatCompletionRequest

    with pytest.raises(ValueError, match="colour"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi", "colour": "red"}]})
    # An assistant message as the openai client returns it: OpenAI's other fields, empty.
    echoed = {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": None, "function_call": None,
              "audio": None, "annotations": []}
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}, echoed]})
    assert _template_message(1, body.messages[1], {}) == {"role": "assistant", "content": "Hello"}
    refusing = {**echoed, "refusal": "I will not"}
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}, refusing]})
    with pytest.raises(APIError) as refused:
        _template_message(1, body.messages[1], {})
    assert refused.value.status == 400 and refused.value.param == "messages.1.refusal"
