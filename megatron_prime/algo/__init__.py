"""PRIME algorithm as pure tensor functions: no torch.distributed, no Megatron, no I/O.

Batch layout (shared by every function): token tensors are ``[batch, seq]`` with a
``response_mask`` that is 1 on each row's (contiguous, variable-length) response tokens; the
``num_samples_per_prompt`` responses of a prompt are consecutive rows.
"""

from megatron_prime.algo.advantage import (
    AdvantageConfig,
    compute_prime_advantages,
    discounted_returns,
    outcome_rloo_rewards,
    process_rloo_rewards,
)
from megatron_prime.algo.filter import AccuracyFilterConfig, FilterResult, accuracy_band_filter
from megatron_prime.algo.implicit_reward import (
    implicit_process_rewards,
    log_ratio_error,
    prm_cross_entropy_loss,
    prm_group_ranking_agreement,
    prm_pairwise_accuracy,
    prm_pairwise_agreement,
    sequence_log_ratio,
)
from megatron_prime.algo.masked import ReduceFn, masked_mean, masked_sum, masked_whiten
from megatron_prime.algo.ppo_loss import (
    PPOLossConfig,
    aggregate_token_values,
    ppo_policy_loss,
    truncated_importance_weights,
)

__all__ = [
    "AccuracyFilterConfig",
    "AdvantageConfig",
    "FilterResult",
    "PPOLossConfig",
    "ReduceFn",
    "accuracy_band_filter",
    "aggregate_token_values",
    "compute_prime_advantages",
    "discounted_returns",
    "implicit_process_rewards",
    "log_ratio_error",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "outcome_rloo_rewards",
    "ppo_policy_loss",
    "prm_cross_entropy_loss",
    "prm_group_ranking_agreement",
    "prm_pairwise_accuracy",
    "prm_pairwise_agreement",
    "process_rloo_rewards",
    "sequence_log_ratio",
    "truncated_importance_weights",
]
