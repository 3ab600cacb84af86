"""Activation recomputation (parallel.recompute_granularity) through the real trainer path:
benchmarks/bench_gpu_train_step.py on CPU with a tiny model. Recomputing changes memory and
time, never the numbers: every setting must give the same losses, step for step, with either
core attention of the local spec (SDPA or Megatron's unfused one, equal within 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch import REPO


@pytest.mark.slow
def test_recompute_settings_give_identical_losses(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu_train_step.py"), "--tiny",
         "--device", "cpu", "--seq", "96", "--global-batch", "4", "--micro-batch", "2",
         "--warmup", "1", "--steps", "2", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = {(r["attention"], r["recompute"]): r for r in json.loads(out.read_text())["results"]}
    assert sorted(results) == [(a, r) for a in ("sdpa", "unfused") for r in ("full", "none", "selective")]
    for attention in ("sdpa", "unfused"):
        base = results[attention, "none"]
        assert base["loss_last"] < base["loss_first"]  # three Adam steps on one batch do learn
        for name in ("selective", "full"):
            assert results[attention, name]["params"] == base["params"]
            assert results[attention, name]["loss_first"] == base["loss_first"], (attention, name)
            assert results[attention, name]["loss_last"] == base["loss_last"], (attention, name)
    # The two attention kernels: the same losses to float32 rounding, step after step.
    for key in ("loss_first", "loss_last"):
        assert abs(results["sdpa", "none"][key] - results["unfused", "none"][key]) < 1e-5, key
