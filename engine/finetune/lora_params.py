"""The trainable LoRA adapter of one finetuning job: float32 parameters, PEFT layout.

Parameters are kept per (layer, PEFT module) exactly as PEFT names them, A [r, in] and
B [out, r], so a checkpoint is a PEFT adapter file and a reference PEFT model can be
compared tensor by tensor. Initialisation follows PEFT's default (A Kaiming-uniform
with a = sqrt(5), B zero), from the job's seed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from engine.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, LoRAWeights, lora_scaling
from engine.lora.layout import LoRALayout, LoRATarget
from engine.parallel.tensor_parallel import ROW_PARALLEL, TensorParallel, shard_layout, share


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)


class TrainableLoRA(nn.Module):
    def __init__(self, layout: LoRALayout, config: LoRAConfig, seed: int,
                 tensor_parallel: TensorParallel | None = None):
        """layout: the whole model's. With `tensor_parallel`, the parameters are this rank's
        share of the whole adapter's (initialised whole, then split like the weights they
        adapt: engine/parallel/tensor_parallel.py), so every size initialises alike."""
        super().__init__()
        self.config = config
        unknown = set(config.target_modules) - set(layout.module_names)
        if unknown:
            raise ValueError(f"target modules {sorted(unknown)} are not projections of this model")
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for layer in range(layout.num_layers):
            for target in layout.targets:
                for module, out_features in target.parts:
                    if module not in config.target_modules:
                        continue
                    a = torch.empty(config.rank, target.in_features)
                    # Kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in), as nn.Linear and PEFT do.
                    bound = 1.0 / math.sqrt(target.in_features)
                    a.uniform_(-bound, bound, generator=generator)
                    self.a[self.key(layer, module)] = nn.Parameter(a)
                    self.b[self.key(layer, module)] = nn.Parameter(torch.zeros(out_features, config.rank))
        self.tensor_parallel = tensor_parallel if tensor_parallel is not None and tensor_parallel.size > 1 else None
        # Per parameter name: the dim along which ranks split it, None where replicated.
        self.split_dims = {f"{factor}.{key}": None for factor in ("a", "b") for key in self.a}
        if self.tensor_parallel is not None:
            for key in self.a:
                target, _ = layout.locate(key.split("_", 1)[1])
                factor, dim = ("a", 1) if target.name in ROW_PARALLEL else ("b", 0)
                params = getattr(self, factor)
                params[key] = nn.Parameter(share(params[key].detach(), dim, self.tensor_parallel))
                self.split_dims[f"{factor}.{key}"] = dim
            layout = shard_layout(layout, self.tensor_parallel.size)
        self.layout = layout  # of this rank's share
        self._targets = {target.name: target for target in layout.targets}

    @staticmethod
    def key(layer: int, module: str) -> str:
        return f"{layer}_{module}"

    def pair(self, layer: int, module: str) -> tuple[nn.Parameter, nn.Parameter] | None:
        key = self.key(layer, module)
        return (self.a[key], self.b[key]) if key in self.a else None

    def stacked(self, layer: int, target: LoRATarget) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The target's adapted parts as one adapter, differentiable in the parameters:
        A of every adapted part stacked, [parts x r, in], and B block diagonal, [out,
        parts x r], with no columns for a part that is not adapted (its rows stay zero).
        None when no part is adapted."""
        pairs = [(self.pair(layer, name), size) for name, size in target.parts]
        if all(pair is None for pair, _ in pairs):
            return None
        a = torch.cat([pair[0] for pair, _ in pairs if pair is not None])
        b = torch.block_diag(*(pair[1] if pair is not None else torch.zeros(size, 0) for pair, size in pairs))
        return a, b

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        """out [T, out_features], the base projection of x [T, in], plus this adapter's
        delta, differentiable in x and the parameters (engine/model/llama.py LayerLoRA).

        The delta is computed in float32, like the parameters, and joins out in out's dtype
        (the compute type, as the serving forward adds it). All adapted parts take two
        matmuls, the second accumulating into the base output: per-part matmuls and a
        concatenation of their deltas cost more in calls and passes over [T, out] than the
        arithmetic of a rank-16 adapter."""
        stacked = self.stacked(layer, self._targets[target])
        if stacked is None:
            return out
        a, b = stacked  # [parts x r, in], block diagonal [out, parts x r]
        return torch.addmm(out.float(), x.float() @ a.T, b.T, alpha=self.config.scaling).to(out.dtype)

    def serving_weights(self, dtype: torch.dtype) -> LoRAWeights:
        """Detached copy in the serving layout (scaling folded into B) for a compute slot."""
        scale = self.config.scaling
        modules = {}
        for key, a in self.a.items():
            layer, module = key.split("_", 1)
            b = self.b[key]
            modules[(int(layer), module)] = (a.detach().to(dtype).clone(), (b.detach() * scale).to(dtype))
        return LoRAWeights(path=None, rank=self.config.rank, modules=modules)

    def peft_names(self) -> dict[str, str]:
        """PEFT key -> the name of the parameter it holds ("a.<key>" or "b.<key>")."""
        groups = {t.name: t.group for t in self.layout.targets}
        names = {}
        for key in self.a:
            layer, module = key.split("_", 1)
            target, _ = self.layout.locate(module)
            prefix = f"base_model.model.model.layers.{layer}.{groups[target.name]}.{module}"
            names[f"{prefix}.lora_A.weight"] = f"a.{key}"
            names[f"{prefix}.lora_B.weight"] = f"b.{key}"
        return names

    def peft_state_dict(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """PEFT key -> A [r, in] / B [out, r]; copies, or (copy=False) detached views of
        the live parameters for a caller that copies them itself."""
        params = dict(self.named_parameters())
        state = {}
        for peft_key, name in self.peft_names().items():
            t = params[name].detach()
            state[peft_key] = t.clone().contiguous() if copy else t
        return state

    def peft_config(self, base_model: str) -> dict:
        """adapter_config.json of this adapter, as PEFT writes it."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "use_rslora": self.config.use_rslora,
            "target_modules": sorted(self.config.target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "inference_mode": True,
        }


def write_peft(path: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """Write a PEFT adapter directory atomically (a temp dir renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    write_peft_files(staging, state, config)
    os.replace(staging, path)


def write_peft_files(directory: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """The adapter's config and weights into `directory` (which the caller renames into
    place), flushed to disk."""
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(state, directory / WEIGHTS_FILE)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(directory / name, "rb") as f:
            os.fsync(f.fileno())
