"""Steps 1, 3, 4 and 5 of the PRIME step: prompts -> samples -> outcome rewards -> filter.

Each data-parallel replica draws its shard of a round of prompts, splits it over its
engines (distributed.engine_slot: on a GPU one per rollout-TP GPUs, so every GPU generates),
each engine's rank samples n responses per prompt of its part and scores them, every rank of
the replica gathers all parts in prompt order, and the accuracy-band filter keeps the
prompts that still teach something (neither always right nor always wrong). Rounds repeat
(over-sampling, then refills) until every replica holds its share of the step's prompts;
all replicas then train on the same number of prompts, so their schedules run the same
number of micro-batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.algo import AccuracyFilterConfig, FilterResult, accuracy_band_filter
from megatron_prime.config import require, require_positive_int
from megatron_prime.data import PromptRecord, PromptSampler, render_prompt
from megatron_prime.losses import ROLLOUT_LOGPROBS
from megatron_prime.models.architectures import SEQUENCE_LENGTH_ALIGNMENT, padded_sequence_length
from megatron_prime.models.schedule import TokenBatch
from megatron_prime.rewards import RewardRegistry
from megatron_prime.rollout.engine import RolloutEngine, SamplingConfig


@dataclass
class BatchConfig:
    """How many prompts a step trains on and how they are found (PRIME.md, step 1)."""

    # Prompts per step over all data-parallel replicas, after filtering (reference: 256).
    prompts_per_step: int = 256
    # Prompts drawn per round = oversample_factor * prompts_per_step (reference: 4).
    oversample_factor: int = 4
    # Rounds of sampling before the step trains on whatever was kept.
    max_rounds: int = 4
    filter: AccuracyFilterConfig = field(default_factory=AccuracyFilterConfig)
    # Drop every prompt any of whose n responses stopped at rollout.sampling.max_new_tokens,
    # before the accuracy band (the PRIME reference's truncation filter, on in its run).
    filter_truncated: bool = True

    def validate(self) -> None:
        require_positive_int("rollout.batch.prompts_per_step", self.prompts_per_step)
        require_positive_int("rollout.batch.oversample_factor", self.oversample_factor)
        require_positive_int("rollout.batch.max_rounds", self.max_rounds)
        require(isinstance(self.filter_truncated, bool), "rollout.batch.filter_truncated",
                self.filter_truncated, "true or false")

    @property
    def prompts_per_round(self) -> int:
        return self.prompts_per_step * self.oversample_factor


@dataclass
class ScoredGroup:
    """One prompt's n samples with their outcome rewards (host data, pickled between ranks)."""

    prompt_token_ids: list[int]
    response_token_ids: list[list[int]]
    scores: list[float]
    # The sampler's log-prob of each response token: the trainer compares them with its own
    # (rollout/logprob_diff_*), which shows a stale or broken weight sync at once.
    response_logprobs: list[list[float]] = field(default_factory=list)
    # Whether each response stopped at the length limit (finish_reason "length"); empty: none.
    truncated: list[bool] = field(default_factory=list)

    def truncated_flags(self) -> list[bool]:
        return self.truncated or [False] * len(self.response_token_ids)


@dataclass
class CollectedBatch:
    tokens: TokenBatch  # groups of n consecutive rows
    outcome_rewards: torch.Tensor  # [rows]
    metrics: dict[str, float]


def sampling_seed(seed: int, step: int, round_index: int, dp_rank: int) -> int:
    """A distinct, reproducible vLLM seed per (step, round, replica): a resumed run samples
    the same responses as an uninterrupted one."""
    return (seed * 1_000_003 + step * 10_007 + round_index * 101 + dp_rank) % (2**31 - 1)


