"""Run by tests/test_gpu_fp8.py (torchrun, one process, a GPU with FP8 and Transformer Engine):
the calibration pass of a frozen reference in delayed-scaling FP8 (models/fp8.calibrate).

Builds the tiny Qwen2 reference with Transformer Engine's layer spec in FP8 (delayed scaling),
loads weights, and records on one batch: the forward FP8 scales of every TE module before and
after ``calibrate``; the largest |FP8 - bf16| log-prob difference of a forward-only pass before
calibration (scale 1) and after it (bf16 = the same model inside ``fp8_off``); and whether a
second forward-only pass leaves the scales as they are (TE recomputes them only when an FP8
region is left with autograd on, which forward-only passes never do).
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.config import ParallelConfig, PrecisionConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.fp8 import calibrate, fp8_off, needs_calibration
from megatron_prime.models.schedule import forward_only
from workers.parity_worker import make_batch, make_hf_model


def forward_scales(model) -> list[float]:
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    scales: list[float] = []
    for chunk in model.chunks:
        for module in chunk.modules():
            state = getattr(module, "fp8_meta", {}).get("scaling_fwd") \
                if isinstance(module, TransformerEngineBaseModule) else None
            if state is not None:
                scales += state.scale.float().tolist()
    return scales


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig()
    hf_config, hf_model = make_hf_model("qwen2")
    distributed.init_distributed(parallel, use_gpu=True)
    precision = PrecisionConfig(fp8_recipe="delayed", fp8_roles=["reference"])
    reference = build_model(hf_config, "reference", parallel, precision)
    load_hf_weights(reference, hf_model.state_dict())
    batch = make_batch(hf_config.vocab_size).to(distributed.device())
    mask = batch.scored_token_mask().to(distributed.device())

    def fp8_error() -> float:
        scored = forward_only(reference, batch, 2).logprobs
        with fp8_off(reference):
            exact = forward_only(reference, batch, 2).logprobs
        return float(((scored - exact).abs() * mask).max())

    result = {"needs_calibration": needs_calibration(reference),
              "sequence_length_multiple": reference.sequence_length_multiple,
              "batch_tokens": batch.seq_length}
    result["error_before"] = fp8_error()
    result["scales_before"] = forward_scales(reference)
    calibrate(reference, batch, 2)
    result["scales_after"] = forward_scales(reference)
    result["error_after"] = fp8_error()
    result["scales_after_more_passes"] = forward_scales(reference)
    result["fp8_after"] = reference.config.fp8
    with open(args.out, "w") as handle:
        json.dump(result, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
