"""Operational endpoints: health, version, metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.context import get_context

router = APIRouter()


def _package_version() -> str:
    try:
        return version("coserve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@router.get(
    "/health", response_class=Response, responses={200: {"description": "The engine is up (empty body)"}}
)
async def health(request: Request) -> Response:
    get_context(request).check_engine()
    return Response(status_code=200)


@router.get("/version")
async def server_version() -> dict[str, str]:
    return {"version": _package_version()}


@router.get(
    "/metrics", response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
