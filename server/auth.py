"""Bearer-key authentication of requests, and the caller's rights (server/api_keys.py).

`authenticate` runs as a dependency of every protected route and leaves the caller's
`Principal` on `request.state`; routes read it with `principal_of`.
"""

from __future__ import annotations

from fastapi import Request

from server.api_keys import Principal
from server.errors import APIError


async def authenticate(request: Request) -> None:
    principal = request.app.state.ctx.keys.principal_for(request.headers.get("authorization", ""))
    if principal is None:
        raise APIError(
            401,
            "Missing or invalid API key; send `Authorization: Bearer <key>`.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.principal = principal


def principal_of(request: Request) -> Principal:
    return request.state.principal


def require_admin(request: Request) -> None:
    if not principal_of(request).admin:
        raise APIError(
            403,
            f"{request.url.path} needs an admin key.",
            type="permission_error",
            code="admin_required",
        )
