"""Run under torchrun by tests/test_nan_guard.py: the NaN/inf guard of train_step at a layout.

Three steps on a tiny policy: a loss that is NaN, a loss that is finite but whose gradient
is NaN, then a normal loss. Records each step's skip reason and whether the weights changed.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.optimizer import build_optimizer, sequence_nll_loss, train_step
from workers.parity_worker import make_batch, make_hf_model


class NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_loss(outputs, batch):
    loss, units, metrics = sequence_nll_loss(outputs, batch)
    return loss * float("nan"), units, metrics


def nan_gradient_loss(outputs, batch):
    loss, units, metrics = sequence_nll_loss(outputs, batch)
    return NanGradient.apply(loss), units, metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel_size=args.tp)
    hf_config, hf_model = make_hf_model("qwen2")
    distributed.init_distributed(parallel)
    policy = build_model(hf_config, "policy", parallel,
                         use_distributed_optimizer=args.distributed_optimizer)
    load_hf_weights(policy, hf_model.state_dict())
    optimizer = build_optimizer(policy, OptimizerConfig(
        lr=1e-2, use_distributed_optimizer=args.distributed_optimizer))
    batch = make_batch(hf_config.vocab_size)

    def weights() -> list[torch.Tensor]:
        return [p.detach().clone() for p in policy.chunks[0].parameters()]

    results = []
    for loss_fn in (nan_loss, nan_gradient_loss, sequence_nll_loss):
        before = weights()
        result = train_step(policy, optimizer, batch, 2, loss_fn)
        after = weights()
        results.append({
            "skip_reason": result.skip_reason,
            "update_successful": result.update_successful,
            "loss": result.metrics["loss"],
            "weights_changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
            "weights_finite": all(bool(torch.isfinite(a).all()) for a in after),
        })
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(results, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
