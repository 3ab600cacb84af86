"""Plan the per-GPU memory and the TP x PP x DP layout of a PRIME run before queueing it. See
megatron_prime/plan.py (also the megatron-prime-plan command)."""

import sys

from megatron_prime.plan import main

if __name__ == "__main__":
    sys.exit(main())
