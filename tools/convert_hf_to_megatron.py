"""HF model folder -> Megatron checkpoint. See megatron_prime/checkpoint/convert.py."""

if __name__ == "__main__":
    # Imported here, not at the top: Megatron's checkpoint writer starts a helper process with
    # the "spawn" method, which re-imports this file; keeping it light saves seconds.
    from megatron_prime.checkpoint.convert import hf_to_megatron_main

    hf_to_megatron_main()
