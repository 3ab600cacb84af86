"""The trainer -> vLLM memory hand-off for real, on a GPU (``pytest -m gpu``).

The CPU simulation (tests/test_gpu_path_simulation.py) checks the order of release, wake and
sleep; only a GPU shows that the memory is free for another process afterwards: after one
PRIME update, the trainer's allocator caches its activations (hundreds of MB here); a second
process (as vLLM's engine is) cannot allocate them until the trainer releases, and can after.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from launch import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_released_trainer_cache_is_allocatable_by_another_process(tmp_path):
    from megatron_prime.toy.model import write_toy_model

    model = write_toy_model(tmp_path / "model", hidden_size=1024, num_layers=8,
                            num_attention_heads=16, num_key_value_heads=8, intermediate_size=2816,
                            max_position_embeddings=2048)
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "gpu_handoff_worker.py"),
                           "--model", str(model), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
                                            **__import__("os").environ})
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(out.read_text())
    print(json.dumps(result))
    assert result["cached"] > 64 * 2**20, "the update left a real cache to hand over"
    assert not result["fits_before"], "the cache was not yet free for another process"
    assert result["free_after"] - result["free_before"] >= 0.9 * result["cached"]
    assert result["fits_after"], "after the release another process takes the memory"
