"""Where LoRA adapters attach to a model: its fused projections and their parts. The
model declares its layout (LlamaForCausalLM.lora_layout).

PEFT names the projections of the Hugging Face model (q_proj, k_proj, ...); our model
fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`. A `LoRATarget` is one of
our linears with the PEFT parts it is made of, in output-column order, so an adapter
of `q_proj` and `v_proj` lands on columns [0, q) and [q + kv, q + 2 kv) of `qkv_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRATarget:
    name: str  # our module, e.g. "qkv_proj"
    group: str  # PEFT path component: "self_attn" or "mlp"
    in_features: int
    parts: tuple[tuple[str, int], ...]  # (PEFT module name, output features), in column order

    @property
    def out_features(self) -> int:
        return sum(size for _, size in self.parts)


@dataclass(frozen=True)
class LoRALayout:
    num_layers: int
    targets: tuple[LoRATarget, ...]

    def locate(self, peft_module: str) -> tuple[LoRATarget, int] | None:
        """(target, part index) of a PEFT module name such as "k_proj"; None if we have no such part."""
        for target in self.targets:
            for index, (name, _) in enumerate(target.parts):
                if name == peft_module:
                    return target, index
        return None

    @property
    def module_names(self) -> list[str]:
        return [name for target in self.targets for name, _ in target.parts]
