"""kill -9 of the whole daemon (server and engine at once) while a finetuning job trains
and an upload is half sent; a restart on the same data directory finds every
acknowledged file intact, nothing half-written, and the job going on from its last
checkpoint to success."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import start_server
from tests.server.test_fine_tuning import _chat_jsonl, _steps, _wait

pytestmark = pytest.mark.server


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _slow_upload(url: str, outcome: list) -> None:
    """A multipart upload that sends its first megabytes and then stalls, as a client on a slow link."""
    boundary = "coserve-crash-test"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(4):
            yield _chat_jsonl(2000)[:1_000_000]
        outcome.append("stalled")
        time.sleep(60)

    try:
        httpx.post(f"{url}/v1/files", content=body(), timeout=90,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        outcome.append("answered")
    except httpx.HTTPError:
        outcome.append("cut off")


def test_kill_9_during_training_and_upload(tmp_path):
    first = start_server(tmp_path)
    client = openai.OpenAI(base_url=f"{first.url}/v1", api_key="unused", max_retries=0, timeout=120)
    base = client.models.list().data[0].id
    acknowledged = {}
    for n in (24, 7, 300):
        data = _chat_jsonl(n)
        acknowledged[client.files.create(file=(f"t{n}.jsonl", io.BytesIO(data)), purpose="fine-tune").id] = _sha256(data)
    training = next(iter(acknowledged))
    job = client.fine_tuning.jobs.create(model=base, training_file=training,
                                         hyperparameters={"n_epochs": 2, "batch_size": 2})  # 24 steps
    deadline = time.monotonic() + 300
    while _steps(client, job.id) < 12 and time.monotonic() < deadline:
        time.sleep(0.3)
    upload: list[str] = []
    uploader = threading.Thread(target=_slow_upload, args=(first.url, upload), daemon=True)
    uploader.start()
    while not upload and time.monotonic() < deadline:
        time.sleep(0.1)
    assert upload == ["stalled"]
    stepped = _steps(client, job.id)
    engine = first.engine_pid()
    os.kill(first.process.pid, signal.SIGKILL)
    os.kill(engine, signal.SIGKILL)
    first.process.wait(10)
    while os.path.exists(f"/proc/{engine}"):
        time.sleep(0.05)

    second = start_server(tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key="unused", max_retries=0, timeout=120)
        listed = {f.id for f in client.files.list().data}
        assert listed == set(acknowledged), "the half-sent upload must not appear, every acknowledged one must"
        for file_id, digest in acknowledged.items():
            assert _sha256(client.files.content(file_id).content) == digest
        stray = [p.name for p in (tmp_path / "files").iterdir() if p.name not in acknowledged]
        assert stray == [], stray
        finished = _wait(client, job.id, {"succeeded", "failed"}, timeout=900)
        assert finished.status == "succeeded", finished.error
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
        assert any("continues from its last checkpoint" in e.message for e in events)
        steps = [e.data["step"] for e in events if e.type == "metrics"]
        # Steps after the step-10 checkpoint were trained again after the restart; none is missing.
        assert set(steps) == set(range(1, 25)) and stepped >= 12
        checkpoint_dirs = tmp_path / "jobs" / job.id / "checkpoints"
        assert all(not p.name.startswith(".") for p in checkpoint_dirs.iterdir()), list(checkpoint_dirs.iterdir())
        assert sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)) == [10, 20, 24]
        reply = client.chat.completions.create(model=finished.fine_tuned_model, max_tokens=4,
                                               messages=[{"role": "user", "content": "What is the password?"}])
        assert reply.choices[0].message.content
    finally:
        second.stop()
