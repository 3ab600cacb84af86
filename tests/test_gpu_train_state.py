"""Resuming on a GPU continues bit for bit: 2 steps with a checkpoint after each, then a
fresh process loads the step-1 checkpoint and takes step 2; its bf16 weights, fp32 Adam state
and losses equal the uninterrupted run's exactly (tests/workers/gpu_train_state_worker.py).

The CPU case runs the same worker in float32 (also covered, at TP2/DP2, by
tests/test_train_state.py); it keeps this worker honest on machines without a GPU.
"""

from __future__ import annotations

import pytest
from launch import run_json_worker

WORKER = "tests/workers/gpu_train_state_worker.py"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu),
                                    pytest.param("cpu", marks=pytest.mark.slow)])
def test_resume_from_step_1_in_a_fresh_process_is_bit_exact(device, tmp_path, keep_result):
    common = ["--device", device, "--root", str(tmp_path / "checkpoints"),
              "--snapshot", str(tmp_path / "step2_state.pt")]
    trained = run_json_worker(WORKER, 1, ["train", *common], tmp_path / "train.json")
    resumed = run_json_worker(WORKER, 1, ["resume", *common], tmp_path / "resume.json")
    keep_result("train", trained)
    keep_result("resume", resumed)

    dtype = "torch.bfloat16" if device == "cuda" else "torch.float32"
    assert trained["param_dtype"] == resumed["param_dtype"] == dtype
    assert resumed["device"].startswith(device)
    first, second = trained["losses"]
    assert first != second  # step 2 trained on a new batch with moved weights
    assert resumed["loaded_step"] == 1
    assert resumed["resumed_losses"] == second  # exact, not approximate
    assert resumed["checks"] == {
        "resumed_weights_equal": True,  # torch.equal per tensor, dtype included
        "resumed_adam_equal": True,  # fp32 main params, both moments, step counts
        "step2_checkpoint_equal": True,
    }, (resumed.get("max_weight_diff"), resumed["nondeterministic_ops"])
