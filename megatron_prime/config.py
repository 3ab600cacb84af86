"""Typed configuration for megatron_prime.

Each component owns a dataclass; ``validate()`` raises ``ValueError`` naming the key, the
bad value and what is allowed, so a wrong YAML value fails before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: expected {allowed}")


def require_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    _require(value in choices, key, value, f"one of {list(choices)}")


def require_positive_int(key: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             key, value, "an integer >= 1")


@dataclass
class ParallelConfig:
    """How each model is split: TP inside a node, PP across nodes, DP is what is left."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    # Interleaved 1F1B: model chunks per pipeline stage (None = plain 1F1B).
    virtual_pipeline_parallel_size: int | None = None
    # Shards LayerNorm/dropout activations over TP ranks; needs TP > 1.
    sequence_parallel: bool = False

    def validate(self) -> None:
        require_positive_int("parallel.tensor_parallel_size", self.tensor_parallel_size)
        require_positive_int("parallel.pipeline_parallel_size", self.pipeline_parallel_size)
        require_positive_int("parallel.context_parallel_size", self.context_parallel_size)
        if self.virtual_pipeline_parallel_size is not None:
            require_positive_int(
                "parallel.virtual_pipeline_parallel_size", self.virtual_pipeline_parallel_size
            )
            _require(self.pipeline_parallel_size > 1, "parallel.virtual_pipeline_parallel_size",
                     self.virtual_pipeline_parallel_size,
                     "None unless parallel.pipeline_parallel_size > 1")
        if self.sequence_parallel:
            _require(self.tensor_parallel_size > 1, "parallel.sequence_parallel", True,
                     "False unless parallel.tensor_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size


@dataclass
class PrecisionConfig:
    """Numerics. On CPU everything runs in float32 and FP8 must be off."""

    # "auto": bf16 on GPU, float32 on CPU.
    dtype: str = "auto"
    # FP8 through Transformer Engine (GPU only): off, delayed scaling or current scaling.
    fp8_recipe: str = "off"
    # "hybrid": e4m3 forward, e5m2 backward; "e4m3": e4m3 both ways.
    fp8_format: str = "hybrid"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"

    def validate(self) -> None:
        require_choice("precision.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        require_choice("precision.fp8_recipe", self.fp8_recipe, ("off", "delayed", "current"))
        require_choice("precision.fp8_format", self.fp8_format, ("hybrid", "e4m3"))
        require_positive_int("precision.fp8_amax_history_len", self.fp8_amax_history_len)
        require_choice("precision.fp8_amax_compute_algo", self.fp8_amax_compute_algo,
                       ("max", "most_recent"))


@dataclass
class OptimizerConfig:
    """Adam via Megatron's optimizer; defaults are PRIME's policy settings (PRIME.md)."""

    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Global grad-norm clip; 0 disables clipping (the norm is still reported).
    clip_grad: float = 1.0
    # Shards optimizer state (and the fp32 master weights) across data-parallel ranks.
    use_distributed_optimizer: bool = False

    def validate(self, prefix: str = "optimizer") -> None:
        _require(self.lr > 0, f"{prefix}.lr", self.lr, "a float > 0")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, ">= 0")
        _require(0 <= self.adam_beta1 < 1, f"{prefix}.adam_beta1", self.adam_beta1, "in [0, 1)")
        _require(0 <= self.adam_beta2 < 1, f"{prefix}.adam_beta2", self.adam_beta2, "in [0, 1)")
        _require(self.adam_eps > 0, f"{prefix}.adam_eps", self.adam_eps, "a float > 0")
        _require(self.clip_grad >= 0, f"{prefix}.clip_grad", self.clip_grad, ">= 0 (0 = off)")
