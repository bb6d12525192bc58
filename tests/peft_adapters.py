"""LoRA adapters made by peft itself, and peft models to compare against."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def write_peft_adapter(base_dir: Path, out_dir: Path, seed: int, b_scale: float = 1.0, **lora_options) -> None:
    """Save a random LoRA adapter of the model at `base_dir` (A and B both random, so it changes outputs)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    model.save_pretrained(out_dir)


def peft_reference(base_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    """transformers base model with the adapter applied by peft (float32, eval); no adapter = the base."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return base
    return PeftModel.from_pretrained(base, adapter_dir).eval()
