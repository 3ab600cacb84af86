"""The default job: a tiny Qwen2-shaped Megatron model learns a toy task on CPU.

It exercises the whole foundation end to end — process groups, the architecture registry,
the HF->Megatron mapping, vocab-parallel log-probs, Megatron's schedule and optimizer — and
prints the loss falling. Runs as one process (``python -m megatron_prime.demo``) or under
``torchrun --nproc-per-node 2 -m megatron_prime.demo --tp 2``.

The task: the response repeats the prompt's tokens in reverse, so the loss can fall far
below the uniform baseline log(vocab) only by attending to the prompt.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.optimizer import build_optimizer, sequence_nll_loss, train_step
from megatron_prime.models.schedule import TokenBatch

VOCAB = 64
PROMPT_LEN = 6


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    return config, Qwen2ForCausalLM(config).float()


def reversal_batch(batch_size: int, generator: torch.Generator) -> TokenBatch:
    prompt = torch.randint(2, VOCAB, (batch_size, PROMPT_LEN), generator=generator)
    separator = torch.ones(batch_size, 1, dtype=torch.long)
    input_ids = torch.cat([prompt, separator, prompt.flip(1)], dim=1)
    response_mask = torch.zeros_like(input_ids, dtype=torch.float32)
    response_mask[:, PROMPT_LEN + 1:] = 1
    return TokenBatch(input_ids, response_mask)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    hf_config, hf_model = tiny_qwen2()
    runtime = distributed.init_distributed(parallel)
    policy = build_model(hf_config, "policy", parallel)
    load_hf_weights(policy, hf_model.state_dict())
    optimizer = build_optimizer(policy, OptimizerConfig(lr=args.lr, clip_grad=1.0))
    is_logger = runtime.launch.rank == 0
    if is_logger:
        print(f"tiny Qwen2 on {runtime.device} ({runtime.backend}), TP={args.tp} PP={args.pp} "
              f"DP={distributed.dp_world_size()}; uniform loss = {math.log(VOCAB):.3f}")

    generator = torch.Generator().manual_seed(distributed.dp_rank())
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = reversal_batch(args.batch_size, generator)
        result = train_step(policy, optimizer, batch, args.micro_batch_size, sequence_nll_loss)
        if is_logger and (step % 10 == 0 or step == 1):
            print(f"step {step:4d}  loss {result.metrics['loss']:.4f}  "
                  f"entropy {result.metrics['entropy']:.3f}  grad_norm {result.grad_norm:.3f}  "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
