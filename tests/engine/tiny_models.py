"""Tiny random-weight Llama-family checkpoints, written to disk in Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def tiny_llama_config(**overrides) -> LlamaConfig:
    params = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    params = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, eos_token_id=2, architectures=["Qwen2ForCausalLM"],
    )
    params.update(overrides)
    return Qwen2Config(**params)


def write_tiny_model(path: Path, config, seed: int = 0) -> torch.nn.Module:
    """Save a random-weight model of `config` to `path`; returns the transformers reference (float32, eval)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves biases at zero; give them values so the loader must place them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.02)
    model.save_pretrained(path)
    return model


def write_char_tokenizer(path: Path, vocab_size: int = 97) -> None:
    """A byte-level tokenizer for the tiny models' vocabulary: <unk>, <s> (1), </s> (2),
    then one token per character: space and the printable ASCII characters from '!' on,
    as many as fit. Grammars compile against it (any JSON of plain ASCII can be spelled
    one character per token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["Ġ"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]  # byte-level 'Ġ' is the space
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in chars[: vocab_size - len(vocab)]:
        vocab[c] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(path)