def sample_and_score(engine: RolloutEngine, tokenizer: Any, prompts: Sequence[PromptRecord],
                      sampling: SamplingConfig, rewards: RewardRegistry,
                      use_chat_template: bool, first_prompt_index: int = 0
                      ) -> tuple[list[ScoredGroup], dict[str, float]]:
    prompt_ids = [render_prompt(tokenizer, p.messages, use_chat_template).token_ids for p in prompts]
    # Each prompt's responses go to the verifiers' pools the moment vLLM finishes them, so
    # scoring runs while the engine still generates the rest of the round.
    pending: dict[int, list] = {}

    def score_when_finished(prompt_rollouts: list) -> None:
        prompt = prompts[prompt_rollouts[0].prompt_index]
        pending[prompt_rollouts[0].prompt_index] = rewards.submit(
            [r.text for r in prompt_rollouts], [prompt.ground_truth] * len(prompt_rollouts),
            [prompt.ability] * len(prompt_rollouts), [prompt.data_source] * len(prompt_rollouts))

    start = time.perf_counter()
    rollouts = engine.generate(prompt_ids, sampling, on_finished=score_when_finished,
                               first_prompt_index=first_prompt_index)
    seconds = time.perf_counter() - start
    n = sampling.n
    wait_start = time.perf_counter()
    scores = rewards.gather([entry for index in range(len(prompts)) for entry in pending[index]])
    score_wait_seconds = time.perf_counter() - wait_start
    groups = [ScoredGroup(prompt_ids[i], [r.response_token_ids for r in rollouts[i * n:(i + 1) * n]],
                          scores[i * n:(i + 1) * n], [r.logprobs for r in rollouts[i * n:(i + 1) * n]],
                          [r.finish_reason == "length" for r in rollouts[i * n:(i + 1) * n]])
              for i in range(len(prompts))]
    lengths = [len(r.response_token_ids) for r in rollouts]
    # "correct" for the length split: full reward (math right, every code test passed).
    passed = [score >= 1.0 for score in scores]
    stats = {"responses": float(len(rollouts)), "correct": float(sum(scores)),
             "response_tokens": float(sum(lengths)),
             "passed_responses": float(sum(passed)),
             "passed_response_tokens": float(sum(length for length, ok in zip(lengths, passed) if ok)),
             "truncated": float(sum(r.finish_reason == "length" for r in rollouts)),
             "generate_seconds": seconds,
             # scoring not finished when generation was: what overlapping did not hide
             "score_wait_seconds": score_wait_seconds,
             # responses scored 0 because their scoring raised (RewardRegistry logs each reason)
             "verifier_errors": float(len(rewards.last_failures))}
    return groups, stats


# Stats of one engine's part that are wall times: the replica waited for the slowest engine.
_PARALLEL_SECONDS = ("generate_seconds", "score_wait_seconds")


def sample_and_score_in_replica(slot: distributed.EngineSlot | None, engine: RolloutEngine | None,
                                tokenizer: Any, prompts: Sequence[PromptRecord],
                                sampling: SamplingConfig, rewards: RewardRegistry | None,
                                use_chat_template: bool
                                ) -> tuple[list[ScoredGroup], dict[str, float]]:
    """The replica's groups for ``prompts`` on every rank of the replica (collective over the
    replica, host data): the prompts are cut into ``slot.count`` contiguous parts, engine k
    samples and scores part k, and the parts come back in prompt order. Each prompt's seed
    follows its index in ``prompts``, so the samples do not depend on the number of engines.
    ``slot`` None: one engine per replica, the one this rank holds if any."""
    if slot is None or slot.count == 1:
        result = None
        if engine is not None:
            assert rewards is not None
            result = sample_and_score(engine, tokenizer, prompts, sampling, rewards, use_chat_template)
        return distributed.broadcast_in_replica(result)
    bounds = [len(prompts) * k // slot.count for k in range(slot.count + 1)]
    part = None
    if engine is not None:
        assert rewards is not None and slot.index is not None
        start, end = bounds[slot.index], bounds[slot.index + 1]
        part = (slot.index, sample_and_score(engine, tokenizer, prompts[start:end], sampling,
                                             rewards, use_chat_template, first_prompt_index=start)
                if end > start else ([], {}))
    parts = distributed.all_gather_in_replica(part)
    groups: list[ScoredGroup] = []
    stats: dict[str, float] = {}
    for _, (part_groups, part_stats) in sorted(p for p in parts if p is not None):
        groups.extend(part_groups)
        for name, value in part_stats.items():
            combine = max if name in _PARALLEL_SECONDS else (lambda a, b: a + b)
            stats[name] = combine(stats[name], value) if name in stats else value
    return groups, stats


def filter_groups(groups: list[ScoredGroup], n: int, config: BatchConfig) -> tuple[list[ScoredGroup], FilterResult]:
    """The groups that survive the truncation filter (if on) and then the accuracy band."""
    scores = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32)
    truncated = None
    if config.filter_truncated:
        truncated = torch.tensor([t for g in groups for t in g.truncated_flags()], dtype=torch.bool)
    verdict = accuracy_band_filter(scores, n, config.filter, truncated)
    return [g for g, keep in zip(groups, verdict.keep_prompt.tolist()) if keep], verdict


