"""The FP8 calibration of a frozen model on a GPU with Transformer Engine (issue 18): with
delayed scaling, a frozen reference scores at scale 1 and, since its passes are forward-only,
never gets other scales; ``models/fp8.calibrate`` gives it scales from the first batch
(tests/workers/gpu_fp8_worker.py). Skipped without CUDA (conftest.py), without Transformer
Engine, or on a GPU without FP8."""

from __future__ import annotations

import pytest
from launch import run_json_worker


def fp8_unavailable_reason() -> str | None:
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError as error:
        return f"needs Transformer Engine ({error})"
    available, reason = FP8GlobalStateManager.is_fp8_available()
    return None if available else f"this GPU has no FP8: {reason}"


@pytest.mark.gpu
def test_calibration_gives_a_frozen_fp8_model_its_scales(tmp_path, keep_result):
    reason = fp8_unavailable_reason()
    if reason:
        pytest.skip(reason)
    result = run_json_worker("tests/workers/gpu_fp8_worker.py", 1, [], tmp_path / "fp8.json")
    keep_result("calibration", result)
    assert result["needs_calibration"] is True
    assert result["sequence_length_multiple"] == 16 and result["batch_tokens"] == 16
    before, after = result["scales_before"], result["scales_after"]
    assert before and all(scale == 1.0 for scale in before)  # forward-only: never updated
    assert len(after) == len(before) and any(scale != 1.0 for scale in after)
    # Later forward-only passes keep the calibrated scales (TE updates none under no_grad).
    assert result["scales_after_more_passes"] == after
    assert result["fp8_after"] == "hybrid"  # FP8 back on after the calibration's fp8_off
    # Scales fitted to the activations put small values in e4m3's normal range.
    assert result["error_after"] < result["error_before"]
