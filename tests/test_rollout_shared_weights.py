"""``rollout.weight_sync=shared``: where each HF tensor lands in the engine's parameters.

The layout vLLM reports (its parameter names, shapes and byte offsets, and its fused-module
table) is written out by hand here for a tiny Qwen2, as vLLM 0.32 builds it: q/k/v stacked
into ``qkv_proj`` rows, gate/up into ``gate_up_proj``, vocabulary padded to 64 rows. The
real engine is exercised in test_rollout_bridge.py (log-probs equal Megatron's).
"""

from __future__ import annotations

import mmap
import os
import secrets

import pytest
import torch

from megatron_prime.checkpoint.hf_mapping import expected_hf_shapes
from megatron_prime.models.architectures import ModelShape
from megatron_prime.rollout.engine import RolloutConfig, RolloutEngine, SharedParameters

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
HF_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8,
             "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 10, "max_position_embeddings": 32,
             "tie_word_embeddings": False, "hidden_act": "silu"}


def vllm_entries(drop: str = "", wrong: str = "") -> list[tuple[str, str, list[int], int]]:
    """vLLM's parameters of the tiny model (hidden 8, head size 4, 1 KV head, FFN 12)."""
    shapes = {
        "model.embed_tokens.weight": [64, 8],
        "model.layers.0.self_attn.qkv_proj.weight": [16, 8],  # q 8 rows, k 4, v 4
        "model.layers.0.self_attn.qkv_proj.bias": [16],
        "model.layers.0.self_attn.o_proj.weight": [8, 8],
        "model.layers.0.mlp.gate_up_proj.weight": [24, 8],
        "model.layers.0.mlp.down_proj.weight": [8, 12],
        "model.layers.0.input_layernorm.weight": [8],
        "model.layers.0.post_attention_layernorm.weight": [8],
        "model.norm.weight": [8],
        "lm_head.weight": [64, 8],
    }
    if wrong:
        shapes[wrong] = [shapes[wrong][0], 7]
    entries, offset = [], 0
    for name, shape in shapes.items():
        if name == drop:
            continue
        offset = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        entries.append((name, "float32", shape, offset))
        numel = 1
        for dim in shape:
            numel *= dim
        offset += 4 * numel
    return entries


def shape() -> ModelShape:
    return ModelShape.from_hf(HF_CONFIG)


def test_each_hf_tensor_lands_in_its_rows_of_the_fused_vllm_parameter():
    targets = SharedParameters._place(vllm_entries(), PACKED, expected_hf_shapes(shape()))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert targets["model.layers.0.self_attn.q_proj.weight"][0] == qkv
    assert [targets[f"model.layers.0.self_attn.{p}_proj.weight"][4] for p in "qkv"] == [0, 8, 12]
    assert [targets[f"model.layers.0.self_attn.{p}_proj.bias"][4] for p in "qkv"] == [0, 8, 12]
    assert [targets[f"model.layers.0.mlp.{p}_proj.weight"][4] for p in ("gate", "up")] == [0, 12]
    assert targets["lm_head.weight"][0] == "lm_head.weight"
    assert targets["lm_head.weight"][4] == 0  # the vocabulary's 10 rows, then vLLM's padding
    assert len(targets) == len(expected_hf_shapes(shape()))


