"""Server-sent events in the form OpenAI clients parse: `data: <json>` lines, then `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.errors import APIError

DONE = "data: [DONE]\n\n"
# OpenAPI: a route that streams (`stream: true`) answers server-sent events too; each
# event's `data` is a chunk object, an error object or `[DONE]`.
STREAMED: dict[int | str, dict] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}}}
}


def event(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


async def _with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once headers are sent, a failure can only be reported as an error event."""
    try:
        async for chunk in events:
            yield chunk
    except APIError as exc:
        yield event(exc.body())
    yield DONE


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        _with_error_event(events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
