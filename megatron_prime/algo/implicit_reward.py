"""Implicit process rewards from the PRM and the PRM's own training loss.

PRIME's PRM is a language model pi_psi; its reward for token t is
``beta * (log pi_psi(y_t | y_<t) - log pi_ref(y_t | y_<t))``. Summed over a response this is
the log-likelihood ratio that the PRM is trained, with a binary cross-entropy, to turn into the
probability that the response is correct. Layout: see ``megatron_prime.algo.masked``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from megatron_prime.algo.masked import ReduceFn, check_groups, check_same_shape, masked_sum

ProcessRewardNormalization = Literal["none", "batch_norm"]
PROCESS_REWARD_NORMALIZATIONS: tuple[str, ...] = ("none", "batch_norm")

# Keeps the batch_norm division finite when every implicit reward in the batch is 0.
_BATCH_NORM_EPS = 1e-6


def implicit_process_rewards(
    prm_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
    normalization: ProcessRewardNormalization = "none",
    reduce_max: ReduceFn | None = None,
) -> torch.Tensor:
    """Per-token implicit reward ``beta * (logp_prm - logp_ref)``, 0 outside the response.

    ``normalization="batch_norm"`` (the PRIME reference) divides every token reward by the
    largest absolute reverse-cumulative sum of rewards in the batch, so that the process
    return of any token lies in [-1, 1] whatever beta and the response lengths are.

    Which batch: the reference (verl ``recipe/prime/prime_dp_rm.py``,
    ``DataParallelPRIMERewardModel.prime_norm``, called in ``compute_rm_score`` and
    ``update_rm``) takes the max over the rows one data-parallel worker holds, so its scale
    depends on the number of GPUs. We take it over the whole step's batch: when the rows are
    one shard of it, ``reduce_max`` returns the maximum over all shards (the trainer passes an
    all-reduce MAX over the data-parallel group). That equals the reference run on one
    worker and gives the same rewards at every layout.
    """
    check_same_shape(prm_log_probs=prm_log_probs, ref_log_probs=ref_log_probs, response_mask=response_mask)
    if normalization not in PROCESS_REWARD_NORMALIZATIONS:
        raise ValueError(
            f"normalization={normalization!r} is not supported; allowed: {PROCESS_REWARD_NORMALIZATIONS}"
        )
    mask = response_mask.to(prm_log_probs.dtype)
    rewards = beta * (prm_log_probs - ref_log_probs) * mask
    if normalization == "batch_norm":
        reverse_cumsum = rewards.flip(-1).cumsum(-1).flip(-1)
        largest = reverse_cumsum.abs().max() if rewards.numel() else rewards.new_zeros(())
        if reduce_max is not None:
            largest = reduce_max(largest)
        rewards = rewards / (largest + _BATCH_NORM_EPS)
    return rewards


def sequence_log_ratio(
    prm_log_probs: torch.Tensor, ref_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """``sum_t (logp_prm - logp_ref)`` over each response: the PRM's ``[batch]`` score before beta."""
    check_same_shape(prm_log_probs=prm_log_probs, ref_log_probs=ref_log_probs, response_mask=response_mask)
    return masked_sum(prm_log_probs - ref_log_probs, response_mask, dim=-1)


