"""Rollouts: the vLLM engine wrapper and the Megatron -> vLLM weight bridge."""
