"""Our model, loaded through the real loader, against transformers' logits (float32).

Sequences of different lengths are prefilled in chunks, decoded through the paged
cache and mixed in the same iterations; block_size 4 spreads every sequence over
many blocks. Every token the engine computes is checked against the reference.
"""

from __future__ import annotations

import pytest
import torch

from engine.block_manager import BlockManager
from engine.messages import SamplingParams
from engine.model.loader import load_model
from engine.model.packed_linear import onednn_packing_available
from engine.ops import (
    BF16_LINEAR_MAX_ROWS,
    bf16_linear_available,
    cpu_kernels_available,
    prefill_attention_available,
)
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from tests.engine.teacher_forcing import run_teacher_forced
from tests.engine.tiny_models import (
    tiny_llama_config,
    tiny_qwen2_config,
    write_tiny_model,
)

pytestmark = pytest.mark.tiny

ATOL = 1e-4


def _reference_logits(reference, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([token_ids])).logits[0]  # [len, vocab]


def _run_and_compare(model_dir, reference, prompt_lens, decode_steps, budget, use_kernels, block_size=4,
                     panel_max_rows=0, dtype=torch.float32, atol=ATOL, onednn_max_rows=0, prefill_kernel=None,
                     device="cpu", kv_dtype=None):
    """prefill_kernel: None = the runner's own choice; True forces the AMX prefill kernel.
    kv_dtype: the KV cache's type; None = the model's."""
    model = load_model(model_dir, dtype, device, panel_max_rows=panel_max_rows, onednn_max_rows=onednn_max_rows)
    blocks = BlockManager(num_blocks=64, block_size=block_size)
    runner = ModelRunner(model, blocks.num_blocks, block_size, max_model_len=256, device=device, use_kernels=use_kernels,
                         kv_dtype=kv_dtype)
    if prefill_kernel is not None:
        runner.prefill_kernel = prefill_kernel
    scheduler = Scheduler(blocks, max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256, eos_token_ids=[])
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    seqs = []
    for i, n in enumerate(prompt_lens):
        prompt = torch.randint(3, vocab, (n,), generator=gen).tolist()
        seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=decode_steps, temperature=0.0), 0.0)
        scheduler.add(seq)
        seqs.append(seq)

    computed, saw_mixed_iteration = run_teacher_forced(scheduler, runner, gen)
    assert saw_mixed_iteration, "the workload should mix decodes and prefill chunks in one iteration"
    references = {s.request_id: _reference_logits(reference, s.token_ids) for s in seqs}
    assert len(computed) == sum(s.num_tokens - 1 for s in seqs)
    for seq, position, ours in computed:
        torch.testing.assert_close(ours.float().cpu(), references[seq.request_id][position], atol=atol, rtol=0)


KERNEL_CHOICES = [
    pytest.param(False, id="native"),
    pytest.param(True, id="cpu-kernels", marks=pytest.mark.skipif(not cpu_kernels_available(), reason="no C++ build")),
]


@pytest.mark.parametrize("use_kernels", KERNEL_CHOICES)
def test_llama_logits_match_transformers(tmp_path, use_kernels):
    reference = write_tiny_model(tmp_path, tiny_llama_config())
    _run_and_compare(tmp_path, reference, prompt_lens=[5, 13, 37], decode_steps=6, budget=24, use_kernels=use_kernels)


@pytest.mark.parametrize("use_kernels", KERNEL_CHOICES)
def test_llama_tied_embeddings_and_scaled_rope(tmp_path, use_kernels):
    config = tiny_llama_config(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    reference = write_tiny_model(tmp_path, config)
    _run_and_compare(tmp_path, reference, prompt_lens=[9, 30], decode_steps=5, budget=16, use_kernels=use_kernels)


@pytest.mark.skipif(not onednn_packing_available(torch.empty(1)), reason="oneDNN does not pack float32 weights here")
@pytest.mark.parametrize("use_kernels", KERNEL_CHOICES)
def test_float32_onednn_packed_linears_match_transformers(tmp_path, use_kernels):
    """Calls of up to 16 rows on oneDNN-packed weights (their rows padded to buckets), larger
    ones plain: the iterations here are both."""
    reference = write_tiny_model(tmp_path, tiny_qwen2_config())
    _run_and_compare(tmp_path, reference, prompt_lens=[3, 21, 11], decode_steps=4, budget=20, use_kernels=use_kernels,
                     onednn_max_rows=16)


@pytest.mark.parametrize("use_kernels", KERNEL_CHOICES)
def test_float32_model_with_bfloat16_kv_cache_stays_within_the_caches_rounding(tmp_path, use_kernels):
    """float32 compute over a bfloat16 KV cache (`kv_cache_dtype` auto on a CPU without fast
    bfloat16 GEMMs), chunks reading earlier chunks' cached KV, against the float32
    reference: within the rounding of cached keys and values (measured 0.0008 at most,
    against 2e-7 with a float32 cache; logits of std 0.17)."""
    reference = write_tiny_model(tmp_path, tiny_llama_config())
    _run_and_compare(tmp_path, reference, prompt_lens=[5, 13, 37], decode_steps=6, budget=24, use_kernels=use_kernels,
                     atol=0.004, kv_dtype=torch.bfloat16)


@pytest.mark.parametrize("use_kernels", KERNEL_CHOICES)
def test_qwen2_with_qkv_bias(tmp_path, use_kernels):
    reference = write_tiny_model(tmp_path, tiny_qwen2_config())
    _run_and_compare(tmp_path, reference, prompt_lens=[3, 21, 11], decode_steps=4, budget=20, use_kernels=use_kernels)


def _with_bf16_linear_weights(reference):
    """The reference with every linear weight rounded to bfloat16 (kept float32), the
    LM head untied first so that the embedding lookup stays float32, as in ours."""
    with torch.no_grad():
        if reference.lm_head.weight is reference.model.embed_tokens.weight:
            reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.clone())
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.to(torch.bfloat16).float())
    return reference


