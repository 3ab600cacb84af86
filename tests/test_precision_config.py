"""How PrecisionConfig / ParallelConfig reach Megatron's TransformerConfig per model role:
FP8 only for precision.fp8_roles, the Transformer Engine spec only where TE imports, and
activation recompute as Megatron's granularity/method/layer count."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from megatron_prime.config import ParallelConfig, PrecisionConfig
from megatron_prime.models.architectures import ModelShape, layer_spec, transformer_config

SHAPE = ModelShape.from_hf(Qwen2Config(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"]))


def test_fp8_runs_only_for_the_listed_roles():
    precision = PrecisionConfig(fp8_recipe="delayed", fp8_roles=["prm", "reference"])
    configs = {role: transformer_config(SHAPE, ParallelConfig(), precision, on_gpu=True, role=role)
               for role in ("policy", "prm", "reference")}
    assert configs["policy"].fp8 is None  # the policy trains in bf16
    for role in ("prm", "reference"):
        assert configs[role].fp8 == "hybrid" and configs[role].fp8_recipe == "delayed"
        assert configs[role].fp8_amax_history_len == 1024
    current = transformer_config(SHAPE, ParallelConfig(), PrecisionConfig(fp8_recipe="current"),
                                 on_gpu=True, role="policy")
    assert current.fp8_recipe == "tensorwise"  # Megatron's name for per-tensor current scaling
    assert all(c.bf16 for c in configs.values())


def test_fp8_is_refused_on_cpu_and_with_bad_roles():
    with pytest.raises(ValueError, match="precision.fp8_recipe='delayed' needs a GPU"):
        transformer_config(SHAPE, ParallelConfig(), PrecisionConfig(fp8_recipe="delayed"), on_gpu=False)
    with pytest.raises(ValueError, match=r"precision.fp8_roles=\['critic'\] is invalid"):
        PrecisionConfig(fp8_roles=["critic"]).validate()


def test_without_transformer_engine_the_gpu_runs_the_local_spec_unless_fp8_is_asked():
    from megatron_prime.models.architectures import uses_transformer_engine

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        assert not uses_transformer_engine(PrecisionConfig(), on_gpu=True)
        fp8 = PrecisionConfig(fp8_recipe="delayed")
        assert uses_transformer_engine(fp8, on_gpu=True)
        config = transformer_config(SHAPE, ParallelConfig(), fp8, on_gpu=True)
        with pytest.raises(ValueError, match="FP8 needs Transformer Engine.*precision.fp8_recipe=off"):
            layer_spec(config, use_transformer_engine=True)
    else:
        assert uses_transformer_engine(PrecisionConfig(), on_gpu=True)
    assert not uses_transformer_engine(PrecisionConfig(layer_spec="local"), on_gpu=True)
    assert not uses_transformer_engine(PrecisionConfig(), on_gpu=False)
    local = transformer_config(SHAPE, ParallelConfig(), PrecisionConfig(layer_spec="local"), on_gpu=True)
    assert local.masked_softmax_fusion is False and local.persist_layer_norm is False
    # The local spec's core attention: SDPA by default, Megatron's own on request.
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_prime.models.attention import SDPACoreAttention

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention
    assert core(layer_spec(local, False)) is SDPACoreAttention
    assert core(layer_spec(local, False, "unfused")) is DotProductAttention
    with pytest.raises(ValueError, match="precision.local_attention='flash' is invalid"):
        PrecisionConfig(local_attention="flash").validate()


@pytest.mark.parametrize("parallel, expected", [
    (ParallelConfig(), (None, None, None)),
    (ParallelConfig(recompute_granularity="selective"), ("selective", None, None)),
    (ParallelConfig(recompute_granularity="full"), ("full", "uniform", 1)),
    (ParallelConfig(recompute_granularity="full", pipeline_parallel_size=2), ("full", "uniform", 1)),
    (ParallelConfig(recompute_granularity="full", recompute_num_layers=2), ("full", "uniform", 2)),
])
def test_recompute_reaches_megatron(parallel, expected):
    config = transformer_config(SHAPE, parallel, PrecisionConfig(), on_gpu=False)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == expected
