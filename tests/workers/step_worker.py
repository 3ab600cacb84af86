"""Run under torchrun by tests/test_prime_step.py: one PRIME update at a layout.

Policy, PRM and reference all start from the same tiny HF model; one prompt with n=4
responses and outcomes [1, 0, 1, 0]. Records the step's metrics and, per HF tensor, the sum
and absolute sum of the updated policy and PRM weights (gathered over TP, all stages).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import iter_hf_tensors, load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import BuiltModel, build_model
from megatron_prime.models.optimizer import build_optimizer
from megatron_prime.update import AlgoConfig, PrimeModels, prime_update
from workers.parity_worker import make_batch, make_hf_model


def weight_sums(model: BuiltModel) -> dict[str, list[float]]:
    local = {name: [float(t.double().sum()), float(t.double().abs().sum())]
             for name, t in iter_hf_tensors(model.gpt_chunks(), model.shape,
                                            distributed.gather_tp_shards)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prm-mode", default="before")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    hf_config, hf_model = make_hf_model("qwen2")
    distributed.init_distributed(parallel)
    built = {role: build_model(hf_config, role, parallel) for role in ("policy", "prm", "reference")}
    for model in built.values():
        load_hf_weights(model, hf_model.state_dict())
    models = PrimeModels(
        policy=built["policy"], reference=built["reference"], prm=built["prm"],
        policy_optimizer=build_optimizer(built["policy"], OptimizerConfig(lr=1e-3)),
        prm_optimizer=build_optimizer(built["prm"], OptimizerConfig(lr=1e-3)),
    )
    metrics = prime_update(models, make_batch(hf_config.vocab_size),
                           torch.tensor([1.0, 0.0, 1.0, 0.0]),
                           AlgoConfig(prm_mode=args.prm_mode, micro_batch_size=2)).metrics
    result = {"metrics": metrics, "policy": weight_sums(models.policy),
              "prm": weight_sums(models.prm)}
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
