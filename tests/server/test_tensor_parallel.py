"""The default model served over three tensor-parallel ranks (its 9 query and 3 KV heads
and 1,536 MLP columns divide by 3) gives the same greedy completions through the HTTP API
as one rank, with and without a LoRA adapter made by peft; sizes that do not divide are
refused at start; a fine-tuning job trains on the three ranks and its model is served;
the ranks end with the server.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
from peft import PeftConfig

from tests.server.conftest import _children, start_server
from tests.peft_adapters import write_peft_adapter

pytestmark = pytest.mark.server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
ADAPTER = {"r": 8, "lora_alpha": 16,
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    from engine.model_files import resolve_model

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    path = tmp_path_factory.mktemp("tp-adapter") / "all"
    write_peft_adapter(resolve_model(None, cache)[0], path, seed=7, b_scale=0.3, **ADAPTER)
    return path


def base_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def greedy_completions(url: str, model: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        response = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        })
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    return texts


def test_three_ranks_serve_what_one_serves(tmp_path, adapter_dir):
    args = ("--lora-modules", f"all={adapter_dir}", "--num-threads", "1")
    (tmp_path / "tp1").mkdir()
    (tmp_path / "tp3").mkdir()
    one = start_server(tmp_path / "tp1", *args)
    try:
        base = base_model(one.url)
        expected = {model: greedy_completions(one.url, model) for model in (base, "all")}
    finally:
        one.stop()
    assert expected[base] != expected["all"]  # the adapter changes what is generated

    three = start_server(tmp_path / "tp3", *args, "--tensor-parallel-size", "3")
    ranks = []
    try:
        engine = three.engine_pid()
        ranks = [pid for pid in _children(engine) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(ranks) == 2  # ranks 1 and 2 beside the engine, rank 0
        for model in (base, "all"):
            assert greedy_completions(three.url, model) == expected[model], model
        fine_tune_and_serve(three.url, base)
    finally:
        three.stop()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "a tensor-parallel rank outlived the server"


def fine_tune_and_serve(url: str, base: str) -> None:
    """A small job (two optimizer steps) co-served with completions; its model is then
    served and its adapter is a whole PEFT adapter of the base model (equality with one
    rank's training: tests/engine/test_tensor_parallel_finetune.py)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    line = {"messages": [{"role": "user", "content": "What is the password?"},
                         {"role": "assistant", "content": "The password is pineapple."}]}
    training = client.files.create(file=("t.jsonl", io.BytesIO("\n".join([json.dumps(line)] * 8).encode())),
                                   purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=base, training_file=training.id, suffix="tp", seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
    )
    deadline = time.monotonic() + 900
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status in ("validating_files", "queued", "running"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        reply = client.completions.create(model=base, prompt="Hello", max_tokens=2, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 2
        time.sleep(1)
    assert job.status == "succeeded", job.error
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=50) if e.type == "metrics"]
    assert sorted(steps) == [1, 2]
    served = {m.id: m for m in client.models.list().data}
    assert PeftConfig.from_pretrained(served[job.fine_tuned_model].root).r == 16
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "What is the password?"}])
    assert reply.usage.completion_tokens > 0


def test_a_size_that_does_not_divide_the_heads_is_refused(tmp_path):
    with pytest.raises(RuntimeError) as refused:
        start_server(tmp_path, "--tensor-parallel-size", "2")
    message = str(refused.value)
    assert "tensor_parallel_size 2 does not divide" in message and "3 KV heads" in message
