"""Run under torchrun by tests/test_prime_step.py: one PRIME update at a layout.

Policy, PRM and reference all start from the same tiny HF model. Two batches:
``single``: one prompt with n=4 responses and outcomes [1, 0, 1, 0];
``global``: a fixed global batch of 4 prompts x n=4 responses (different lengths, outcomes
and sampler log-probs per group); each data-parallel rank takes its contiguous quarter or
half, whole groups in the same order, as the trainer's sampler shards prompts.

Records the step's metrics and, per HF tensor, the sum and absolute sum of the updated
policy and PRM weights (gathered over TP, all stages), plus what the device checks saw:
the devices of every tensor the two losses read, which StepBatch fields they were given,
and any ``Tensor.cpu()``/``.numpy()`` call made directly from megatron_prime's code during
the step. On a CPU-only machine the training device *is* the host, so the device check
cannot see a host/device mix there (it can on a GPU); the host-copy recorder can: it sees
the call, whatever the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import megatron_prime
import megatron_prime.update as update_module
from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import iter_hf_tensors, load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import BuiltModel, build_model
from megatron_prime.models.optimizer import build_optimizer
from megatron_prime.models.schedule import TokenBatch
from megatron_prime.update import AlgoConfig, PrimeModels, prime_update
from workers.parity_worker import make_batch, make_hf_model

GLOBAL_PROMPTS, N = 4, 4
# 7 of 16 correct: DP rank 0's two groups hold 4, rank 1's hold 3.
GLOBAL_OUTCOMES = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
PACKAGE_DIR = os.path.dirname(megatron_prime.__file__)
TORCH_DIR = os.path.dirname(torch.__file__)


def hf_token_logprobs(hf_model, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token from transformers, in TokenOutputs'
    layout (position t scores input_ids[t]; 0 outside the scored tokens)."""
    with torch.no_grad():
        logits = hf_model(batch.input_ids).logits.float() / temperature
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.scored_token_mask()
    return torch.cat([torch.zeros(batch.batch_size, 1), logprobs], 1) * mask


