"""Render and submit a SLURM job for a PRIME run. See megatron_prime/launch/submit.py (also
the megatron-prime-submit command)."""

import sys

from megatron_prime.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
