"""The trainer's log-probs follow the rollout's sampling temperature: at temperature T every
log-prob pass scores softmax(logits / T), the distribution vLLM sampled from, and gradients
flow through the division. Checked against a transformers forward of the same tiny model."""

from __future__ import annotations

import pytest
import torch

from launch import run_json_worker
from test_parallel_parity import hf_reference
from megatron_prime.update import AlgoConfig, prime_update
from workers.parity_worker import make_batch, make_hf_model
from workers.step_worker import hf_token_logprobs, make_global_batch

TEMPERATURE = 2.0


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_at_temperature_match_transformers(tp, tmp_path):
    ours = run_json_worker("tests/workers/temperature_worker.py", tp,
                           ["--tp", str(tp), "--temperature", str(TEMPERATURE)],
                           tmp_path / "result.json")
    ref = hf_reference("qwen2", TEMPERATURE)
    torch.testing.assert_close(torch.tensor(ours["logprobs"]), ref["logprobs"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(ours["entropy"]), ref["entropy"], atol=1e-4, rtol=0)
    assert ours["loss"] == pytest.approx(ref["loss0"], abs=1e-4)
    # The grad norm checks the 1/T of the hand-written backward against autograd.
    assert ours["grad_norm"] == pytest.approx(ref["grad_norm0"], rel=1e-4)
    # And the temperature matters: at T=1 the log-probs differ by far more than the tolerance.
    untempered = hf_reference("qwen2")
    assert (untempered["logprobs"] - ref["logprobs"]).abs().max() > 0.1


@pytest.mark.slow
def test_prime_update_scores_the_policy_at_the_sampling_temperature(tmp_path):
    """prime_update(temperature=2): the sampler's log-probs are transformers' at T=2, so the
    old-policy pass matches them (gap ~0; at T=1 it would be 0.06 nats a token), and the
    PPO loss's entropy is the tempered distribution's. (The PRM and reference score at T=1,
    as in the PRIME recipe: see prime_update's docstring.)"""
    result = run_json_worker("tests/workers/step_worker.py", 1,
                             ["--batch", "global", "--sampler", "hf",
                              "--temperature", str(TEMPERATURE)], tmp_path / "result.json")
    metrics = result["metrics"]
    assert metrics["rollout/logprob_diff_max"] < 1e-4
    _, model = make_hf_model("qwen2")
    batch, _ = make_global_batch(model.config.vocab_size)
    mask = batch.scored_token_mask()
    untempered_gap = (hf_token_logprobs(model, batch, 1.0)
                      - hf_token_logprobs(model, batch, TEMPERATURE)).abs().sum() / mask.sum()
    assert untempered_gap > 0.03  # nats per token, vs < 1e-4 at T=2
    with torch.no_grad():
        log_softmax = torch.log_softmax(model(batch.input_ids).logits.float() / TEMPERATURE, -1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)[:, :-1]
    expected = float((entropy * mask[:, 1:]).sum() / mask.sum())
    assert metrics["policy/entropy"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_temperature_cannot_reach_training(temperature):
    batch = make_batch(300)
    with pytest.raises(ValueError, match=r"rollout\.sampling\.temperature"):
        prime_update(None, batch, torch.tensor([1.0, 0.0, 1.0, 0.0]), AlgoConfig(),
                     temperature=temperature)
