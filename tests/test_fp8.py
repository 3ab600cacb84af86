"""Transformer Engine / FP8 details (issue 18): sequence padding to what FP8 and sequence
parallelism need, the PRM and the reference out of FP8 by default, the log-ratio error
measured when they are in it, and the calibration pass before a delayed-scaling scoring
model's first scored pass (recorded on CPU by tests/workers/fp8_worker.py)."""

from __future__ import annotations

import pytest
import torch
from launch import run_json_worker
from transformers import Qwen2Config

from megatron_prime.algo import log_ratio_error
from megatron_prime.config import ParallelConfig, PrecisionConfig
from megatron_prime.losses import StepBatch
from megatron_prime.models.architectures import (
    ModelShape,
    padded_sequence_length,
    sequence_length_multiple,
    transformer_config,
)
from megatron_prime.rollout.collect import ScoredGroup, _to_token_batch
from megatron_prime.sft import SFTExample, sft_batch

DELAYED = PrecisionConfig(fp8_recipe="delayed")


def sp(tp: int) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=tp, sequence_parallel=True)


@pytest.mark.parametrize("parallel, precision, expected", [
    (ParallelConfig(), PrecisionConfig(), 8),  # few shapes, whole bf16 tiles
    (ParallelConfig(), DELAYED, 16),  # FP8 GEMMs want 16
    (ParallelConfig(), PrecisionConfig(fp8_recipe="current", fp8_roles=["reference"]), 16),
    (ParallelConfig(), PrecisionConfig(fp8_recipe="delayed", fp8_roles=[]), 8),  # no model in FP8
    (sp(2), PrecisionConfig(), 8),  # lcm(8, 2)
    (sp(4), PrecisionConfig(), 8),  # lcm(8, 4)
    (sp(3), PrecisionConfig(), 24),  # lcm(8, 3)
    (sp(3), DELAYED, 48),  # lcm(8, 16, 3)
    (sp(6), DELAYED, 48),  # lcm(8, 16, 6)
    (sp(4), DELAYED, 16),  # lcm(8, 16, 4)
    (sp(32), DELAYED, 32),  # lcm(8, 16, 32)
    (ParallelConfig(tensor_parallel_size=3), DELAYED, 16),  # TP without SP splits no sequence
])
def test_sequence_length_multiple(parallel, precision, expected):
    assert sequence_length_multiple(parallel, precision) == expected


@pytest.mark.parametrize("parallel, precision, expected", [
    (ParallelConfig(), PrecisionConfig(), 1),  # what a CPU model strictly needs: nothing
    (ParallelConfig(), DELAYED, 16),
    (sp(3), PrecisionConfig(), 3),
    (sp(6), DELAYED, 48),
])
def test_what_a_model_strictly_needs(parallel, precision, expected):
    assert sequence_length_multiple(parallel, precision, shape_alignment=1) == expected


@pytest.mark.parametrize("length, multiple, expected", [
    (17, 16, 32), (16, 16, 16), (1, 16, 16), (0, 8, 8), (49, 48, 96), (13, 1, 13), (25, 24, 48),
])
def test_padded_sequence_length(length, multiple, expected):
    assert padded_sequence_length(length, multiple) == expected


def test_rollout_and_sft_batches_pad_to_the_multiple():
    groups = [ScoredGroup([5, 6, 7], [[8] * 14, [9]], [1.0, 0.0])]  # longest row: 3 + 14 = 17
    assert _to_token_batch(groups, pad_token_id=0)[0].seq_length == 24  # default 8
    assert _to_token_batch(groups, 0, length_multiple=16)[0].seq_length == 32
    assert _to_token_batch(groups, 0, length_multiple=48)[0].seq_length == 48
    batch = _to_token_batch(groups, 0, length_multiple=48)[0]
    assert batch.response_mask.sum() == 15 and batch.response_mask[:, 17:].sum() == 0
    examples = [SFTExample(list(range(1, 44)), 9, "a"), SFTExample([1, 2, 3, 4], 2, "b")]
    assert sft_batch(examples, pad_token_id=0).seq_length == 43  # a CPU model needs nothing
    padded = sft_batch(examples, pad_token_id=258, length_multiple=16)
    assert padded.seq_length == 48
    assert padded.input_ids[1].tolist() == [1, 2, 3, 4] + [258] * 44
    assert padded.response_mask[0].tolist() == [0.0] * 9 + [1.0] * 34 + [0.0] * 5


def test_padded_to_length_pads_token_tensors_only():
    batch = StepBatch(input_ids=torch.tensor([[3, 4, 5]]), response_mask=torch.tensor([[0.0, 1, 1]]),
                      outcome_rewards=torch.tensor([1.0]), old_logprobs=torch.tensor([[0.0, -1, -2]]))
    padded = batch.padded_to_length(5)
    assert padded.input_ids.tolist() == [[3, 4, 5, 0, 0]]
    assert padded.response_mask.tolist() == [[0.0, 1, 1, 0, 0]]
    assert padded.old_logprobs.tolist() == [[0.0, -1, -2, 0, 0]]
    assert padded.outcome_rewards.tolist() == [1.0]  # one value per row: untouched
    assert batch.padded_to_length(3) is batch
    with pytest.raises(ValueError, match="cannot pad a batch of 3 tokens to 2"):
        batch.padded_to_length(2)


