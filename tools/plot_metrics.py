"""metrics.jsonl -> curves PNG. See megatron_prime/plot.py (also the megatron-prime-plot command)."""

from megatron_prime.plot import main

if __name__ == "__main__":
    main()
