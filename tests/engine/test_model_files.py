"""Model path resolution: the embedded GGUF, its one-time conversion, clear failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.model_files import ModelFilesError, default_model_path, resolve_model
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny


def cache_dir() -> Path:
    return Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()


@pytest.mark.model
def test_default_gguf_is_converted_once_and_then_reused():
    gguf = default_model_path()
    assert gguf.suffix == ".gguf"
    model_dir, name = resolve_model(None, cache_dir())
    assert name == "SmolLM2-135M-Instruct"
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (model_dir / "tokenizer.json").is_file()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    again, _ = resolve_model(str(gguf), cache_dir())
    assert again == model_dir and (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_hf_directory_is_served_as_is(tmp_path):
    write_tiny_model(tmp_path / "tiny", tiny_llama_config())
    model_dir, name = resolve_model(str(tmp_path / "tiny"), tmp_path / "cache")
    assert model_dir == tmp_path / "tiny" and name == "tiny"
    assert not (tmp_path / "cache").exists()


def test_bad_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"), tmp_path / "cache")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelFilesError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFilesError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    write_tiny_model(tmp_path, tiny_llama_config())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ModelFilesError, match=r"unsupported architecture \['BertModel'\].*LlamaForCausalLM"):
        resolve_model(str(tmp_path), tmp_path / "cache")
