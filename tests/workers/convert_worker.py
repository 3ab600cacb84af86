"""Run under torchrun by tests/test_checkpoint_conversion.py.

Mode "roundtrip": HF folder -> Megatron checkpoint at --tp/--pp, load it back into a fresh
model at the same layout, dump full-vocab logits, then Megatron -> HF folder.
Mode "logits": load an existing Megatron checkpoint at --tp/--pp and dump logits.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prime import distributed
from megatron_prime.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_prime.checkpoint.model_checkpoint import hf_config_of, load_model_checkpoint
from megatron_prime.config import ParallelConfig
from megatron_prime.models.builder import BuiltModel, build_model
from megatron_prime.models.schedule import TokenBatch


def full_logits(model: BuiltModel, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Test-only: the full-vocab logits (gathered over TP) on the last stage, else None."""
    batch = TokenBatch(input_ids, torch.ones_like(input_ids))
    collected = []

    def forward_step(data_iterator, chunk):
        micro = next(data_iterator)
        output = chunk(micro.input_ids, micro.position_ids(), micro.attention_mask())

        def loss_func(logits):
            shards = [torch.empty_like(logits) for _ in range(distributed.tp_world_size())]
            dist.all_gather(shards, logits.contiguous(), group=distributed.tp_group())
            collected.append(torch.cat(shards, dim=-1)[..., : model.shape.vocab_size])
            return logits.new_zeros(()), {}

        return output, loss_func

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=model.chunks,
            num_microbatches=1, seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0],
            forward_only=True)
    return collected[0] if collected else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["roundtrip", "logits"], required=True)
    parser.add_argument("--hf-dir")
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--hf-out")
    parser.add_argument("--logits-out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    distributed.init_distributed(parallel, use_gpu=False)
    if args.mode == "roundtrip":
        convert_hf_to_megatron(args.hf_dir, args.megatron_dir, parallel)
    model = build_model(hf_config_of(args.megatron_dir), "reference", parallel)
    load_model_checkpoint(model, args.megatron_dir)
    input_ids = torch.randint(0, model.shape.vocab_size, (2, 12),
                              generator=torch.Generator().manual_seed(3))
    logits = full_logits(model, input_ids)
    if logits is not None and distributed.tp_rank() == 0 and distributed.dp_rank() == 0:
        torch.save({"input_ids": input_ids, "logits": logits}, args.logits_out)
    if args.mode == "roundtrip":
        # Small shards, so the index over several files (from several stages) is exercised.
        convert_megatron_to_hf(args.megatron_dir, args.hf_out, parallel, max_shard_bytes=200_000)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
