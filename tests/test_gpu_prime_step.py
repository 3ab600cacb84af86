"""One PRIME step on one CUDA GPU in bf16 gives what the CPU float32 run of the same step on
the same batch gives, within bf16's round-off.

Policy, PRM and reference at TP=1 with Megatron's local layer spec (no Transformer Engine on
the GPU test machine), built by ``train.build_prime_models`` and updated by
``update.prime_update``, as the trainer does. The batch (2 prompts x 4 responses) is sampled
on the GPU, by vLLM where it imports, else by a plain sampler over the Megatron policy's own
logits; each worker is its own process (tests/workers/gpu_step_worker.py), so the CPU
reference reads the very tokens the GPU drew.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch import run_json_worker

WORKER = "tests/workers/gpu_step_worker.py"

pytestmark = pytest.mark.gpu

# bf16 keeps 8 significant bits (round-off 2^-9 = 0.2% per operation); through a 2-layer
# model, Adam and the losses, per-token log-probs stay within a few 1e-3 of float32, so these
# bounds are ~10x the expected error and far below what a wrong device, dtype or mask gives.
LOGPROB_ATOL = 0.05
GRAD_NORM_RTOL = 0.05
METRIC_TOLERANCES = {  # name -> (rel, abs)
    "prm/loss": (0.0, 2e-3),  # ln 2 at the first step: the PRM starts as the reference
    "reward/outcome_mean": (0.0, 0.0),
    "reward/process_mean": (0.0, 5e-3),  # normalised to [-1, 1] (batch_norm)
    "policy/loss": (0.0, 1e-3),
    "policy/entropy": (1e-2, 0.0),
    "policy/num_units": (0.0, 0.0),
    "prm/grad_norm": (GRAD_NORM_RTOL, 0.0),
    "policy/grad_norm": (GRAD_NORM_RTOL, 0.0),
}


def vllm_imports() -> bool:
    done = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("rollout_source", ["megatron_policy_sampler", "vllm"])
def test_prime_step_on_gpu_in_bf16_matches_cpu_float32(rollout_source, tmp_path, keep_result):
    if rollout_source == "vllm" and not vllm_imports():
        pytest.skip("vLLM does not import here; the megatron_policy_sampler case samples "
                    "from the policy itself instead")
    batch = tmp_path / "batch.pt"
    sampled = run_json_worker(WORKER, 1, [
        "sample", "--device", "cuda", "--batch", str(batch), "--model-dir", str(tmp_path / "hf"),
        "--rollout-source", "vllm" if rollout_source == "vllm" else "policy"],
        tmp_path / "sampled.json")
    assert len(sampled["responses"]) == 8 and all(len(r) == 10 for r in sampled["responses"])
    gpu = run_json_worker(WORKER, 1, ["step", "--device", "cuda", "--batch", str(batch)],
                          tmp_path / "gpu.json")
    cpu = run_json_worker(WORKER, 1, ["step", "--device", "cpu", "--batch", str(batch)],
                          tmp_path / "cpu.json")
    keep_result("gpu", gpu)
    keep_result("cpu", cpu)

    assert gpu["device"].startswith("cuda") and gpu["param_dtype"] == "torch.bfloat16"
    assert cpu["device"] == "cpu" and cpu["param_dtype"] == "torch.float32"
    assert gpu["skip_reasons"] == [] and cpu["skip_reasons"] == []

    # The sampler's log-probs are the policy's (the same weights scored the same tokens).
    assert gpu["metrics"]["rollout/logprob_diff_max"] < LOGPROB_ATOL
    assert cpu["metrics"]["rollout/logprob_diff_max"] < LOGPROB_ATOL
    # Old-policy log-probs of every response token: bf16 on the GPU against float32.
    worst = max(abs(g - c) for g_row, c_row in zip(gpu["old_logprobs"], cpu["old_logprobs"])
                for g, c in zip(g_row, c_row))
    assert worst < LOGPROB_ATOL, worst

    for name, (rel, abs_) in METRIC_TOLERANCES.items():
        assert gpu["metrics"][name] == pytest.approx(cpu["metrics"][name], rel=rel, abs=abs_), name
    # The updated weights: the bf16 copy rounds each weight by <= 0.4%, the Adam step (lr 1e-3)
    # is the same on both devices up to that round-off.
    for role in ("policy", "prm"):
        assert sorted(gpu[role]) == sorted(cpu[role])
        for name, (_, absolute) in cpu[role].items():
            assert gpu[role][name][1] == pytest.approx(absolute, rel=1e-2), (role, name)
