"""Micro-batches cut after their own last scored token against the padded form, one process
per pipeline stage: forward-only log-probs, a PPO-like loss, its metrics and the gradients.

    torchrun --nproc-per-node 2 tests/workers/trim_worker.py --pp 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.config import ParallelConfig, PrecisionConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.schedule import MicroBatching, TokenBatch, forward_backward, forward_only
from megatron_prime.toy import write_toy_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(pipeline_parallel_size=args.pp)
    distributed.init_distributed(parallel)
    folder = os.path.join(os.path.dirname(os.path.abspath(args.out)), "model")
    write_toy_model(folder, num_layers=2, num_key_value_heads=2)  # every rank (rank 0 writes)
    hf_config = json.loads(open(folder + "/config.json").read())
    torch.manual_seed(0)
    model = build_model(hf_config, "policy", parallel, PrecisionConfig())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (6, 32), generator=generator)
    mask = torch.zeros(6, 32, dtype=torch.long)
    # Micro-batches of 2: rows ending at 12 and 9 (cut to 12), 30 and 20 (30), 6 and 5 (6).
    for row, (start, end) in enumerate([(4, 12), (3, 9), (10, 30), (8, 20), (2, 6), (1, 5)]):
        mask[row, start:end] = 1
    batch = TokenBatch(ids, mask)

    def loss_fn(outputs, micro):
        scored = micro.scored_token_mask()
        loss = -(outputs.logprobs * scored).sum() + 0.1 * (outputs.entropy * scored).sum()
        return loss, scored.sum().to(torch.int), {"logprob_max": (outputs.logprobs.detach() * scored).max()}

    result = {}
    # padded: 2 rows each, full length; trimmed: 2 rows each, cut to 12, 30, 6; budget: a
    # 40-token budget takes rows longest first: [30] (1 x 30), [20, 12] (2 x 20), [9, 6, 5]
    # (3 x 9): micro-batches of varying rows and lengths, in another row order.
    for name, trim, micro_batching in (("padded", False, MicroBatching(2)),
                                       ("trimmed", True, MicroBatching(2)),
                                       ("budget", True, MicroBatching(2, max_tokens=40))):
        model.trim_micro_batches = trim
        outputs = forward_only(model, batch, micro_batching)
        for chunk in model.chunks:
            chunk.zero_grad_buffer()
        metrics = forward_backward(model, batch, micro_batching, loss_fn)
        grads = torch.cat([p.main_grad.flatten() for chunk in model.chunks for p in chunk.parameters()])
        # Each stage's own gradients, summed over the stages (a layout-free fingerprint).
        fingerprint = torch.stack([grads.abs().sum(), grads.sum()]).double()
        dist.all_reduce(fingerprint, group=distributed.pp_group())
        result[name] = {
            "logprobs": outputs.logprobs.tolist(), "entropy": outputs.entropy.tolist(),
            "metrics": metrics, "grad_abs_sum": fingerprint[0].item(), "grad_sum": fingerprint[1].item(),
            "variable_seq_lengths": bool(model.config.variable_seq_lengths)}
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
