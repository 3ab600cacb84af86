"""Tiny HF model folders made on the spot (no downloads): random weights + a trained BPE."""

from __future__ import annotations

from pathlib import Path

from workers.parity_worker import make_hf_model


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE trained in a second on generated text, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [f"Solve {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}." for a in range(40)
            for b in range(10)]
    tokenizer.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(folder)


def save_tiny_model(arch: str, folder: Path):
    """Saves the parity tests' tiny model (qwen2: QKV bias, GQA, untied; llama: tied)."""
    config, model = make_hf_model(arch)
    model.config.eos_token_id = model.config.pad_token_id = 0
    model.save_pretrained(folder)
    save_tokenizer(folder, vocab_size=min(config.vocab_size, 290))
    return model
