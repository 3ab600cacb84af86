"""Run by tests/test_prm_reference.py as one process (torchrun, world size 1).

Builds PRIME's models with ``model.prm_path`` set to a checkpoint other than ``model.path``,
once with the default reference (None: the PRM's start), once with ``model.reference_path``
pointing at the policy's checkpoint and once with a smaller PRM, and records which parameters
differ between the models, their sizes and the implicit process rewards of a batch before any
update; then the errors of PRM checkpoints that cannot score the policy's tokens.
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
from transformers import AutoTokenizer
from megatron_prime.train import ModelConfig, PrimeConfig, _open_sft_checkpoint, build_prime_models


def parameters(model: BuiltModel) -> dict[str, torch.Tensor]:
    return dict(model.gpt_chunks()[0].named_parameters())


def differing(a: BuiltModel, b: BuiltModel) -> list[str] | None:
    """Names of the parameters that differ; None for models of different shapes."""
    pa, pb = parameters(a), parameters(b)
    if sorted(pa) != sorted(pb) or any(pa[name].shape != pb[name].shape for name in pa):
        return None
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

    # A PRM of its own, smaller architecture that shares the tokenizer; a copy of it whose
    # tokenizer has one token more; one whose positions stop short of the rollout's length.
    tiny = dict(hidden_size=32, num_layers=1, intermediate_size=64)
    small_prm = write_toy_model(root / "small_prm", seed=2, **tiny)
    other_tokenizer = write_toy_model(root / "other_tokenizer", seed=2, **tiny)
    tokenizer = AutoTokenizer.from_pretrained(str(other_tokenizer))
    tokenizer.add_tokens(["<step>"])
    tokenizer.save_pretrained(str(other_tokenizer))
    short = write_toy_model(root / "short", seed=2, max_position_embeddings=64, **tiny)

    def prime_config(**model: str) -> PrimeConfig:
        config = PrimeConfig(model=ModelConfig(path=str(sft), **model))
        config.rollout.engine.max_model_len = 96
        config.validate()
        return config

    results = {}
    for case, model in (("default", {"prm_path": str(prm_start)}),
                        ("reference_path=sft", {"prm_path": str(prm_start), "reference_path": str(sft)}),
                        ("small_prm", {"prm_path": str(small_prm)})):
        config = prime_config(**model)
        models = build_prime_models(config, _open_sft_checkpoint(config.model.path, "model.path"))
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
            "sizes": {role: sum(p.numel() for p in parameters(getattr(models, role)).values())
                      for role in ("policy", "prm", "reference")},
        }
    # Refused before any model is built, naming the key and the problem.
    for case, model in (("other_tokenizer", {"prm_path": str(other_tokenizer)}),
                        ("short_positions", {"prm_path": str(short)}),
                        ("reference_of_policy_shape", {"prm_path": str(small_prm),
                                                       "reference_path": str(sft)})):
        try:
            build_prime_models(prime_config(**model), _open_sft_checkpoint(str(sft), "model.path"))
            results[case] = None
        except ValueError as error:
            results[case] = str(error)
    Path(args.out).write_text(json.dumps(results, indent=1))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
