"""Megatron checkpoint -> HF model folder. See megatron_prime/checkpoint/convert.py."""

from megatron_prime.checkpoint.convert import megatron_to_hf_main

if __name__ == "__main__":
    megatron_to_hf_main()
