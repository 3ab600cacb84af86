"""Prompt filters: truncation, then the accuracy band.

A prompt whose n responses are all right or all wrong gives zero RLOO advantage to every
response: it costs a forward/backward and teaches nothing. PRIME keeps only prompts whose
accuracy over the n samples lies in [low, high] and over-samples prompts to refill the batch.

Before the band, the PRIME reference drops every prompt any of whose responses hit the
length limit (its ``filter_truncated``, on in the published run): a cut-off response is
scored wrong for being cut, and the process rewards' per-token baseline would pay a long
wrong response for each of its tokens. Layout: see ``megatron_prime.algo.masked``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prime.algo.masked import check_groups

# Accuracies are means of n scores; the tolerance makes 1/5 == 0.2 count as inside the band
# regardless of float rounding.
_BAND_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AccuracyFilterConfig:
    """Inclusive accuracy band; defaults are the PRIME reference."""

    low: float = 0.2
    high: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(
                f"AccuracyFilterConfig(low={self.low}, high={self.high}) is not allowed; "
                "need 0 <= low <= high <= 1"
            )


@dataclass(frozen=True)
class FilterResult:
    """Which prompts and responses survive the filter, and the counts the trainer refills by."""

    prompt_accuracy: torch.Tensor  # [num_prompts] mean score of each prompt's n responses
    keep_prompt: torch.Tensor  # [num_prompts] bool
    keep_response: torch.Tensor  # [batch] bool, keep_prompt repeated n times
    num_kept: int  # prompts kept
    num_prompts: int  # prompts seen
    # Prompts dropped by the truncation filter (before the band, whatever their accuracy).
    num_truncated_dropped: int = 0


def accuracy_band_filter(
    scores: torch.Tensor, num_samples_per_prompt: int, config: AccuracyFilterConfig = AccuracyFilterConfig(),
    truncated: torch.Tensor | None = None,
) -> FilterResult:
    """Keep prompts whose mean response score lies in ``[config.low, config.high]``.

    ``scores`` is ``[batch]``: per-response correctness (0/1, or a fraction of tests passed).
    ``truncated`` (``[batch]`` bool, optional: the truncation filter) marks the responses that
    stopped at the length limit; a prompt with any of them is dropped before the band and
    counts as not kept, so the trainer refills for it. ``num_kept`` is read back to the host
    once, since the trainer needs it to decide how many more prompts to sample.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be a [batch] vector, got shape {tuple(scores.shape)}")
    num_prompts = check_groups(scores.shape[0], num_samples_per_prompt)
    prompt_accuracy = scores.to(torch.float64).view(num_prompts, num_samples_per_prompt).mean(dim=-1)
    keep_prompt = (prompt_accuracy >= config.low - _BAND_TOLERANCE) & (prompt_accuracy <= config.high + _BAND_TOLERANCE)
    num_truncated_dropped = 0
    if truncated is not None:
        if truncated.shape != scores.shape:
            raise ValueError(f"truncated must have the shape of scores {tuple(scores.shape)}, "
                             f"got {tuple(truncated.shape)}")
        any_truncated = truncated.bool().view(num_prompts, num_samples_per_prompt).any(dim=-1)
        keep_prompt = keep_prompt & ~any_truncated
        num_truncated_dropped = int(any_truncated.sum().item())  # host sync, with num_kept's
    keep_response = keep_prompt.repeat_interleave(num_samples_per_prompt)
    num_kept = int(keep_prompt.sum().item())  # host sync: the refill decision is made on the host
    return FilterResult(prompt_accuracy, keep_prompt, keep_response, num_kept, num_prompts,
                        num_truncated_dropped)
