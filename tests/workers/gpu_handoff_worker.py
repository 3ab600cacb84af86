"""GPU worker for tests/test_gpu_memory_handoff.py: one PRIME update on CUDA, then the
trainer's release (distributed.runtime().memory.release_cached, as the weight bridge calls it
before an engine wakes), and a second process that must be able to allocate the memory the
release returned: the colocated vLLM engine's view of the hand-off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ALLOCATE = """
import sys, torch
nbytes = int(sys.argv[1])
try:
    block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print("ok")
except torch.OutOfMemoryError:
    print("oom")
"""


def second_process_allocates(nbytes: int) -> bool:
    done = subprocess.run([sys.executable, "-c", ALLOCATE, str(nbytes)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1] == "ok"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from megatron_prime import distributed
    from megatron_prime.config import load_config
    from megatron_prime.models.schedule import TokenBatch
    from megatron_prime.train import PrimeConfig, _open_sft_checkpoint, build_prime_models
    from megatron_prime.update import prime_update

    config = load_config(PrimeConfig, None, [f"model.path={args.model}", "precision.layer_spec=local",
                                             "trainer.device=cuda", "algo.micro_batch_size=4"])
    distributed.init_distributed(config.parallel, seed=1, use_gpu=True)
    start = _open_sft_checkpoint(config.model.path, "model.path")
    hf_config = start.hf_config
    models = build_prime_models(config, start)
    generator = torch.Generator().manual_seed(0)
    rows, length, prompt = 16, 1024, 64
    input_ids = torch.randint(3, hf_config["vocab_size"], (rows, length), generator=generator)
    response_mask = torch.zeros(rows, length)
    response_mask[:, prompt:] = 1.0
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0] * (rows // 4))
    prime_update(models, TokenBatch(input_ids, response_mask), rewards, config.algo)
    torch.cuda.synchronize()

    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    free_before, total = torch.cuda.mem_get_info()
    # What the engine wakes into: everything free now plus 90% of the trainer's cache.
    ask = free_before + int(0.9 * cached)
    fits_before = second_process_allocates(ask)
    distributed.runtime().memory.release_cached()
    free_after, _ = torch.cuda.mem_get_info()
    fits_after = second_process_allocates(ask)
    Path(args.out).write_text(json.dumps({
        "card": torch.cuda.get_device_name(), "total": total, "cached": cached,
        "free_before": free_before, "free_after": free_after, "ask": ask,
        "fits_before": fits_before, "fits_after": fits_after,
        "reserved_after": torch.cuda.memory_reserved(),
        "allocated_after": torch.cuda.memory_allocated()}))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