def log_ratio_error(
    prm_log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
    exact_prm_log_probs: torch.Tensor, exact_ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """``|(logp_prm - logp_ref) - (exact_prm - exact_ref)|`` per token, 0 outside the mask: how
    far the implicit reward's log ratio as scored (e.g. in FP8) is from the same ratio in high
    precision, in the units of the signal itself (the reward is beta times it)."""
    check_same_shape(prm_log_probs=prm_log_probs, ref_log_probs=ref_log_probs,
                     exact_prm_log_probs=exact_prm_log_probs,
                     exact_ref_log_probs=exact_ref_log_probs, response_mask=response_mask)
    scored = prm_log_probs - ref_log_probs
    exact = exact_prm_log_probs - exact_ref_log_probs
    return (scored - exact).abs() * response_mask


def prm_cross_entropy_loss(
    prm_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    outcome_labels: torch.Tensor,
    beta: float,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Binary cross-entropy between ``sigmoid(beta * sequence_log_ratio)`` and the outcome.

    Computed from logits (``binary_cross_entropy_with_logits``) so a large log-ratio does not
    saturate the sigmoid into log(0). ``outcome_labels`` is ``[batch]`` in [0, 1] (1 correct).
    ``reduction="sum"`` lets the trainer divide by a global sample count itself.
    """
    if outcome_labels.shape != prm_log_probs.shape[:1]:
        raise ValueError(
            f"outcome_labels must have shape [batch]={tuple(prm_log_probs.shape[:1])}, "
            f"got {tuple(outcome_labels.shape)}"
        )
    logits = beta * sequence_log_ratio(prm_log_probs, ref_log_probs, response_mask)
    return F.binary_cross_entropy_with_logits(logits, outcome_labels.to(logits.dtype), reduction=reduction)


def prm_pairwise_accuracy(
    sequence_scores: torch.Tensor, outcome_labels: torch.Tensor, num_samples_per_prompt: int
) -> torch.Tensor:
    """How often the PRM ranks the better of two responses to the same prompt higher.

    Over every pair (i, j) inside a prompt's group whose labels differ, a pair counts 1 if the
    score order agrees with the label order, 0.5 on a score tie, 0 otherwise; pairs are
    weighted by ``|label_i - label_j|`` (fractional code rewards count proportionally). Groups
    whose labels are all equal carry no ranking signal and are skipped; with no informative
    pair at all the result is 0.5 (chance), so the metric never becomes NaN.
    """
    if sequence_scores.shape != outcome_labels.shape or sequence_scores.dim() != 1:
        raise ValueError(
            f"sequence_scores and outcome_labels must both be [batch], got "
            f"{tuple(sequence_scores.shape)} and {tuple(outcome_labels.shape)}"
        )
    agreeing, total_weight = prm_pairwise_agreement(sequence_scores, outcome_labels,
                                                    num_samples_per_prompt)
    # torch.where instead of an `if` keeps this free of a host-device sync.
    accuracy = torch.where(total_weight > 0, agreeing / total_weight.clamp(min=1e-12), 0.5)
    return accuracy.to(sequence_scores.dtype)


def _agreement_per_group(
    sequence_scores: torch.Tensor, outcome_labels: torch.Tensor, num_samples_per_prompt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (float64, ``[num_prompts]``): the weight of the (better, worse) pairs the
    scores order right, ties half, and the weight of all such pairs. A pair's weight is its
    label difference (1 for a right and a wrong response); each unordered pair counts once."""
    if sequence_scores.shape != outcome_labels.shape or sequence_scores.dim() != 1:
        raise ValueError(
            f"sequence_scores and outcome_labels must both be [batch], got "
            f"{tuple(sequence_scores.shape)} and {tuple(outcome_labels.shape)}"
        )
    n = num_samples_per_prompt
    check_groups(sequence_scores.shape[0], n, min_samples=2)
    scores = sequence_scores.detach().double().view(-1, n)
    labels = outcome_labels.detach().double().view(-1, n)
    score_diff = scores.unsqueeze(-1) - scores.unsqueeze(-2)  # [P, n, n], entry [i, j] = s_i - s_j
    label_diff = labels.unsqueeze(-1) - labels.unsqueeze(-2)
    weight = label_diff * (label_diff > 0)  # oriented so that label_i > label_j
    agreement = torch.where(score_diff > 0, 1.0, torch.where(score_diff == 0, 0.5, 0.0))
    return (agreement * weight).sum(dim=(-1, -2)), weight.sum(dim=(-1, -2))


def prm_pairwise_agreement(
    sequence_scores: torch.Tensor, outcome_labels: torch.Tensor, num_samples_per_prompt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float64 sums behind ``prm_pairwise_accuracy``: the weight of the pairs the PRM
    orders right (ties count half) and the weight of all informative pairs.

    Sums, not their ratio, so that shards of a batch (data-parallel ranks) can be added up
    first and the accuracy is over every group of the step, whatever the layout.
    """
    agreeing, total = _agreement_per_group(sequence_scores, outcome_labels, num_samples_per_prompt)
    return agreeing.sum(), total.sum()


def prm_group_ranking_agreement(
    sequence_scores: torch.Tensor, outcome_labels: torch.Tensor, num_samples_per_prompt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over groups of each group's ranking accuracy, and the number of groups summed.

    A group's accuracy is the fraction (by the pair weights of ``prm_pairwise_agreement``) of
    its (better, worse) pairs that the scores order right, ties half. Only groups whose labels
    are not all equal count: with 0/1 labels, the groups holding both a correct and a wrong
    response. Their mean weighs every such prompt the same, where the pair-weighted
    ``prm_pairwise_accuracy`` weighs a 2-right-2-wrong group (4 pairs) above a 1-3 one
    (3 pairs). Float64 sums, so that shards of a batch can be added before dividing.
    """
    agreeing, total = _agreement_per_group(sequence_scores, outcome_labels, num_samples_per_prompt)
    informative = total > 0
    fractions = torch.where(informative, agreeing / total.clamp(min=1e-12), 0.0)
    return fractions.sum(), informative.sum().double()
