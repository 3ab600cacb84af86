"""HF model folder -> Megatron checkpoint. See megatron_prime/checkpoint/convert.py."""

from megatron_prime.checkpoint.convert import hf_to_megatron_main

if __name__ == "__main__":
    hf_to_megatron_main()
