"""The PRIME loop (``megatron_prime.train.train``) as one process, with the stand-in vLLM
engine of tests/gpu_simulation.py, for tests/test_kill_at_random.py: that test kills it many
times, and the stand-in starts in a fraction of a second where the vLLM CPU engine takes
tens. Everything the kills exercise (metrics.jsonl, checkpoints, resume) is the real code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/

import gpu_simulation as sim  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ledger", required=True, help="a fresh folder for this start")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from megatron_prime import distributed
    from megatron_prime.config import load_config
    from megatron_prime.train import PrimeConfig, train

    config = load_config(PrimeConfig, None, args.overrides)
    train(config, engine_factory=sim.simulated_engine_class(sim.Ledger(args.ledger)))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
