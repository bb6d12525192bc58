"""Test tiers. Every test has exactly one: the tier marker closest to it (a test's own
over its module's). `--tiers unit,tiny` runs those tiers only; `make test` runs all.

- unit: no model weights and no server (block manager, scheduler, policies, kernels
  against references, stores, request schemas);
- tiny: tiny random-weight models built in the test, against transformers and PEFT;
- model: the default model (SmolLM2-135M-Instruct) or its tokenizer, in-process;
- server: a live coserve process (on the default model) over HTTP;
- gpu: the engine on a CUDA device against the same references (skipped without one).
"""

from __future__ import annotations

import pytest

TIERS = ("unit", "tiny", "model", "server", "gpu")


def pytest_addoption(parser):
    parser.addoption("--tiers", default="", help=f"comma-separated tiers to run, of {', '.join(TIERS)} (default: all)")


def tier_of(item: pytest.Item) -> str | None:
    # iter_markers walks from the test outwards: the first tier found is the closest.
    return next((mark.name for mark in item.iter_markers() if mark.name in TIERS), None)


def pytest_collection_modifyitems(config, items):
    wanted = {name.strip() for name in config.getoption("--tiers").split(",") if name.strip()}
    if unknown := wanted - set(TIERS):
        raise pytest.UsageError(f"--tiers: unknown {sorted(unknown)}; the tiers are {', '.join(TIERS)}")
    untiered = [item.nodeid for item in items if tier_of(item) is None]
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {untiered[:5]}")
    if not wanted:
        return
    deselected = [item for item in items if tier_of(item) not in wanted]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if tier_of(item) in wanted]


@pytest.fixture
def tp_model_dir(tmp_path, monkeypatch):
    """For an engine at several tensor-parallel ranks in the test process (engine tests
    on the CPU, gpu tests on CUDA): a tiny Llama whose 4 heads, 2 KV heads and MLP divide
    by 2; a fresh rendezvous port per test; the test process's thread count restored
    afterwards (rank 0 is the test process and sets it)."""
    import socket

    import torch

    from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    threads = torch.get_num_threads()
    path = tmp_path / "model"
    write_tiny_model(path, tiny_llama_config())
    yield path
    torch.set_num_threads(threads)
