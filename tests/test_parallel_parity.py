"""Megatron log-probs, losses and grad norms: every TP/PP/DP layout equals TP=1/PP=1, and
TP=1/PP=1 equals the matching `transformers` model (same weights, same batch).

Each layout is a real torchrun job with gloo processes (tests/workers/parity_worker.py).
"""

from __future__ import annotations

import pytest
import torch

from launch import run_json_worker
from megatron_prime.algo import PPOLossConfig, ppo_policy_loss, prm_cross_entropy_loss
from workers.parity_worker import (
    ENTROPY_COEF,
    make_batch,
    make_hf_model,
    pack_tensor,
    prime_extras,
)

pytestmark = pytest.mark.slow

LAYOUTS = {
    # name: (processes, worker arguments)
    "tp1pp1": (1, ["--tp", "1", "--pp", "1"]),
    "tp2": (2, ["--tp", "2", "--pp", "1"]),
    "pp2": (2, ["--tp", "1", "--pp", "2"]),
    "tp2pp2": (4, ["--tp", "2", "--pp", "2"]),
    "pp2_interleaved": (2, ["--tp", "1", "--pp", "2", "--vpp", "2"]),
    "dp2_distributed_optimizer": (2, ["--tp", "1", "--pp", "1", "--distributed-optimizer",
                                      "--micro-batch-size", "1"]),
}

_cache: dict[tuple[str, str], dict] = {}


def run_layout(arch: str, layout: str, tmp_path_factory) -> dict:
    key = (arch, layout)
    if key not in _cache:
        nproc, args = LAYOUTS[layout]
        out = tmp_path_factory.mktemp(f"{arch}_{layout}") / "result.json"
        _cache[key] = run_json_worker("tests/workers/parity_worker.py", nproc,
                                      ["--arch", arch, *args], out)
    return _cache[key]


