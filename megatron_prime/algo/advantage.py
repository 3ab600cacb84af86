"""PRIME advantages: RLOO on outcome rewards, leave-one-out process rewards, returns.

Each reward source gets its own leave-one-out baseline within the prompt's group of n
responses, is weighted by its coefficient, and the weighted token rewards are summed. The
advantage of a token is the (discounted) return from that token to the end of its response,
optionally whitened over all response tokens of the batch. Layout: see
``megatron_prime.algo.masked``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prime.algo.masked import (
    ReduceFn,
    check_groups,
    check_same_shape,
    last_token_index,
    leave_one_out_mean,
    masked_mean,
    masked_whiten,
)


@dataclass(frozen=True)
class AdvantageConfig:
    """How reward sources combine into advantages. Defaults are the PRIME reference run."""

    outcome_coef: float = 5.0  # weight of the verifier's 0/1 outcome reward after RLOO
    process_coef: float = 5.0  # weight of the implicit process rewards after leave-one-out
    gamma: float = 1.0  # discount of the reverse-cumulative return; the reference uses 1
    whiten: bool = True  # zero-mean, unit-variance advantages over the batch's response tokens

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"AdvantageConfig.gamma={self.gamma} is not allowed; need 0 < gamma <= 1")
        for name in ("outcome_coef", "process_coef"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"AdvantageConfig.{name}={value} is not allowed; need a value >= 0")


def outcome_rloo_rewards(
    outcome_rewards: torch.Tensor, response_mask: torch.Tensor, num_samples_per_prompt: int
) -> torch.Tensor:
    """``[batch, seq]`` tensor holding ``r_i - mean_{j != i} r_j`` on each response's last token.

    The verifier judges the whole response, so its reward belongs to the final token; the
    return computation then carries it back to every earlier token. A row with no response
    tokens has nowhere to put its reward and stays all-zero.
    """
    if outcome_rewards.shape != response_mask.shape[:1]:
        raise ValueError(
            f"outcome_rewards must have shape [batch]={tuple(response_mask.shape[:1])}, "
            f"got {tuple(outcome_rewards.shape)}"
        )
    check_groups(response_mask.shape[0], num_samples_per_prompt, min_samples=2)
    rewards = outcome_rewards.to(torch.float32)
    advantage = rewards - leave_one_out_mean(rewards, num_samples_per_prompt)
    index, has_tokens = last_token_index(response_mask)
    token_rewards = torch.zeros(response_mask.shape, dtype=rewards.dtype, device=rewards.device)
    token_rewards.scatter_(1, index.unsqueeze(-1), (advantage * has_tokens).unsqueeze(-1))
    return token_rewards


def process_rloo_rewards(
    process_rewards: torch.Tensor, response_mask: torch.Tensor, num_samples_per_prompt: int
) -> torch.Tensor:
    """Token rewards minus the leave-one-out mean of the other responses' average reward.

    Token t of response i gets ``r_it - mean_{j != i} mean_t'(r_jt')``: the baseline is the
    response-averaged implicit reward of the other n - 1 responses, so long and short responses
    weigh the same in it. (The verl recipe instead scales r_it by n/(n-1) and subtracts the
    mean over all n; the two agree only for one-token rewards. We follow the paper.)
    """
    check_same_shape(process_rewards=process_rewards, response_mask=response_mask)
    check_groups(response_mask.shape[0], num_samples_per_prompt, min_samples=2)
    response_average = masked_mean(process_rewards, response_mask, dim=-1)
    baseline = leave_one_out_mean(response_average, num_samples_per_prompt)
    return (process_rewards - baseline.unsqueeze(-1)) * response_mask.to(process_rewards.dtype)


def discounted_returns(token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reverse-cumulative discounted sum ``G_t = r_t + gamma * G_{t+1}`` within each response.

    gamma = 1 is one flipped cumsum. gamma < 1 loops over the sequence positions (not over
    samples): a closed form with gamma^-t overflows for long responses. Rewards outside the
    mask are ignored and returns there are 0.
    """
    check_same_shape(token_rewards=token_rewards, response_mask=response_mask)
    mask = response_mask.to(token_rewards.dtype)
    rewards = token_rewards * mask
    if gamma == 1.0:
        returns = rewards.flip(-1).cumsum(-1).flip(-1)
    else:
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[-1])):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
    return returns * mask


def compute_prime_advantages(
    outcome_rewards: torch.Tensor,
    process_rewards: torch.Tensor | None,
    response_mask: torch.Tensor,
    num_samples_per_prompt: int,
    config: AdvantageConfig = AdvantageConfig(),
    reduce_sum: ReduceFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PRIME advantages and returns, both ``[batch, seq]`` and 0 outside the response.

    The rows may be one shard (a data-parallel rank's whole groups) of the step's batch:
    everything but the whitening is per group, and ``reduce_sum`` (see ``masked_whiten``)
    makes the whitening statistics the whole batch's, as in the reference, where the
    driver whitens the full batch at once.

    ``outcome_rewards`` is the verifier's ``[batch]`` score; ``process_rewards`` the per-token
    implicit rewards (from ``implicit_process_rewards``), or None for outcome-only RLOO. Each
    source is leave-one-out baselined on its own, scaled by its coefficient, summed per token,
    turned into a return, and the return is the advantage (whitened if configured).
    """
    check_groups(response_mask.shape[0], num_samples_per_prompt, min_samples=2)
    mask = response_mask.to(torch.float32)
    combined = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    if config.outcome_coef != 0:
        combined = combined + config.outcome_coef * outcome_rloo_rewards(outcome_rewards, mask, num_samples_per_prompt)
    if process_rewards is not None and config.process_coef != 0:
        process = process_rloo_rewards(process_rewards.to(torch.float32), mask, num_samples_per_prompt)
        combined = combined + config.process_coef * process
    returns = discounted_returns(combined, mask, config.gamma)
    advantages = masked_whiten(returns, mask, reduce_sum=reduce_sum) if config.whiten else returns
    return advantages, returns
