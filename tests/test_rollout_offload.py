"""The trainer's state off the device while the engine is awake (models/offload.py), on CPU:
the gradient buffers, the Adam state and the frozen reference free their storages (0 bytes
each while released, counted against a hand computation from the parameter counts), an
update while released is refused by name, as is a second release, and after the restore
(twice, reusing the host buffers) the next PRIME update gives the metrics and weights of a
run that never released anything. The GPU twin (test_gpu_rollout_offload.py) checks the same
on CUDA with the allocator's own count. The order against the engine's wakes is checked by
the simulated GPU job (test_gpu_path_simulation.py)."""

from __future__ import annotations

import pytest

from launch import run_json_worker

pytestmark = pytest.mark.slow


def check_offload(result: dict, exact: bool) -> None:
    stats, counts, tensors = result["stats"], result["param_counts"], result["param_tensors"]
    trained_params = counts["policy"] + counts["prm"]
    # Megatron's grad buffers: fp32, one slot per parameter plus its bucket padding.
    assert stats["grad_bytes"] == result["before"]["grads"]
    assert 4 * trained_params <= stats["grad_bytes"] <= 4 * trained_params + 4 * 1024
    # Adam: exp_avg and exp_avg_sq in fp32 per trained parameter, and the fp32 main weights
    # where the model trains in another dtype; torch's Adam keeps a 4-byte step per tensor on
    # the host (fused or capturable Adam on the GPU), so on CPU it moves too.
    main_weights = 0 if result["dtype"] == "torch.float32" else 4 * trained_params
    steps = 4 * (tensors["policy"] + tensors["prm"])
    moments = 8 * trained_params + main_weights
    allowed = {moments + steps} if result["device"] == "cpu" else {moments, moments + steps}
    assert stats["optimizer_bytes"] in allowed
    assert stats["frozen_bytes"] == result["before"]["reference"] \
        == result["reference_dtype_bytes"] * counts["reference"]
    assert result["during"] == {"grads": 0, "optimizer": 0, "reference": 0}
    assert result["after"] == result["before"]
    assert "prime_update while the trainer's gradients, optimizer state and frozen models are off" \
        in result["refused"]
    assert "already off the GPU" in result["released_twice"]
    kept, offloaded = result["second"]["kept"], result["second"]["offloaded"]
    assert sorted(kept["metrics"]) == sorted(offloaded["metrics"])
    for name, value in kept["metrics"].items():
        if exact:
            assert offloaded["metrics"][name] == value, name
        else:
            assert offloaded["metrics"][name] == pytest.approx(value, rel=2e-2, abs=2e-3), name
    for role in ("policy", "prm"):
        for name, (total, absolute) in kept[role].items():
            if exact:
                assert offloaded[role][name] == [total, absolute], (role, name)
            else:
                assert offloaded[role][name][1] == pytest.approx(absolute, rel=1e-3), (role, name)


def test_released_state_comes_back_bit_exact_on_cpu(tmp_path):
    result = run_json_worker("tests/workers/offload_worker.py", 1, ["--device", "cpu"],
                             tmp_path / "out.json")
    assert result["device"] == "cpu"
    check_offload(result, exact=True)
