"""Held-out validation during training: greedy pass@1 of the current policy (verl's
``test_freq``/``val_before_train``).

The rollout engine already holds the policy's weights after a sync, so validation is one
more ``generate`` on held-out prompts with greedy decoding, scored by the same verifiers as
training. Prompts are split over the data-parallel replicas (replica r takes rows r, r+DP,
...); each replica's engine rank samples, and the counts are summed over replicas, so every
rank logs the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.config import require, require_positive_int
from megatron_prime.data import PromptRecord
from megatron_prime.rewards import RewardRegistry
from megatron_prime.rollout.collect import sample_and_score_in_replica
from megatron_prime.rollout.engine import RolloutEngine, SamplingConfig


@dataclass
class ValidationConfig:
    """Held-out prompts (the training rows' layout) and when to score them."""

    paths: list[str] = field(default_factory=list)  # empty: no validation
    # Every this many steps, and always after the last step; 0: only after the last step.
    every: int = 0
    # Also score the starting (SFT) policy, logged as step 0.
    before_train: bool = False
    # Use the first this many held-out prompts (None: all).
    max_prompts: int | None = None
    # None: rollout.sampling.max_new_tokens.
    max_new_tokens: int | None = None

    def validate(self) -> None:
        require(isinstance(self.paths, list) and all(isinstance(p, str) and p for p in self.paths),
                "validation.paths", self.paths, "a list of .jsonl/.parquet paths (empty: none)")
        require(isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 0,
                "validation.every", self.every, "an integer >= 0 (0: after the last step only)")
        if self.max_prompts is not None:
            require_positive_int("validation.max_prompts", self.max_prompts)
        if self.max_new_tokens is not None:
            require_positive_int("validation.max_new_tokens", self.max_new_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.paths)

    def due(self, step: int, last_step: int) -> bool:
        return self.enabled and (step == last_step or (self.every > 0 and step % self.every == 0))


def greedy(sampling: SamplingConfig, max_new_tokens: int | None) -> SamplingConfig:
    """One greedy sample per prompt (temperature 0: pass@1 without sampling noise)."""
    return replace(sampling, n=1, temperature=0.0, top_p=1.0, top_k=-1, seed=0,
                   max_new_tokens=max_new_tokens or sampling.max_new_tokens)


def run_validation(records: list[PromptRecord], engine: RolloutEngine | None, tokenizer: Any,
                   rewards: RewardRegistry | None, sampling: SamplingConfig,
                   use_chat_template: bool,
                   slot: distributed.EngineSlot | None = None) -> dict[str, float]:
    """``val/accuracy`` (greedy pass@1) and ``val/response_length`` over all held-out prompts
    (collective over the world; the engine must hold the current policy)."""
    shard = records[distributed.dp_rank()::distributed.dp_world_size()]
    correct = count = tokens = 0.0
    if shard:
        # The training rollout's sample-and-score, with greedy sampling, over the replica's
        # engines.
        _, stats = sample_and_score_in_replica(slot, engine, tokenizer, shard, sampling,
                                               rewards, use_chat_template)
        correct, count, tokens = stats["correct"], stats["responses"], stats["response_tokens"]
    totals = torch.tensor([correct, count, tokens], dtype=torch.float64)
    # One copy per replica: the replica's ranks hold the same numbers after the broadcast.
    # Over gloo: replicas that finished first wait here while the others generate.
    dist.all_reduce(totals, group=distributed.dp_host_group())
    correct, count, tokens = totals.tolist()
    return {"val/accuracy": correct / max(count, 1.0), "val/response_length": tokens / max(count, 1.0),
            "val/prompts": count}
