"""Run by tests/test_gpu_plan_memory.py (torchrun, one process on one GPU): what the trainer
keeps on the GPU once it has released its memory for vLLM, beside the planner's number.

Builds policy, PRM and reference (bf16, Megatron's local layers, TP=PP=DP=1), takes one step
of each trained model and one reference forward, so that activations, log-prob temporaries
and Adam's lazily created moments have all existed, then releases as the trainer does before
waking the engine (``gc.collect()``, ``torch.cuda.empty_cache()``) and measures:

* ``allocated``: bytes held by live tensors (``torch.cuda.memory_allocated``): what
  megatron_prime.plan counts as the trainer's resident state in the rollout phase;
* ``cached_after_release``: what the caching allocator still holds beyond that
  (``memory_reserved - memory_allocated``: segments with a live tensor beside free blocks);
* ``outside_allocator``: device memory in use (``mem_get_info``) minus ``memory_reserved``
  minus what was in use before this process touched CUDA (taken as 0: the GPU is assumed
  to be this test's alone, as in benchmarks/gpu_check.sh): the CUDA context, cuBLAS
  workspaces, NCCL. Together with the cached part, the planner's ``--reserved-gib``.
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict

import torch

from megatron_prime import distributed
from megatron_prime.config import OptimizerConfig, ParallelConfig, PrecisionConfig
from megatron_prime.models.architectures import ModelShape
from megatron_prime.models.builder import build_model
from megatron_prime.models.optimizer import build_optimizer, sequence_nll_loss, train_step
from megatron_prime.models.schedule import TokenBatch, forward_only
from megatron_prime.plan import Cluster, Layout, Options, Workload, plan_layout

PROMPT_TOKENS, RESPONSE_TOKENS, ROWS, MICRO_BATCH = 256, 768, 4, 2


def hf_config():
    """A ~156M-parameter Qwen2 shape (GQA, untied): big enough that state dominates noise,
    small enough for any GPU."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=False,
                       architectures=["Qwen2ForCausalLM"])


def planned(distributed_optimizer: bool, gpu_bytes: int) -> dict:
    shape = ModelShape.from_hf(hf_config())
    work = Workload(prompt_tokens=PROMPT_TOKENS, response_tokens=RESPONSE_TOKENS,
                    micro_batch_size=MICRO_BATCH, samples_per_prompt=ROWS, prompts_per_step=1,
                    oversample_factor=1)
    options = Options(distributed_optimizer=distributed_optimizer, attention="unfused",
                      vllm_tensor_parallel_size=1)
    cluster = Cluster(nodes=1, gpus_per_node=1, gpu_memory_gb=gpu_bytes / 1e9)
    plan = plan_layout(shape, cluster, work, options, Layout(1, 1, 1))
    return {"trainer_resident_bytes": plan.trainer_resident_bytes,
            "reserved_bytes": cluster.gpu_bytes - cluster.budget_bytes,
            "max_vllm_memory_fraction": plan.max_vllm_memory_fraction,
            "cluster": asdict(cluster)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed.init_distributed(ParallelConfig(), use_gpu=True)
    precision = PrecisionConfig(dtype="bfloat16", layer_spec="local")
    models = {role: build_model(hf_config(), role, ParallelConfig(), precision,
                                use_distributed_optimizer=args.distributed_optimizer)
              for role in ("policy", "prm", "reference")}
    optimizers = {role: build_optimizer(models[role], OptimizerConfig(
        lr=1e-5, use_distributed_optimizer=args.distributed_optimizer))
        for role in ("policy", "prm")}
    generator = torch.Generator().manual_seed(0)
    seq = PROMPT_TOKENS + RESPONSE_TOKENS
    input_ids = torch.randint(0, hf_config().vocab_size, (ROWS, seq), generator=generator)
    mask = torch.zeros(ROWS, seq)
    mask[:, PROMPT_TOKENS:] = 1
    batch = TokenBatch(input_ids, mask)

    forward_only(models["reference"], batch, MICRO_BATCH)
    for role in ("prm", "policy"):
        result = train_step(models[role], optimizers[role], batch, MICRO_BATCH, sequence_nll_loss)
        assert result.update_successful, result.skip_reason
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del batch, result
    gc.collect()
    torch.cuda.empty_cache()  # what the trainer does before it wakes the engine
    free, total = torch.cuda.mem_get_info()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    measured = {
        "device_name": torch.cuda.get_device_name(),
        "total_bytes": total,
        "peak_allocated_during_step": peak,
        "allocated": allocated,
        "cached_after_release": reserved - allocated,
        "outside_allocator": (total - free) - reserved,
        "in_use": total - free,
    }
    with open(args.out, "w") as handle:
        json.dump({"measured": measured, "planned": planned(args.distributed_optimizer, total),
                   "distributed_optimizer": args.distributed_optimizer}, handle, indent=1)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
