"""The rollout offload (models/offload.py) on one CUDA GPU in bf16: the checks of
test_rollout_offload.py (storages freed to 0 bytes and counted by hand, refusals, the next
update unchanged within bf16's run-to-run noise), plus torch's allocator: what it holds drops
by at least the bytes released and comes back after the restore. Keeps the bytes and the
release/restore seconds in the results folder (benchmarks/gpu_check.sh collects them)."""

from __future__ import annotations

import pytest

from launch import run_json_worker
from test_rollout_offload import check_offload

pytestmark = pytest.mark.gpu


def test_released_state_frees_gpu_memory_and_comes_back(tmp_path, keep_result):
    result = run_json_worker("tests/workers/offload_worker.py", 1, ["--device", "cuda"],
                             tmp_path / "out.json")
    assert result["device"].startswith("cuda")
    check_offload(result, exact=False)
    before, during, after = result["allocated"]
    released = result["stats"]["grad_bytes"] + result["stats"]["optimizer_bytes"] \
        + result["stats"]["frozen_bytes"]
    assert before - during >= released
    assert after == pytest.approx(before, rel=0.01)
    keep_result("rollout_offload", {"allocated": result["allocated"], "stats": result["stats"]})
