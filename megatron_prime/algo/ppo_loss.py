"""PPO clipped policy loss with optional dual clip and entropy bonus (no KL term: PRIME uses
kl_coef 0). Layout: see ``megatron_prime.algo.masked``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_prime.algo.masked import check_same_shape, masked_sum

LossAggregation = Literal["token_mean", "seq_mean"]
LOSS_AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean")


@dataclass(frozen=True)
class PPOLossConfig:
    """Surrogate-loss knobs; defaults are the PRIME reference run."""

    clip_ratio: float = 0.2  # ratio is clipped to [1 - clip_ratio, 1 + clip_ratio]
    # Dual clip (Ye et al., 2020): for negative advantages the loss is capped at
    # -advantage * dual_clip_ratio, so one token with a huge ratio cannot dominate. None = off.
    dual_clip_ratio: float | None = None
    # token_mean: every valid token of the batch weighs the same (the reference).
    # seq_mean: average tokens within a response, then responses (long answers weigh less).
    aggregation: LossAggregation = "token_mean"
    entropy_coef: float = 0.001  # entropy bonus: loss -= entropy_coef * entropy

    def __post_init__(self) -> None:
        if not 0.0 < self.clip_ratio < 1.0:
            raise ValueError(f"PPOLossConfig.clip_ratio={self.clip_ratio} is not allowed; need 0 < clip_ratio < 1")
        if self.dual_clip_ratio is not None and self.dual_clip_ratio <= 1.0:
            raise ValueError(
                f"PPOLossConfig.dual_clip_ratio={self.dual_clip_ratio} is not allowed; need None or a value > 1"
            )
        if self.aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"PPOLossConfig.aggregation={self.aggregation!r} is not allowed; allowed: {LOSS_AGGREGATIONS}")
        if self.entropy_coef < 0:
            raise ValueError(f"PPOLossConfig.entropy_coef={self.entropy_coef} is not allowed; need a value >= 0")


def aggregate_token_values(
    values: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: LossAggregation,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce ``[batch, seq]`` token values to a scalar as the loss aggregation says.

    token_mean: sum over valid tokens / ``normalizer`` (default: this batch's valid-token
    count). seq_mean: per-response token mean, summed over responses / ``normalizer``
    (default: the number of responses). A trainer that splits a global batch into
    micro-batches (and data-parallel ranks) passes the global count, so that the sum of the
    micro-batch losses is the mean over the whole batch.
    """
    mask = response_mask.to(values.dtype)
    if aggregation == "token_mean":
        total = masked_sum(values, mask)
        count = mask.sum() if normalizer is None else normalizer
    elif aggregation == "seq_mean":
        per_sequence = masked_sum(values, mask, dim=-1) / mask.sum(dim=-1).clamp(min=1)
        total = per_sequence.sum()
        count = values.shape[0] if normalizer is None else normalizer
    else:
        raise ValueError(f"aggregation={aggregation!r} is not allowed; allowed: {LOSS_AGGREGATIONS}")
    if isinstance(count, torch.Tensor):
        return total / count.clamp(min=1)
    return total / max(count, 1)


def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PPOLossConfig = PPOLossConfig(),
    entropy: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise) and detached metrics.

    Per token: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``, with the dual-clip cap
    for A < 0 if configured; aggregated by ``config.aggregation`` (see
    ``aggregate_token_values`` for ``normalizer``). ``entropy`` is the per-token policy
    entropy; when given, ``entropy_coef * entropy`` is subtracted as an exploration bonus.

    Metrics: ``pg_loss``, ``clip_fraction`` (tokens where the clipped branch is taken),
    ``dual_clip_fraction``, ``approx_kl`` (the k3 estimator ``ratio - 1 - log ratio``, >= 0,
    of KL(old || new)) and ``entropy``; all are token means over this batch.

    ``token_weights`` (constants, e.g. ``truncated_importance_weights``) multiply each
    token's clipped surrogate before aggregation; the entropy bonus is not weighted.
    """
    check_same_shape(
        log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, response_mask=response_mask
    )
    mask = response_mask.to(log_probs.dtype)
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - config.clip_ratio, 1.0 + config.clip_ratio)
    token_loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(token_loss, dtype=torch.bool)
    if config.dual_clip_ratio is not None:
        cap = -advantages * config.dual_clip_ratio
        dual_clipped = (advantages < 0) & (token_loss > cap)
        token_loss = torch.where(dual_clipped, cap, token_loss)
    if token_weights is not None:
        check_same_shape(token_weights=token_weights, response_mask=response_mask)
        token_loss = token_loss * token_weights.detach()

    pg_loss = aggregate_token_values(token_loss, mask, config.aggregation, normalizer)
    loss = pg_loss
    metrics: dict[str, torch.Tensor] = {}
    if entropy is not None:
        check_same_shape(entropy=entropy, response_mask=response_mask)
        entropy_term = aggregate_token_values(entropy, mask, config.aggregation, normalizer)
        loss = loss - config.entropy_coef * entropy_term
        metrics["entropy"] = _token_mean(entropy.detach(), mask)

    metrics["pg_loss"] = pg_loss.detach()
    metrics["clip_fraction"] = _token_mean((clipped > unclipped).to(mask.dtype), mask)
    metrics["dual_clip_fraction"] = _token_mean(dual_clipped.to(mask.dtype), mask)
    metrics["approx_kl"] = _token_mean((ratio - 1.0 - log_ratio).detach(), mask)
    return loss, metrics


def truncated_importance_weights(old_log_probs: torch.Tensor, sampler_log_probs: torch.Tensor,
                                 response_mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) between the sampler and the trainer: per token
    ``min(pi_old / pi_sampler, cap)``, detached, 0 outside the mask.

    The tokens were drawn by vLLM, whose kernels (bf16, FP8) give log-probs that differ from
    the trainer's; PPO's ratio is taken against the trainer's old policy, so the sample is
    off-policy by pi_old / pi_sampler. Weighting each token's surrogate by that ratio,
    capped so a token vLLM undersampled cannot dominate, corrects it (Yao et al., 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; verl's
    ``rollout_is`` with ``rollout_is_threshold``, slime's ``--use-tis``)."""
    check_same_shape(old_log_probs=old_log_probs, sampler_log_probs=sampler_log_probs,
                     response_mask=response_mask)
    log_ratio = (old_log_probs.detach() - sampler_log_probs).to(torch.float32)
    # Clamped before exp: a token with a huge gap is capped anyway, and exp must not overflow.
    weights = torch.exp(torch.clamp(log_ratio, max=math.log(cap)))
    return weights * response_mask.to(weights.dtype)


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(values, mask) / mask.sum().clamp(min=1)
