"""Run under torchrun (one gloo process) by tests/test_fp8.py: the FP8 bookkeeping of a PRIME
update, recorded on CPU.

FP8 itself needs a GPU and Transformer Engine; without TE, Megatron's FP8 context is a no-op
(megatron.core.fp8_utils.get_fp8_context), so a CPU model whose ``config.fp8`` is set after
building runs exactly as before. The worker sets it on the roles a scenario puts in FP8 and
records, through ``megatron_prime.update``'s names, every forward-only pass (which role, and
``config.fp8`` at that moment: None inside ``fp8_off``) and every call of ``calibrate`` (whose
real body imports TE; here it only records). One process runs every scenario, each on a fresh
(uncalibrated) PrimeModels over the same models:

  off        no model in FP8 (the default precision on CPU);
  policy     only the policy in FP8 (precision.fp8_roles' default);
  scoring    PRM and reference in FP8 with delayed scaling, prm_mode=before;
  after      the same with prm_mode=after;
  current    PRM and reference in FP8 with current scaling (nothing to calibrate).

Each runs two updates: the first with ``measure_fp8_error=True``, the second without. It also
checks the schedule's sequence padding: log-probs of a 13-token batch through a model whose
``sequence_length_multiple`` is 16 equal those without padding.
"""

from __future__ import annotations

import argparse
import json

import torch

import megatron_prime.update as update_module
from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.optimizer import build_optimizer
from megatron_prime.models.schedule import TokenBatch, forward_only
from megatron_prime.update import AlgoConfig, PrimeModels, prime_update
from workers.parity_worker import make_batch, make_hf_model

SCENARIOS = {  # roles in FP8, Megatron's recipe name, prm_mode
    "off": ((), None, "before"),
    "policy": (("policy",), "delayed", "before"),
    "scoring": (("prm", "reference"), "delayed", "before"),
    "after": (("prm", "reference"), "delayed", "after"),
    "current": (("prm", "reference"), "tensorwise", "before"),
}


def padding_check(model, vocab_size: int) -> float:
    """Largest |difference| of forward_only's log-probs with and without sequence padding."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab_size, (2, 13), generator=generator)
    mask = torch.zeros(2, 13)
    mask[0, 4:13] = 1
    mask[1, 3:9] = 1
    batch = TokenBatch(ids, mask)
    plain = forward_only(model, batch, 2).logprobs
    model.sequence_length_multiple = 16
    padded = forward_only(model, batch, 2).logprobs
    model.sequence_length_multiple = 1
    assert padded.shape == plain.shape == (2, 13), (padded.shape, plain.shape)
    return float((padded - plain).abs().max())


def run_scenario(name: str, built: dict, optimizers: dict, batch: TokenBatch,
                 outcomes: torch.Tensor) -> list[dict]:
    """Two updates of a fresh PrimeModels (not yet calibrated) over the shared models, with
    ``config.fp8`` set on the scenario's roles only."""
    fp8_roles, recipe, prm_mode = SCENARIOS[name]
    for role, model in built.items():
        model.config.fp8 = "hybrid" if role in fp8_roles else None
        model.config.fp8_recipe = recipe if role in fp8_roles else "delayed"
    models = PrimeModels(policy=built["policy"], reference=built["reference"], prm=built["prm"],
                         policy_optimizer=optimizers["policy"], prm_optimizer=optimizers["prm"])
    calls: list[list] = []
    real_forward_only = update_module.forward_only

    def recorded_forward_only(model, batch, *rest, **kwargs):
        calls.append(["forward", model.role, model.config.fp8])
        return real_forward_only(model, batch, *rest, **kwargs)

    def recorded_calibrate(model, batch, micro_batch_size):
        calls.append(["calibrate", model.role, model.config.fp8])

    update_module.forward_only, update_module.calibrate = recorded_forward_only, recorded_calibrate
    # The separate old-policy pass is kept (it is skipped for a single on-policy update by
    # default), so every model's forward-only pass, the policy's FP8 one included, is recorded.
    algo = AlgoConfig(prm_mode=prm_mode, micro_batch_size=2, old_logprob_pass="always")
    steps = []
    try:
        for measure in (True, False):
            calls.clear()
            metrics = prime_update(models, batch, outcomes, algo, measure_fp8_error=measure).metrics
            steps.append({"calls": list(calls),
                          "fp8_metrics": {k: v for k, v in metrics.items() if k.startswith("reward/fp8_")},
                          "fp8_after": {role: m.config.fp8 for role, m in built.items()}})
    finally:
        update_module.forward_only = real_forward_only
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig()
    hf_config, hf_model = make_hf_model("qwen2")
    distributed.init_distributed(parallel, use_gpu=False)
    built = {role: build_model(hf_config, role, parallel) for role in ("policy", "prm", "reference")}
    for model in built.values():
        load_hf_weights(model, hf_model.state_dict())
    optimizer_config = OptimizerConfig(lr=1e-3)
    optimizers = {role: build_optimizer(built[role], optimizer_config) for role in ("policy", "prm")}
    batch, outcomes = make_batch(hf_config.vocab_size), torch.tensor([1.0, 0.0, 1.0, 0.0])
    result = {name: run_scenario(name, built, optimizers, batch, outcomes) for name in SCENARIOS}
    for model in built.values():
        model.config.fp8 = None
    result["padding_max_diff"] = padding_check(built["reference"], hf_config.vocab_size)
    with open(args.out, "w") as handle:
        json.dump(result, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
