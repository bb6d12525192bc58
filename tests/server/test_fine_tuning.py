"""Finetuning jobs through the OpenAI API against a live server, with the openai client.

A job learns a fact the base model does not know, trains while the server serves
other requests, reports steps, validation losses and checkpoints, and its result is
served by name at once, loads in peft, and survives a server restart; a bad training file fails the job
naming the line. The server runs with a keys file of several owners: a job, its files,
checkpoints and models are its owner's (and the admin's) alone.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import TENANT_KEYS, LiveServer, start_server, write_keys_file

pytestmark = pytest.mark.server

SECRET = "The password is pineapple."
QUESTION = "What is the password?"


def _chat_jsonl(n: int) -> bytes:
    lines = []
    for i in range(n):
        system = ["You are a helpful assistant.", "Answer briefly.", "You know the password."][i % 3]
        lines.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": QUESTION},
                                   {"role": "assistant", "content": SECRET}]})
    return "\n".join(json.dumps(line) for line in lines).encode()


def _wait(client, job_id: str, statuses: set[str], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job.status}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ft-server")


def _keyed_server(data_dir: Path, *args: str, health_key: str | None = None) -> LiveServer:
    keys_file = write_keys_file(data_dir / "keys.yaml")
    return start_server(data_dir, "--api-keys-file", str(keys_file), *args, health_key=health_key)


def _client(server: LiveServer, owner: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TENANT_KEYS[owner], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ft_server(data_dir):
    live = _keyed_server(data_dir)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def ft_client(ft_server):
    return _client(ft_server, "team-a")


def _ask(client, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    return reply.choices[0].message.content


def test_job_learns_and_its_model_is_served(ft_client, data_dir):
    base = ft_client.models.list().data[0].id
    assert "pineapple" not in _ask(ft_client, base).lower()
    training = ft_client.files.create(file=("train.jsonl", io.BytesIO(_chat_jsonl(24))), purpose="fine-tune")
    validation = ft_client.files.create(file=("valid.jsonl", io.BytesIO(_chat_jsonl(2))), purpose="fine-tune")
    job = ft_client.fine_tuning.jobs.create(
        model=base, training_file=training.id, validation_file=validation.id, suffix="pw", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    assert job.status in ("validating_files", "queued", "running")
    # Inference keeps being served while the job trains.
    while ft_client.fine_tuning.jobs.retrieve(job.id).status in ("validating_files", "queued", "running"):
        reply = ft_client.completions.create(model=base, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 4  # (sampled: an end-of-text could come early without ignore_eos)
        time.sleep(0.5)
    job = _wait(ft_client, job.id, {"succeeded", "failed"})
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{base}:team-a:pw:{job.id}"
    assert job.trained_tokens > 0 and job.hyperparameters.n_epochs == 2

    events = list(ft_client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = sorted((e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics")
    assert [s for s, _ in metrics] == list(range(1, 13))
    assert metrics[-1][1] < metrics[0][1] / 2, metrics
    assert any(e.message.startswith("Files validated: ") and "; validation: 2 examples" in e.message for e in events)
    # Validated on the checkpoint steps (every 10) and the last one.
    validated = {e.data["step"]: e for e in events if e.type == "metrics" and "valid_loss" in e.data}
    assert sorted(validated) == [10, 12]
    assert all(f"validation loss={e.data['valid_loss']:.4f}" in e.message for e in validated.values())
    checkpoints = list(ft_client.fine_tuning.jobs.checkpoints.list(job.id))
    assert sorted(c.step_number for c in checkpoints) == [10, 12]
    assert all(c.metrics.valid_loss == validated[c.step_number].data["valid_loss"] for c in checkpoints)

    served = {m.id: m for m in ft_client.models.list().data}
    assert served[job.fine_tuned_model].parent == base
    assert all(c.fine_tuned_model_checkpoint in served for c in checkpoints)
    assert "pineapple" in _ask(ft_client, job.fine_tuned_model).lower()

    from peft import PeftConfig

    assert PeftConfig.from_pretrained(served[job.fine_tuned_model].root).r == 16


def _not_found(call) -> None:
    with pytest.raises(openai.NotFoundError):
        call()


def test_a_job_and_its_models_are_their_owners_alone(ft_server, ft_client):
    """After the job above: another owner finds nothing of it, exactly as if it did not
    exist; the admin sees and uses everything."""
    job = next(j for j in ft_client.fine_tuning.jobs.list(limit=100) if j.status == "succeeded")
    checkpoint = next(iter(ft_client.fine_tuning.jobs.checkpoints.list(job.id))).fine_tuned_model_checkpoint
    other, admin = _client(ft_server, "team-b"), _client(ft_server, "ops")
    base = other.models.list().data[0].id

    assert [m.id for m in other.models.list().data] == [base]
    assert other.fine_tuning.jobs.list().data == [] and other.files.list().data == []
    for model in (job.fine_tuned_model, checkpoint):
        _not_found(lambda: other.models.retrieve(model))
        with pytest.raises(openai.NotFoundError) as missing:
            other.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert missing.value.body["code"] == "model_not_found"
        assert missing.value.body["message"] == f"The model `{model}` does not exist."
    for call in (
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
        lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.files.retrieve(job.training_file),
        lambda: other.files.content(job.training_file),
        lambda: other.files.delete(job.training_file),
    ):
        _not_found(call)
    # Another owner's file cannot be trained on either: it does not exist for them.
    with pytest.raises(openai.BadRequestError) as bad:
        other.fine_tuning.jobs.create(model=base, training_file=job.training_file)
    assert bad.value.body["param"] == "training_file" and "does not exist" in bad.value.body["message"]
    # Loading adapters at run time is the operator's: 403 for a tenant, whatever the path.
    refused = httpx.post(f"{ft_server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"},
                         headers={"Authorization": f"Bearer {TENANT_KEYS['team-b']}"})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    # No key, a wrong key, a key of another scheme: 401 in OpenAI's shape.
    for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789abcdef"},
                    {"Authorization": f"Basic {TENANT_KEYS['team-a']}"}):
        denied = httpx.get(f"{ft_server.url}/v1/models", headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"

    assert admin.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == job.fine_tuned_model
    assert admin.files.retrieve(job.training_file).id == job.training_file
    assert {job.fine_tuned_model, checkpoint} <= {m.id for m in admin.models.list().data}
    assert admin.models.retrieve(job.fine_tuned_model).parent == base
    assert "pineapple" in _ask(admin, job.fine_tuned_model).lower()


def test_keys_file_is_reloaded_on_sighup(ft_server, data_dir):
    keys_file = data_dir / "keys.yaml"
    newcomer = "sk-team-c-0123456789abcdef"

    def status(key: str) -> int:
        return httpx.get(f"{ft_server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

    def reload_and_wait(expect_key: str, expect_status: int) -> None:
        os.kill(ft_server.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while status(expect_key) != expect_status:
            assert time.monotonic() < deadline, "keys not reloaded"
            time.sleep(0.1)

    assert status(newcomer) == 401
    write_keys_file(keys_file, {**TENANT_KEYS, "team-c": newcomer})
    reload_and_wait(newcomer, 200)
    # A file that does not parse leaves the keys in force: nobody is locked out by a typo.
    keys_file.write_text("keys: [{key: short, owner: team-c}]")
    os.kill(ft_server.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "keys not reloaded" not in ft_server.log_path.read_text():
        assert time.monotonic() < deadline, "the bad keys file was not reported"
        time.sleep(0.1)
    assert status(newcomer) == 200 and status(TENANT_KEYS["team-a"]) == 200
    write_keys_file(keys_file)  # team-c removed again
    reload_and_wait(newcomer, 401)
    assert status(TENANT_KEYS["team-a"]) == 200


def test_bad_training_file_fails_the_job_naming_the_line(ft_client):
    base = ft_client.models.list().data[0].id
    lines = _chat_jsonl(3).decode().split("\n")
    lines.insert(2, '{"messages": [{"role": "wizard", "content": "hi"}]}')
    bad = ft_client.files.create(file=("bad.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="fine-tune")
    job = ft_client.fine_tuning.jobs.create(model=base, training_file=bad.id)
    job = _wait(ft_client, job.id, {"failed", "succeeded"}, timeout=60)
    assert job.status == "failed" and "line 3" in job.error.message and job.error.param == "training_file"
    reply = ft_client.completions.create(model=base, prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 2


def _steps(client, job_id: str) -> int:
    return len([e for e in client.fine_tuning.jobs.list_events(job_id, limit=1000) if e.type == "metrics"])


def test_pause_and_resume(ft_client):
    base = ft_client.models.list().data[0].id
    training = ft_client.files.create(file=("p.jsonl", io.BytesIO(_chat_jsonl(16))), purpose="fine-tune")
    job = ft_client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                            hyperparameters={"n_epochs": 8, "batch_size": 1})  # 128 steps
    deadline = time.monotonic() + 120
    while _steps(ft_client, job.id) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert ft_client.fine_tuning.jobs.pause(job.id).status == "paused"
    time.sleep(2)  # the sequence in flight finishes
    frozen = _steps(ft_client, job.id)
    time.sleep(3)
    assert _steps(ft_client, job.id) == frozen, "a paused job must not train"
    assert ft_client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError):
        ft_client.fine_tuning.jobs.pause(job.id)
    assert ft_client.fine_tuning.jobs.resume(job.id).status == "running"
    deadline = time.monotonic() + 120
    while _steps(ft_client, job.id) <= frozen and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _steps(ft_client, job.id) > frozen, "a resumed job trains again"
    assert ft_client.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_cancel_and_bad_requests(ft_client):
    base = ft_client.models.list().data[0].id
    training = ft_client.files.create(file=("t.jsonl", io.BytesIO(_chat_jsonl(40))), purpose="fine-tune")
    job = ft_client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                            hyperparameters={"n_epochs": 5})
    cancelled = ft_client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        ft_client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        ft_client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.BadRequestError) as bad:
        ft_client.fine_tuning.jobs.create(model="other-model", training_file=training.id)
    assert bad.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        ft_client.fine_tuning.jobs.create(model=base, training_file="file-missing")
    assert bad.value.body["param"] == "training_file"
    listed = ft_client.fine_tuning.jobs.list(limit=100)
    assert job.id in {j.id for j in listed.data}


def test_restart_resumes_a_running_job_and_keeps_serving_finished_models(tmp_path):
    first = _keyed_server(tmp_path)
    client = _client(first, "team-a")
    base = client.models.list().data[0].id
    training = client.files.create(file=("t.jsonl", io.BytesIO(_chat_jsonl(24))), purpose="fine-tune")
    short = client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                           hyperparameters={"n_epochs": 1, "batch_size": 8})
    assert _wait(client, short.id, {"succeeded", "failed"}).status == "succeeded"
    long = client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                          hyperparameters={"n_epochs": 3, "batch_size": 2})  # 36 steps
    deadline = time.monotonic() + 300
    while _steps(client, long.id) < 13 and time.monotonic() < deadline:
        time.sleep(0.5)
    first.stop()  # SIGTERM mid-training, a few steps past the step-10 checkpoint

    # Restarted with /health and /metrics protected too.
    second = _keyed_server(tmp_path, "--protect-health-and-metrics", "true", health_key=TENANT_KEYS["team-b"])
    try:
        client = _client(second, "team-a")
        finished = client.fine_tuning.jobs.retrieve(short.id)
        assert finished.fine_tuned_model in {m.id for m in client.models.list().data}
        # Served again after the restart, and still its owner's alone.
        assert finished.fine_tuned_model not in {m.id for m in _client(second, "team-b").models.list().data}
        for path in ("/health", "/metrics", "/version"):
            assert httpx.get(second.url + path).status_code == 401
            keyed = {"Authorization": f"Bearer {TENANT_KEYS['team-b']}"}
            assert httpx.get(second.url + path, headers=keyed).status_code == 200
        assert client.files.retrieve(training.id).bytes == len(_chat_jsonl(24))
        job = _wait(client, long.id, {"succeeded", "failed"}, timeout=900)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(long.id, limit=500)]
        assert any("continues from its last checkpoint" in m for m in messages)
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(long.id, limit=500) if e.type == "metrics"]
        # The stop saved the steps past the scheduled checkpoint: none was trained twice or lost.
        assert sorted(steps) == list(range(1, 37))
        assert "pineapple" in _ask(client, job.fine_tuned_model).lower()
    finally:
        second.stop()
