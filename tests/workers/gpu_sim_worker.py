"""One rank of the simulated GPU job (tests/gpu_simulation.py): the real PRIME loop
(``megatron_prime.train.train``) with the stand-in vLLM engine and the memory ledger.

Started by tests/test_gpu_path_simulation.py with torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, GROUP_RANK) set per process, so several simulated nodes share this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/

import gpu_simulation as sim  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ledger", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    ledger = sim.Ledger(args.ledger)
    os.environ["MEGATRON_PRIME_SIM_RANK"] = os.environ["RANK"]
    os.environ["MEGATRON_PRIME_SIM_NODE"] = os.environ["GROUP_RANK"]

    from megatron_prime import distributed
    from megatron_prime import train as train_module
    from megatron_prime.config import load_config
    from megatron_prime.models import schedule

    recorder = sim.CollectiveRecorder(ledger)
    recorder.install()
    config = load_config(train_module.PrimeConfig, None, args.overrides)
    memory = sim.LedgerMemory(ledger)
    distributed.init_distributed(config.parallel, seed=config.trainer.seed, use_gpu=False, memory=memory)

    # The allocator's caches: every schedule pass leaves activations, every gather buffers.
    run_schedule = schedule._run_schedule

    def booked_schedule(*a, **k):
        memory.book_activations()
        return run_schedule(*a, **k)

    gather = distributed.gather_tp_shards

    def booked_gather(tensor):
        memory.book_gather()
        return gather(tensor)

    schedule._run_schedule = booked_schedule
    distributed.gather_tp_shards = booked_gather
    distributed.engine_slot = recorder.wrap_placement(distributed.engine_slot)
    train_module.collect_batch = recorder.wrap_rollout(train_module.collect_batch)
    train_module.run_validation = recorder.wrap_rollout(train_module.run_validation)

    result = train_module.train(config, engine_factory=sim.simulated_engine_class(ledger))
    rank = int(os.environ["RANK"])
    ledger.write(f"rank-{rank}.json", {
        "gpu": memory.gpu, "releases": memory.releases, "last_step": result.last_step,
        "state_moves": memory.state_moves,
        "rollout_collectives": sorted(set(recorder.rollout_collectives)),
        "history": [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))
                     and not k.endswith("_per_s")}
                    for m in result.history],
    })
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
