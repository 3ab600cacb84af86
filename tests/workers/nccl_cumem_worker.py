"""Run under torchrun by tests/test_nccl_env.py: rank 0 imports vLLM and the engine module
(as a rank hosting an engine does), rank 1 does not; both report NCCL_CUMEM_ENABLE."""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.config import ParallelConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed.init_distributed(ParallelConfig(), use_gpu=False)
    if dist.get_rank() == 0:
        import vllm  # noqa: F401  (some releases set NCCL_CUMEM_ENABLE here)

        import megatron_prime.rollout.engine  # noqa: F401
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, os.environ.get("NCCL_CUMEM_ENABLE"))
    if dist.get_rank() == 0:
        with open(args.out, "w") as file:
            json.dump({"values": values}, file)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
