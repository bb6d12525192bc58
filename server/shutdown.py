"""How the server stops: draining on SIGTERM, exiting when the engine dies.

SIGTERM or SIGINT: uvicorn stops accepting connections and waits for the requests in
flight; `DrainingServer` adds the deadline. After `drain_timeout_s` the requests still
open end with a 503 (an error event, in a stream) and the exit goes on, so it is
bounded: drain_timeout_s, then the engine's stop (which first checkpoints the progress
of running finetuning jobs), a few seconds.

Engine death: the requests in flight have already failed and /health answers 503. The
server then exits with status 1 for its supervisor (`restart:` in docker compose,
systemd's `Restart=`) to start it again, rather than restarting the engine itself: a
fresh process pair resumes every finetuning job from its checkpoint and serves every
model again, the path a crash of the whole daemon takes anyway, so one path is tested.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from server import errors
from server.engine_client import EngineClient

log = logging.getLogger(__name__)

# Time for health checks and load balancers to see the 503 before the server exits.
ENGINE_DEATH_EXIT_DELAY_S = 5.0
# uvicorn's own limit, past ours: it cancels what is still running (a route stuck
# outside the engine), so the exit stays bounded whatever happens.
UVICORN_BACKSTOP_S = 5.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, drain_timeout_s: float):
        config.timeout_graceful_shutdown = int(drain_timeout_s + UVICORN_BACKSTOP_S)
        super().__init__(config)
        self._engine = engine
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine_died = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._engine.on_death = self._on_engine_death
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: the loop runs this thread, but only between two of its callbacks.
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        log.info(
            "shutting down: %d request(s) in flight have %gs to finish", len(self._engine.streams),
            self._drain_timeout_s,
        )
        deadline_error = errors.shutting_down(self._drain_timeout_s)
        self._loop.call_later(self._drain_timeout_s, self._engine.end_open_requests, deadline_error)

    def _on_engine_death(self, reason: str) -> None:
        self.engine_died = True
        log.error("the engine died (%s); exiting in %gs for the supervisor to restart us", reason,
                  ENGINE_DEATH_EXIT_DELAY_S)
        self._loop.call_later(ENGINE_DEATH_EXIT_DELAY_S, setattr, self, "should_exit", True)