def test_writes_fill_the_engine_file_as_vllm_stacks_them(tmp_path):
    entries = vllm_entries()
    size = entries[-1][3] + 64 * 8 * 4
    path = f"/dev/shm/megatron_prime_test_{secrets.token_hex(4)}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, size)
    engine_side = mmap.mmap(fd, size)  # what the engine process keeps mapped
    os.close(fd)
    shared = SharedParameters(path, size, entries, PACKED, shape())
    assert not os.path.exists(path)  # unlinked once mapped: nothing left behind on a crash

    torch.manual_seed(0)
    hf = {name: torch.randn(dims) for name, dims in expected_hf_shapes(shape()).items()}
    for name, tensor in hf.items():
        shared.write(name, tensor.t().contiguous().t() if tensor.dim() == 2 else tensor)

    def engine_param(name: str) -> torch.Tensor:
        _, _, dims, offset = next(e for e in entries if e[0] == name)
        numel = 1
        for dim in dims:
            numel *= dim
        return torch.frombuffer(engine_side, dtype=torch.float32, count=numel, offset=offset).view(dims)

    prefix = "model.layers.0."
    expected_qkv = torch.cat([hf[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(engine_param(prefix + "self_attn.qkv_proj.weight"), expected_qkv)
    expected_bias = torch.cat([hf[prefix + f"self_attn.{p}_proj.bias"] for p in "qkv"])
    assert torch.equal(engine_param(prefix + "self_attn.qkv_proj.bias"), expected_bias)
    expected_fc1 = torch.cat([hf[prefix + "mlp.gate_proj.weight"], hf[prefix + "mlp.up_proj.weight"]])
    assert torch.equal(engine_param(prefix + "mlp.gate_up_proj.weight"), expected_fc1)
    assert torch.equal(engine_param("lm_head.weight")[:10], hf["lm_head.weight"])
    assert torch.equal(engine_param("lm_head.weight")[10:], torch.zeros(54, 8))  # padding untouched
    assert torch.equal(engine_param("model.norm.weight"), hf["model.norm.weight"])
    with pytest.raises(KeyError, match="no vLLM parameter holds HF tensor 'model.extra.weight'"):
        shared.write("model.extra.weight", torch.zeros(1))
    shared.close()
    engine_side.close()


def test_a_layout_the_trainer_cannot_fill_is_refused_by_name():
    hf_shapes = expected_hf_shapes(shape())
    with pytest.raises(ValueError, match="HF tensor 'model.layers.0.mlp.down_proj.weight': the "
                                         "vLLM engine has no parameter 'model.layers.0.mlp.down_proj.weight'"):
        SharedParameters._place(vllm_entries(drop="model.layers.0.mlp.down_proj.weight"), PACKED, hf_shapes)
    with pytest.raises(ValueError, match=r"HF tensor 'model.layers.0.self_attn.o_proj.weight' \(8, 8\) "
                                         r"does not fit rows 0.. of vLLM parameter"):
        SharedParameters._place(vllm_entries(wrong="model.layers.0.self_attn.o_proj.weight"), PACKED, hf_shapes)
    # Without the fused-module table q/k/v have nowhere to go.
    with pytest.raises(ValueError, match="q_proj.weight': the vLLM engine has no parameter"):
        SharedParameters._place(vllm_entries(), {}, hf_shapes)
    # A fused parameter with rows nobody writes (e.g. a third part the trainer lacks).
    entries = [(n, d, [36, 8] if n.endswith("gate_up_proj.weight") else s, o)
               for n, d, s, o in vllm_entries()]
    with pytest.raises(ValueError, match="'model.layers.0.mlp.gate_up_proj.weight' \\(36, 8\\): "
                                         "the HF tensors cover 24 of its 36 rows"):
        SharedParameters._place(entries, PACKED, hf_shapes)


def test_shared_weight_sync_config_errors(tmp_path):
    with pytest.raises(ValueError, match="rollout.weight_sync='copy' is invalid"):
        RolloutConfig(weight_sync="copy").validate()
    with pytest.raises(ValueError, match="weight_sync=shared needs rollout.tensor_parallel_size=1 "
                                         r"\(got 2\)"):
        RolloutConfig(weight_sync="shared", tensor_parallel_size=2).validate()
    import json

    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "hidden_size": 128}))
    with pytest.raises(ValueError, match="weight_sync=shared is for the CPU engine"):
        RolloutEngine(tmp_path, RolloutConfig(weight_sync="shared"), on_gpu=True)


def test_sampler_logprobs_sit_at_their_response_tokens():
    """The trainer's rollout/logprob_diff_* compares these with its own log-probs, which sit
    at the response token positions (log p(token t | tokens before t))."""
    from megatron_prime.rollout.collect import ScoredGroup, _to_token_batch

    groups = [ScoredGroup([5, 6], [[7, 8, 9], [10]], [1.0, 0.0], [[-0.5, -1.5, -2.5], [-3.0]]),
              ScoredGroup([11], [[12, 13], []], [0.0, 1.0], [[-0.25, -0.75], []])]
    batch, scores = _to_token_batch(groups, pad_token_id=0)
    assert batch.input_ids.shape == (4, 8) and scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    sampler = batch.extras["rollout_logprobs"]
    assert sampler[0, :6].tolist() == [0, 0, -0.5, -1.5, -2.5, 0]
    assert sampler[1, :4].tolist() == [0, 0, -3.0, 0]
    assert sampler[2, :4].tolist() == [0, -0.25, -0.75, 0]
    assert sampler[3].abs().sum() == 0
    assert torch.equal(sampler != 0, batch.response_mask.bool())
    # Groups without the sampler's log-probs (e.g. built by hand) carry no such extra.
    plain, _ = _to_token_batch([ScoredGroup([5], [[6]], [1.0])], pad_token_id=0)
    assert "rollout_logprobs" not in plain.extras
