"""Steps 6-9 of the PRIME step: log-probs, PRM update, advantages, PPO update.

``prime_update`` runs on every rank of the trainer, after the rollouts (steps 1-5, in
rollout/collect.py) have given this data-parallel replica its groups of n responses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from megatron.core.optimizer import MegatronOptimizer
from torch import Tensor

from megatron_prime import distributed
from megatron_prime.algo import (
    AdvantageConfig,
    PPOLossConfig,
    compute_prime_advantages,
    implicit_process_rewards,
    log_ratio_error,
    masked_sum,
    prm_group_ranking_agreement,
    prm_pairwise_agreement,
    sequence_log_ratio,
)
from megatron_prime.config import require, require_choice, require_positive_int
from megatron_prime.losses import StepBatch, ppo_loss, prm_loss
from megatron_prime.models.builder import BuiltModel, resident
from megatron_prime.models.offload import RolloutOffload
from megatron_prime.models.fp8 import calibrate, fp8_off, needs_calibration, runs_fp8
from megatron_prime.models.optimizer import train_step
from megatron_prime.models.schedule import MicroBatching, TokenBatch, TokenOutputs, forward_only


PRM_MODES: tuple[str, ...] = ("before", "after", "frozen", "outcome_only")


@dataclass
class AlgoConfig:
    """PRIME's algorithm settings; defaults are the reference 7B run (../shared/PRIME.md)."""

    beta: float = 0.05
    num_samples_per_prompt: int = 4
    # "before": update the PRM on the batch, then score it with the updated PRM (reference);
    # "after": score with the PRM as it is, then update it;
    # "frozen": score with the PRM as loaded, never update it (no PRM optimizer): an ablation;
    # "outcome_only": RLOO on the outcome rewards alone, no PRM and no reference: the baseline.
    prm_mode: str = "before"
    # PRM optimizer steps per step: the rows on each rank are cut into this many mini-batches,
    # one step each (reference: 4, i.e. 64 of 256 responses per step).
    prm_mini_batches: int = 4
    process_reward_normalization: str = "batch_norm"
    micro_batch_size: int = 4
    # Token-budget micro-batching (verl's use_dynamic_bsz with ppo_max_token_len_per_gpu):
    # when set, every forward and backward pass of the step cuts its rows into micro-batches
    # of varying rows whose padded tokens (rows x the longest row's length) stay within this
    # budget, longest rows first, and micro_batch_size is not used. None: micro_batch_size
    # rows each. Must cover one row of rollout.engine.max_model_len tokens.
    max_tokens_per_micro_batch: int | None = None
    # PPO updates per step: the responses are cut into ppo_mini_batches optimizer steps,
    # repeated ppo_epochs times (verl's ppo_mini_batch_size / ppo_epochs). The reference
    # run makes one update per step; after the first, the clip starts to matter.
    ppo_epochs: int = 1
    ppo_mini_batches: int = 1
    # The old-policy log-prob pass (PPO's denominator). "auto": skipped when the update is one
    # on-policy pass (ppo_epochs=1 and ppo_mini_batches=1): the old policy is then the policy
    # being updated, so its log-probs are the update's own forward, detached (ratio exactly
    # 1), as verl's dp_actor does for an on-policy update (one mini-batch, ppo_epochs 1:
    # old_log_prob = log_prob.detach()). "always": the separate pass.
    old_logprob_pass: str = "auto"
    # Correction for the sampler/trainer mismatch (vLLM's bf16 or FP8 kernels draw from a
    # slightly different distribution than the trainer's old policy): "tis" weights each
    # token's PPO surrogate by min(pi_old / pi_sampler, rollout_correction_cap), truncated
    # importance sampling on the log-probs vLLM returned (verl's rollout_is, slime's
    # --use-tis). "off" (the PRIME reference): none.
    rollout_correction: str = "off"
    rollout_correction_cap: float = 2.0
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    ppo: PPOLossConfig = field(default_factory=PPOLossConfig)

    def validate(self) -> None:
        require(self.beta > 0, "algo.beta", self.beta, "a float > 0")
        require_positive_int("algo.num_samples_per_prompt", self.num_samples_per_prompt)
        require(self.num_samples_per_prompt >= 2, "algo.num_samples_per_prompt",
                 self.num_samples_per_prompt, ">= 2 (leave-one-out baselines)")
        if self.prm_mode == "none":
            raise ValueError("algo.prm_mode='none' was renamed to 'outcome_only' (RLOO on outcome "
                             "rewards, no PRM, no reference); 'frozen' scores with a PRM that is "
                             "never updated")
        require_choice("algo.prm_mode", self.prm_mode, PRM_MODES)
        require_choice("algo.process_reward_normalization", self.process_reward_normalization,
                       ("none", "batch_norm"))
        require_positive_int("algo.micro_batch_size", self.micro_batch_size)
        if self.max_tokens_per_micro_batch is not None:
            require_positive_int("algo.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch)
        require_positive_int("algo.ppo_epochs", self.ppo_epochs)
        require_positive_int("algo.ppo_mini_batches", self.ppo_mini_batches)
        require_positive_int("algo.prm_mini_batches", self.prm_mini_batches)
        require_choice("algo.old_logprob_pass", self.old_logprob_pass, ("auto", "always"))
        require_choice("algo.rollout_correction", self.rollout_correction, ("off", "tis"))
        require(isinstance(self.rollout_correction_cap, (int, float)) and self.rollout_correction_cap >= 1.0,
                "algo.rollout_correction_cap", self.rollout_correction_cap, "a number >= 1")

    @property
    def micro_batching(self) -> MicroBatching:
        return MicroBatching(self.micro_batch_size, self.max_tokens_per_micro_batch)

    @property
    def skips_old_logprob_pass(self) -> bool:
        """One on-policy PPO update: the update's forward gives the old log-probs too."""
        return self.old_logprob_pass == "auto" and self.ppo_epochs == 1 and self.ppo_mini_batches == 1

    @property
    def uses_prm(self) -> bool:
        """The PRM and the reference score the batch (every mode but outcome_only)."""
        return self.prm_mode != "outcome_only"

    @property
    def trains_prm(self) -> bool:
        """The PRM is updated and has an optimizer ("before" and "after")."""
        return self.prm_mode in ("before", "after")


@dataclass
class PrimeModels:
    policy: BuiltModel
    reference: BuiltModel | None  # None for outcome-only RLOO (algo.prm_mode=outcome_only)
    policy_optimizer: MegatronOptimizer
    prm: BuiltModel | None = None
    prm_optimizer: MegatronOptimizer | None = None  # None unless the PRM trains
    # The reference lives in host memory between its forward passes (trainer.offload_reference).
    reference_offloaded: bool = False
    # Set once the scoring models in delayed-scaling FP8 had their calibration pass in this
    # process (models/fp8.py); a resumed run calibrates again, since the frozen reference's
    # FP8 scales are not part of any checkpoint.
    fp8_calibrated: bool = False
    # Off the GPU while the engine is awake (models/offload.py); train.py builds it.
    rollout_offload: RolloutOffload | None = None


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
                 config: AlgoConfig, *, temperature: float = 1.0,
                 measure_fp8_error: bool = False) -> UpdateResult:
    """One PRIME update on this data-parallel rank's responses (groups of n consecutive rows).

    Results do not depend on the data-parallel layout: what PRIME computes over the batch
    (the whitening of advantages, batch_norm's scale of process rewards) and every metric is
    over the whole step's batch, all ranks' rows, through sums (and maxima) all-reduced over
    the DP group; the losses are normalised by global counts (losses.py). One exception:
    with ``ppo_mini_batches > 1`` or ``prm_mini_batches > 1`` each rank cuts its own rows,
    so a mini-batch's rows depend on the layout (as in verl).

    ``temperature`` is the rollout's sampling temperature: the policy's log-prob passes (old
    log-probs, the PPO loss) divide the logits by it, so PPO's ratio is that of the
    distribution vLLM sampled from. The PRM and the reference score at temperature 1, as in
    the PRIME recipe (verl ``recipe/prime/prime_dp_rm.py``, ``_forward_micro_batch``: the
    reward and reference log-probs are log_softmax of the raw logits, while the actor's
    divide by the temperature): r_t = beta * log(pi_psi / pi_ref) is a property of the two
    models, trained by the PRM's cross-entropy on raw log-probs, not of the sampler.

    FP8 (models/fp8.py): before the first scored pass of the process, the PRM and reference
    that run delayed-scaling FP8 get a calibration pass on this batch. ``measure_fp8_error``
    (the trainer sets it every precision.fp8_error_check_every steps) scores the batch again
    with FP8 off wherever the PRM or the reference runs FP8, and logs the log-ratio error.

    Device: the batch and the outcome rewards are moved to the training device once, here;
    everything the step derives from them is computed there. Host syncs: the NaN guard's
    and the schedules' metric reads (models/), and one read of this step's metrics at the end.
    """
    config.validate()
    if not temperature > 0:
        raise ValueError(f"rollout.sampling.temperature={temperature} cannot train: PPO needs the "
                         f"log-probs of a sampling distribution; expected a temperature > 0 "
                         f"(greedy decoding, 0, is for validation only)")
    n = config.num_samples_per_prompt
    if batch.batch_size % n:
        raise ValueError(f"{batch.batch_size} responses on this rank are not whole groups of "
                         f"algo.num_samples_per_prompt={n}")
    if models.rollout_offload is not None:
        models.rollout_offload.check_on_device("prime_update")
    step = StepBatch.from_rollout(batch, outcome_rewards).to(distributed.device())
    if config.rollout_correction != "off" and step.rollout_logprobs is None:
        raise ValueError(f"algo.rollout_correction={config.rollout_correction!r} needs the "
                         f"sampler's log-probs, and this batch has none (the engine returns them "
                         f"with every rollout; a batch built elsewhere must attach them)")
    mask = step.scored_token_mask()
    outcomes = step.require("outcome_rewards")
    batch_metrics = BatchMetrics()
    metrics: dict[str, float] = {}
    skip_reasons: list[str] = []
    # Where the update's time goes: log-prob passes, PRM update, policy update.
    timer = PhaseTimer()
    mbs = config.micro_batching

    check_fp8 = (config.uses_prm and measure_fp8_error
                 and (runs_fp8(models.prm) or runs_fp8(models.reference)))
    # The scoring models' log-probs with FP8 off, where they run FP8 and this step checks it.
    exact: dict[str, Tensor] = {}

    # Step 6: old-policy and reference log-probs (forward-only, vocab-parallel). Only the
    # implicit PRM reads the reference (PRIME has no KL term): outcome-only RLOO skips it.
    with timer("logprobs"):
        if config.uses_prm:
            _calibrate_fp8_once(models, step, mbs)
        if not config.skips_old_logprob_pass:
            step = step.with_fields(old_logprobs=forward_only(models.policy, step, mbs, temperature).logprobs)
        if config.uses_prm:
            if models.reference is None:
                raise ValueError(f"algo.prm_mode={config.prm_mode!r} needs the reference model")
            with resident(models.reference, models.reference_offloaded):
                step = step.with_fields(
                    ref_logprobs=forward_only(models.reference, step, mbs).logprobs)
                if check_fp8 and runs_fp8(models.reference):
                    with fp8_off(models.reference):
                        exact["ref"] = forward_only(models.reference, step, mbs).logprobs
    if step.rollout_logprobs is not None and not config.skips_old_logprob_pass:
        # The engine sampled with the weights the bridge pushed, which are these weights: any
        # gap beyond kernel round-off means a stale or mangled sync (verl logs the same check).
        gap = (step.require("old_logprobs").float() - step.rollout_logprobs.float()).abs() * mask
        batch_metrics.mean("rollout/logprob_diff_mean", gap.sum(), mask.sum())
        batch_metrics.maximum("rollout/logprob_diff_max", gap.max())

    # Step 7: the implicit PRM, updated before or after it scores the batch (or never).
    process_rewards = None
    if config.uses_prm:
        if models.prm is None or (config.trains_prm and models.prm_optimizer is None):
            raise ValueError(f"algo.prm_mode={config.prm_mode!r} needs a PRM model"
                             + (" and optimizer" if config.trains_prm else ""))
        prm = models.prm

        def scored_by_prm(step: StepBatch) -> StepBatch:
            """The scoring pass (and its FP8-off twin when checked), by the PRM as it is now."""
            with timer("logprobs"):
                if check_fp8 and runs_fp8(prm):
                    with fp8_off(prm):
                        exact["prm"] = forward_only(prm, step, mbs).logprobs
                return step.with_fields(prm_logprobs=forward_only(prm, step, mbs).logprobs)

        if config.prm_mode in ("after", "frozen"):
            step = scored_by_prm(step)
            # Whether the PRM verifies responses it has not been trained on: its loss on this
            # batch before this step's updates, from the scoring pass, by prm_loss's formula.
            loss_sum, responses, sums = prm_loss(config.beta)(
                TokenOutputs(step.require("prm_logprobs"), torch.zeros_like(mask)), step)
            batch_metrics.mean("prm/loss_before_update", loss_sum, responses.double())
            batch_metrics.mean("prm/accuracy_before_update", sums["accuracy"], responses.double())
        if config.trains_prm:
            prm_metrics: dict[str, list[float]] = {}
            for start, end in row_bounds(step.batch_size, config.prm_mini_batches, "algo.prm_mini_batches"):
                mini_batch = step.map_tensors(lambda t, a=start, b=end: t[a:b])
                with timer("prm_update"):
                    prm_step = train_step(prm, models.prm_optimizer, mini_batch, mbs, prm_loss(config.beta))
                if prm_step.skip_reason:
                    skip_reasons.append(f"PRM update skipped: {prm_step.skip_reason}")
                for name, value in {**prm_step.metrics, "grad_norm": prm_step.grad_norm}.items():
                    prm_metrics.setdefault(name, []).append(value)
            # Means over the step's PRM updates; each is global over DP (forward_backward).
            metrics.update({f"prm/{name}": sum(values) / len(values) for name, values in prm_metrics.items()
                            if name in ("loss", "accuracy", "grad_norm")})
            if config.prm_mode == "before":
                # Each mini-batch's loss at its own forward pass, before its own optimizer step
                # (after the step's earlier mini-batches' steps): the mean over mini-batches.
                metrics["prm/loss_before_update"] = metrics["prm/loss"]
                metrics["prm/accuracy_before_update"] = metrics["prm/accuracy"]
        if config.prm_mode == "before":
            step = scored_by_prm(step)
        prm_logprobs, ref = step.require("prm_logprobs"), step.require("ref_logprobs")
        if check_fp8:
            # How far FP8 moves the implicit reward's log ratio, next to the signal's own size.
            exact_prm, exact_ref = exact.get("prm", prm_logprobs), exact.get("ref", ref)
            error = log_ratio_error(prm_logprobs, ref, exact_prm, exact_ref, mask)
            batch_metrics.mean("reward/fp8_log_ratio_error_mean", error.sum(), mask.sum())
            batch_metrics.maximum("reward/fp8_log_ratio_error_max", error.max())
            batch_metrics.mean("reward/fp8_log_ratio_abs_mean",
                               masked_sum((exact_prm - exact_ref).abs(), mask), mask.sum())
        # batch_norm's scale is the largest |process return| of the whole step batch.
        process_rewards = implicit_process_rewards(prm_logprobs, ref, mask, config.beta,
                                                   config.process_reward_normalization,
                                                   reduce_max=distributed.dp_max)
        # How often the scoring PRM ranks a correct response above a wrong one of the same
        # prompt: over all informative pairs of the step (pair-weighted), and as the mean over
        # groups with both outcomes of each group's fraction (every such prompt weighs the same).
        sequence_scores = config.beta * sequence_log_ratio(prm_logprobs, ref, mask)
        agreeing, pairs = prm_pairwise_agreement(sequence_scores, outcomes, n)
        batch_metrics.mean("prm/ranking_accuracy", agreeing, pairs, if_empty=0.5)
        group_fractions, groups = prm_group_ranking_agreement(sequence_scores, outcomes, n)
        batch_metrics.mean("prm/group_ranking_accuracy", group_fractions, groups, if_empty=0.5)
        batch_metrics.mean("reward/process_mean", masked_sum(process_rewards, mask), mask.sum())

    # Step 8: advantages (RLOO on outcomes + leave-one-out process returns), whitened with the
    # mean and variance of the whole step batch.
    advantages, _ = compute_prime_advantages(outcomes, process_rewards, mask, n, config.advantage,
                                             reduce_sum=distributed.dp_sum)

    # Step 9: PPO update of the policy, in ppo_epochs x ppo_mini_batches optimizer steps.
    correction_cap = config.rollout_correction_cap if config.rollout_correction == "tis" else None
    policy_batch = step.with_fields(advantages=advantages)
    policy_metrics: dict[str, list[float]] = {}
    for _ in range(config.ppo_epochs):
        for start, end in row_bounds(step.batch_size, config.ppo_mini_batches, "algo.ppo_mini_batches"):
            mini_batch = policy_batch.map_tensors(lambda t, a=start, b=end: t[a:b])
            with timer("policy_update"):
                policy_step = train_step(models.policy, models.policy_optimizer, mini_batch, mbs,
                                         ppo_loss(config.ppo, config.skips_old_logprob_pass,
                                                  correction_cap),
                                         temperature)
            if policy_step.skip_reason:
                skip_reasons.append(f"policy update skipped: {policy_step.skip_reason}")
            for name, value in {**policy_step.metrics, "grad_norm": policy_step.grad_norm}.items():
                policy_metrics.setdefault(name, []).append(value)
    if "rollout_logprob_diff_max" in policy_metrics:
        # Without an old-policy pass the update's forward compared the sampler's log-probs
        # (one update, so one value each; both global over DP).
        diff_sum = policy_metrics.pop("rollout_logprob_diff_sum")[0]
        metrics["rollout/logprob_diff_mean"] = diff_sum / max(policy_metrics["num_tokens"][0], 1e-30)
        metrics["rollout/logprob_diff_max"] = policy_metrics.pop("rollout_logprob_diff_max")[0]
    # Means over the step's updates (the first update is on-policy: ratio 1, no clipping);
    # each is already global (forward_backward reduces its metric sums over DP).
    metrics.update({f"policy/{k}": sum(v) / len(v) for k, v in policy_metrics.items()})
    batch_metrics.mean("reward/outcome_mean", outcomes.sum(),
                       torch.tensor(float(step.batch_size), device=outcomes.device))
    metrics.update(batch_metrics.read())
    metrics.update({f"time/{name}": seconds for name, seconds in timer.seconds.items()})
    return UpdateResult(metrics, skip_reasons)


