"""Tensor parallelism on the CPU (gloo): TP=2 against TP=1 through the real loader.

Two processes form a gloo group; each loads its shard of a tiny random checkpoint and
runs the same iterations (chunked prefills mixed with decodes over the paged cache,
with and without a batch mixing LoRA adapters made by peft) and the same greedy
generation. Every rank's logits must equal the single-process model's within 1e-5, and
the greedy tokens be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.block_manager import BlockManager
from engine.messages import SamplingParams
from engine.lora.manager import LoRAManager
from engine.model.loader import load_model
from engine.parallel.tensor_parallel import TensorParallel, check_divides
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from tests.engine.teacher_forcing import run_teacher_forced
from tests.engine.tiny_models import tiny_llama_config, tiny_qwen2_config, write_tiny_model
from tests.peft_adapters import write_peft_adapter

pytestmark = pytest.mark.tiny

PROMPT_LENS = [5, 13, 37, 9, 21, 6]
# Column-parallel projections only (A whole, B split), and all seven (o and down: A split).
ADAPTERS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]),
}


def _engine(model, loras: LoRAManager | None):
    blocks = BlockManager(num_blocks=96, block_size=4)
    runner = ModelRunner(model, blocks.num_blocks, 4, max_model_len=256, device="cpu",
                         lora_backend=None if loras is None else loras.backend)
    scheduler = Scheduler(blocks, max_num_batched_tokens=24, max_num_seqs=8, max_model_len=256, eos_token_ids=[],
                          adapter_slots=loras)
    return runner, scheduler


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def run_workloads(model, adapter_root: Path | None, tp: TensorParallel | None = None):
    """(every logits row of a teacher-forced mixed workload, stacked [rows, vocab];
    greedy continuations of the same prompts). With `adapter_root`, the sequences take
    turns: base model, then each adapter."""
    loras = None
    if adapter_root is not None:
        loras = LoRAManager(model.lora_layout(), max_loras=2, max_cpu_loras=2, max_rank=8, dtype=torch.float32,
                            device="cpu", tensor_parallel=tp)
        for name in ADAPTERS:
            loras.add(name, adapter_root / name)
    names = [None, *ADAPTERS] if loras is not None else [None]

    def sequences(prefix: str, max_tokens: int) -> list[Sequence]:
        return [
            Sequence(f"{prefix}{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), 0.0,
                     None if names[i % len(names)] is None else loras.acquire(names[i % len(names)]))
            for i, prompt in enumerate(_prompts(model.config.vocab_size))
        ]

    runner, scheduler = _engine(model, loras)
    for seq in sequences("t", 6):
        scheduler.add(seq)
    computed, mixed = run_teacher_forced(scheduler, runner, torch.Generator().manual_seed(2))
    assert mixed
    logits = torch.stack([row.float() for _, _, row in computed])

    runner, scheduler = _engine(model, loras)
    seqs = sequences("g", 8)
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_work():
        plan = scheduler.schedule()
        scheduler.update(plan, runner.execute(plan).sampled)
    return logits, [seq.token_ids[seq.num_prompt_tokens :] for seq in seqs]


def _rank_main(rank: int, size: int, init_file: str, model_dir: str, adapter_root: str | None, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        tp = TensorParallel(rank, size)
        model = load_model(Path(model_dir), torch.float32, tensor_parallel=tp)
        # What this rank holds: its KV heads, its share of the MLP's intermediate columns.
        shard = (model.num_kv_heads, model.layers[0].mlp.down_proj.weight.shape[1])
        adapters = None if adapter_root is None else Path(adapter_root)
        torch.save((*run_workloads(model, adapters, tp), shard), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "config, with_adapters",
    [(tiny_llama_config(), False), (tiny_qwen2_config(), False), (tiny_llama_config(), True)],
    ids=["llama", "qwen2-tied-bias", "llama-mixed-adapters"],
)
def test_tp2_matches_tp1(tmp_path, config, with_adapters):
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, config)
    adapter_root = None
    if with_adapters:
        adapter_root = tmp_path / "adapters"
        for seed, (name, options) in enumerate(ADAPTERS.items()):
            write_peft_adapter(model_dir, adapter_root / name, seed=seed, **options)
    expected_logits, expected_tokens = run_workloads(load_model(model_dir, torch.float32), adapter_root)
    if with_adapters:  # the adapters change what the base model computes
        base_logits, _ = run_workloads(load_model(model_dir, torch.float32), None)
        assert (expected_logits - base_logits).abs().max() > 1e-2
    args = (2, str(tmp_path / "rendezvous"), str(model_dir), adapter_root and str(adapter_root), str(tmp_path))
    mp.spawn(_rank_main, args=args, nprocs=2)
    for rank in range(2):
        logits, tokens, shard = torch.load(tmp_path / f"rank{rank}.pt")
        assert shard == (config.num_key_value_heads // 2, config.intermediate_size // 2)
        assert logits.shape == expected_logits.shape == (sum(PROMPT_LENS) + len(PROMPT_LENS) * 5, config.vocab_size)
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