@pytest.mark.skipif(not bf16_linear_available(), reason="bf16_linear needs the C++ build on a CPU with AVX-512 or AVX2")
@pytest.mark.parametrize("config", [tiny_llama_config(tie_word_embeddings=True), tiny_qwen2_config()],
                         ids=["llama-tied", "qwen2-qkv-bias"])
def test_bfloat16_decode_weights_match_transformers_with_rounded_weights(tmp_path, config):
    """With panels up to 16 rows and batches of at most 16 rows, every linear reads bfloat16
    weights; the reference rounds its linear weights the same way."""
    reference = _with_bf16_linear_weights(write_tiny_model(tmp_path, config))
    _run_and_compare(tmp_path, reference, prompt_lens=[5, 13, 30], decode_steps=5, budget=BF16_LINEAR_MAX_ROWS,
                     use_kernels=True, panel_max_rows=BF16_LINEAR_MAX_ROWS)


@pytest.mark.parametrize("use_kernels", KERNEL_CHOICES)
@pytest.mark.parametrize(("panel_max_rows", "onednn_max_rows"), [(0, 0), (8, 0), (2, 16)],
                         ids=["bf16-gemm", "panels-to-8-rows", "panels-to-2-onednn-packed-to-16"])
def test_bfloat16_compute_matches_transformers_with_rounded_parameters(tmp_path, use_kernels, panel_max_rows,
                                                                       onednn_max_rows):
    """bfloat16 weights and activations (float32 residual stream and softmax), against the
    float32 reference holding the same bfloat16-rounded parameters: within bfloat16's
    rounding of the activations (measured 0.003 at most, logits of std 0.17)."""
    if panel_max_rows and not bf16_linear_available():
        pytest.skip("bf16_linear needs the C++ build on a CPU with AVX-512 or AVX2")
    reference = write_tiny_model(tmp_path, tiny_llama_config())
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    _run_and_compare(tmp_path, reference, prompt_lens=[5, 13, 37], decode_steps=6, budget=24, use_kernels=use_kernels,
                     panel_max_rows=panel_max_rows, dtype=torch.bfloat16, atol=0.01, onednn_max_rows=onednn_max_rows)


@pytest.mark.skipif(not prefill_attention_available(), reason="no AMX here (or not granted)")
def test_amx_prefill_attention_matches_transformers_with_rounded_parameters(tmp_path):
    """Head dim 64 (the AMX kernel's tiles take multiples of 32), chunks that start after
    earlier chunks of their sequence, bfloat16 compute against the rounded reference."""
    reference = write_tiny_model(tmp_path, tiny_llama_config(hidden_size=256, num_attention_heads=4,
                                                             num_key_value_heads=2, intermediate_size=384))
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    _run_and_compare(tmp_path, reference, prompt_lens=[5, 40, 90], decode_steps=6, budget=32, use_kernels=True,
                     dtype=torch.bfloat16, atol=0.02, block_size=16, prefill_kernel=True)


def test_unsupported_architecture_fails_clearly(tmp_path):
    config = tiny_llama_config(architectures=["GPT2LMHeadModel"])
    write_tiny_model(tmp_path, tiny_llama_config())
    (tmp_path / "config.json").write_text(config.to_json_string())
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(tmp_path, torch.float32)


def test_float16_model_runs_natively_and_matches_transformers(tmp_path):
    """The CPU kernels take float32 and bfloat16 only; a float16 model must fall back to
    the native path (it raised inside the kernels before), and stay close to the reference."""
    reference = write_tiny_model(tmp_path, tiny_llama_config())
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.float16).float())
    _run_and_compare(tmp_path, reference, prompt_lens=[5, 13], decode_steps=4, budget=16, use_kernels=None,
                     dtype=torch.float16, atol=0.01)
