"""The default model served over three tensor-parallel ranks (its 9 query and 3 KV heads
and 1,536 MLP columns divide by 3) gives the same greedy completions through the HTTP API
as one rank, with and without a LoRA adapter made by peft; sizes that do not divide are
refused at start; the ranks end with the server; fine-tuning jobs are refused by name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import _children, assert_openai_error, start_server
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
        response = httpx.post(f"{three.url}/v1/fine_tuning/jobs", json={"model": "x", "training_file": "file-x"})
        assert_openai_error(response, 400, param="model")
        assert "tensor_parallel_size" in response.json()["error"]["message"]
    finally:
        three.stop()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "a tensor-parallel rank outlived the server"


def test_a_size_that_does_not_divide_the_heads_is_refused(tmp_path):
    with pytest.raises(RuntimeError) as refused:
        start_server(tmp_path, "--tensor-parallel-size", "2")
    message = str(refused.value)
    assert "tensor_parallel_size 2 does not divide" in message and "3 KV heads" in message
