"""PRIME's two losses as Megatron schedule losses (steps 7 and 9 of the PRIME step), and the
typed batch they read.

Each adapter reads the model's per-token outputs (models/schedule.TokenOutputs) and the
micro-batch's ``StepBatch`` fields, calls the pure function in algo/, and answers Megatron's
3-tuple contract: an un-normalised sum, the number of units it is a sum over, and metric sums.
Megatron (``calculate_per_token_loss``) then divides gradients once by the global unit
count, so the update equals the full-batch mean whatever the micro-batching and DP layout.

Fields each loss needs (batch-first tensors, split into micro-batches with the tokens):
- PPO: ``old_logprobs`` [b, s] and ``advantages`` [b, s];
- PRM: ``ref_logprobs`` [b, s] and ``outcome_rewards`` [b] (the labels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from megatron_prime.algo import (
    PPOLossConfig,
    ppo_policy_loss,
    prm_cross_entropy_loss,
    sequence_log_ratio,
    truncated_importance_weights,
)
from megatron_prime.models.schedule import LossFn, TokenBatch, TokenOutputs

# The key under which rollout/collect.py attaches the sampler's log-probs to its TokenBatch.
ROLLOUT_LOGPROBS = "rollout_logprobs"


@dataclass
class StepBatch(TokenBatch):
    """One PRIME step's data on one data-parallel rank: tokens plus every per-response and
    per-token tensor the step computes, as named fields instead of string keys.

    Every field is batch-first, so TokenBatch's ``map_tensors`` moves (``to``), pads and
    micro-batches all of them with the tokens. Fields a step has not computed yet, or does
    not compute in its mode, are None. ``prime_update`` moves the batch to the training
    device once; everything added afterwards is computed there.
    """

    outcome_rewards: Tensor | None = None  # [b] float32, the verifier's score (PRM label)
    rollout_logprobs: Tensor | None = None  # [b, s] the sampler's log-probs, if it sent them
    old_logprobs: Tensor | None = None  # [b, s] policy before the update (PPO's ratio)
    ref_logprobs: Tensor | None = None  # [b, s] frozen reference (implicit reward's denominator)
    prm_logprobs: Tensor | None = None  # [b, s] the scoring PRM
    advantages: Tensor | None = None  # [b, s]

    @classmethod
    def from_rollout(cls, tokens: TokenBatch, outcome_rewards: Tensor) -> StepBatch:
        """The rollout's tokens and scores; its sampler log-probs become a typed field."""
        extras = dict(tokens.extras)
        rollout_logprobs = extras.pop(ROLLOUT_LOGPROBS, None)
        return cls(input_ids=tokens.input_ids, response_mask=tokens.response_mask,
                   segment_ids=tokens.segment_ids, extras=extras,
                   outcome_rewards=outcome_rewards.float(), rollout_logprobs=rollout_logprobs)

    def with_fields(self, **values: Tensor) -> StepBatch:
        """A copy with the given fields set (detached: the step's inputs are constants)."""
        return replace(self, **{name: value.detach() for name, value in values.items()})

    def require(self, name: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"StepBatch.{name} is None; the loss reading it runs after the "
                             f"step has computed it")
        return value


def ppo_loss(config: PPOLossConfig, old_from_current: bool = False,
             correction_cap: float | None = None) -> LossFn:
    """PPO clipped surrogate with entropy bonus; units: tokens (token_mean) or responses.

    ``old_from_current``: the update is one on-policy pass, so the old log-probs are this
    forward's own, detached (ratio exactly 1; update.py skips the old-policy pass). The
    sampler's log-probs, when the batch has them, are then compared here: the metric sums
    ``rollout_logprob_diff_sum`` and ``rollout_logprob_diff_max`` (reduced by max).

    ``correction_cap`` (algo.rollout_correction=tis): each token's surrogate is weighted by
    min(pi_old / pi_sampler, cap), the truncated importance weight between the trainer's old
    policy and the sampler's log-probs; metrics ``rollout_is_weight`` (mean weight) and
    ``rollout_is_capped_fraction`` (tokens at the cap)."""

    def loss_fn(outputs: TokenOutputs, batch: StepBatch):
        mask = batch.scored_token_mask(outputs.logprobs.dtype)
        old = outputs.logprobs.detach() if old_from_current else batch.require("old_logprobs")
        weights = None
        if correction_cap is not None:
            weights = truncated_importance_weights(old, batch.require("rollout_logprobs").to(old.dtype),
                                                   mask, correction_cap).to(old.dtype)
        # normalizer=1: a sum over this micro-batch; Megatron divides by the global count.
        loss_sum, metrics = ppo_policy_loss(
            outputs.logprobs, old, batch.require("advantages"), mask,
            config, entropy=outputs.entropy, normalizer=1.0, token_weights=weights,
        )
        if weights is not None:
            tokens_here = mask.sum().clamp(min=1)
            metrics["rollout_is_weight"] = (weights * mask).sum() / tokens_here
            capped = (weights >= correction_cap * (1 - 1e-6)).to(mask.dtype) * mask
            metrics["rollout_is_capped_fraction"] = capped.sum() / tokens_here
        if config.aggregation == "token_mean":
            units = mask.sum()
        else:
            units = (mask.sum(dim=-1) > 0).sum().to(mask.dtype)
        tokens = mask.sum()
        # pg_loss is already a sum (normalizer=1); the other metrics are token means over this
        # micro-batch: weight them back into sums so the reported value is the step's mean
        # (exact for token_mean; for seq_mean, micro-batch means weighted by responses).
        metric_sums = {name: (value if name == "pg_loss" else value * units)
                       for name, value in metrics.items()}
        metric_sums["num_tokens"] = tokens
        if old_from_current and batch.rollout_logprobs is not None:
            gap = (old.float() - batch.rollout_logprobs.float()).abs() * mask
            metric_sums["rollout_logprob_diff_sum"] = gap.sum()
            metric_sums["rollout_logprob_diff_max"] = gap.max()
        return loss_sum, units.to(torch.int), metric_sums

    return loss_fn


def prm_loss(beta: float) -> LossFn:
    """Cross-entropy of sigmoid(beta * sum_t log(pi_psi / pi_ref)) against the outcome label;
    units: responses."""

    def loss_fn(outputs: TokenOutputs, batch: StepBatch):
        mask = batch.scored_token_mask(outputs.logprobs.dtype)
        labels = batch.require("outcome_rewards").to(outputs.logprobs.dtype)
        ref = batch.require("ref_logprobs").to(outputs.logprobs.dtype)
        # Rows without scored tokens are padding (forward_backward fills the last micro-batch).
        is_response = (mask.sum(dim=-1) > 0).to(labels.dtype)
        per_response = prm_cross_entropy_loss(outputs.logprobs, ref, mask, labels, beta, reduction="none")
        loss_sum = (per_response * is_response).sum()
        with torch.no_grad():
            score = beta * sequence_log_ratio(outputs.logprobs, ref, mask)
            # Accuracy of the PRM as a classifier of the outcome (score > 0 <=> predicts correct).
            correct = (((score > 0).to(labels.dtype) == labels).to(labels.dtype) * is_response).sum()
        return loss_sum, is_response.sum().to(torch.int), {"accuracy": correct}

    return loss_fn