def check_mini_batches(config: AlgoConfig, rows_per_rank: int, max_model_len: int | None = None) -> None:
    """At start-up: a full step's rows on a rank can be cut into the configured mini-batches
    (a step that kept fewer prompts is checked again by ``row_bounds``), and a token budget
    holds the longest row the engine can return (``max_model_len`` tokens)."""
    budget = config.max_tokens_per_micro_batch
    if budget is not None and max_model_len is not None:
        require(budget >= max_model_len, "algo.max_tokens_per_micro_batch", budget,
                f"at least rollout.engine.max_model_len={max_model_len}: a response of that "
                f"many tokens (prompt included) must fit one micro-batch")
    counts = [("algo.ppo_mini_batches", config.ppo_mini_batches)]
    if config.trains_prm:
        counts.append(("algo.prm_mini_batches", config.prm_mini_batches))
    for key, value in counts:
        require(value <= rows_per_rank, key, value,
                f"at most the {rows_per_rank} responses a data-parallel rank trains on per step "
                f"(rollout.batch.prompts_per_step / data-parallel size x algo.num_samples_per_prompt)")


def row_bounds(rows: int, mini_batches: int, key: str) -> list[tuple[int, int]]:
    """``[start, end)`` rows of each of ``mini_batches`` near-equal cuts of this rank's rows.

    Each rank cuts its own rows (as verl's mini-batches do); every rank holds as many rows
    (collect.py trains all replicas on the same number of prompts), so all take the same
    number of optimizer steps. Host arithmetic on a host tensor, no device involved.
    """
    if mini_batches > rows:
        raise ValueError(f"{key}={mini_batches} is more than the {rows} responses on this rank; "
                         f"expected at most {rows}")
    bounds = torch.linspace(0, rows, mini_batches + 1).round().long().tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _calibrate_fp8_once(models: PrimeModels, batch: StepBatch, micro_batch_size: MicroBatching) -> None:
    """The calibration pass (models/fp8.calibrate) of every scoring model in delayed-scaling
    FP8, on this process's first batch, before any of them scores it."""
    if models.fp8_calibrated:
        return
    for model in (models.reference, models.prm):
        if needs_calibration(model):
            offloaded = model is models.reference and models.reference_offloaded
            with resident(model, offloaded):
                calibrate(model, batch, micro_batch_size)
    models.fp8_calibrated = True


