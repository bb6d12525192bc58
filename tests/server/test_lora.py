"""Multi-LoRA serving against a live server: adapters made by peft on the default model.

The server starts with two adapters (--lora-modules), may load more at run time from
its --lora-roots, and has max_loras=2 compute slots, so the third adapter in a batch
waits for a slot. Greedy outputs of every adapter must equal transformers + peft.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.peft_adapters import peft_reference, write_peft_adapter
from tests.server.conftest import assert_openai_error, start_server

pytestmark = pytest.mark.server

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "sql": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "chat-rs": {"r": 16, "lora_alpha": 16, "use_rslora": True, "target_modules": ALL_TARGETS},
    "mlp": {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def base_dir() -> Path:
    from engine.model_files import resolve_model

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    return resolve_model(None, cache)[0]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, base_dir) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        write_peft_adapter(base_dir, root / name, seed=seed, b_scale=0.3, **options)
    return root


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, adapter_root):
    live = start_server(
        tmp_path_factory.mktemp("lora-server"),
        "--lora-modules", f"sql={adapter_root / 'sql'}", f"chat-rs={adapter_root / 'chat-rs'}",
        "--lora-roots", str(adapter_root),
        "--max-loras", "2",
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def lora_client(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lora_http(lora_server):
    import httpx

    with httpx.Client(base_url=lora_server.url, timeout=120) as c:
        yield c


def _greedy_reference(base_dir, adapter_dir, ids: list[int]) -> list[int]:
    model = peft_reference(base_dir, adapter_dir)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=2,
        )
    return out[0, len(ids):].tolist()


def test_models_lists_adapters_with_parent(lora_client):
    models = {m.id: m for m in lora_client.models.list().data}
    base = next(iter(models))
    assert {"sql", "chat-rs"} <= set(models)
    assert models["sql"].parent == base and models["chat-rs"].parent == base
    assert models[base].parent is None


def test_mixed_batch_each_request_gets_its_own_adapter(lora_client, lora_http, base_dir, adapter_root):
    """Base + three adapters in flight at once (two slots): every output equals its peft reference."""
    lora_http.post("/v1/load_lora_adapter", json={"lora_name": "mlp", "lora_path": str(adapter_root / "mlp")})
    base_name = lora_client.models.list().data[0].id
    jobs = [(name, prompt) for prompt in PROMPTS[:2] for name in [base_name, *ADAPTERS]]
    tokenized = {p: lora_http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in PROMPTS[:2]}

    def run(job):
        name, prompt = job
        got = lora_client.completions.create(
            model=name, prompt=tokenized[prompt], max_tokens=MAX_TOKENS, temperature=0
        )
        assert got.model == name
        return got.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(run, jobs))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    outputs_by_adapter: dict[str, set[str]] = {}
    for (name, prompt), text in zip(jobs, texts):
        adapter_dir = None if name == base_name else adapter_root / name
        expected = _greedy_reference(base_dir, adapter_dir, tokenized[prompt])
        assert text == tokenizer.decode(expected, skip_special_tokens=True), (name, prompt)
        outputs_by_adapter.setdefault(prompt, set()).add(text)
    # The adapters really change the model: the four answers to a prompt are not all the same.
    assert all(len(answers) > 1 for answers in outputs_by_adapter.values())


def test_unload_while_running_lets_the_request_finish(lora_client, lora_http, adapter_root):
    lora_http.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": str(adapter_root / "mlp")})
    stream = lora_client.completions.create(
        model="busy", prompt="Count with me: one, two,", max_tokens=40, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    unloaded = lora_http.post("/v1/unload_lora_adapter", json={"lora_name": "busy"})
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json() == {"id": "busy", "object": "model", "deleted": True}
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert "busy" not in {m.id for m in lora_client.models.list().data}
    gone = lora_http.post("/v1/completions", json={"model": "busy", "prompt": "hi", "max_tokens": 2})
    assert_openai_error(gone, 404, param="model", code="model_not_found")
    again = lora_http.post("/v1/unload_lora_adapter", json={"lora_name": "busy"})
    assert_openai_error(again, 404, param="lora_name")


def _copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_bad_adapters_get_400_and_nothing_changes(lora_client, lora_http, adapter_root, tmp_path_factory):
    bad = adapter_root / "bad"
    bad.mkdir()
    cases = {}

    missing = _copy_adapter(adapter_root / "sql", bad / "missing-weights")
    (missing / "adapter_model.safetensors").unlink()
    cases["missing-weights"] = (missing, "lora_path", "adapter_model.safetensors")

    wrong_shape = _copy_adapter(adapter_root / "sql", bad / "wrong-shape")
    tensors = load_file(wrong_shape / "adapter_model.safetensors")
    tensors = {k: (v[:, :100].contiguous() if "lora_A" in k else v) for k, v in tensors.items()}
    save_file(tensors, wrong_shape / "adapter_model.safetensors")
    cases["wrong-shape"] = (wrong_shape, "lora_path", "do not fit the base model")

    high_rank = _copy_adapter(adapter_root / "sql", bad / "high-rank")
    tensors = load_file(high_rank / "adapter_model.safetensors")
    tensors = {k: torch.cat([v] * 4, dim=0 if "lora_A" in k else 1).contiguous() for k, v in tensors.items()}
    save_file(tensors, high_rank / "adapter_model.safetensors")
    _edit_config(high_rank, r=32)
    cases["high-rank"] = (high_rank, "lora_path", "exceeds max_lora_rank=16")

    foreign_target = _copy_adapter(adapter_root / "sql", bad / "foreign-target")
    _edit_config(foreign_target, target_modules=["c_attn"])
    cases["foreign-target"] = (foreign_target, "lora_path", "'c_attn'")

    foreign_weight = _copy_adapter(adapter_root / "sql", bad / "foreign-weight")
    tensors = load_file(foreign_weight / "adapter_model.safetensors")
    tensors = {k.replace("q_proj", "c_attn"): v for k, v in tensors.items()}
    save_file(tensors, foreign_weight / "adapter_model.safetensors")
    cases["foreign-weight"] = (foreign_weight, "lora_path", "c_attn")

    broken_json = _copy_adapter(adapter_root / "sql", bad / "broken-json")
    (broken_json / "adapter_config.json").write_text("{not json")
    cases["broken-json"] = (broken_json, "lora_path", "not valid JSON")

    outside = tmp_path_factory.mktemp("elsewhere") / "sql"
    _copy_adapter(adapter_root / "sql", outside)
    cases["outside-roots"] = (outside, "lora_path", "not under an allowed adapter root")
    # The same adapter reached through the root: by `..`, and by a symlink placed inside it.
    cases["dotdot-escape"] = (adapter_root / ".." / outside.parent.name / "sql", "lora_path", "not under an allowed")
    (adapter_root / "link-out").symlink_to(outside, target_is_directory=True)
    cases["symlink-escape"] = (adapter_root / "link-out", "lora_path", "not under an allowed adapter root")

    cases["name-taken"] = (adapter_root / "mlp", "lora_name", "already loaded")

    before = [m.id for m in lora_client.models.list().data]
    for case, (path, param, fragment) in cases.items():
        name = "sql" if case == "name-taken" else f"bad-{case}"
        response = lora_http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        error = assert_openai_error(response, 400, param=param)
        assert fragment in error["message"], (case, error)
    assert [m.id for m in lora_client.models.list().data] == before
    assert_openai_error(lora_http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, param="lora_path")
    # Still serving, adapters included.
    reply = lora_client.completions.create(model="sql", prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3


def test_adapter_metrics_while_running(lora_client, lora_http):
    stream = lora_client.completions.create(
        model="chat-rs", prompt="Hi", max_tokens=30, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    text = lora_http.get("/metrics").text
    list(chunks)
    running = [line for line in text.splitlines() if line.startswith("coserve:lora_requests_running{")]
    assert any('lora_name="chat-rs"' in line and line.endswith(" 1.0") for line in running), running
    assert "coserve:num_requests_waiting_for_lora_slot{" in text
