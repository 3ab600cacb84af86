"""Run under torchrun by tests/test_temperature.py: log-probs, entropy and one gradient of
the tiny Qwen2 model at a sampling temperature, at a TP layout (vocab-parallel log-probs).

Records on rank 0: forward-only log-probs and entropy, and the loss and pre-clip grad norm
of one train_step on -log p - 0.1 * entropy (token mean), all at the given temperature.
"""

from __future__ import annotations

import argparse
import json

import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.optimizer import build_optimizer, train_step
from megatron_prime.models.schedule import forward_only
from workers.parity_worker import make_batch, make_hf_model, nll_with_entropy_bonus


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel_size=args.tp)
    hf_config, hf_model = make_hf_model("qwen2")
    distributed.init_distributed(parallel)
    policy = build_model(hf_config, "policy", parallel)
    load_hf_weights(policy, hf_model.state_dict())
    batch = make_batch(hf_config.vocab_size)
    outputs = forward_only(policy, batch, 2, temperature=args.temperature)
    optimizer = build_optimizer(policy, OptimizerConfig(lr=1e-3))
    step = train_step(policy, optimizer, batch, 2, nll_with_entropy_bonus,
                      temperature=args.temperature)
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump({"logprobs": outputs.logprobs.tolist(), "entropy": outputs.entropy.tolist(),
                       "loss": step.metrics["loss"], "grad_norm": step.grad_norm}, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
