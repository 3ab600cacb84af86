"""Engine placement on real GPUs (``pytest -m gpu``): distributed.engine_slot reads each
rank's CUDA device through CUDA_VISIBLE_DEVICES, which the CPU simulation
(tests/test_gpu_path_simulation.py) stands in for with local ranks."""

from __future__ import annotations

import pytest
import torch

from launch import run_json_worker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]


def test_every_gpu_hosts_an_engine_worker_on_its_own_device(tmp_path):
    world = min(torch.cuda.device_count(), 8)
    ranks = run_json_worker("tests/workers/engine_slot_worker.py", world, [],
                            tmp_path / "slots.json")
    devices = [device for device, _ in ranks]
    assert len(set(devices)) == world, "each rank on its own GPU"
    for rank, (device, slots) in enumerate(ranks):
        assert slots["per_gpu"] == [rank, world, [device]]
        assert slots["one"] == ([0, 1, devices] if rank == 0 else [None, 1, []])
