"""megatron_prime: PRIME on Megatron-core."""
