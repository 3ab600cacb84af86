"""Run by tests/test_prm_reference.py as one process (torchrun, world size 1).

Builds PRIME's models with ``model.prm_path`` set to a checkpoint other than ``model.path``,
once with the default reference (None: the PRM's start) and once with ``model.reference_path``
pointing at the policy's checkpoint, and records which parameters differ between the models
and the implicit process rewards of a batch before any update.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_prime import distributed
from megatron_prime.algo import implicit_process_rewards
from megatron_prime.config import ParallelConfig
from megatron_prime.models.builder import BuiltModel
from megatron_prime.models.schedule import TokenBatch, forward_only
from megatron_prime.toy.model import write_toy_model
from megatron_prime.train import ModelConfig, PrimeConfig, _open_sft_checkpoint, build_prime_models


def parameters(model: BuiltModel) -> dict[str, torch.Tensor]:
    return dict(model.gpt_chunks()[0].named_parameters())


def differing(a: BuiltModel, b: BuiltModel) -> list[str]:
    pa, pb = parameters(a), parameters(b)
    assert sorted(pa) == sorted(pb)
    return sorted(name for name in pa if not torch.equal(pa[name], pb[name]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    root = Path(args.root)
    distributed.init_distributed(ParallelConfig(), use_gpu=False)
    small = dict(hidden_size=64, num_layers=2, intermediate_size=128)
    sft = write_toy_model(root / "sft", seed=0, **small)
    prm_start = write_toy_model(root / "prm_start", seed=1, **small)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 100, (4, 12), generator=generator)
    response_mask = torch.zeros(4, 12)
    response_mask[:, 5:] = 1
    batch = TokenBatch(input_ids, response_mask)

    results = {}
    for case, reference_path in (("default", None), ("reference_path=sft", str(sft))):
        config = PrimeConfig(model=ModelConfig(path=str(sft), prm_path=str(prm_start),
                                               reference_path=reference_path))
        config.validate()
        hf_config, _, load = _open_sft_checkpoint(config.model.path, "model.path")
        models = build_prime_models(config, hf_config, load)
        assert models.prm is not None and models.reference is not None
        prm_logprobs = forward_only(models.prm, batch, config.algo.micro_batch_size).logprobs
        ref_logprobs = forward_only(models.reference, batch, config.algo.micro_batch_size).logprobs
        rewards = implicit_process_rewards(prm_logprobs, ref_logprobs, response_mask,
                                           beta=config.algo.beta)
        results[case] = {
            "parameter_names": sorted(parameters(models.prm)),
            "reference_vs_prm": differing(models.reference, models.prm),
            "reference_vs_policy": differing(models.reference, models.policy),
            "policy_vs_prm": differing(models.policy, models.prm),
            "max_abs_reward": rewards.abs().max().item(),
            "response_tokens": int(response_mask.sum().item()),
        }
    Path(args.out).write_text(json.dumps(results, indent=1))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
