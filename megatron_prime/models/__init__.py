"""Megatron models for PRIME: architecture registry, builders, vocab-parallel log-probs, schedules."""
