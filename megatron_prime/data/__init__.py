"""Prompt data: Eurus-2-RL-Data files -> validated records -> per-rank batches -> prompt tokens."""

from megatron_prime.data.dataset import DataConfig, MalformedRow, PromptRecord, load_prompts, parse_row, read_rows
from megatron_prime.data.render import RenderedPrompt, render_prompt
from megatron_prime.data.sampler import PromptSampler, epoch_permutation, shard
from megatron_prime.data.templates import (
    ACTIONS,
    CODE_SUFFIX,
    MATH_SUFFIX,
    SYSTEM_PROMPT,
    build_prompt_messages,
    question_messages,
)

__all__ = [
    "ACTIONS",
    "CODE_SUFFIX",
    "DataConfig",
    "MATH_SUFFIX",
    "MalformedRow",
    "PromptRecord",
    "PromptSampler",
    "RenderedPrompt",
    "SYSTEM_PROMPT",
    "build_prompt_messages",
    "epoch_permutation",
    "load_prompts",
    "parse_row",
    "question_messages",
    "read_rows",
    "render_prompt",
    "shard",
]
