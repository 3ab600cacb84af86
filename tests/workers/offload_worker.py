"""Run under torchrun (one process) by tests/test_rollout_offload.py and its GPU twin: the
trainer's state released for a rollout and restored (models/offload.py), against a run that
kept it.

Two model sets from the same tiny HF model (policy, trained PRM, reference; Adam): both take
a PRIME update on the global batch; set B then releases its state (as around a rollout),
is checked for what left the device, refuses an update while released, and restores; both
take a second update. Records the bytes each part freed (from the storages and, on CUDA, from
torch's allocator), the storages' sizes while released, the wall time of release and restore,
and the second update's metrics and weights of both sets.

    torchrun --nproc-per-node 1 tests/workers/offload_worker.py --device cpu --out result.json
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
from megatron_prime.models.offload import OffloadOrderError, RolloutOffload, optimizer_state_tensors
from megatron_prime.models.optimizer import build_optimizer
from megatron_prime.update import AlgoConfig, PrimeModels, prime_update
from workers.parity_worker import make_hf_model
from workers.step_worker import make_global_batch, weight_sums


def build_set(hf_config, hf_model) -> PrimeModels:
    parallel = ParallelConfig()
    built = {role: build_model(hf_config, role, parallel) for role in ("policy", "prm", "reference")}
    for model in built.values():
        load_hf_weights(model, hf_model.state_dict())
    optimizer_config = OptimizerConfig(lr=1e-3, adam_eps=1e-6)
    return PrimeModels(policy=built["policy"], reference=built["reference"], prm=built["prm"],
                       policy_optimizer=build_optimizer(built["policy"], optimizer_config),
                       prm_optimizer=build_optimizer(built["prm"], optimizer_config))


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (freed ones count 0)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed.init_distributed(ParallelConfig(), use_gpu=args.device == "cuda")
    hf_config, hf_model = make_hf_model("qwen2")
    batch, outcomes = make_global_batch(hf_config.vocab_size)
    config = AlgoConfig(micro_batch_size=2, prm_mini_batches=1)
    sets = {"kept": build_set(hf_config, hf_model), "offloaded": build_set(hf_config, hf_model)}
    for models in sets.values():
        prime_update(models, batch, outcomes, config)

    models = sets["offloaded"]
    trained = [(models.policy, models.policy_optimizer), (models.prm, models.prm_optimizer)]
    offload = RolloutOffload(trained, [models.reference])
    models.rollout_offload = offload

    def parts() -> dict[str, list[torch.Tensor]]:
        grads = [buffer.grad_data for model, _ in trained for chunk in model.chunks for buffer in chunk.buffers]
        weights = {p.untyped_storage().data_ptr() for model, _ in trained
                   for chunk in model.chunks for p in chunk.parameters()}
        optimizer = [t for _, opt in trained for t in optimizer_state_tensors(opt)
                     if t.untyped_storage().data_ptr() not in weights]
        reference = [p for chunk in models.reference.chunks for p in chunk.parameters()]
        return {"grads": grads, "optimizer": optimizer, "reference": reference}

    tensors = parts()  # the same tensor objects before, during and after
    before = {name: storage_bytes(ts) for name, ts in tensors.items()}
    param_counts = {role: sum(p.numel() for chunk in model.chunks for p in chunk.parameters())
                    for role, model in (("policy", models.policy), ("prm", models.prm),
                                        ("reference", models.reference))}
    param_tensors = {role: sum(1 for chunk in model.chunks for p in chunk.parameters())
                     for role, model in (("policy", models.policy), ("prm", models.prm))}
    reference_dtype_bytes = next(models.reference.chunks[0].parameters()).element_size()
    cuda = args.device == "cuda"
    allocated = [torch.cuda.memory_allocated()] if cuda else []
    stats = offload.release()
    if cuda:
        allocated.append(torch.cuda.memory_allocated())
    during = {name: storage_bytes(ts) for name, ts in tensors.items()}
    try:
        prime_update(models, batch, outcomes, config)
        refused = ""
    except OffloadOrderError as error:
        refused = str(error)
    try:
        offload.release()
        released_twice = ""
    except OffloadOrderError as error:
        released_twice = str(error)
    offload.restore()
    if cuda:
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    after = {name: storage_bytes(ts) for name, ts in tensors.items()}
    # A second release and restore reuse the pinned host buffers.
    offload.release()
    offload.restore()
    second = {}
    for name, each in sets.items():
        metrics = prime_update(each, batch, outcomes, config).metrics
        second[name] = {"metrics": {k: v for k, v in metrics.items() if not k.startswith("time/")},
                        "policy": weight_sums(each.policy), "prm": weight_sums(each.prm)}
    result = {"before": before, "during": during, "after": after, "stats": {
                  "grad_bytes": stats.grad_bytes, "optimizer_bytes": stats.optimizer_bytes,
                  "frozen_bytes": stats.frozen_bytes, "release_seconds": stats.release_seconds,
                  "restore_seconds": offload.last.restore_seconds},
              "param_counts": param_counts, "param_tensors": param_tensors,
              "reference_dtype_bytes": reference_dtype_bytes,
              "allocated": allocated, "refused": refused, "released_twice": released_twice,
              "second": second, "device": str(distributed.device()),
              "dtype": str(next(models.policy.chunks[0].parameters()).dtype)}
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
