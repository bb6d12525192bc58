"""A nested trainer state (dicts, lists, tuples, numbers, tensors) as one safetensors file.

The tensors go in as they are; the structure around them goes in the file's metadata as
JSON, each tensor replaced by its name, and dicts and tuples tagged so that they come
back as they went in (the optimizer's state is keyed by int, and JSON keys are strings).
torch.save of the same state (840 tensors for SmolLM2-135M at rank 16) took ~330 ms of
pickling on the 2-core machine; this is a plain copy of the bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_STRUCTURE = "structure"


def save_state(state, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}

    def encode(value):
        if isinstance(value, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = value.detach().contiguous()
            return {"tensor": name}
        if isinstance(value, dict):
            return {"dict": [[key, encode(item)] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {"tuple": [encode(item) for item in value]}
        if isinstance(value, list):
            return [encode(item) for item in value]
        return value

    structure = json.dumps(encode(state))
    save_file(tensors, str(path), metadata={_STRUCTURE: structure})


def load_state(path: Path):
    with safe_open(str(path), framework="pt") as f:
        structure = json.loads(f.metadata()[_STRUCTURE])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - a file handle, not a dict

    def decode(value):
        if isinstance(value, list):
            return [decode(item) for item in value]
        if isinstance(value, dict):
            if "tensor" in value:
                return tensors[value["tensor"]]
            if "tuple" in value:
                return tuple(decode(item) for item in value["tuple"])
            return {key: decode(item) for key, item in value["dict"]}
        return value

    return decode(structure)
