"""Hugging Face config -> Megatron ``TransformerConfig`` + layer spec, per architecture.

One registry entry per supported HF architecture. The GPU path uses the Transformer Engine
layer spec (optionally FP8); the CPU path uses Megatron's local spec in float32. Everything
else (shapes, RoPE, norms, parallel layout) is the same on both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_prime.config import ParallelConfig, PrecisionConfig


@dataclass(frozen=True)
class Architecture:
    """What differs between the decoder-only families we support."""

    hf_architecture: str
    # Qwen2 always has biases on q/k/v; Llama only when ``attention_bias`` says so.
    qkv_bias_default: bool
    qkv_bias_key: str | None


ARCHITECTURES: dict[str, Architecture] = {
    "Qwen2ForCausalLM": Architecture("Qwen2ForCausalLM", qkv_bias_default=True, qkv_bias_key=None),
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", qkv_bias_default=False,
                                     qkv_bias_key="attention_bias"),
}

# Megatron pads the vocabulary so every TP shard of the embedding has the same, GEMM-friendly
# number of rows; the padded rows are masked out of every log-prob (models/logprobs.py).
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _hf_get(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def architecture_of(hf_config: Any) -> Architecture:
    names = _hf_get(hf_config, "architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(
        f"config.json field 'architectures'={list(names)!r} names no supported architecture; "
        f"expected one of {sorted(ARCHITECTURES)}"
    )


@dataclass(frozen=True)
class ModelShape:
    """The HF config fields that Megatron needs, read and checked once."""

    architecture: Architecture
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    add_qkv_bias: bool
    # Llama-3.1 style frequency scaling (factor), or None.
    rope_scaling_factor: float | None
    initializer_range: float

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelShape:
        arch = architecture_of(hf_config)
        hidden = int(_hf_get(hf_config, "hidden_size"))
        heads = int(_hf_get(hf_config, "num_attention_heads"))
        kv_heads = int(_hf_get(hf_config, "num_key_value_heads") or heads)
        head_dim = _hf_get(hf_config, "head_dim") or hidden // heads
        if heads % kv_heads:
            raise ValueError(f"config.json num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        hidden_act = _hf_get(hf_config, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"config.json hidden_act={hidden_act!r} is unsupported; expected 'silu'")
        if _hf_get(hf_config, "use_sliding_window", False):
            raise ValueError("config.json use_sliding_window=True is unsupported; expected False")
        rope_scaling = _hf_get(hf_config, "rope_scaling")
        rope_theta = _hf_get(hf_config, "rope_theta", None)
        # transformers 5 moved rope settings into ``rope_parameters``.
        rope_params = _hf_get(hf_config, "rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10000.0)
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        scaling_factor = None
        rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
        if rope_type not in (None, "default"):
            if rope_type != "llama3":
                raise ValueError(f"config.json rope_scaling type {rope_type!r} is unsupported; "
                                 "expected none or 'llama3'")
            scaling_factor = float(rope_scaling["factor"])
        qkv_bias = arch.qkv_bias_default
        if arch.qkv_bias_key is not None:
            qkv_bias = bool(_hf_get(hf_config, arch.qkv_bias_key, False))
        if arch.hf_architecture == "LlamaForCausalLM" and _hf_get(hf_config, "mlp_bias", False):
            raise ValueError("config.json mlp_bias=True is unsupported; expected False")
        return cls(
            architecture=arch,
            num_layers=int(_hf_get(hf_config, "num_hidden_layers")),
            hidden_size=hidden,
            ffn_hidden_size=int(_hf_get(hf_config, "intermediate_size")),
            num_attention_heads=heads,
            num_query_groups=kv_heads,
            head_dim=int(head_dim),
            vocab_size=int(_hf_get(hf_config, "vocab_size")),
            max_position_embeddings=int(_hf_get(hf_config, "max_position_embeddings", 4096)),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(_hf_get(hf_config, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(_hf_get(hf_config, "tie_word_embeddings", False)),
            add_qkv_bias=qkv_bias,
            rope_scaling_factor=scaling_factor,
            initializer_range=float(_hf_get(hf_config, "initializer_range", 0.02)),
        )

    def check_layout(self, parallel: ParallelConfig) -> None:
        """Refuses a TP/PP layout that cannot split this model evenly."""
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        checks = [
            ("num_attention_heads", self.num_attention_heads, tp, "tensor_parallel_size"),
            ("num_key_value_heads", self.num_query_groups, tp, "tensor_parallel_size"),
            ("intermediate_size", self.ffn_hidden_size, tp, "tensor_parallel_size"),
        ]
        layers_per_split = pp * (parallel.virtual_pipeline_parallel_size or 1)
        checks.append(("num_hidden_layers", self.num_layers, layers_per_split,
                       "pipeline_parallel_size x virtual_pipeline_parallel_size"))
        for field, value, divisor, divisor_name in checks:
            if value % divisor:
                raise ValueError(
                    f"model field {field}={value} is not divisible by parallel.{divisor_name}="
                    f"{divisor}; expected {divisor_name} to divide {value} "
                    f"(e.g. one of {[d for d in range(1, value + 1) if value % d == 0][:8]})"
                )


def params_dtype(precision: PrecisionConfig, on_gpu: bool) -> torch.dtype:
    if precision.dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, precision.dtype)


def transformer_config(
    shape: ModelShape,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    on_gpu: bool,
    initialize_weights: bool = True,
    role: str = "policy",
) -> TransformerConfig:
    """The one adapter from our configs into Megatron's ``TransformerConfig``. ``role``
    decides whether this model runs FP8 (``precision.fp8_roles``)."""
    precision.validate()
    shape.check_layout(parallel)
    dtype = params_dtype(precision, on_gpu)
    if precision.fp8_recipe != "off" and not on_gpu:
        raise ValueError(f"precision.fp8_recipe={precision.fp8_recipe!r} needs a GPU with "
                         "Transformer Engine; expected 'off' on CPU")
    fp8_kwargs: dict[str, Any] = {}
    if precision.fp8_recipe != "off" and role in precision.fp8_roles:
        fp8_kwargs = dict(
            fp8=precision.fp8_format,
            # Megatron calls per-tensor current scaling "tensorwise".
            fp8_recipe={"delayed": "delayed", "current": "tensorwise"}[precision.fp8_recipe],
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=shape.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.initializer_range,
        # Skipped when weights are loaded right after (conversion): saves time and the
        # full-size float32 master copy that CPU initialisation makes per tensor.
        perform_initialization=initialize_weights,
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # PRIME losses are token sums; the schedule then divides by the global token count
        # once (finalize_model_grads) instead of per micro-batch.
        calculate_per_token_loss=True,
        # Fused CUDA kernels exist only on GPU; on CPU the unfused reference ops run.
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=on_gpu,
        # The fused softmax and persistent LayerNorm kernels come with TE/apex builds.
        masked_softmax_fusion=uses_transformer_engine(precision, on_gpu),
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=uses_transformer_engine(precision, on_gpu),
        # batch_isend_irecv with a CUDA sync in between is what NCCL wants; gloo does plain p2p.
        batch_p2p_comm=on_gpu,
        **_recompute_kwargs(parallel, shape),
        **fp8_kwargs,
    )


def _recompute_kwargs(parallel: ParallelConfig, shape: ModelShape) -> dict[str, Any]:
    if parallel.recompute_granularity == "none":
        return {}
    if parallel.recompute_granularity == "selective":
        return dict(recompute_granularity="selective")
    # Groups of recompute_num_layers layers keep only each group's input; the backward pass
    # rebuilds one group at a time, so a group as large as the stage would save nothing.
    return dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=parallel.recompute_num_layers or 1)


# Every batch is right-padded to a multiple of this many tokens at least: a few distinct
# shapes (fewer kernel autotunes and allocator sizes) and whole tensor-core tiles in bf16.
SEQUENCE_LENGTH_ALIGNMENT = 8
# Transformer Engine's FP8 GEMMs need both dimensions of each operand divisible by 16.
FP8_SEQUENCE_LENGTH_ALIGNMENT = 16


def sequence_length_multiple(parallel: ParallelConfig, precision: PrecisionConfig,
                             shape_alignment: int = SEQUENCE_LENGTH_ALIGNMENT) -> int:
    """The multiple a batch's sequence length is padded to; the one place this is decided (the
    rollout batch, the SFT batch and the schedule, which pads whatever reaches a model).

    The least common multiple of: ``shape_alignment`` (8 for the rollout's batches: few shapes;
    1 for what a model strictly needs); 16 when any model runs FP8 (the GEMMs' token dimension;
    the rows go through every model, so one FP8 model sets it for the batch); the
    tensor-parallel size under sequence parallelism (Megatron splits the sequence over the TP
    ranks). NeMo-RL's Megatron policy worker pads by the same rules (16 for FP8, TP under
    sequence parallelism).
    """
    multiple = shape_alignment
    if precision.fp8_recipe != "off" and precision.fp8_roles:
        multiple = math.lcm(multiple, FP8_SEQUENCE_LENGTH_ALIGNMENT)
    if parallel.sequence_parallel:
        multiple = math.lcm(multiple, parallel.tensor_parallel_size)
    return multiple


def padded_sequence_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(1, -(-length // multiple)) * multiple


@functools.cache
def transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def uses_transformer_engine(precision: PrecisionConfig, on_gpu: bool) -> bool:
    """Transformer Engine's spec: on GPU with ``layer_spec=auto``, where TE imports or FP8 is
    asked for (only TE has it: ``layer_spec`` then stops with the reason). Otherwise
    Megatron's local spec, with SDPA attention by default (models/attention.py)."""
    if not on_gpu or precision.layer_spec != "auto":
        return False
    return transformer_engine_importable() or precision.fp8_recipe != "off"


def layer_spec(config: TransformerConfig, use_transformer_engine: bool,
               local_attention: str = "sdpa") -> ModuleSpec:
    """TE's spec, or Megatron's local spec whose core attention is ``local_attention``:
    "sdpa" (torch's fused kernel, models/attention.py) or "unfused" (Megatron's own)."""
    if use_transformer_engine:
        if not transformer_engine_importable():
            raise ValueError("FP8 needs Transformer Engine, which is not importable on this GPU "
                             "machine: install the [gpu] extra, or set precision.fp8_recipe=off "
                             "(Megatron's local layers with SDPA attention then run)")
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
    if local_attention == "sdpa":
        from megatron_prime.models.attention import SDPACoreAttention

        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    elif local_attention != "unfused":
        raise ValueError(f"precision.local_attention={local_attention!r} is invalid: expected "
                         "'sdpa' or 'unfused'")
    return spec
