"""The planner's memory estimate beside what bench_gpu_train_step.py measured on a GPU.

Reads the JSON files that benchmark wrote (benchmarks/results/gpu_train_step_h100_*.json)
and prints, per run, the planner's static bytes (bf16 weights + fp32 main grads + Adam with
fp32 master copies, megatron_prime.plan) and its activation peak for the same shape,
sequence, micro-batch, recompute setting and core attention of Megatron's local spec (the
run's ``attention``: sdpa or unfused; files from before SDPA existed ran unfused), next to
the measured ``static`` and ``peak - static``:

    python benchmarks/plan_vs_gpu.py benchmarks/results/gpu_train_step_h100_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import Qwen2Config

from megatron_prime.models.architectures import ModelShape, padded_vocab_size
from megatron_prime.plan import ActivationShape, model_params, optimizer_bytes_per_param, stage_activations

BF16 = 2
MAIN_GRAD = 4  # DDP grad buffer in fp32 (grad_reduce_in_fp32)


def main(paths: list[str]) -> None:
    print(f"{'file':42s} {'recompute':10s} {'attention':9s} {'static GiB plan/meas':>22s} {'ratio':>6s} "
          f"{'activ. GiB plan/meas':>22s} {'ratio':>6s}")
    for path in paths:
        data = json.loads(Path(path).read_text())
        shape = ModelShape.from_hf(Qwen2Config(**data["model"], architectures=["Qwen2ForCausalLM"]))
        params = model_params(shape, padded_vocab_size(shape.vocab_size, 1))
        static = params * (BF16 + MAIN_GRAD + optimizer_bytes_per_param(BF16))
        for result in data["results"]:
            if "error" in result:
                continue
            act = ActivationShape(seq_length=result["seq_length"], micro_batch_size=result["micro_batch_size"],
                                  tp=1, sequence_parallel=False,
                                  attention=result.get("attention", "unfused"), dtype_bytes=BF16)
            stage = stage_activations(shape, act, result["recompute"], None, shape.num_layers,
                                      first=True, last=True, in_flight=1,
                                      padded_vocab=padded_vocab_size(shape.vocab_size, 1))
            planned = stage.training_peak
            measured = result["peak_minus_static_bytes"]
            print(f"{Path(path).name:42s} {result['recompute']:10s} {result.get('attention', 'unfused'):9s} "
                  f"{static / 2**30:10.2f} / {result['static_bytes'] / 2**30:9.2f} {result['static_bytes'] / static:6.3f} "
                  f"{planned / 2**30:10.2f} / {measured / 2**30:9.2f} {measured / planned:6.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
