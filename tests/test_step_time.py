"""The step-time estimate (megatron_prime/step_time.py) by hand on a small made-up step, and
its place in the plan's report."""

from __future__ import annotations

import pytest

from megatron_prime.step_time import StepTimeAssumptions, StepWork, estimate

WORK = StepWork(
    params=1_000_000_000, num_layers=10, q_dim=1000,
    prm_params=1_000_000_000, prm_num_layers=10, prm_q_dim=1000, prompts_per_step=8, oversample_factor=2,
    samples_per_prompt=2, prompt_tokens=300, response_tokens=600, world_size=2, engines=1,
    engine_gpus=2, engine_weight_bytes_per_gpu=1_000_000_000, kv_bytes_per_token_per_gpu=100_000,
    kv_sequences=4, pipeline_bubble=0.0, recompute_full=False, skips_old_logprob_pass=True,
    prm_trains=True, with_prm=True, host_bytes_per_gpu=5_000_000_000)
ASSUMED = StepTimeAssumptions(accelerator="h100", train_mfu=0.5, prefill_mfu=0.5,
                              decode_bandwidth_efficiency=0.5)


def test_every_phase_by_hand():
    """Mean prompt 100, response 200 (a third of each limit).

    Rollout: 8 x 2 x 2 = 32 responses on one engine. Prefill, once per prompt: 2e9 x 100 x 16
    = 3.2e12 FLOPs over 2 GPUs at 0.5 x 989.4e12 -> 3.234e-3 s. In flight: the KV cache holds
    4 sequences of 900 tokens = 12 of 300 -> 12. A decode step reads 1e9 weight bytes + 12 x
    (100 + 100) x 1e5 = 1.24e9 bytes at 0.5 x 3.35e12 -> 7.403e-4 s; its compute, 12 x (2e9
    + 4 x 10 x 200 x 1000) / 2 GPUs = 1.205e10 FLOPs at 0.5 x 989.4e12 = 2.4e-5 s, is less.
    Decode steps: 32 x 200 / 12 = 533.3 -> 0.39482 s; rollout 0.39806 s; 16,210 tokens/s.

    Training: 8 x 2 x 300 = 4800 tokens, forward 2e9 + 4 x 10 x 150 x 1000 = 2.006e9 FLOPs
    each = 9.6288e12; 2 GPUs at 0.5 x 989.4e12 = 9.894e14 FLOPs/s. Log-probs: the reference
    only (old pass skipped) 9.732e-3 s; PRM 3 + 1 forwards 3.8927e-2 s; policy 3 forwards
    2.9196e-2 s. Offload: 2 x 5e9 bytes at 50e9 B/s = 0.2 s."""
    result = estimate(WORK, ASSUMED)
    assert (result.mean_prompt_tokens, result.mean_response_tokens) == (100, 200)
    assert result.sequences_in_flight == 12
    decode_step = 1.24e9 / (0.5 * 3.35e12)
    assert result.seconds["rollout"] == pytest.approx(3.2e12 / (2 * 0.5 * 989.4e12)
                                                      + 32 * 200 / 12 * decode_step)
    assert result.seconds["rollout"] == pytest.approx(0.39806, rel=1e-4)
    assert result.decode_tokens_per_s_per_engine == pytest.approx(12 / decode_step)
    forward = 4800 * (2e9 + 4 * 10 * 150 * 1000)
    rate = 2 * 989.4e12 * 0.5
    assert result.seconds["log-probs"] == pytest.approx(forward / rate)
    assert result.seconds["PRM update"] == pytest.approx(4 * forward / rate)
    assert result.seconds["policy update"] == pytest.approx(3 * forward / rate)
    assert result.seconds["offload"] == pytest.approx(0.2)
    assert result.total == pytest.approx(sum(result.seconds.values()))


def test_the_passes_follow_the_algorithm_and_the_layout():
    from dataclasses import replace

    base = estimate(WORK, ASSUMED).seconds
    # The old-policy pass, full recomputation and a pipeline bubble cost what they add.
    old = estimate(replace(WORK, skips_old_logprob_pass=False), ASSUMED).seconds
    assert old["log-probs"] == pytest.approx(2 * base["log-probs"])
    full = estimate(replace(WORK, recompute_full=True), ASSUMED).seconds
    assert full["policy update"] == pytest.approx(base["policy update"] * 4 / 3)
    assert full["PRM update"] == pytest.approx(base["PRM update"] * 5 / 4)
    bubble = estimate(replace(WORK, pipeline_bubble=0.2), ASSUMED).seconds
    assert bubble["policy update"] == pytest.approx(base["policy update"] / 0.8)
    # Outcome-only RLOO: no reference, no PRM.
    rloo = estimate(replace(WORK, with_prm=False, prm_trains=False), ASSUMED).seconds
    assert rloo["log-probs"] == 0 and "PRM update" not in rloo
    # A larger KV cache puts more sequences in flight, up to the engine's whole round.
    wide = estimate(replace(WORK, kv_sequences=1000), ASSUMED)
    assert wide.sequences_in_flight == 32


def test_a_smaller_prm_costs_its_own_flops():
    """A PRM (and reference) of 2.5e8 parameters, 5 layers, q_dim 500: its forward is
    4800 x (5e8 + 4 x 5 x 150 x 500) = 2.4072e12 FLOPs. Log-probs: the reference's only
    (old pass skipped); PRM update 3 + 1 of its forwards; the policy's update unchanged;
    with the old-policy pass, log-probs add one policy forward (9.6288e12)."""
    from dataclasses import replace

    small = replace(WORK, prm_params=250_000_000, prm_num_layers=5, prm_q_dim=500)
    result = estimate(small, ASSUMED).seconds
    rate = 2 * 989.4e12 * 0.5
    prm_forward = 4800 * (5e8 + 4 * 5 * 150 * 500)
    assert prm_forward == pytest.approx(2.4072e12)
    assert result["log-probs"] == pytest.approx(prm_forward / rate)
    assert result["PRM update"] == pytest.approx(4 * prm_forward / rate)
    assert result["policy update"] == pytest.approx(estimate(WORK, ASSUMED).seconds["policy update"])
    old = estimate(replace(small, skips_old_logprob_pass=False), ASSUMED).seconds
    assert old["log-probs"] == pytest.approx((prm_forward + 9.6288e12) / rate)


def test_bad_assumptions_are_named():
    with pytest.raises(ValueError, match="--train-mfu=1.5"):
        estimate(WORK, StepTimeAssumptions(train_mfu=1.5))
    with pytest.raises(ValueError, match="--accelerator='tpu'"):
        estimate(WORK, StepTimeAssumptions(accelerator="tpu"))


def test_the_plan_reports_the_estimate_next_to_the_reference():
    import contextlib
    import io

    from megatron_prime.plan import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--model", "eurus-2-7b", "--micro-batch-size", "1", "--distributed-optimizer",
                     "--vllm-memory-fraction", "0.6", "--vllm-tensor-parallel-size", "4"])
    text = out.getvalue()
    assert code == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("Step time (an estimate"))
    assert "on 8 H100 SXM" in line and "rollout" in line and "policy update" in line
    assert "PRIME reference (Eurus-2-7B, 8 A800, measured): 680 s = rollout 282 + policy update " \
           "157 + PRM update 151 + other 91" in text
