"""Finetuning jobs through the OpenAI API against a live server, with the openai client.

A job learns a fact the base model does not know, trains while the server serves
other requests, reports steps, validation losses and checkpoints, and its result is
served by name at once, loads in peft, and survives a server restart; a bad training file fails the job
naming the line.
"""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.server.conftest import start_server

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


@pytest.fixture(scope="module")
def ft_server(data_dir):
    live = start_server(data_dir)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def ft_client(ft_server):
    return openai.OpenAI(base_url=f"{ft_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


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
    assert job.fine_tuned_model == f"ft:{base}:default:pw:{job.id}"
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
    first = start_server(tmp_path)
    client = openai.OpenAI(base_url=f"{first.url}/v1", api_key="unused", max_retries=0, timeout=120)
    base = client.models.list().data[0].id
    training = client.files.create(file=("t.jsonl", io.BytesIO(_chat_jsonl(24))), purpose="fine-tune")
    short = client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                           hyperparameters={"n_epochs": 1, "batch_size": 8})
    assert _wait(client, short.id, {"succeeded", "failed"}).status == "succeeded"
    long = client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                          hyperparameters={"n_epochs": 3, "batch_size": 2})  # 36 steps
    deadline = time.monotonic() + 300
    while not list(client.fine_tuning.jobs.checkpoints.list(long.id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    first.stop()  # SIGTERM mid-training, after the step-10 checkpoint

    second = start_server(tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key="unused", max_retries=0, timeout=120)
        finished = client.fine_tuning.jobs.retrieve(short.id)
        assert finished.fine_tuned_model in {m.id for m in client.models.list().data}
        assert client.files.retrieve(training.id).bytes == len(_chat_jsonl(24))
        job = _wait(client, long.id, {"succeeded", "failed"}, timeout=900)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(long.id, limit=500)]
        assert any("continues from its last checkpoint" in m for m in messages)
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(long.id, limit=500) if e.type == "metrics"]
        assert max(steps) == 36
        assert "pineapple" in _ask(client, job.fine_tuned_model).lower()
    finally:
        second.stop()
