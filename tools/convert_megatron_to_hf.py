"""Megatron checkpoint -> HF model folder. See megatron_prime/checkpoint/convert.py."""

if __name__ == "__main__":
    # Imported here to keep re-imports by spawned helper processes light (see the sibling tool).
    from megatron_prime.checkpoint.convert import megatron_to_hf_main

    megatron_to_hf_main()
