"""Run by tests/test_gpu_engine_slot.py under torchrun on a GPU machine: where each rank's
rollout engine would run (distributed.engine_slot), for TP = the world size."""

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
    world = int(os.environ["WORLD_SIZE"])
    distributed.init_distributed(ParallelConfig(tensor_parallel_size=world), use_gpu=True)
    slots = {
        # The GPU default: one engine per rollout-TP GPU of the replica, so every rank hosts one.
        "per_gpu": distributed.engine_slot(None, 1),
        # One engine over the whole replica.
        "one": distributed.engine_slot(1, world),
    }
    mine = {name: [slot.index, slot.count, slot.devices] for name, slot in slots.items()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, [distributed.physical_device_id(), mine],
                           group=distributed.host_group())
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(everyone, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
