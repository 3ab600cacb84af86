"""Checkpoints move between Megatron's local layer spec (CPU) and its Transformer Engine spec
(GPU): names on disk are TE's whatever spec saved them, TE-only state (_extra_state) is
skipped or tolerated, and a tensor with no counterpart is refused by name.

TE is not installed here: the TE-spec names are written out by hand from Megatron-core 0.16's
get_gpt_layer_with_transformer_engine_spec (linear_qkv and linear_fc1 are
TELayerNormColumnParallelLinear holding the norm as ``layer_norm_weight``; the layer's own
input_layernorm / pre_mlp_layernorm are IdentityOp; linear_proj, linear_fc2 and core_attention
are TE modules carrying ``_extra_state``; the output layer stays Megatron's
ColumnParallelLinear, which carries an empty ``_extra_state`` in both specs).
"""

from __future__ import annotations

import pytest
import torch
from launch import run_json_worker
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_prime.checkpoint.hf_mapping import resolve
from megatron_prime.checkpoint.spec_names import (
    canonical_sharded_state_dict,
    check_key_naming,
    local_name,
    te_name,
)


def te_layer_keys(layer: int, qkv_bias: bool) -> list[str]:
    p = f"decoder.layers.{layer}."
    return [p + "self_attention.linear_qkv.layer_norm_weight",
            p + "self_attention.linear_qkv.weight",
            *([p + "self_attention.linear_qkv.bias"] if qkv_bias else []),
            p + "self_attention.linear_qkv._extra_state",
            p + "self_attention.core_attention._extra_state",
            p + "self_attention.linear_proj.weight",
            p + "self_attention.linear_proj._extra_state",
            p + "mlp.linear_fc1.layer_norm_weight",
            p + "mlp.linear_fc1.weight",
            p + "mlp.linear_fc1._extra_state",
            p + "mlp.linear_fc2.weight",
            p + "mlp.linear_fc2._extra_state"]


# The module state dict of a 2-layer TE-spec GPTModel.
TE_KEYS = {
    # Qwen2: QKV bias, untied output layer.
    "qwen2": sorted(["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                     "output_layer.weight", "output_layer._extra_state",
                     *te_layer_keys(0, True), *te_layer_keys(1, True)]),
    # Llama: no bias, output layer tied to the embedding (no weight of its own).
    "llama": sorted(["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                     "output_layer._extra_state",
                     *te_layer_keys(0, False), *te_layer_keys(1, False)]),
}

# The local spec's module names that differ.
LOCAL_ONLY = ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
              "decoder.layers.1.input_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight"]


def disk_keys(qkv_bias: bool, untied: bool) -> list[str]:
    """What a save writes (layers stacked; ShardedObjects one per layer)."""
    layers = "decoder.layers."
    objects = [f"{layers}{m}._extra_state/shard_{i}_2" for m in
               ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                "mlp.linear_fc2") for i in (0, 1)]
    return sorted(["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                   *(["output_layer.weight"] if untied else []),
                   layers + "self_attention.linear_qkv.layer_norm_weight",
                   layers + "self_attention.linear_qkv.weight",
                   *([layers + "self_attention.linear_qkv.bias"] if qkv_bias else []),
                   layers + "self_attention.linear_proj.weight",
                   layers + "mlp.linear_fc1.layer_norm_weight",
                   layers + "mlp.linear_fc1.weight",
                   layers + "mlp.linear_fc2.weight", *objects])


def test_names_translate_both_ways():
    assert te_name("decoder.layers.7.input_layernorm.weight") == \
        "decoder.layers.7.self_attention.linear_qkv.layer_norm_weight"
    assert te_name("decoder.layers.7.pre_mlp_layernorm.bias") == \
        "decoder.layers.7.mlp.linear_fc1.layer_norm_bias"
    # Dist-checkpoint keys (stacked layers, no index) translate too.
    assert te_name("decoder.layers.input_layernorm.weight") == \
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert local_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    for same in ("decoder.layers.0.mlp.linear_fc1.weight", "decoder.final_layernorm.weight",
                 "embedding.word_embeddings.weight", "output_layer.weight"):
        assert te_name(same) == same and local_name(same) == same


