"""Resuming with the fused Adam the GPU path uses (Transformer Engine's FusedAdam, else Apex's)
continues bit for bit: its step count lives in the param groups, not in each parameter's
state as with torch's Adam, which every CPU resume test runs (issue 18;
checkpoint/train_state.py, ``adam_step_count`` and ``_restore_adam_steps``).

tests/workers/gpu_train_state_worker.py takes 2 steps with a checkpoint after each; a fresh
process loads step 1 and takes step 2: its next-step weights, Adam moments and step counts must
equal the uninterrupted run's. Skipped without CUDA (conftest.py) or without a fused Adam.
"""

from __future__ import annotations

import pytest
from launch import run_json_worker

WORKER = "tests/workers/gpu_train_state_worker.py"
FUSED_ADAMS = ("transformer_engine.pytorch.optimizers.fused_adam.FusedAdam",
               "apex.optimizers.fused_adam.FusedAdam")


def fused_adam_unavailable_reason() -> str | None:
    from megatron.core.optimizer import distrib_optimizer

    if not distrib_optimizer.HAVE_APEX_OR_TE:
        return ("needs Transformer Engine or Apex: without them Megatron falls back to torch's "
                "Adam, which tests/test_gpu_train_state.py covers")
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("options", [[], ["--distributed-optimizer"], ["--layer-spec", "te"]],
                         ids=["plain", "distributed_optimizer", "te_spec"])
def test_fused_adam_resume_is_bit_exact(options, tmp_path, keep_result):
    reason = fused_adam_unavailable_reason()
    if reason:
        pytest.skip(reason)
    common = ["--device", "cuda", "--root", str(tmp_path / "checkpoints"),
              "--snapshot", str(tmp_path / "step2_state.pt"), *options]
    trained = run_json_worker(WORKER, 1, ["train", *common], tmp_path / "train.json")
    resumed = run_json_worker(WORKER, 1, ["resume", *common], tmp_path / "resume.json")
    keep_result("train", trained)
    keep_result("resume", resumed)

    assert trained["adam_classes"] == resumed["adam_classes"]
    assert len(trained["adam_classes"]) == 1 and trained["adam_classes"][0] in FUSED_ADAMS
    first, second = trained["losses"]
    assert first != second
    assert resumed["loaded_step"] == 1
    assert resumed["resumed_losses"] == second  # exact
    assert resumed["checks"] == {
        "resumed_weights_equal": True,  # the next step's parameters, torch.equal per tensor
        "resumed_adam_equal": True,  # fp32 main params, both moments, the groups' step counts
        "step2_checkpoint_equal": True,
    }, (resumed.get("max_weight_diff"), resumed["nondeterministic_ops"])
