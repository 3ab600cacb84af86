"""Bad layouts, unknown architectures and bad config values are refused with clear errors."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config

from megatron_prime.config import OptimizerConfig, ParallelConfig, PrecisionConfig
from megatron_prime.distributed import (
    expand_slurm_nodelist,
    init_distributed,
    read_launch_env,
    validate_layout,
)
from megatron_prime.models.architectures import ModelShape, padded_vocab_size, transformer_config


def qwen2(**overrides) -> Qwen2Config:
    fields = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"])
    fields.update(overrides)
    return Qwen2Config(**fields)


def test_unknown_architecture_names_the_field_and_the_supported_ones():
    config = qwen2(architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match=r"'architectures'=\['GPTNeoXForCausalLM'\].*"
                                         r"LlamaForCausalLM.*Qwen2ForCausalLM"):
        ModelShape.from_hf(config)


@pytest.mark.parametrize("parallel, field, value, divisor", [
    (ParallelConfig(tensor_parallel_size=3), "num_attention_heads", 4, 3),
    (ParallelConfig(tensor_parallel_size=4), "num_key_value_heads", 2, 4),
    (ParallelConfig(pipeline_parallel_size=3), "num_hidden_layers", 4, 3),
    (ParallelConfig(pipeline_parallel_size=2, virtual_pipeline_parallel_size=4),
     "num_hidden_layers", 4, 8),
])
def test_layout_that_does_not_divide_the_model_is_refused(parallel, field, value, divisor):
    shape = ModelShape.from_hf(qwen2())
    with pytest.raises(ValueError, match=rf"{field}={value} is not divisible by .*={divisor}"):
        shape.check_layout(parallel)


def test_world_size_must_be_a_multiple_of_model_parallel_size():
    with pytest.raises(ValueError, match=r"world size 6 is not a multiple .* = 4"):
        validate_layout(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2), 6)
    # Refused before any process group or CPU patch exists.
    with pytest.raises(ValueError, match=r"world size 3"):
        init_distributed(ParallelConfig(tensor_parallel_size=2),
                         environ={"RANK": "0", "WORLD_SIZE": "3"})


@pytest.mark.parametrize("config, key", [
    (ParallelConfig(tensor_parallel_size=0), "parallel.tensor_parallel_size=0"),
    (ParallelConfig(sequence_parallel=True), "parallel.sequence_parallel=True"),
    (ParallelConfig(virtual_pipeline_parallel_size=2), "parallel.virtual_pipeline_parallel_size=2"),
    (PrecisionConfig(fp8_recipe="fast"), "precision.fp8_recipe='fast'"),
    (PrecisionConfig(dtype="fp64"), "precision.dtype='fp64'"),
    (OptimizerConfig(lr=-1.0), "optimizer.lr=-1.0"),
    (OptimizerConfig(clip_grad=-1.0), "optimizer.clip_grad=-1.0"),
])
def test_bad_config_values_name_key_and_value(config, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
        config.validate()


def test_fp8_is_refused_on_cpu():
    shape = ModelShape.from_hf(qwen2())
    with pytest.raises(ValueError, match="fp8_recipe='delayed' needs a GPU"):
        transformer_config(shape, ParallelConfig(), PrecisionConfig(fp8_recipe="delayed"), on_gpu=False)


def test_fp8_recipes_map_to_megatron_names():
    shape = ModelShape.from_hf(qwen2())
    # Constructing a TransformerConfig with fp8 does not need CUDA; the names must be Megatron's.
    current = transformer_config(shape, ParallelConfig(), PrecisionConfig(fp8_recipe="current",
                                 fp8_format="e4m3"), on_gpu=True)
    assert (current.fp8, current.fp8_recipe, current.bf16) == ("e4m3", "tensorwise", True)
    delayed = transformer_config(shape, ParallelConfig(), PrecisionConfig(fp8_recipe="delayed"),
                                 on_gpu=True)
    assert (delayed.fp8, delayed.fp8_recipe) == ("hybrid", "delayed")


def test_hf_fields_reach_megatron_config():
    llama = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=True,
                        architectures=["LlamaForCausalLM"])
    shape = ModelShape.from_hf(llama)
    assert (shape.add_qkv_bias, shape.tie_word_embeddings, shape.rope_theta, shape.rms_norm_eps,
            shape.num_query_groups, shape.head_dim) == (False, True, 500000.0, 1e-5, 1, 16)
    config = transformer_config(shape, ParallelConfig(), PrecisionConfig(), on_gpu=False)
    assert (config.num_query_groups, config.kv_channels, config.layernorm_epsilon) == (1, 16, 1e-5)
    assert config.params_dtype.is_floating_point and config.use_cpu_initialization
    assert ModelShape.from_hf(qwen2()).add_qkv_bias is True
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelShape.from_hf(qwen2(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_vocab_padding_is_a_multiple_of_128_times_tp():
    assert padded_vocab_size(300, 1) == 384
    assert padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(151936, 4) == 152064  # Qwen2.5-7B: 151936 -> 297 x 512


def test_launch_env_from_torchrun_and_slurm():
    torchrun = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr,
            torchrun.master_port, torchrun.launcher) == (3, 8, 1, "node7", 1234, "torchrun")
    slurm = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu[007-008,010],login", "SLURM_JOB_ID": "123"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr,
            slurm.master_port, slurm.launcher) == (9, 16, 1, "gpu007", 20123, "slurm")
    assert read_launch_env({}).launcher == "single"


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("gpu[001-003,007],login") == [
        "gpu001", "gpu002", "gpu003", "gpu007", "login"]
    assert expand_slurm_nodelist("a1,b[2-3]") == ["a1", "b2", "b3"]
    with pytest.raises(ValueError, match="names no host"):
        expand_slurm_nodelist("")
