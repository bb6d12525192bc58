"""The engine process: a loop around `LLMEngine.step()` fed over ZeroMQ.

The server binds two sockets and starts this process, which connects to them:
  input  (server PUSH -> engine PULL): EngineRequest | AbortRequests |
                                       LoadAdapter | UnloadAdapter | Shutdown
  output (engine PUSH -> server PULL): EngineReady | EngineFailed first, then one
                                       EngineOutputs per iteration, and an
                                       AdapterOpDone for each adapter operation
When idle the loop blocks on the input socket, so an idle engine costs no CPU (while a
checkpoint is being written it wakes every few ms to report it once written).
"""

from __future__ import annotations

import logging
import signal
import traceback

import msgspec
import zmq

from engine.config import EngineConfig
from engine.lora.adapter import AdapterError
from engine.messages import (
    AbortRequests,
    AdapterOpDone,
    ControlFinetune,
    EngineFailed,
    EngineOutputs,
    EngineRequest,
    LoadAdapter,
    ServerToEngine,
    Shutdown,
    StartFinetune,
    UnloadAdapter,
)

log = logging.getLogger(__name__)

# How often an idle engine looks for checkpoint writes that have finished.
_CHECKPOINT_POLL_MS = 20
# How long the last reports may take to leave when the engine stops.
_SHUTDOWN_LINGER_MS = 2000


def run_engine_process(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(ServerToEngine)
    try:
        from engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
    except Exception as exc:  # noqa: BLE001 - any start failure is reported, then we exit
        log.error("engine failed to start: %s", traceback.format_exc())
        outbox.send(encoder.encode(EngineFailed(message=f"{type(exc).__name__}: {exc}")))
        outbox.close(linger=2000)
        return
    outbox.send(encoder.encode(engine.ready_info()))
    # SIGTERM (the server's terminate, or its death via PDEATHSIG) unwinds through the
    # `finally` below, so a locked GPU clock is always given back.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _serve(engine, inbox, outbox, encoder, decoder)
    finally:
        engine.close()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def _serve(engine, inbox, outbox, encoder, decoder) -> None:
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    while True:
        if engine.has_work():
            timeout = 0
        else:  # idle: block, or wake up to report checkpoints as their writes finish
            timeout = _CHECKPOINT_POLL_MS if engine.finetune_runs.writing() else None
        while poller.poll(timeout):
            msg = decoder.decode(inbox.recv())
            if isinstance(msg, EngineRequest):
                rejected = engine.add_request(msg)
                if rejected is not None:
                    outbox.send(encoder.encode(EngineOutputs(outputs=[rejected], stats=engine.stats())))
            elif isinstance(msg, LoadAdapter | UnloadAdapter):
                outbox.send(encoder.encode(_adapter_op(engine, msg)))
            elif isinstance(msg, StartFinetune | ControlFinetune):
                if isinstance(msg, StartFinetune):
                    engine.finetune_runs.start(msg)
                else:
                    engine.finetune_runs.control(msg)
                reports = engine.finetune_runs.reports()
                if reports:
                    outbox.send(encoder.encode(EngineOutputs(outputs=[], finetune=reports)))
            elif isinstance(msg, AbortRequests):
                engine.abort(msg.request_ids)
                if not engine.has_work():
                    # No step follows to report it: tell the server the engine is now idle.
                    outbox.send(encoder.encode(EngineOutputs(outputs=[], stats=engine.stats())))
            elif isinstance(msg, Shutdown):
                log.info("engine shutting down")
                engine.finetune_runs.save_progress()  # checkpoints of the steps since the last ones
                # The steps and checkpoints not yet reported, for the server to record before it exits.
                if reports := engine.finetune_runs.idle_reports():
                    outbox.send(encoder.encode(EngineOutputs(outputs=[], finetune=reports)))
                outbox.close(linger=_SHUTDOWN_LINGER_MS)
                inbox.close(linger=0)
                return
            timeout = 0
        if engine.has_work():
            outputs, stats = engine.step()
            outbox.send(encoder.encode(EngineOutputs(outputs=outputs, stats=stats, finetune=engine.finetune_runs.reports())))
        elif reports := engine.finetune_runs.idle_reports():
            outbox.send(encoder.encode(EngineOutputs(outputs=[], finetune=reports)))


def _adapter_op(engine, msg: LoadAdapter | UnloadAdapter) -> AdapterOpDone:
    try:
        if isinstance(msg, LoadAdapter):
            engine.load_adapter(msg.name, msg.path)
        else:
            engine.unload_adapter(msg.name)
    except AdapterError as exc:
        return AdapterOpDone(op_id=msg.op_id, error=str(exc), param=exc.param)
    return AdapterOpDone(op_id=msg.op_id)
