"""Reading a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

Everything is checked before anything is kept: a bad adapter raises `AdapterError`
naming the problem and the setting (`param`) that caused it, and leaves no trace.
Each module's scaling (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, per
module when rank_pattern / alpha_pattern say so) is folded into B once here, so
serving computes `y += (x A^T) B'^T` with no per-token multiply.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.lora.layout import LoRALayout

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """The factor on B @ A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (PEFT's)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class AdapterError(ValueError):
    def __init__(self, message: str, param: str = "lora_path"):
        super().__init__(message)
        self.param = param


@dataclass
class LoRAWeights:
    """One adapter on the host: per (layer, PEFT module), A [r, in] and scaled B [out, r]."""

    path: Path
    rank: int  # the largest rank among its modules
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or a suffix of it."""
    for pattern, value in (patterns or {}).items():
        if module_key == pattern or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_key):
            return value
    return default


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(f"adapter path {path} is not a directory")
    if not config_path.is_file():
        raise AdapterError(f"adapter at {path} has no {CONFIG_FILE}")
    if not (path / WEIGHTS_FILE).is_file():
        hint = " (adapter_model.bin is not supported; save with safe_serialization)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"adapter at {path} has no {WEIGHTS_FILE}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter at {path} is a {config['peft_type']} adapter; only LORA is supported")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights")):
        if config.get(flag):
            raise AdapterError(f"adapter at {path} uses {what}, which is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter at {path} trains biases (bias={config['bias']!r}); only bias='none' is supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter at {path} saves whole modules {config['modules_to_save']}; not supported")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise AdapterError(f"{config_path} needs a positive integer 'r'")
    return config


def _check_targets(config: dict, layout: LoRALayout) -> None:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return  # a regex over module paths; the weight keys below are checked one by one
    supported = layout.module_names
    for name in targets or []:
        if name not in supported:
            raise AdapterError(
                f"target module {name!r} is not a projection this model can adapt (supported: {', '.join(supported)})"
            )


def load_adapter(path: Path, layout: LoRALayout, max_rank: int, dtype: torch.dtype) -> LoRAWeights:
    """Read and validate the adapter at `path` against the base model's `layout`."""
    path = Path(path)
    config = _read_config(path)
    _check_targets(config, layout)
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from None

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter weight {key!r} is not a LoRA A/B matrix of a decoder-layer projection")
        layer, group, module, which = int(match[1]), match[2], match[3], match[4]
        located = layout.locate(module)
        if located is None or located[0].group != group:
            raise AdapterError(f"adapter targets {group}.{module}, which this model does not have (weight {key!r})")
        if layer >= layout.num_layers:
            raise AdapterError(f"adapter weight {key!r} is for layer {layer}; the model has {layout.num_layers} layers")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise AdapterError(f"{path / WEIGHTS_FILE} holds no LoRA weights")

    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), pair in sorted(pairs.items()):
        target, part = layout.locate(module)
        module_key = f"model.layers.{layer}.{target.group}.{module}"
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise AdapterError(f"adapter has lora_{'AB'.replace(missing, '')} but no lora_{missing} for {module_key}")
        a, b = pair["A"], pair["B"]
        rank = _pattern_value(config.get("rank_pattern"), module_key, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), module_key, config.get("lora_alpha", 8))
        out_features = target.parts[part][1]
        if a.dim() != 2 or b.dim() != 2 or a.shape != (rank, target.in_features) or b.shape != (out_features, rank):
            raise AdapterError(
                f"{module_key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base model, "
                f"which needs ({rank}, {target.in_features}) and ({out_features}, {rank}); "
                "was the adapter trained on a different base model?"
            )
        if rank > max_rank:
            raise AdapterError(f"adapter rank {rank} ({module_key}) exceeds max_lora_rank={max_rank}")
        scale = lora_scaling(alpha, rank, bool(config.get("use_rslora")))
        modules[(layer, module)] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    return LoRAWeights(path=path, rank=max(a.shape[0] for a, _ in modules.values()), modules=modules)
