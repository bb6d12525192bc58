"""The FastAPI application: routes, error handlers, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import signal
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from server.auth import authenticate
from server.context import ServerContext
from server.errors import ERROR_RESPONSES, install_error_handlers
from server.limits import RequestLimits
from server.metrics import install_metrics
from server.routes import (
    adapters,
    chat,
    completions,
    files,
    fine_tuning,
    misc,
    models,
    tokenize,
)


def create_app(ctx: ServerContext) -> FastAPI:
    """`ctx.engine` is already started (so start-up failures are reported before we
    listen); the app stops it and closes `ctx.store` on shutdown, which uvicorn runs once
    the requests in flight are drained (server/shutdown.py); on SIGTERM and SIGINT it then
    re-raises the signal, so code after `serve()` never runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Operators rotate keys by editing the keys file and sending SIGHUP.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, ctx.keys.reload)
        try:
            yield
        finally:
            # The engine first, so that the job manager records its last reports.
            await ctx.engine.shutdown()
            await ctx.jobs.close()
            ctx.store.close()

    app = FastAPI(title="coserve", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = install_metrics(ctx.engine, ctx.jobs, ctx.adapters, ctx.served_model_name, ctx.settings)
    install_error_handlers(app)
    settings = ctx.settings
    app.add_middleware(
        RequestLimits,
        keys=ctx.keys,
        max_body_bytes=settings.max_request_body_bytes,
        max_in_flight_per_owner=settings.max_concurrent_requests_per_owner,
    )
    protected = [Depends(authenticate)]
    for api in (completions, chat, models, tokenize, adapters, files, fine_tuning):
        app.include_router(api.router, dependencies=protected, responses=ERROR_RESPONSES)
    app.include_router(
        misc.router, dependencies=protected if settings.protect_health_and_metrics else [], responses=ERROR_RESPONSES
    )
    return app
