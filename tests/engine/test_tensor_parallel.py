"""Tensor parallelism on the CPU (gloo): TP=2 against TP=1 through the real loader.

Two processes form a gloo group; each loads its shard of a tiny random checkpoint and
runs the same iterations (chunked prefills mixed with decodes over the paged cache) and
the same greedy generation. Rank 0's logits must equal the single-process model's
within 1e-5, every rank's the same, and the greedy tokens identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.block_manager import BlockManager
from engine.messages import SamplingParams
from engine.model.loader import load_model
from engine.parallel.tensor_parallel import TensorParallel, check_divides
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from tests.engine.teacher_forcing import run_teacher_forced
from tests.engine.tiny_models import tiny_llama_config, tiny_qwen2_config, write_tiny_model

pytestmark = pytest.mark.tiny

PROMPT_LENS = [5, 13, 37]


def _engine(model, budget: int = 24):
    blocks = BlockManager(num_blocks=64, block_size=4)
    runner = ModelRunner(model, blocks.num_blocks, 4, max_model_len=256, device="cpu")
    scheduler = Scheduler(blocks, max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256, eos_token_ids=[])
    return runner, scheduler


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def run_workloads(model) -> tuple[torch.Tensor, list[list[int]]]:
    """(every logits row of a teacher-forced mixed workload, stacked [rows, vocab];
    greedy continuations of the same prompts)."""
    prompts = _prompts(model.config.vocab_size)
    runner, scheduler = _engine(model)
    for i, prompt in enumerate(prompts):
        scheduler.add(Sequence(f"t{i}", prompt, SamplingParams(max_tokens=6, temperature=0.0), 0.0))
    computed, mixed = run_teacher_forced(scheduler, runner, torch.Generator().manual_seed(2))
    assert mixed
    logits = torch.stack([row.float() for _, _, row in computed])

    runner, scheduler = _engine(model)
    seqs = [Sequence(f"g{i}", p, SamplingParams(max_tokens=8, temperature=0.0), 0.0) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_work():
        plan = scheduler.schedule()
        scheduler.update(plan, runner.execute(plan).sampled)
    return logits, [seq.token_ids[seq.num_prompt_tokens :] for seq in seqs]


def _rank_main(rank: int, size: int, init_file: str, model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        model = load_model(Path(model_dir), torch.float32, tensor_parallel=TensorParallel(rank, size))
        # What this rank holds: its KV heads, its share of the MLP's intermediate columns.
        shard = (model.num_kv_heads, model.layers[0].mlp.down_proj.weight.shape[1])
        torch.save((*run_workloads(model), shard), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("config", [tiny_llama_config(), tiny_qwen2_config()], ids=["llama", "qwen2-tied-bias"])
def test_tp2_matches_tp1(tmp_path, config):
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, config)
    expected_logits, expected_tokens = run_workloads(load_model(model_dir, torch.float32))
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rendezvous"), str(model_dir), str(tmp_path)), nprocs=2)
    for rank in range(2):
        logits, tokens, shard = torch.load(tmp_path / f"rank{rank}.pt")
        assert shard == (config.num_key_value_heads // 2, config.intermediate_size // 2)
        assert logits.shape == expected_logits.shape == (sum(PROMPT_LENS) + 3 * 5, config.vocab_size)
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
        assert tokens == expected_tokens and all(len(t) == 8 for t in tokens)


@pytest.mark.unit
def test_sizes_that_do_not_divide_are_refused():
    config = tiny_llama_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=90)
    check_divides(config, 3)  # 6, 3 and 90 divide by 3
    with pytest.raises(ValueError, match=r"3 KV heads \(num_key_value_heads\)") as refused:
        check_divides(config, 2)
    assert "attention heads" not in str(refused.value) and "intermediate" not in str(refused.value)
    with pytest.raises(ValueError, match=r"6 attention heads .* and 3 KV heads .* and 90 intermediate_size"):
        check_divides(config, 4)