def hf_reference(arch: str, temperature: float = 1.0) -> dict:
    """Log-probs, entropy, loss and grad norm from transformers with plain autograd, of
    softmax(logits / temperature) (the distribution a sampler at that temperature draws from)."""
    _, model = make_hf_model(arch)
    batch = make_batch(model.config.vocab_size)
    logits = model(batch.input_ids).logits.float() / temperature
    log_softmax = torch.log_softmax(logits[:, :-1], dim=-1)
    logprobs = log_softmax.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    mask = batch.response_mask[:, 1:]
    loss = (-(logprobs * mask).sum() - ENTROPY_COEF * (entropy * mask).sum()) / mask.sum()
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    zero = torch.zeros(batch.batch_size, 1)
    return {
        "logprobs": torch.cat([zero, (logprobs * mask).detach()], 1),
        "entropy": torch.cat([zero, (entropy * mask).detach()], 1),
        "loss0": float(loss),
        "grad_norm0": float(grad_norm),
    }


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_megatron_matches_transformers(arch, tmp_path_factory):
    ours = run_layout(arch, "tp1pp1", tmp_path_factory)
    ref = hf_reference(arch)
    torch.testing.assert_close(torch.tensor(ours["logprobs"]), ref["logprobs"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(ours["entropy"]), ref["entropy"], atol=1e-4, rtol=0)
    assert ours["loss0"] == pytest.approx(ref["loss0"], abs=1e-4)
    # The grad norm checks the hand-written backward of log-prob AND entropy against autograd.
    assert ours["grad_norm0"] == pytest.approx(ref["grad_norm0"], rel=1e-4)
    # Log-probs only on response tokens: prompt and padding positions are exactly 0.
    mask = make_batch(300 if arch == "qwen2" else 260).response_mask
    mask[:, 0] = 0
    assert torch.all(torch.tensor(ours["logprobs"])[mask == 0] == 0)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1pp1"])
def test_layout_matches_single_process(layout, tmp_path_factory):
    base = run_layout("qwen2", "tp1pp1", tmp_path_factory)
    ours = run_layout("qwen2", layout, tmp_path_factory)
    torch.testing.assert_close(torch.tensor(ours["logprobs"]), torch.tensor(base["logprobs"]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(ours["entropy"]), torch.tensor(base["entropy"]),
                               atol=1e-5, rtol=0)
    assert ours["num_units0"] == base["num_units0"]
    assert ours["loss0"] == pytest.approx(base["loss0"], abs=1e-5)
    assert ours["grad_norm0"] == pytest.approx(base["grad_norm0"], abs=1e-5)
    # After one (clipped) Adam step; summation order differs across layouts.
    assert ours["loss1"] == pytest.approx(base["loss1"], abs=1e-4)


def test_tied_llama_at_tp2_pp2_matches_single_process(tmp_path_factory):
    base = run_layout("llama", "tp1pp1", tmp_path_factory)
    ours = run_layout("llama", "tp2pp2", tmp_path_factory)
    torch.testing.assert_close(torch.tensor(ours["logprobs"]), torch.tensor(base["logprobs"]),
                               atol=1e-5, rtol=0)
    assert ours["grad_norm0"] == pytest.approx(base["grad_norm0"], abs=1e-5)


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp2"])
def test_packed_rows_equal_right_padded_rows(layout, tmp_path_factory):
    result = run_layout("qwen2", layout, tmp_path_factory)
    padded = torch.tensor(result["logprobs"])
    packed = torch.tensor(result["packed_logprobs"])
    # Position 0 of every sequence is a prompt token, so packing changes no log-prob.
    torch.testing.assert_close(packed, pack_tensor(padded), atol=1e-5, rtol=0)
    assert packed.abs().sum() > 1  # the comparison covers real log-probs, not only zeros


def test_one_step_lowers_loss_and_reference_is_frozen(tmp_path_factory):
    result = run_layout("qwen2", "tp1pp1", tmp_path_factory)
    assert result["loss1"] < result["loss0"] - 1e-3
    assert result["reference_unchanged"]
    # Before the step the reference and policy hold the same weights: same log-probs.
    assert result["ref_logprobs_equal_policy"]
    assert "frozen" in result["frozen_optimizer_error"]


def hf_prime_reference(arch: str) -> dict:
    """PRIME's PPO and PRM losses and gradient norms with transformers + algo/ directly."""
    results = {}
    for name in ("ppo", "prm"):
        _, model = make_hf_model(arch)
        batch = make_batch(model.config.vocab_size)
        extras = prime_extras(batch)
        log_softmax = torch.log_softmax(model(batch.input_ids).logits.float()[:, :-1], dim=-1)
        zero = torch.zeros(batch.batch_size, 1)
        logprobs = torch.cat([zero, log_softmax.gather(-1, batch.input_ids[:, 1:, None])[..., 0]], 1)
        entropy = torch.cat([zero, -(log_softmax.exp() * log_softmax).sum(-1)], 1)
        mask = batch.response_mask.clone()
        mask[:, 0] = 0
        if name == "ppo":
            loss, metrics = ppo_policy_loss(logprobs * mask, extras["old_logprobs"],
                                            extras["advantages"], mask, PPOLossConfig(),
                                            entropy=entropy * mask)
        else:
            loss = prm_cross_entropy_loss(logprobs * mask, extras["ref_logprobs"], mask,
                                          extras["outcome_labels"], beta=0.05)
            metrics = {}
        loss.backward()
        grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
        results[name] = {"loss": float(loss.detach()), "grad_norm": float(grad_norm),
                         **{k: float(v) for k, v in metrics.items()}}
    return results


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2", "pp2", "tp2pp2", "dp2_distributed_optimizer"])
def test_prime_losses_in_the_schedule_match_a_direct_computation(layout, tmp_path_factory):
    ours = run_layout("qwen2", layout, tmp_path_factory)["prime"]
    ref = hf_prime_reference("qwen2")
    for name in ("ppo", "prm"):
        assert ours[name]["loss"] == pytest.approx(ref[name]["loss"], abs=1e-5), name
        assert ours[name]["grad_norm"] == pytest.approx(ref[name]["grad_norm"], rel=1e-4), name
    for metric in ("clip_fraction", "approx_kl", "entropy", "pg_loss"):
        assert ours["ppo"][metric] == pytest.approx(ref["ppo"][metric], abs=1e-5), metric
    assert 0 < ref["ppo"]["clip_fraction"] < 1  # the clipped and unclipped branches both occur
