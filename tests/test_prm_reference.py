"""The implicit PRM's reference is the PRM's starting checkpoint unless set otherwise, so with
``model.prm_path`` != ``model.path`` the implicit process rewards are exactly 0 before the
first PRM update (PRIME's definition); ``model.reference_path`` overrides it."""

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