def test_canonical_sharded_state_dict_renames_local_keys():
    """A spec that saved under its own module names would be written in TE names."""
    norm = ShardedTensor.from_rank_offsets("decoder.layers.input_layernorm.weight", torch.ones(4))
    fc1 = ShardedTensor.from_rank_offsets("decoder.layers.mlp.linear_fc1.weight", torch.ones(2, 4))
    state = canonical_sharded_state_dict({"model": {"a": norm, "b": [fc1]}})
    assert state["model"]["a"].key == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert state["model"]["b"][0].key == "decoder.layers.mlp.linear_fc1.weight"


def test_hf_mapping_resolves_both_specs_alike():
    from workers.parity_worker import make_hf_model

    from megatron_prime.models.architectures import ModelShape

    shape = ModelShape.from_hf(make_hf_model("qwen2")[0])
    for local, hf in (("decoder.layers.1.input_layernorm.weight", "model.layers.1.input_layernorm.weight"),
                      ("decoder.layers.1.pre_mlp_layernorm.weight",
                       "model.layers.1.post_attention_layernorm.weight")):
        assert resolve(local, shape).hf_names == (hf,)
        assert resolve(te_name(local), shape).hf_names == (hf,)
        assert resolve(local, shape).megatron_name == local  # the model's own name is kept


def test_unknown_key_naming_is_refused(tmp_path):
    check_key_naming(tmp_path, None)  # saved before the field existed: Megatron's TE names
    check_key_naming(tmp_path, "transformer_engine")
    with pytest.raises(ValueError, match=r"key_naming='local' is not supported: expected "
                                         r"'transformer_engine'"):
        check_key_naming(tmp_path, "local")


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_names")
    return run_json_worker("tests/workers/spec_names_worker.py", 1, ["--root", str(root)],
                           root / "result.json", timeout=300)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_te_spec_keys_of_a_local_model(arch, worker_results):
    result = worker_results[arch]
    assert result["layer_spec"] == "local"
    assert result["te_keys"] == TE_KEYS[arch]
    # The local model has exactly the TE keys, less the fused norms' names and the attention
    # kernel's TE state, plus its standalone norms.
    te_only = [k for k in TE_KEYS[arch] if "layer_norm_weight" in k or "core_attention" in k]
    assert sorted(result["local_keys"]) == sorted(
        set(TE_KEYS[arch]) - set(te_only) | set(LOCAL_ONLY))


@pytest.mark.parametrize("arch,qkv_bias,untied", [("qwen2", True, True), ("llama", False, False)])
def test_local_spec_saves_te_names(arch, qkv_bias, untied, worker_results):
    result = worker_results[arch]
    assert result["disk_keys"] == disk_keys(qkv_bias, untied)
    assert result["manifest"]["key_naming"] == "transformer_engine"
    assert result["manifest"]["layer_spec"] == "local"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("case", ["plain", "te_extra", "no_extra"])
def test_checkpoints_of_either_spec_load_into_local(arch, case, worker_results):
    outcome = worker_results[arch]["loads"][case]
    assert "error" not in outcome, outcome.get("error")
    # The fresh model differed in every tensor (norms included) and now equals the saved one.
    weights = sorted(k for k in worker_results[arch]["local_keys"] if not k.endswith("_extra_state"))
    assert outcome["differed_before"] == weights
    assert outcome["loaded"] == weights
    assert outcome["mismatched"] == []


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_load_refuses_a_tensor_without_counterpart(arch, worker_results):
    error = worker_results[arch]["loads"]["unknown_key"]["error"]
    assert error.endswith(f"{arch}_unknown_key/model: checkpoint tensor(s) "
                          "['decoder.layers.self_attention.linear_qkv.layer_norm_bias'] (1 in all) "
                          "have no counterpart in this model (a different architecture or "
                          "normalization?): expected only names of this model's parameters and "
                          "_extra_state")
    missing = worker_results[arch]["loads"]["lacks_weight"]["error"]
    assert missing.endswith(f"{arch}_lacks_weight/model: the checkpoint lacks "
                            "['decoder.final_layernorm.weight'] (1 in all) that this model needs")
