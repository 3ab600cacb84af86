"""The PRIME step. (The loop around it, the rollout and checkpointing steps, come next.)

``prime_update`` is steps 6-9 of the PRIME step in ../shared/DESIGN.md for a batch of
sampled responses whose outcome rewards are known: log-probs of the old policy, the
reference and the implicit PRM through Megatron's forward-only schedule; the PRM update
("before" or "after" scoring); PRIME advantages; the PPO update of the policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megatron.core.optimizer import MegatronOptimizer
from torch import Tensor

from megatron_prime.algo import (
    AdvantageConfig,
    PPOLossConfig,
    compute_prime_advantages,
    implicit_process_rewards,
    masked_mean,
)
from megatron_prime.config import require, require_choice, require_positive_int
from megatron_prime.losses import ppo_loss, prm_loss
from megatron_prime.models.builder import BuiltModel
from megatron_prime.models.optimizer import train_step
from megatron_prime.models.schedule import TokenBatch, forward_only


@dataclass
class AlgoConfig:
    """PRIME's algorithm settings; defaults are the reference 7B run (../shared/PRIME.md)."""

    beta: float = 0.05
    num_samples_per_prompt: int = 4
    # "before": update the PRM on the batch, then score it; "after": score, then update;
    # "none": outcome-only RLOO (no PRM at all), the comparison baseline.
    prm_mode: str = "before"
    process_reward_normalization: str = "batch_norm"
    micro_batch_size: int = 4
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    ppo: PPOLossConfig = field(default_factory=PPOLossConfig)

    def validate(self) -> None:
        require(self.beta > 0, "algo.beta", self.beta, "a float > 0")
        require_positive_int("algo.num_samples_per_prompt", self.num_samples_per_prompt)
        require(self.num_samples_per_prompt >= 2, "algo.num_samples_per_prompt",
                 self.num_samples_per_prompt, ">= 2 (leave-one-out baselines)")
        require_choice("algo.prm_mode", self.prm_mode, ("before", "after", "none"))
        require_choice("algo.process_reward_normalization", self.process_reward_normalization,
                       ("none", "batch_norm"))
        require_positive_int("algo.micro_batch_size", self.micro_batch_size)


@dataclass
class PrimeModels:
    policy: BuiltModel
    reference: BuiltModel
    policy_optimizer: MegatronOptimizer
    prm: BuiltModel | None = None
    prm_optimizer: MegatronOptimizer | None = None


def prime_update(models: PrimeModels, batch: TokenBatch, outcome_rewards: Tensor,
                 config: AlgoConfig) -> dict[str, float]:
    """One PRIME update on this data-parallel rank's responses (groups of n consecutive rows).

    Advantages are whitened over this rank's responses.
    """
    config.validate()
    n = config.num_samples_per_prompt
    if batch.batch_size % n:
        raise ValueError(f"{batch.batch_size} responses on this rank are not whole groups of "
                         f"algo.num_samples_per_prompt={n}")
    mask = batch.scored_token_mask()
    metrics: dict[str, float] = {}

    # Step 6: old-policy and reference log-probs (forward-only, vocab-parallel).
    old = forward_only(models.policy, batch, config.micro_batch_size).logprobs
    ref = forward_only(models.reference, batch, config.micro_batch_size).logprobs

    # Step 7: the implicit PRM, updated before or after it scores the batch.
    process_rewards = None
    if config.prm_mode != "none":
        if models.prm is None or models.prm_optimizer is None:
            raise ValueError(f"algo.prm_mode={config.prm_mode!r} needs a PRM model and optimizer")
        prm_batch = _with_extras(batch, ref_logprobs=ref, outcome_labels=outcome_rewards.float())
        if config.prm_mode == "after":
            prm_logprobs = forward_only(models.prm, batch, config.micro_batch_size).logprobs
        prm_step = train_step(models.prm, models.prm_optimizer, prm_batch,
                              config.micro_batch_size, prm_loss(config.beta))
        if config.prm_mode == "before":
            prm_logprobs = forward_only(models.prm, batch, config.micro_batch_size).logprobs
        process_rewards = implicit_process_rewards(prm_logprobs, ref, mask, config.beta,
                                                   config.process_reward_normalization)
        metrics.update({"prm/loss": prm_step.metrics["loss"],
                        "prm/accuracy": prm_step.metrics["accuracy"],
                        "prm/grad_norm": prm_step.grad_norm,
                        "reward/process_mean": float(masked_mean(process_rewards, mask))})

    # Step 8: advantages (RLOO on outcomes + leave-one-out process returns).
    advantages, _ = compute_prime_advantages(outcome_rewards.float(), process_rewards, mask, n,
                                             config.advantage)

    # Step 9: PPO update of the policy.
    policy_batch = _with_extras(batch, old_logprobs=old, advantages=advantages)
    policy_step = train_step(models.policy, models.policy_optimizer, policy_batch,
                             config.micro_batch_size, ppo_loss(config.ppo))
    metrics.update({f"policy/{k}": v for k, v in policy_step.metrics.items()})
    metrics["policy/grad_norm"] = policy_step.grad_norm
    metrics["reward/outcome_mean"] = float(outcome_rewards.float().mean())
    return metrics


def _with_extras(batch: TokenBatch, **extras: Tensor) -> TokenBatch:
    return replace(batch, extras={**batch.extras, **{k: v.detach().cpu() for k, v in extras.items()}})
