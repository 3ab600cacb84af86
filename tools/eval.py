"""Evaluate an HF policy on math benchmarks (pass@1, pass@k, majority vote, implicit-PRM
best-of-N). See megatron_prime/evaluate.py (also the megatron-prime-eval command)."""

import sys

from megatron_prime.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
