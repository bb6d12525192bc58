"""The engine on a CUDA device: the native PyTorch paths (no csrc/ CPU kernels, no
CPU weight packing) against the same references as on the CPU. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from engine.finetune.lora_params import LoRAConfig, TrainableLoRA
from engine.finetune.recompute import layer_forward
from engine.model.loader import load_model
from engine.model.rope import rope_tables
from tests.engine.test_model_parity import _run_and_compare
from tests.engine.tiny_models import tiny_llama_config, tiny_qwen2_config, write_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("config", [tiny_llama_config(), tiny_qwen2_config()], ids=["llama", "qwen2"])
def test_logits_match_transformers_on_cuda(tmp_path, config):
    """float32, chunked prefills mixed with decodes over the paged cache, 1e-4 against
    transformers on the CPU."""
    reference = write_tiny_model(tmp_path, config)
    _run_and_compare(tmp_path, reference, prompt_lens=[5, 13, 37], decode_steps=6, budget=24, use_kernels=False,
                     device="cuda")


def test_recompute_gradients_on_cuda_equal_the_cpu(tmp_path):
    """The finetuning backward's layer recompute on CUDA gives the CPU's output and
    gradients (float32)."""
    config = tiny_llama_config()
    write_tiny_model(tmp_path, config)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(29, config.hidden_size, generator=gen)
    grad = torch.randn(29, config.hidden_size, generator=gen)
    results = {}
    for device in ("cpu", "cuda"):
        model = load_model(tmp_path, torch.float32, device)
        lora = TrainableLoRA(model.lora_layout(), LoRAConfig(rank=8, alpha=16), seed=0).to(device)
        with torch.no_grad():
            for b in lora.b.values():
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())) * 0.05)
        cos, sin = (t[:29].to(device) for t in rope_tables(config, model.head_dim, 64))
        inputs = x.to(device).requires_grad_(True)
        with torch.enable_grad():
            y = layer_forward(model, 1, inputs, cos, sin, lora)
            y.backward(grad.to(device))
        results[device] = (y.detach().cpu(), inputs.grad.cpu(),
                           {n: p.grad.cpu() for n, p in lora.named_parameters() if p.grad is not None})
    (y_cpu, dx_cpu, dp_cpu), (y_gpu, dx_gpu, dp_gpu) = results["cpu"], results["cuda"]
    torch.testing.assert_close(y_gpu, y_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx_gpu, dx_cpu, atol=1e-4, rtol=1e-4)
    assert dp_gpu.keys() == dp_cpu.keys() and dp_cpu
    for name in dp_cpu:
        torch.testing.assert_close(dp_gpu[name], dp_cpu[name], atol=1e-4, rtol=1e-3)