SHAPE = ModelShape.from_hf(Qwen2Config(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"]))


def test_prm_and_reference_stay_out_of_fp8_by_default():
    assert PrecisionConfig().fp8_roles == ["policy"]
    configs = {role: transformer_config(SHAPE, ParallelConfig(), DELAYED, on_gpu=True, role=role)
               for role in ("policy", "prm", "reference")}
    assert (configs["policy"].fp8, configs["policy"].fp8_recipe) == ("hybrid", "delayed")
    assert configs["prm"].fp8 is None and configs["reference"].fp8 is None


def test_fp8_error_check_interval_is_validated_by_its_key():
    with pytest.raises(ValueError, match="precision.fp8_error_check_every=0"):
        PrecisionConfig(fp8_error_check_every=0).validate()
    # FP8 on CPU stays refused, whichever roles are listed.
    with pytest.raises(ValueError, match="precision.fp8_recipe='delayed' needs a GPU"):
        transformer_config(SHAPE, ParallelConfig(), PrecisionConfig(
            fp8_recipe="delayed", fp8_roles=["prm"]), on_gpu=False, role="prm")


def test_log_ratio_error_by_hand():
    prm = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5]])
    exact_prm = torch.tensor([[0.0, -1.25, -2.0, -9.0]])
    exact_ref = torch.tensor([[0.0, -1.5, -1.5, -9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    # token 1: (-1 + 1.5) - (-1.25 + 1.5) = 0.5 - 0.25 = 0.25
    # token 2: (-2 + 1) - (-2 + 1.5) = -1 + 0.5 = -0.5 -> 0.5; tokens 0 and 3 are masked
    assert log_ratio_error(prm, ref, exact_prm, exact_ref, mask).tolist() == [[0.0, 0.25, 0.5, 0.0]]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "result.json"
    return run_json_worker("tests/workers/fp8_worker.py", 1, [], out, timeout=500)


FIRST_SCORED = [["forward", "policy", None], ["forward", "reference", "hybrid"],
                ["forward", "reference", None]]  # the reference, then its FP8-off twin


@pytest.mark.slow
def test_calibration_precedes_the_first_scored_pass(recorded):
    first, second = recorded["scoring"]
    assert first["calls"] == [["calibrate", "reference", "hybrid"], ["calibrate", "prm", "hybrid"],
                              *FIRST_SCORED,
                              # prm_mode=before: the PRM update (no forward_only), then scoring
                              ["forward", "prm", None], ["forward", "prm", "hybrid"]]
    # Calibrated once per process; no check on this step; FP8 is back on after each fp8_off.
    assert second["calls"] == [["forward", "policy", None], ["forward", "reference", "hybrid"],
                               ["forward", "prm", "hybrid"]]
    assert second["fp8_metrics"] == {}
    assert first["fp8_after"] == second["fp8_after"] == {
        "policy": None, "prm": "hybrid", "reference": "hybrid"}
    after, _ = recorded["after"]  # prm_mode=after: the PRM scores before its update
    assert after["calls"] == [["calibrate", "reference", "hybrid"], ["calibrate", "prm", "hybrid"],
                              *FIRST_SCORED, ["forward", "prm", None], ["forward", "prm", "hybrid"]]


@pytest.mark.slow
def test_no_calibration_without_a_delayed_scaling_scoring_model(recorded):
    plain = [["forward", "policy", None], ["forward", "reference", None], ["forward", "prm", None]]
    assert [c for s in recorded["off"] for c in s["calls"]] == plain * 2
    assert [c for s in recorded["policy"] for c in s["calls"]] == [
        ["forward", "policy", "hybrid"], ["forward", "reference", None], ["forward", "prm", None]] * 2
    # Current scaling has no history to fill: no calibration, but the error is still measured.
    first, _ = recorded["current"]
    assert first["calls"] == [["forward", "policy", None], ["forward", "reference", "hybrid"],
                              ["forward", "reference", None], ["forward", "prm", None],
                              ["forward", "prm", "hybrid"]]


@pytest.mark.slow
def test_log_ratio_error_is_logged_only_for_fp8_scoring_models(recorded):
    for name in ("off", "policy"):
        assert recorded[name][0]["fp8_metrics"] == {}, name
    for name in ("scoring", "after", "current"):
        metrics = recorded[name][0]["fp8_metrics"]
        assert sorted(metrics) == ["reward/fp8_log_ratio_abs_mean",
                                   "reward/fp8_log_ratio_error_max",
                                   "reward/fp8_log_ratio_error_mean"]
        # Without Transformer Engine, the "FP8" pass is the bf16 pass: the error is exactly 0,
        # while the signal it is compared with is not.
        assert metrics["reward/fp8_log_ratio_error_max"] == 0.0
        assert metrics["reward/fp8_log_ratio_error_mean"] == 0.0
        assert metrics["reward/fp8_log_ratio_abs_mean"] > 1e-3


@pytest.mark.slow
def test_schedule_pads_to_the_model_multiple_and_trims_back(recorded):
    # 13 tokens through a model that needs 16: same log-probs (causal attention, masked pad).
    assert recorded["padding_max_diff"] < 1e-5
