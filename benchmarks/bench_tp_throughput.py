"""Forward-backward tokens/s of a ~20M-parameter Qwen2-shaped model at TP=1 vs TP=2.

Both layouts run in this one invocation (torchrun, gloo, float32 on CPU; NCCL/bf16 on GPU),
so the printed ratio compares like with like on the same machine:

    python benchmarks/bench_tp_throughput.py [--steps 6] [--seq 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def model_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=1024, tie_word_embeddings=False,
                       architectures=["Qwen2ForCausalLM"])


def worker(args) -> None:
    from megatron_prime import distributed
    from megatron_prime.config import OptimizerConfig, ParallelConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.models.optimizer import build_optimizer, sequence_nll_loss, train_step
    from megatron_prime.models.schedule import TokenBatch

    parallel = ParallelConfig(tensor_parallel_size=args.tp)
    distributed.init_distributed(parallel)
    model = build_model(model_config(), "policy", parallel)
    params = sum(p.numel() for chunk in model.gpt_chunks() for p in chunk.parameters())
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=generator)
    batch = TokenBatch(ids, torch.ones_like(ids, dtype=torch.float32))
    timings = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch, args.micro_batch, sequence_nll_loss)
        if step >= args.warmup:
            timings.append(time.perf_counter() - start)
    if torch.distributed.get_rank() == 0:
        seconds = sorted(timings)[len(timings) // 2]  # median step
        Path(args.out).write_text(json.dumps({
            "tp": args.tp, "params_per_rank": params, "seconds_per_step": seconds,
            "tokens_per_s": args.batch * args.seq / seconds}))
    distributed.destroy_distributed()


def launch(tp: int, args, out: Path) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
               f"--master-port={port}", __file__, "--worker", "--tp", str(tp), "--out", str(out),
               "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch),
               "--micro-batch", str(args.micro_batch), "--warmup", str(args.warmup)]
    # One intra-op thread per rank per core: TP=2 on 2 cores must not oversubscribe.
    threads = max(1, (os.cpu_count() or 1) // tp)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = [launch(tp, args, Path(tmp) / f"tp{tp}.json") for tp in (1, 2)]
    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(f"forward-backward + Adam step, {args.batch}x{args.seq} tokens/step, device {device}")
    for r in results:
        print(f"TP={r['tp']}: {r['params_per_rank'] / 1e6:.1f}M params/rank, "
              f"{r['seconds_per_step'] * 1e3:.0f} ms/step, {r['tokens_per_s']:.0f} tokens/s")
    print(f"ratio TP=2 / TP=1 tokens/s: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
