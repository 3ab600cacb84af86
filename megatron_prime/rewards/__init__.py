"""Outcome rewards: math answer checking, sandboxed code tests, and routing between them."""

from megatron_prime.rewards.code_verifier import (
    CodeVerifier,
    CodeVerifierConfig,
    CodeTestCases,
    extract_last_python_block,
    stdout_matches,
)
from megatron_prime.rewards.math_verifier import MathVerifier, MathVerifierConfig, extract_last_boxed
from megatron_prime.rewards.registry import RewardRegistry, RewardsConfig, ScoringFailure, reward_kind
from megatron_prime.rewards.sandbox import (
    RunResult,
    RunStatus,
    SandboxConfig,
    SandboxUnavailable,
    check_sandbox_available,
    run_python,
)

__all__ = [
    "CodeVerifier",
    "CodeVerifierConfig",
    "MathVerifier",
    "MathVerifierConfig",
    "RewardRegistry",
    "RewardsConfig",
    "ScoringFailure",
    "RunResult",
    "RunStatus",
    "SandboxConfig",
    "SandboxUnavailable",
    "CodeTestCases",
    "check_sandbox_available",
    "extract_last_boxed",
    "extract_last_python_block",
    "reward_kind",
    "run_python",
    "stdout_matches",
]
