"""The engine process's loop (`engine.process._serve`) over real ZeroMQ sockets."""

from __future__ import annotations

import threading

import msgspec
import pytest
import zmq

from engine.finetune import runs
from engine.messages import (
    ControlFinetune,
    EngineOutputs,
    EngineToServer,
    FinetuneExample,
    ServerToEngine,
    Shutdown,
    StartFinetune,
)
from engine.process import _serve
from tests.engine.test_finetune_equivalence import make_examples
from tests.engine.test_finetune_runs import SETTINGS, _engine
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny


def test_a_paused_engine_reports_the_checkpoint_written_after_the_pause(tmp_path, monkeypatch):
    """The job is paused right after its step-2 checkpoint was snapshotted, so the engine
    has no iteration left to run while the write goes on. The checkpoint must still reach
    the server once written, with no further message to wake the loop."""
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    ctx = zmq.Context()
    to_engine, inbox = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    inbox.bind("inproc://to-engine")
    to_engine.connect("inproc://to-engine")
    outbox, from_engine = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    from_engine.bind("inproc://from-engine")
    outbox.connect("inproc://from-engine")
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineToServer)

    # The engine thread pauses the job itself as it takes the step-2 snapshot (so the
    # pause is in the inbox before the next iteration); the write waits for `release`.
    pauser = ctx.socket(zmq.PUSH)
    pauser.connect("inproc://to-engine")
    release = threading.Event()
    snapshot, write = runs.take_snapshot, runs.write_checkpoint

    def snapshot_then_pause(job, *args, **kwargs):
        pauser.send(encoder.encode(ControlFinetune("job", "pause")))
        return snapshot(job, *args, **kwargs)

    def held_write(snap, path):
        release.wait(timeout=30)
        write(snap, path)

    monkeypatch.setattr(runs, "take_snapshot", snapshot_then_pause)
    monkeypatch.setattr(runs, "write_checkpoint", held_write)
    engine = _engine(model_dir)
    engine_decoder = msgspec.msgpack.Decoder(ServerToEngine)
    loop = threading.Thread(target=_serve, args=(engine, inbox, outbox, encoder, engine_decoder), daemon=True)
    loop.start()
    examples = [FinetuneExample(e.token_ids, e.target) for e in make_examples(97, count=6, seed=4)]
    to_engine.send(encoder.encode(StartFinetune("job", examples, SETTINGS, str(tmp_path / "job"), str(model_dir))))

    def reports_until(done, timeout_ms=30_000):
        seen = []
        while from_engine.poll(timeout_ms):
            msg = decoder.decode(from_engine.recv())
            if isinstance(msg, EngineOutputs):
                seen += msg.finetune
                if done(seen):
                    return seen
        raise AssertionError(f"no such report within {timeout_ms} ms: {seen}")

    try:
        before = reports_until(lambda seen: any(r.status == "paused" for r in seen))
        assert not engine.has_work()
        assert [s.step for r in before for s in r.steps] == [1, 2]
        assert not [c for r in before for c in r.checkpoints], "the write is still held"
        release.set()
        after = reports_until(lambda seen: any(r.checkpoints for r in seen), timeout_ms=10_000)
        assert [step for r in after for step, _ in r.checkpoints] == [2]
        assert (tmp_path / "job" / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()
    finally:
        release.set()
        to_engine.send(encoder.encode(Shutdown()))
        loop.join(timeout=30)
        engine.close()
        for sock in (to_engine, pauser, from_engine):
            sock.close(linger=0)
        ctx.term()
