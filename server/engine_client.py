"""The server's side of the engine process: spawn it, talk to it, watch it.

One `EngineClient` per server. It binds the two ZeroMQ sockets, starts the engine
process (engine/process.py), and waits for its first frame. Afterwards a reader task
routes each `RequestOutput` to the `OutputStream` of the HTTP request that owns it,
and a watchdog notices when the process dies: then every open stream is failed at
once and new work is refused, so no client ever waits on a dead engine.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import multiprocessing
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from engine.config import EngineConfig
from engine.messages import (
    AbortRequests,
    AdapterOpDone,
    ControlFinetune,
    EngineFailed,
    EngineOutputs,
    EngineReady,
    EngineRequest,
    EngineToServer,
    FinetuneReport,
    IterationStats,
    RequestOutput,
    Shutdown,
    StartFinetune,
)
from engine.process import run_engine_process
from server import errors
from server.request_metrics import RequestTracker

log = logging.getLogger(__name__)

# How often the watchdog checks that the engine process is alive.
_WATCH_INTERVAL_S = 0.2
# A stopping engine first saves the progress of running finetuning jobs (well under 1 s
# for SmolLM2-135M's adapters on 2 cores; larger adapters take longer).
_SHUTDOWN_GRACE_S = 15.0
_PR_SET_PDEATHSIG = 1


class EngineStartError(RuntimeError):
    """The engine process failed to start; the message says why."""


class EngineDead(Exception):
    """Raised by adapter operations pending when the engine process dies."""


def _engine_main(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Engine process entry: die with the server, even when the server is SIGKILLed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux; the server's own shutdown still stops us
    # Ctrl-C in a terminal reaches the whole process group; the server shuts us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_engine_process(config, input_addr, output_addr)


class OutputStream:
    """The engine outputs of one HTTP request, which may own several engine requests."""

    def __init__(self, client: EngineClient, request_ids: list[str]):
        self._client = client
        self.unfinished = set(request_ids)
        # Outputs, or the error that ends the request (the engine died, the drain deadline passed).
        self._queue: asyncio.Queue[RequestOutput | errors.APIError] = asyncio.Queue()

    def put(self, item: RequestOutput | errors.APIError) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        item = await self._queue.get()
        if isinstance(item, errors.APIError):
            raise item
        if item.finish_reason is not None:
            self._release(item.request_id)
        return item

    def finish_early(self, request_id: str) -> None:
        """The server ended this request (stop string): free its engine sequence."""
        if request_id in self.unfinished:
            self._release(request_id)
            if self._client.requests is not None:
                self._client.requests.finish(request_id, "stop")
            self._client.abort([request_id])

    def close(self) -> None:
        """Abort whatever is still running (client went away, error)."""
        if self.unfinished:
            ids = list(self.unfinished)
            for request_id in ids:
                self._release(request_id)
                if self._client.requests is not None:
                    self._client.requests.finish(request_id, "abort")
            self._client.abort(ids)

    def _release(self, request_id: str) -> None:
        self.unfinished.discard(request_id)
        self._client.streams.pop(request_id, None)


class EngineClient:
    def __init__(self, config: EngineConfig, max_queued_requests: int):
        self.config = config
        # Sequences the engine may hold at once: running plus the allowed queue.
        self.capacity = config.max_num_seqs + max_queued_requests
        self.ready: EngineReady | None = None
        self.last_stats: IterationStats | None = None
        self.dead_reason: str | None = None
        self.streams: dict[str, OutputStream] = {}
        self._ipc_dir = Path(tempfile.mkdtemp(prefix="coserve-ipc-"))
        self._ctx = zmq.asyncio.Context()
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._from_engine = self._ctx.socket(zmq.PULL)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task] = []
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineToServer)
        self._op_ids = itertools.count(1)
        # Receives every finetuning report (set by the server's job manager).
        self.on_finetune_report: Callable[[FinetuneReport], None] = lambda report: None
        # Receives every iteration's stats, and follows every request (set by the metrics).
        self.on_stats: Callable[[IterationStats], None] = lambda stats: None
        self.requests: RequestTracker | None = None
        # Called once if the engine process dies while serving (set by the server).
        self.on_death: Callable[[str], None] = lambda reason: None
        self._pending_ops: dict[int, asyncio.Future[AdapterOpDone]] = {}
        self._stopping = False  # shutdown() has begun: the engine's exit is expected

    @property
    def alive(self) -> bool:
        return self.ready is not None and self.dead_reason is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> EngineReady:
        input_addr = f"ipc://{self._ipc_dir}/input"
        output_addr = f"ipc://{self._ipc_dir}/output"
        self._to_engine.bind(input_addr)
        self._from_engine.bind(output_addr)
        self._process = multiprocessing.get_context("spawn").Process(
            target=_engine_main, args=(self.config, input_addr, output_addr), name="coserve-engine"
        )
        self._process.start()
        log.info("engine process %d starting", self._process.pid)
        first = await self._first_frame()
        if isinstance(first, EngineFailed):
            await self.shutdown()
            raise EngineStartError(f"engine failed to start: {first.message}")
        self.ready = first
        self._tasks = [asyncio.create_task(self._read_outputs()), asyncio.create_task(self._watch_process())]
        return first

    async def _first_frame(self) -> EngineReady | EngineFailed:
        """Wait for the engine's first frame, however long loading takes, unless it dies."""
        while True:
            if await self._from_engine.poll(timeout=int(_WATCH_INTERVAL_S * 1000)):
                msg = self._decoder.decode(await self._from_engine.recv())
                if isinstance(msg, EngineReady | EngineFailed):
                    return msg
                continue
            if not self._process.is_alive():
                code = self._process.exitcode
                await self.shutdown()
                raise EngineStartError(f"engine process exited with code {code} before it was ready")

    async def _read_outputs(self) -> None:
        while True:
            self._dispatch(self._decoder.decode(await self._from_engine.recv()))

    def _dispatch(self, msg: EngineToServer) -> None:
        if isinstance(msg, AdapterOpDone):
            future = self._pending_ops.pop(msg.op_id, None)
            if future is not None and not future.done():
                future.set_result(msg)
            return
        if not isinstance(msg, EngineOutputs):
            return
        if msg.stats is not None:
            self.last_stats = msg.stats
            self.on_stats(msg.stats)
        for report in msg.finetune:
            self.on_finetune_report(report)
        for output in msg.outputs:
            if self.requests is not None:
                self.requests.on_output(output)
            stream = self.streams.get(output.request_id)
            if stream is not None:  # None: the server already gave it up
                stream.put(output)

    async def _watch_process(self) -> None:
        while self._process.is_alive():
            await asyncio.sleep(_WATCH_INTERVAL_S)
        if not self._stopping:
            self._declare_dead(f"engine process exited with code {self._process.exitcode}")

    def _declare_dead(self, reason: str, expected: bool = False) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        if self.streams or not expected:
            log.log(logging.INFO if expected else logging.ERROR, "%s; failing %d open requests", reason, len(self.streams))
        self._end_streams(errors.engine_unavailable(reason))
        for future in self._pending_ops.values():
            if not future.done():
                future.set_exception(EngineDead(reason))
        self._pending_ops.clear()
        if not expected:
            self.on_death(reason)

    def end_open_requests(self, error: errors.APIError) -> None:
        """Ends every request in flight with `error` (the drain deadline of a shutdown has
        passed); each is aborted in the engine as its route unwinds."""
        if self.streams:
            log.warning("ending %d request(s) still in flight: %s", len(self.streams), error.message)
        self._end_streams(error)

    def _end_streams(self, error: errors.APIError) -> None:
        for stream in set(self.streams.values()):
            stream.put(error)
        self.streams.clear()
        if self.requests is not None:
            self.requests.finish_all("error")

    def open_stream(self, requests: list[EngineRequest]) -> OutputStream:
        """Send requests to the engine; their outputs arrive on the returned stream."""
        if not self.alive:
            raise errors.engine_unavailable(self.dead_reason or "not started")
        if len(self.streams) + len(requests) > self.capacity:
            raise errors.queue_full()
        stream = OutputStream(self, [r.request_id for r in requests])
        for request in requests:
            self.streams[request.request_id] = stream
            if self.requests is not None:
                self.requests.start(request)
            self._send(request)
        return stream

    async def adapter_op(self, make_msg) -> AdapterOpDone:
        """Send the adapter operation `make_msg(op_id)` and wait for the engine's answer."""
        if not self.alive:
            raise errors.engine_unavailable(self.dead_reason or "not started")
        op_id = next(self._op_ids)
        future = self._pending_ops[op_id] = asyncio.get_running_loop().create_future()
        self._send(make_msg(op_id))
        try:
            return await future
        except EngineDead as dead:
            raise errors.engine_unavailable(str(dead)) from None

    def send_finetune(self, msg: StartFinetune | ControlFinetune) -> None:
        if not self.alive:
            raise errors.engine_unavailable(self.dead_reason or "not started")
        self._send(msg)

    def abort(self, request_ids: list[str]) -> None:
        if self.alive and request_ids:
            self._send(AbortRequests(request_ids=request_ids))

    def _send(self, msg) -> None:
        # A PUSH socket with a connected peer queues without blocking.
        self._to_engine.send(self._encoder.encode(msg), flags=zmq.NOBLOCK)

    async def shutdown(self) -> None:
        """Stop the engine process (politely, then by force) and release sockets. Idempotent."""
        if self._ctx.closed:
            return
        self._stopping = True
        process = self._process
        if process is not None and process.is_alive():
            try:
                self._send(Shutdown())
            except zmq.ZMQError:
                pass  # engine not connected or queue full: terminate below
            deadline = time.monotonic() + _SHUTDOWN_GRACE_S
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.is_alive():
                process.terminate()
                process.join(2)
            if process.is_alive():
                process.kill()
                process.join()
        # The reader ran until the engine was gone; what it sent last may still be queued.
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self.ready is not None:
            while await self._from_engine.poll(timeout=0):
                self._dispatch(self._decoder.decode(await self._from_engine.recv()))
        self._declare_dead("server shutting down", expected=True)
        self._to_engine.close(linger=0)
        self._from_engine.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