def collect_batch(sampler: PromptSampler, engine: RolloutEngine | None, tokenizer: Any,
                  rewards: RewardRegistry | None, sampling: SamplingConfig, config: BatchConfig,
                  step: int, seed: int, use_chat_template: bool, pad_token_id: int,
                  length_multiple: int = SEQUENCE_LENGTH_ALIGNMENT,
                  slot: distributed.EngineSlot | None = None) -> CollectedBatch:
    """This replica's kept groups for one step (collective over the world).

    Rows are right-padded to a multiple of ``length_multiple`` tokens
    (models/architectures.sequence_length_multiple: 16 under FP8, TP under sequence parallelism).

    Every rank advances the sampler the same way; the replica's engine ranks sample and
    score their parts of each round (``sample_and_score_in_replica``), and every rank of the
    replica receives all of them.
    """
    n = sampling.n
    target = config.prompts_per_step // distributed.dp_world_size()
    kept: list[ScoredGroup] = []
    totals = {"prompts": 0.0, "responses": 0.0, "correct": 0.0, "response_tokens": 0.0,
              "passed_responses": 0.0, "passed_response_tokens": 0.0, "truncated": 0.0,
              "truncated_prompts_dropped": 0.0, "generate_seconds": 0.0, "kept_prompts": 0.0,
              "score_wait_seconds": 0.0,
              "verifier_errors": 0.0}
    for round_index in range(config.max_rounds):
        prompts = sampler.next_batch()
        round_sampling = replace(sampling, seed=sampling_seed(seed, step, round_index, distributed.dp_rank()))
        groups, stats = sample_and_score_in_replica(slot, engine, tokenizer, prompts,
                                                    round_sampling, rewards, use_chat_template)
        round_kept, verdict = filter_groups(groups, n, config)
        kept.extend(round_kept)
        for name, value in stats.items():
            totals[name] += value
        totals["prompts"] += len(groups)
        totals["kept_prompts"] += len(round_kept)
        totals["truncated_prompts_dropped"] += verdict.num_truncated_dropped
        # Every replica must stop after the same round with at least `target` groups. Over the
        # host group: replicas whose engine finished first wait here while others generate.
        fewest = torch.tensor([len(kept)], dtype=torch.int64)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN, group=distributed.host_group())
        fewest_kept = int(fewest.item())
        if fewest_kept >= target:
            break
    take = min(target, fewest_kept)
    batch_groups = kept[:take]
    metrics = _rollout_metrics(totals, round_index + 1, take * distributed.dp_world_size(), n)
    tokens, rewards_tensor = _to_token_batch(batch_groups, pad_token_id, length_multiple)
    return CollectedBatch(tokens, rewards_tensor, metrics)


