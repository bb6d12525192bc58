"""Stop work for clients that hung up.

Streaming responses are cancelled by Starlette when the client disconnects; a plain
JSON response is not, so non-streaming generation runs next to a watcher of the
connection and is cancelled (which aborts its engine requests) when the client goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from server.errors import APIError

T = TypeVar("T")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        # Nobody reads this response; 499 is the conventional "client closed request".
        raise APIError(499, "client disconnected", type="client_closed_request")
    return task.result()
