"""Steps 6-9 of the PRIME step: log-probs, PRM update, advantages, PPO update.

``prime_update`` runs on every rank of the trainer, after the rollouts (steps 1-5, in
rollout/collect.py) have given this data-parallel replica its groups of n responses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from megatron.core.optimizer import MegatronOptimizer
from torch import Tensor

from megatron_prime.algo import (
    AdvantageConfig,
    PPOLossConfig,
    compute_prime_advantages,
    implicit_process_rewards,
    masked_mean,
    prm_pairwise_accuracy,
    sequence_log_ratio,
)
from megatron_prime.config import require, require_choice, require_positive_int
from megatron_prime.losses import ppo_loss, prm_loss
from megatron_prime.models.builder import BuiltModel, resident
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
    # PPO updates per step: the responses are cut into ppo_mini_batches optimizer steps,
    # repeated ppo_epochs times (verl's ppo_mini_batch_size / ppo_epochs). The reference
    # run makes one update per step; after the first, the clip starts to matter.
    ppo_epochs: int = 1
    ppo_mini_batches: int = 1
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
        require_positive_int("algo.ppo_epochs", self.ppo_epochs)
        require_positive_int("algo.ppo_mini_batches", self.ppo_mini_batches)


@dataclass
class PrimeModels:
    policy: BuiltModel
    reference: BuiltModel | None  # None for outcome-only RLOO (algo.prm_mode=none)
    policy_optimizer: MegatronOptimizer
    prm: BuiltModel | None = None
    prm_optimizer: MegatronOptimizer | None = None
    # The reference lives in host memory between its forward passes (trainer.offload_reference).
    reference_offloaded: bool = False


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    # Why an update was skipped by the NaN/inf guard, one entry per skipped model.
    skip_reasons: list[str] = field(default_factory=list)


class PhaseTimer:
    """Wall time per phase of a step (host clock; phases end with a host sync anyway)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{k}": v for k, v in self.seconds.items()}, "time/step": self.total}


def prime_update(models: PrimeModels, batch: TokenBatch, outcome_rewards: Tensor,
                 config: AlgoConfig) -> UpdateResult:
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
    skip_reasons: list[str] = []
    # Where the update's time goes: log-prob passes, PRM update, policy update.
    timer = PhaseTimer()

    # Step 6: old-policy and reference log-probs (forward-only, vocab-parallel). Only the
    # implicit PRM reads the reference (PRIME has no KL term): outcome-only RLOO skips it.
    with timer("logprobs"):
        old = forward_only(models.policy, batch, config.micro_batch_size).logprobs
        if config.prm_mode != "none":
            if models.reference is None:
                raise ValueError(f"algo.prm_mode={config.prm_mode!r} needs the reference model")
            with resident(models.reference, models.reference_offloaded):
                ref = forward_only(models.reference, batch, config.micro_batch_size).logprobs
    if "rollout_logprobs" in batch.extras and mask.sum() > 0:
        # The engine sampled with the weights the bridge pushed, which are these weights: any
        # gap beyond kernel round-off means a stale or mangled sync (verl logs the same check).
        gap = (old.detach().float().cpu() - batch.extras["rollout_logprobs"]).abs() * mask.cpu()
        metrics["rollout/logprob_diff_mean"] = float(gap.sum() / mask.sum())
        metrics["rollout/logprob_diff_max"] = float(gap.max())

    # Step 7: the implicit PRM, updated before or after it scores the batch.
    process_rewards = None
    if config.prm_mode != "none":
        if models.prm is None or models.prm_optimizer is None:
            raise ValueError(f"algo.prm_mode={config.prm_mode!r} needs a PRM model and optimizer")
        prm_batch = _with_extras(batch, ref_logprobs=ref, outcome_labels=outcome_rewards.float())
        if config.prm_mode == "after":
            with timer("logprobs"):
                prm_logprobs = forward_only(models.prm, batch, config.micro_batch_size).logprobs
        with timer("prm_update"):
            prm_step = train_step(models.prm, models.prm_optimizer, prm_batch,
                                  config.micro_batch_size, prm_loss(config.beta))
        if prm_step.skip_reason:
            skip_reasons.append(f"PRM update skipped: {prm_step.skip_reason}")
        if config.prm_mode == "before":
            with timer("logprobs"):
                prm_logprobs = forward_only(models.prm, batch, config.micro_batch_size).logprobs
        process_rewards = implicit_process_rewards(prm_logprobs, ref, mask, config.beta,
                                                   config.process_reward_normalization)
        # How often the scoring PRM ranks a correct response above a wrong one of the same
        # prompt (over this rank's groups).
        ranking = prm_pairwise_accuracy(config.beta * sequence_log_ratio(prm_logprobs, ref, mask),
                                        outcome_rewards.float(), n)
        metrics.update({"prm/loss": prm_step.metrics["loss"],
                        "prm/accuracy": prm_step.metrics["accuracy"],
                        "prm/ranking_accuracy": float(ranking),
                        "prm/grad_norm": prm_step.grad_norm,
                        "reward/process_mean": float(masked_mean(process_rewards, mask))})

    # Step 8: advantages (RLOO on outcomes + leave-one-out process returns).
    advantages, _ = compute_prime_advantages(outcome_rewards.float(), process_rewards, mask, n,
                                             config.advantage)

    # Step 9: PPO update of the policy, in ppo_epochs x ppo_mini_batches optimizer steps.
    policy_batch = _with_extras(batch, old_logprobs=old, advantages=advantages)
    if config.ppo_mini_batches > batch.batch_size:
        raise ValueError(f"algo.ppo_mini_batches={config.ppo_mini_batches} is more than the "
                         f"{batch.batch_size} responses on this rank")
    bounds = torch.linspace(0, batch.batch_size, config.ppo_mini_batches + 1).round().long().tolist()
    policy_metrics: dict[str, list[float]] = {}
    for _ in range(config.ppo_epochs):
        for start, end in zip(bounds[:-1], bounds[1:]):
            mini_batch = policy_batch.map_tensors(lambda t, a=start, b=end: t[a:b])
            with timer("policy_update"):
                policy_step = train_step(models.policy, models.policy_optimizer, mini_batch,
                                         config.micro_batch_size, ppo_loss(config.ppo))
            if policy_step.skip_reason:
                skip_reasons.append(f"policy update skipped: {policy_step.skip_reason}")
            for name, value in {**policy_step.metrics, "grad_norm": policy_step.grad_norm}.items():
                policy_metrics.setdefault(name, []).append(value)
    # Means over the step's updates (the first update is on-policy: ratio 1, no clipping).
    metrics.update({f"policy/{k}": sum(v) / len(v) for k, v in policy_metrics.items()})
    metrics["reward/outcome_mean"] = float(outcome_rewards.float().mean())
    metrics.update({f"time/{name}": seconds for name, seconds in timer.seconds.items()})
    return UpdateResult(metrics, skip_reasons)


def _with_extras(batch: TokenBatch, **extras: Tensor) -> TokenBatch:
    return replace(batch, extras={**batch.extras, **{k: v.detach().cpu() for k, v in extras.items()}})