def make_global_batch(vocab_size: int) -> tuple[TokenBatch, torch.Tensor]:
    """16 right-padded rows (4 prompts x 4 responses), prompt and response lengths varying,
    with synthetic sampler log-probs so the rollout gap metrics are exercised."""
    generator = torch.Generator().manual_seed(7)
    rows, seq = GLOBAL_PROMPTS * N, 16
    input_ids = torch.randint(0, vocab_size, (rows, seq), generator=generator)
    response_mask = torch.zeros(rows, seq)
    for row in range(rows):
        prompt_len = 3 + (row // N) % 3  # the same prompt length within a group
        total_len = prompt_len + 3 + (5 * row) % 9  # responses of 3..11 tokens
        response_mask[row, prompt_len:total_len] = 1
        input_ids[row, total_len:] = 0
    sampler = -(1.0 + 5.0 * torch.rand(rows, seq, generator=generator)) * response_mask
    batch = TokenBatch(input_ids, response_mask, extras={"rollout_logprobs": sampler})
    return batch, torch.tensor(GLOBAL_OUTCOMES)


def weight_sums(model: BuiltModel) -> dict[str, list[float]]:
    local = {name: [float(t.double().sum()), float(t.double().abs().sum())]
             for name, t in iter_hf_tensors(model.gpt_chunks(), model.shape,
                                            distributed.gather_tp_shards)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


class HostCopyRecorder(TorchFunctionMode):
    """Records ``Tensor.cpu``/``Tensor.numpy`` calls whose caller is megatron_prime's code
    (not torch's or Megatron's internals): the step should copy nothing to the host except
    through metric reads (float(), .tolist(), .item())."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.numpy):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
                self.calls.append(f"{os.path.relpath(frame.f_code.co_filename, PACKAGE_DIR)}:"
                                  f"{frame.f_lineno} {func.__name__}")
        return func(*args, **(kwargs or {}))


def recording(make_loss, name: str, seen: dict):
    """Wraps a loss factory of losses.py: each call records devices and fields it was given."""

    def factory(*args, **kwargs):
        loss_fn = make_loss(*args, **kwargs)

        def recorded(outputs, micro_batch):
            entry = seen.setdefault(name, {"devices": set(), "fields": set()})
            tensors = {**micro_batch.tensors(), "outputs.logprobs": outputs.logprobs,
                       "outputs.entropy": outputs.entropy}
            entry["devices"].update(str(t.device) for t in tensors.values())
            entry["fields"].update(tensors)
            return loss_fn(outputs, micro_batch)

        return recorded

    return factory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prm-mode", default="before")
    # Default: AlgoConfig's (4 PRM steps, one row each of the single batch). The DP=1 vs DP=2
    # comparison needs 1: each rank cuts its own rows, so mini-batches differ across layouts.
    parser.add_argument("--prm-mini-batches", type=int, default=AlgoConfig().prm_mini_batches)
    parser.add_argument("--batch", choices=("single", "global"), default="single")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--adam-eps", type=float, default=1e-8)
    # hf: the sampler's log-probs are transformers' at --temperature (a faithful engine), so
    # the rollout gap metric measures whether the old-policy pass used the same temperature.
    parser.add_argument("--sampler", choices=("synthetic", "hf"), default="synthetic")
    parser.add_argument("--old-logprob-pass", default=AlgoConfig().old_logprob_pass)
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=None)
    parser.add_argument("--rollout-correction", default="off")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    hf_config, hf_model = make_hf_model("qwen2")
    distributed.init_distributed(parallel)
    # algo.prm_mode=frozen builds the PRM as train.build_prime_models does: forward only.
    built = {role: build_model(hf_config, role, parallel,
                               frozen=role == "prm" and args.prm_mode == "frozen")
             for role in ("policy", "prm", "reference")}
    for model in built.values():
        load_hf_weights(model, hf_model.state_dict())
    # Adam's first step moves a weight by lr * g / (|g| + eps): for gradients of rounding-noise
    # size (|g| ~ 1e-8, mathematically 0) the default eps lets a change in summation order
    # (DP=2 adds two ranks' gradients) move a weight by a visible part of lr. eps=1e-6 makes
    # such weights move ~100x less, so the layout comparison sees the algorithm, not Adam's
    # amplified round-off; every gradient above 1e-6 still gets its full Adam step.
    optimizer_config = OptimizerConfig(lr=1e-3, adam_eps=args.adam_eps)
    models = PrimeModels(
        policy=built["policy"], reference=built["reference"], prm=built["prm"],
        policy_optimizer=build_optimizer(built["policy"], optimizer_config),
        prm_optimizer=(build_optimizer(built["prm"], optimizer_config)
                       if args.prm_mode in ("before", "after") else None),
    )
    if args.batch == "single":
        batch, outcomes = make_batch(hf_config.vocab_size), torch.tensor([1.0, 0.0, 1.0, 0.0])
    else:
        batch, outcomes = make_global_batch(hf_config.vocab_size)
        if args.sampler == "hf":
            batch.extras["rollout_logprobs"] = hf_token_logprobs(hf_model, batch, args.temperature)
        rows = batch.batch_size // distributed.dp_world_size()
        first = distributed.dp_rank() * rows
        batch = batch.map_tensors(lambda t: t[first:first + rows])
        outcomes = outcomes[first:first + rows]
    seen: dict = {}
    update_module.ppo_loss = recording(update_module.ppo_loss, "ppo", seen)
    update_module.prm_loss = recording(update_module.prm_loss, "prm", seen)
    recorder = HostCopyRecorder()
    with recorder:
        metrics = prime_update(models, batch, outcomes,
                               AlgoConfig(prm_mode=args.prm_mode, micro_batch_size=2,
                                          prm_mini_batches=args.prm_mini_batches,
                                          old_logprob_pass=args.old_logprob_pass,
                                          max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
                                          rollout_correction=args.rollout_correction),
                               temperature=args.temperature).metrics
    result = {"metrics": metrics, "policy": weight_sums(models.policy),
              "prm": weight_sums(models.prm), "expected_device": str(distributed.device()),
              "losses_saw": {name: {key: sorted(values) for key, values in entry.items()}
                             for name, entry in seen.items()},
              "host_copies": recorder.calls}
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
