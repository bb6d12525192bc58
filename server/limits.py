"""Limits enforced before a request reaches its route: body size, and generation
requests in flight per owner.

A pure ASGI middleware rather than a FastAPI dependency, because a streamed completion
outlives its route function: the owner's slot is held until the last byte of the
response has been sent or the client has gone, whichever comes first.

The body limit protects the JSON routes (a request is parsed in memory); uploads to
/v1/files stream to disk under their own limit (`max_upload_bytes`). A body without a
Content-Length is read here up to the limit and replayed to the app.
"""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api_keys import KeyRing
from server.errors import RETRY_AFTER_SECONDS, APIError

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
UPLOAD_PATH = "/v1/files"


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds max_request_body_bytes={limit}.", code="request_too_large")


def too_many_requests(owner: str, limit: int) -> APIError:
    return APIError(
        429,
        f"Owner {owner!r} already has max_concurrent_requests_per_owner={limit} requests in flight; retry later.",
        type="rate_limit_error",
        code="too_many_concurrent_requests",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class RequestLimits:
    def __init__(self, app: ASGIApp, keys: KeyRing, max_body_bytes: int, max_in_flight_per_owner: int):
        self._app = app
        self._keys = keys
        self._max_body = max_body_bytes
        self._max_in_flight = max_in_flight_per_owner  # 0 = no limit
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        if path != UPLOAD_PATH:
            declared = _content_length(scope)
            if declared is not None and declared > self._max_body:
                await body_too_large(self._max_body).response()(scope, receive, send)
                return
            if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body = await _read_at_most(receive, self._max_body)
                if body is None:
                    await body_too_large(self._max_body).response()(scope, receive, send)
                    return
                receive = _replay(body, receive)
        owner = self._owner(scope) if path in GENERATION_PATHS and self._max_in_flight else None
        if owner is None:
            await self._app(scope, receive, send)
            return
        if self.in_flight[owner] >= self._max_in_flight:
            await too_many_requests(owner, self._max_in_flight).response()(scope, receive, send)
            return
        self.in_flight[owner] += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self.in_flight[owner] -= 1
            if not self.in_flight[owner]:
                del self.in_flight[owner]

    def _owner(self, scope: Scope) -> str | None:
        """The caller's owner; None for a request the route will answer with 401."""
        principal = self._keys.principal_for(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
        return principal.owner if principal is not None else None


def _content_length(scope: Scope) -> int | None:
    value = dict(scope["headers"]).get(b"content-length")
    return int(value) if value is not None and value.isdigit() else None


async def _read_at_most(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # waits for the disconnect, as the original would
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay

