"""PRIME's two losses as Megatron schedule losses (steps 7 and 9 of the PRIME step).

Each adapter reads the model's per-token outputs (models/schedule.TokenOutputs) and the
micro-batch's ``extras``, calls the pure function in algo/, and answers Megatron's 3-tuple
contract: an un-normalised sum, the number of units it is a sum over, and metric sums.
Megatron (``calculate_per_token_loss``) then divides gradients once by the global unit
count, so the update equals the full-batch mean whatever the micro-batching and DP layout.

Extras each loss needs (batch-first tensors, split into micro-batches with the tokens):
- PPO: ``old_logprobs`` [b, s] and ``advantages`` [b, s];
- PRM: ``ref_logprobs`` [b, s] and ``outcome_labels`` [b].
"""

from __future__ import annotations

import torch

from megatron_prime.algo import (
    PPOLossConfig,
    ppo_policy_loss,
    prm_cross_entropy_loss,
    sequence_log_ratio,
)
from megatron_prime.models.schedule import LossFn, TokenBatch, TokenOutputs


def ppo_loss(config: PPOLossConfig) -> LossFn:
    """PPO clipped surrogate with entropy bonus; units: tokens (token_mean) or responses."""

    def loss_fn(outputs: TokenOutputs, batch: TokenBatch):
        mask = batch.scored_token_mask(outputs.logprobs.dtype)
        # normalizer=1: a sum over this micro-batch; Megatron divides by the global count.
        loss_sum, metrics = ppo_policy_loss(
            outputs.logprobs, batch.extras["old_logprobs"], batch.extras["advantages"], mask,
            config, entropy=outputs.entropy, normalizer=1.0,
        )
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
        return loss_sum, units.to(torch.int), metric_sums

    return loss_fn


def prm_loss(beta: float) -> LossFn:
    """Cross-entropy of sigmoid(beta * sum_t log(pi_psi / pi_ref)) against the outcome label;
    units: responses."""

    def loss_fn(outputs: TokenOutputs, batch: TokenBatch):
        mask = batch.scored_token_mask(outputs.logprobs.dtype)
        labels = batch.extras["outcome_labels"].to(outputs.logprobs.dtype)
        ref = batch.extras["ref_logprobs"].to(outputs.logprobs.dtype)
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
