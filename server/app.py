"""The FastAPI application: routes, error handlers, and the engine's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from server.auth import require_api_key
from server.context import ServerContext
from server.errors import install_error_handlers
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
    listen); the app stops it and closes `ctx.store` on shutdown, which uvicorn runs on
    SIGTERM and SIGINT (and then re-raises the signal, so code after `serve()` never runs)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await ctx.jobs.close()
            await ctx.engine.shutdown()
            ctx.store.close()

    app = FastAPI(title="coserve", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = install_metrics(ctx.engine, ctx.jobs, ctx.adapters, ctx.served_model_name, ctx.settings)
    install_error_handlers(app)
    protected = [Depends(require_api_key)]
    for api in (completions, chat, models, tokenize, adapters, files, fine_tuning):
        app.include_router(api.router, dependencies=protected)
    app.include_router(misc.router)
    return app