class BatchMetrics:
    """Metrics over the whole step batch (all DP ranks), read to the host once.

    Each metric is registered as this rank's sum and count (or maximum); ``read`` adds the
    sums and counts over the DP group in one all-reduce (and the maxima in another), divides,
    and reads the values with one host sync. A mean of per-rank means would weigh a rank's
    tokens by how many it happens to hold; rank 0's value alone would see a part.
    """

    def __init__(self) -> None:
        self._means: dict[str, tuple[Tensor, Tensor, float]] = {}
        self._maxima: dict[str, Tensor] = {}

    def mean(self, name: str, total: Tensor, count: Tensor, if_empty: float = 0.0) -> None:
        """``name`` = sum of ``total`` / sum of ``count`` over ranks (``if_empty`` when 0)."""
        self._means[name] = (total.detach(), count.detach(), if_empty)

    def maximum(self, name: str, value: Tensor) -> None:
        self._maxima[name] = value.detach()

    def read(self) -> dict[str, float]:
        result: dict[str, float] = {}
        if self._means:
            stacked = torch.stack([torch.stack([total.double(), count.double()])
                                   for total, count, _ in self._means.values()])
            sums = distributed.dp_sum(stacked).tolist()  # host sync: the metric read
            for (name, (_, _, if_empty)), (total, count) in zip(self._means.items(), sums):
                result[name] = total / count if count > 0 else if_empty
        if self._maxima:
            maxima = distributed.dp_max(torch.stack([v.double() for v in self._maxima.values()]))
            result.update(zip(self._maxima, maxima.tolist()))  # host sync: the metric read
        return result
