"""The implicit PRM's reference is the PRM's starting checkpoint unless set otherwise, so with
``model.prm_path`` != ``model.path`` the implicit process rewards are exactly 0 before the
first PRM update (PRIME's definition); ``model.reference_path`` overrides it. The PRM may be a
smaller model that shares the policy's tokenizer; the reference then has its shape."""

from __future__ import annotations

import pytest
from launch import run_json_worker


def weight_matrices(names: list[str]) -> list[str]:
    return [name for name in names if "norm" not in name and not name.endswith("bias")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("prm_reference")
    return run_json_worker("tests/workers/prm_reference_worker.py", 1, ["--root", str(root)],
                           root / "result.json", timeout=400)


def test_reference_defaults_to_the_prm_start(results):
    default = results["default"]
    assert len(default["parameter_names"]) == 17  # 2 layers x 7 + embedding, final norm, output
    assert default["reference_vs_prm"] == []
    # The two starting checkpoints really differ: every weight matrix (transformers starts
    # norms at ones and the q/k/v biases at zeros whatever the seed).
    matrices = weight_matrices(default["parameter_names"])
    assert len(matrices) == 10
    assert default["reference_vs_policy"] == matrices
    assert default["policy_vs_prm"] == matrices
    assert default["response_tokens"] == 28
    assert default["max_abs_reward"] == 0.0


def test_reference_path_overrides_it(results):
    explicit = results["reference_path=sft"]
    matrices = weight_matrices(explicit["parameter_names"])
    assert explicit["reference_vs_policy"] == []
    assert explicit["reference_vs_prm"] == matrices
    assert explicit["max_abs_reward"] > 1e-3  # the PRM and the SFT model disagree


def toy_size(hidden: int, layers: int, ffn: int, vocab: int, heads: int = 4, kv_heads: int = 2) -> int:
    """Parameters of a toy Qwen2 (QKV bias, untied output): a hand count."""
    head_dim = hidden // heads
    attention = hidden * heads * head_dim + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim) \
        + heads * head_dim + heads * head_dim * hidden
    layer = attention + 3 * hidden * ffn + 2 * hidden
    return 2 * vocab * hidden + layers * layer + hidden


def test_a_smaller_prm_sharing_the_tokenizer(results):
    small = results["small_prm"]
    vocab = small["sizes"]["policy"] - toy_size(64, 2, 128, 0)
    assert vocab % 128 == 0  # 2 x padded vocab x hidden 64
    padded_vocab = vocab // 128
    assert small["sizes"]["policy"] == toy_size(64, 2, 128, padded_vocab)
    assert small["sizes"]["prm"] == small["sizes"]["reference"] == toy_size(32, 1, 64, padded_vocab)
    assert small["reference_vs_prm"] == []
    assert small["max_abs_reward"] == 0.0  # the reference is the small PRM's start


def test_prm_checkpoints_that_cannot_score_the_policy_are_refused(results):
    assert "model.prm_path=" in results["other_tokenizer"]
    assert "tokenizer is not the policy's" in results["other_tokenizer"]
    assert "'<step>'" in results["other_tokenizer"]
    assert "max_position_embeddings=64" in results["short_positions"]
    assert "rollout.engine.max_model_len=96" in results["short_positions"]
    assert "model.reference_path=" in results["reference_of_policy_shape"]
    assert "the PRM's architecture and size" in results["reference_of_policy_shape"]
