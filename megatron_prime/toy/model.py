"""A tiny random-init Qwen2 HF folder with the toy tokenizer: the default job's base model."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_prime.checkpoint.model_checkpoint import atomic_output_dir
from megatron_prime.config import require, require_positive_int
from megatron_prime.toy.tokenizer import build_toy_tokenizer, save_toy_tokenizer


def write_toy_model(
    folder: str | Path,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 256,
    overwrite: bool = False,
) -> Path:
    """Writes config.json, model.safetensors (float32), generation_config.json and the toy
    tokenizer into ``folder`` (atomically; an existing folder is refused unless ``overwrite``).

    The vocabulary is the tokenizer's size (Megatron pads it for TP itself). The head size
    ``hidden_size / num_attention_heads`` must be one vLLM's CPU attention supports (32, 64,
    80, ...; the rollout engine checks). Weights come from transformers' initialisation under
    ``seed``; the caller's torch RNG state is left as it was.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    for key, value in (("hidden_size", hidden_size), ("num_layers", num_layers),
                       ("num_attention_heads", num_attention_heads),
                       ("num_key_value_heads", num_key_value_heads),
                       ("intermediate_size", intermediate_size),
                       ("max_position_embeddings", max_position_embeddings)):
        require_positive_int(key, value)
    require(hidden_size % num_attention_heads == 0, "hidden_size", hidden_size,
            f"a multiple of num_attention_heads={num_attention_heads}")
    require(num_attention_heads % num_key_value_heads == 0, "num_key_value_heads",
            num_key_value_heads, f"a divisor of num_attention_heads={num_attention_heads}")

    tokenizer = build_toy_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float().eval()
    # Greedy by default; generation stops at <|eos|>.
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, do_sample=False)
    with atomic_output_dir(folder, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        generation.save_pretrained(staging)
        save_toy_tokenizer(tokenizer, staging)
    return Path(folder)