def _rollout_metrics(totals: dict[str, float], rounds: int, prompts_trained: int, n: int) -> dict[str, float]:
    """Step metrics over all replicas (sums over the data-parallel group, then ratios)."""
    names = sorted(totals)
    summed = torch.tensor([totals[k] for k in names], dtype=torch.float64)
    dist.all_reduce(summed, group=distributed.dp_host_group())
    total = dict(zip(names, summed.tolist()))
    responses = max(total["responses"], 1.0)
    wrong = total["responses"] - total["passed_responses"]
    generate_seconds = max(total["generate_seconds"] / distributed.dp_world_size(), 1e-9)
    return {
        # The policy's accuracy on everything it sampled this step, before filtering.
        "reward/accuracy": total["correct"] / responses,
        "rollout/kept_prompt_fraction": total["kept_prompts"] / max(total["prompts"], 1.0),
        "rollout/prompts_trained": float(prompts_trained),
        "rollout/rounds": float(rounds),
        "rollout/response_length": total["response_tokens"] / responses,
        # Mean length of the responses with full reward and of the others (0 when none).
        "rollout/response_length_correct": total["passed_response_tokens"] / max(total["passed_responses"], 1.0),
        "rollout/response_length_wrong": ((total["response_tokens"] - total["passed_response_tokens"])
                                          / max(wrong, 1.0)),
        # Of all sampled responses; and the prompts the truncation filter dropped this step.
        "rollout/truncated_fraction": total["truncated"] / responses,
        "rollout/truncated_prompts_dropped": total["truncated_prompts_dropped"],
        "reward/verifier_error_fraction": total["verifier_errors"] / responses,
        "rollout/generate_tokens_per_s": total["response_tokens"] / generate_seconds,
        # Seconds per replica spent waiting for rewards after generation ended.
        "time/reward_wait": total["score_wait_seconds"] / distributed.dp_world_size(),
    }


def _to_token_batch(groups: list[ScoredGroup], pad_token_id: int,
                    length_multiple: int = SEQUENCE_LENGTH_ALIGNMENT) -> tuple[TokenBatch, torch.Tensor]:
    """Right-padded prompt+response rows; the response mask marks the sampled tokens, and
    ``extras["rollout_logprobs"]`` holds the sampler's log-probs at the same positions."""
    rows = [(g.prompt_token_ids, response) for g in groups for response in g.response_token_ids]
    scores = [s for g in groups for s in g.scores]
    if not rows:
        empty = torch.zeros(0, 1, dtype=torch.long)
        return TokenBatch(empty, empty.float()), torch.zeros(0)
    length = padded_sequence_length(max(len(p) + len(r) for p, r in rows), length_multiple)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(len(rows), length, dtype=torch.float32)
    for row, (prompt, response) in enumerate(rows):
        input_ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        if response:
            input_ids[row, len(prompt):len(prompt) + len(response)] = torch.tensor(response, dtype=torch.long)
            response_mask[row, len(prompt):len(prompt) + len(response)] = 1.0
    extras = {}
    if all(len(g.response_logprobs) == len(g.response_token_ids) for g in groups):
        sampler = torch.zeros(len(rows), length, dtype=torch.float32)
        logprobs = [values for g in groups for values in g.response_logprobs]
        for row, ((prompt, response), values) in enumerate(zip(rows, logprobs)):
            if values:
                sampler[row, len(prompt):len(prompt) + len(values)] = torch.tensor(values, dtype=torch.float32)
        extras[ROLLOUT_LOGPROBS] = sampler
    return TokenBatch(input_ids, response_mask, extras=extras), torch.tensor(scores, dtype=torch.float32)


def check_batch_config(config: BatchConfig, dp_size: int, num_records: int) -> None:
    """Layout-dependent checks, once the data-parallel size and the dataset are known."""
    require(config.prompts_per_step % dp_size == 0, "rollout.batch.prompts_per_step",
            config.prompts_per_step, f"a multiple of the data-parallel size {dp_size}")
    require(config.prompts_per_round <= num_records, "rollout.batch.oversample_factor",
            config.oversample_factor,
            f"small enough that prompts_per_step * oversample_factor = {config.prompts_per_round} "
            f"fits the dataset ({num_records} prompts)")
