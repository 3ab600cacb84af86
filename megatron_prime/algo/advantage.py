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


# The two forms of the process rewards' leave-one-out baseline (process_rloo_rewards).
PROCESS_BASELINES: tuple[str, ...] = ("prime_code", "paper")


@dataclass(frozen=True)
class AdvantageConfig:
    """How reward sources combine into advantages. Defaults are the PRIME reference run."""

    outcome_coef: float = 5.0  # weight of the verifier's 0/1 outcome reward after RLOO
    process_coef: float = 5.0  # weight of the implicit process rewards after leave-one-out
    gamma: float = 1.0  # discount of the reverse-cumulative return; the reference uses 1
    whiten: bool = True  # zero-mean, unit-variance advantages over the batch's response tokens
    # The process rewards' leave-one-out form (see process_rloo_rewards): "prime_code", the
    # PRIME code behind Eurus-2-7B-PRIME, or "paper", the PRIME paper's wording.
    process_baseline: str = "prime_code"

    def __post_init__(self) -> None:
        if self.process_baseline not in PROCESS_BASELINES:
            raise ValueError(f"algo.advantage.process_baseline={self.process_baseline!r} is not "
                             f"allowed; expected one of {PROCESS_BASELINES}")
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
    process_rewards: torch.Tensor, response_mask: torch.Tensor, num_samples_per_prompt: int,
    process_baseline: str = "prime_code",
) -> torch.Tensor:
    """Token rewards of each response, leave-one-out baselined within its group of n.

    With ``m_j`` the mean implicit reward over response j's tokens (long and short responses
    weigh the same in the baseline), token t of response i gets, in PRIME.md's terms:

    - ``"paper"``, the paper's wording: ``r_it - mean_{j != i} m_j``, the response-averaged
      reward of the other n - 1 responses subtracted from every token reward;
    - ``"prime_code"``, what the PRIME code computed for the published runs (PRIME-RL/PRIME
      ``training/verl`` and verl-recipe ``prime/``, ``compute_rloo_advantage_return``):
      ``r_it * n/(n-1) - (sum_j m_j)/(n-1)``, the sum over all n responses, i included.

    Their difference is ``(r_it - m_i)/(n-1)`` per token: it sums to 0 over response i's
    tokens, so the two give the same return at the first response token (with gamma = 1)
    and differ at every later one, where "prime_code" weighs the token's own reward by
    n/(n-1). Outcome rewards sit on one token, where the two forms coincide.
    """
    check_same_shape(process_rewards=process_rewards, response_mask=response_mask)
    check_groups(response_mask.shape[0], num_samples_per_prompt, min_samples=2)
    n = num_samples_per_prompt
    if process_baseline not in PROCESS_BASELINES:
        raise ValueError(f"process_baseline={process_baseline!r} is not allowed; expected one of "
                         f"{PROCESS_BASELINES}")
    response_average = masked_mean(process_rewards, response_mask, dim=-1)
    if process_baseline == "paper":
        baselined = process_rewards - leave_one_out_mean(response_average, n).unsqueeze(-1)
    else:
        group_sum = response_average.view(-1, n).sum(dim=-1, keepdim=True).expand(-1, n).reshape(-1)
        baselined = process_rewards * (n / (n - 1)) - (group_sum / (n - 1)).unsqueeze(-1)
    return baselined * response_mask.to(process_rewards.dtype)


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
        process = process_rloo_rewards(process_rewards.to(torch.float32), mask, num_samples_per_prompt,
                                       config.process_baseline)
        combined = combined + config.process_coef * process
    returns = discounted_returns(combined, mask, config.gamma)
    advantages = masked_whiten(returns, mask, reduce_sum=reduce_sum) if config.whiten else returns
    return advantages, returns
