"""The toy task of the default job: arithmetic in the Eurus-2 action format, an in-repo
tokenizer and a tiny random Qwen2, all made on the spot (no downloads)."""

from megatron_prime.toy.arithmetic import (
    Problem,
    make_problems,
    make_rl_rows,
    make_sft_rows,
    sft_response,
    write_jsonl,
)
from megatron_prime.toy.model import write_toy_model
from megatron_prime.toy.tokenizer import build_toy_tokenizer

__all__ = [
    "Problem",
    "build_toy_tokenizer",
    "make_problems",
    "make_rl_rows",
    "make_sft_rows",
    "sft_response",
    "write_jsonl",
    "write_toy_model",
]
