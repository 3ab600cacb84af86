"""A first-order estimate of one PRIME step's wall time on a planned layout (megatron-prime-plan).

It is arithmetic on the plan, not a measurement: each phase is its work divided by a rate
the hardware could reach, times an efficiency that is an assumption and is printed with the
result. The phases are those of the PRIME reference's own split (PRIME.md: 680 s per step
on 8 A800, rollout 282 s, policy update 157 s, PRM update 151 s, other 91 s), so the two can
be set side by side, and the same model run with ``--accelerator a800`` says how far its
assumptions are from that measurement.

- rollout (vLLM): prefill of each prompt once (prefix caching shares it among the n
  samples), compute-bound; then decoding, where each engine step reads the engine's weights
  on every one of its GPUs and the KV cache of the sequences in flight, memory-bound unless
  the batch makes it compute-bound. In flight: what the plan's KV cache holds, at most the
  engine's share of the round. Rewards overlap generation and are not counted.
- log-probs: forward passes of the reference, and of the old policy unless the update is one
  on-policy pass (algo.old_logprob_pass=auto); PRM update: its forward-backward, plus its
  scoring forward; policy update: forward-backward. A forward-backward is 3 forwards, 4 with
  full recomputation. Tokens are the trained responses with their prompts at the assumed
  mean lengths (no padding: micro-batches are cut to their rows' length). The pipeline
  bubble of the layout stretches every training phase.
- offload: the optimizer states and frozen weights to pinned host memory and back
  (trainer.offload_during_rollout), at the host link's rate.

Not modelled: the weight sync (a few seconds at 7B), rewards that outlast generation,
checkpoints, stragglers among the engines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense peak, no sparsity
    hbm_bytes_per_s: float
    host_bytes_per_s: float  # pinned host <-> GPU copy, one direction


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA datasheets (SXM parts); the host link is PCIe Gen5 x16 / Gen4 x16 at ~80% of line.
    "h100": Accelerator("H100 SXM", 989.4e12, 3.35e12, 50e9),
    "a800": Accelerator("A800 SXM", 312e12, 2.039e12, 25e9),
}

# The PRIME reference's measured step (PRIME.md), seconds.
REFERENCE_STEP = {"rollout": 282.0, "policy update": 157.0, "PRM update": 151.0, "other": 91.0}
REFERENCE_TOTAL = 680.0


@dataclass(frozen=True)
class StepTimeAssumptions:
    """What the estimate cannot know; every one is printed with it."""

    accelerator: str = "h100"
    train_mfu: float = 0.35  # Transformer Engine bf16 training of a dense 7B-70B model
    prefill_mfu: float = 0.5
    decode_bandwidth_efficiency: float = 0.6  # of HBM bandwidth, per decode step
    mean_prompt_tokens: int | None = None  # None: a third of the prompt limit
    mean_response_tokens: int | None = None  # None: a third of the response limit

    def validate(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"--accelerator={self.accelerator!r} is invalid: expected one of "
                             f"{sorted(ACCELERATORS)}")
        for name in ("train_mfu", "prefill_mfu", "decode_bandwidth_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"--{name.replace('_', '-')}={value} is invalid: expected 0 < value <= 1")
        for name in ("mean_prompt_tokens", "mean_response_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value} is invalid: expected >= 1")


@dataclass
class StepTime:
    seconds: dict[str, float] = field(default_factory=dict)
    mean_prompt_tokens: int = 0
    mean_response_tokens: int = 0
    decode_tokens_per_s_per_engine: float = 0.0
    sequences_in_flight: int = 0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class StepWork:
    """What the step computes, from the plan's inputs."""

    params: int  # the policy's parameters
    num_layers: int
    q_dim: int  # attention heads x head dim
    # The PRM's and the reference's (the policy's unless model.prm_path is another size).
    prm_params: int
    prm_num_layers: int
    prm_q_dim: int
    prompts_per_step: int
    oversample_factor: int
    samples_per_prompt: int
    prompt_tokens: int
    response_tokens: int
    world_size: int
    engines: int
    engine_gpus: int  # vLLM TP
    engine_weight_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    kv_sequences: int  # full-length sequences the KV cache holds
    pipeline_bubble: float
    recompute_full: bool
    skips_old_logprob_pass: bool
    prm_trains: bool
    with_prm: bool
    host_bytes_per_gpu: int


def forward_flops_per_token(work: StepWork, context: float, prm: bool = False) -> float:
    """2 FLOPs per weight, plus attention's QK^T and AV at ``context`` keys on average; of
    the PRM (and reference) where ``prm``, else of the policy."""
    if prm:
        return 2 * work.prm_params + 4 * work.prm_num_layers * context * work.prm_q_dim
    return 2 * work.params + 4 * work.num_layers * context * work.q_dim


def estimate(work: StepWork, assumptions: StepTimeAssumptions) -> StepTime:
    assumptions.validate()
    chip = ACCELERATORS[assumptions.accelerator]
    prompt = assumptions.mean_prompt_tokens or max(1, work.prompt_tokens // 3)
    response = assumptions.mean_response_tokens or max(1, work.response_tokens // 3)
    result = StepTime(mean_prompt_tokens=prompt, mean_response_tokens=response)

    # Rollout: every generated response, before the accuracy filter.
    per_engine = math.ceil(work.prompts_per_step * work.oversample_factor
                           * work.samples_per_prompt / work.engines)
    prefill_flops = 2 * work.params * prompt * per_engine / work.samples_per_prompt
    prefill = prefill_flops / (work.engine_gpus * chip.bf16_flops * assumptions.prefill_mfu)
    # The KV cache holds kv_sequences at full length; at mean lengths it holds more.
    full = work.prompt_tokens + work.response_tokens
    in_flight = max(1, min(per_engine, math.floor(work.kv_sequences * full / (prompt + response))))
    context = prompt + response / 2
    read_bytes = work.engine_weight_bytes_per_gpu + in_flight * context * work.kv_bytes_per_token_per_gpu
    memory_time = read_bytes / (chip.hbm_bytes_per_s * assumptions.decode_bandwidth_efficiency)
    compute_time = in_flight * forward_flops_per_token(work, context) / work.engine_gpus \
        / (chip.bf16_flops * assumptions.prefill_mfu)
    decode_step = max(memory_time, compute_time)
    decode_steps = max(response, per_engine * response / in_flight)
    result.seconds["rollout"] = prefill + decode_steps * decode_step
    result.decode_tokens_per_s_per_engine = in_flight / decode_step
    result.sequences_in_flight = in_flight

    # Training passes over the trained responses and their prompts.
    tokens = work.prompts_per_step * work.samples_per_prompt * (prompt + response)
    forward = forward_flops_per_token(work, (prompt + response) / 2) * tokens
    prm_forward = forward_flops_per_token(work, (prompt + response) / 2, prm=True) * tokens
    backward_passes = 4 if work.recompute_full else 3
    rate = work.world_size * chip.bf16_flops * assumptions.train_mfu * (1 - work.pipeline_bubble)
    # The old policy's forward (unless skipped) and the reference's.
    logprob_flops = (0 if work.skips_old_logprob_pass else forward) + (prm_forward if work.with_prm else 0)
    result.seconds["log-probs"] = logprob_flops / rate
    if work.with_prm:
        prm_passes = (backward_passes if work.prm_trains else 0) + 1
        result.seconds["PRM update"] = prm_passes * prm_forward / rate
    result.seconds["policy update"] = backward_passes * forward / rate
    result.seconds["offload"] = 2 * work.host_bytes_per_gpu / chip.host_bytes_per_s
    return result
