"""PPO clipped loss: hand-computed tokens, dual clip, entropy bonus, aggregation, metrics, and
a plain per-token loop reference."""

import math
import random

import pytest
import torch

from megatron_prime.algo import PPOLossConfig, ppo_policy_loss

N = 4


def loop_ppo_loss(log_probs, old, adv, mask, clip, dual_clip, aggregation, entropy, entropy_coef):
    per_row_loss, per_row_entropy = [], []
    total_loss = total_entropy = 0.0
    clipped_tokens = count = 0
    for i in range(len(mask)):
        row_loss = row_entropy = 0.0
        row_count = 0
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(log_probs[i][t] - old[i][t])
            a = adv[i][t]
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
            loss = max(unclipped, clipped)
            if dual_clip is not None and a < 0:
                loss = min(loss, -a * dual_clip)
            clipped_tokens += clipped > unclipped
            row_loss += loss
            row_entropy += entropy[i][t]
            row_count += 1
        total_loss += row_loss
        total_entropy += row_entropy
        count += row_count
        per_row_loss.append(row_loss / max(row_count, 1))
        per_row_entropy.append(row_entropy / max(row_count, 1))
    if aggregation == "token_mean":
        pg, ent = total_loss / count, total_entropy / count
    else:
        pg, ent = sum(per_row_loss) / len(mask), sum(per_row_entropy) / len(mask)
    return pg - entropy_coef * ent, clipped_tokens / count


def _tokens(ratios, advantages):
    log_probs = torch.log(torch.tensor([ratios], dtype=torch.float64))
    return log_probs, torch.zeros_like(log_probs), torch.tensor([advantages], dtype=torch.float64)


def test_clipped_surrogate_by_hand():
    # token: (ratio, A) -> per-token loss max(-A r, -A clip(r, 0.8, 1.2))
    #   (1.5, +1) -> max(-1.5, -1.2) = -1.2   clipped
    #   (1.5, -1) -> max( 1.5,  1.2) =  1.5
    #   (0.5, +1) -> max(-0.5, -0.8) = -0.5
    #   (0.5, -1) -> max( 0.5,  0.8) =  0.8   clipped
    #   (1.0, +2) -> -2
    log_probs, old, adv = _tokens([1.5, 1.5, 0.5, 0.5, 1.0], [1.0, -1.0, 1.0, -1.0, 2.0])
    mask = torch.ones_like(adv)
    loss, metrics = ppo_policy_loss(log_probs, old, adv, mask, PPOLossConfig(clip_ratio=0.2))
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8 - 2.0) / 5)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    # k3 estimator: r - 1 - log r, averaged.
    k3 = [r - 1 - math.log(r) for r in (1.5, 1.5, 0.5, 0.5, 1.0)]
    assert metrics["approx_kl"].item() == pytest.approx(sum(k3) / 5)


def test_dual_clip_caps_negative_advantages():
    # ratio 5, A = -1: clipped surrogate is max(5, 1.2) = 5; the dual clip caps it at 3 * 1 = 3.
    # ratio 5, A = +1: max(-5, -1.2) = -1.2 (dual clip only applies to A < 0).
    log_probs, old, adv = _tokens([5.0, 5.0, 2.0], [-1.0, 1.0, -2.0])
    mask = torch.ones_like(adv)
    # ratio 2, A = -2: max(4, 2.4) = 4, below the cap 6 -> unchanged.
    loss, metrics = ppo_policy_loss(log_probs, old, adv, mask, PPOLossConfig(dual_clip_ratio=3.0, entropy_coef=0.0))
    assert loss.item() == pytest.approx((3.0 - 1.2 + 4.0) / 3)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    no_dual, _ = ppo_policy_loss(log_probs, old, adv, mask, PPOLossConfig(entropy_coef=0.0))
    assert no_dual.item() == pytest.approx((5.0 - 1.2 + 4.0) / 3)


def test_token_mean_vs_seq_mean_and_entropy_bonus_by_hand():
    # Row 0 has 3 tokens with loss -1 each (ratio 1, A = 1); row 1 one token with loss +2.
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 7.0, 7.0]])
    zeros = torch.zeros(2, 3)
    entropy = torch.tensor([[1.0, 1.0, 1.0], [5.0, 9.0, 9.0]])
    token, metrics = ppo_policy_loss(zeros, zeros, adv, mask, PPOLossConfig(entropy_coef=0.1), entropy=entropy)
    # token_mean: (-3 + 2) / 4 = -0.25; entropy (3 + 5) / 4 = 2 -> -0.25 - 0.1 * 2
    assert token.item() == pytest.approx(-0.45)
    assert metrics["entropy"].item() == pytest.approx(2.0)
    seq, _ = ppo_policy_loss(
        zeros, zeros, adv, mask, PPOLossConfig(entropy_coef=0.1, aggregation="seq_mean"), entropy=entropy
    )
    # seq_mean: (-1 + 2) / 2 = 0.5; entropy (1 + 5) / 2 = 3 -> 0.5 - 0.3
    assert seq.item() == pytest.approx(0.2)
    # A global normalizer (e.g. the valid tokens of all micro-batches) replaces the local count.
    global_norm, _ = ppo_policy_loss(zeros, zeros, adv, mask, PPOLossConfig(entropy_coef=0.0), normalizer=8)
    assert global_norm.item() == pytest.approx(-1 / 8)


def test_micro_batch_losses_with_global_normalizer_sum_to_full_batch_loss():
    gen = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(8, 6, generator=gen)
    old = log_probs + 0.3 * torch.randn(8, 6, generator=gen)
    adv = torch.randn(8, 6, generator=gen)
    mask = (torch.rand(8, 6, generator=gen) > 0.3).float()
    full, _ = ppo_policy_loss(log_probs, old, adv, mask)
    total_tokens = mask.sum()
    parts = [ppo_policy_loss(log_probs[s], old[s], adv[s], mask[s], normalizer=total_tokens)[0] for s in (slice(0, 3), slice(3, 8))]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-5)


def test_gradient_pushes_probability_along_advantage():
    log_probs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = ppo_policy_loss(log_probs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    assert log_probs.grad[0, 0] < 0 < log_probs.grad[0, 1]  # descent raises A>0, lowers A<0
    # Clipped tokens get no gradient.
    log_probs = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = ppo_policy_loss(log_probs, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    loss.backward()
    assert log_probs.grad.item() == 0.0


@pytest.mark.parametrize("aggregation,dual_clip", [("token_mean", None), ("seq_mean", None), ("token_mean", 3.0)])
def test_ppo_loss_matches_loop(aggregation, dual_clip):
    rng = random.Random(11)
    batch, seq_len = 3 * N, 10
    gen = torch.Generator().manual_seed(5)
    log_probs = -torch.rand(batch, seq_len, generator=gen, dtype=torch.float64) * 2
    old = log_probs + 0.5 * torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)
    adv = 2 * torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)
    entropy = torch.rand(batch, seq_len, generator=gen, dtype=torch.float64)
    mask = torch.zeros(batch, seq_len, dtype=torch.float64)
    for row in range(batch):
        length = rng.randint(1, seq_len)
        mask[row, :length] = 1
    config = PPOLossConfig(clip_ratio=0.2, dual_clip_ratio=dual_clip, aggregation=aggregation, entropy_coef=0.01)
    loss, metrics = ppo_policy_loss(log_probs, old, adv, mask, config, entropy=entropy)
    expected_loss, expected_clip = loop_ppo_loss(
        log_probs.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, dual_clip, aggregation, entropy.tolist(), 0.01
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9)
    assert metrics["clip_fraction"].item() == pytest.approx(expected_clip)
    assert 0 < metrics["clip_fraction"].item() < 1


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="clip_ratio=1.5"):
        PPOLossConfig(clip_ratio=1.5)
    with pytest.raises(ValueError, match="dual_clip_ratio=0.5"):
        PPOLossConfig(dual_clip_ratio=0.5)
    with pytest.raises(ValueError, match="aggregation='sum'"):
        PPOLossConfig(aggregation="sum")


def test_truncated_importance_weights_by_hand():
    """min(pi_old / pi_sampler, cap) per token, 0 outside the mask: old - sampler log-probs
    of ln 0.5, 0, ln 3 and ln 10 give 0.5, 1, 2 (capped from 3) and 2 (capped from 10)."""
    from megatron_prime.algo import truncated_importance_weights

    old = torch.tensor([[math.log(0.5), 0.0, math.log(3.0), math.log(10.0), 0.0]])
    sampler = torch.zeros_like(old)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    weights = truncated_importance_weights(old, sampler, mask, cap=2.0)
    assert weights.tolist()[0] == pytest.approx([0.5, 1.0, 2.0, 2.0, 0.0])
    # A gap that exp() could not hold is capped, not inf.
    huge = truncated_importance_weights(torch.tensor([[200.0]]), torch.tensor([[-200.0]]),
                                        torch.ones(1, 1), cap=2.0)
    assert huge.item() == 2.0


def test_token_weights_scale_each_surrogate_by_hand():
    # Ratios 1.5 and 0.5 with A = +1: per-token losses -1.2 (clipped) and -0.5; weights 2 and
    # 0.5 make them -2.4 and -0.25, token mean -1.325; the metrics are not weighted.
    log_probs, old, adv = _tokens([1.5, 0.5], [1.0, 1.0])
    mask = torch.ones_like(adv)
    weights = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    loss, metrics = ppo_policy_loss(log_probs, old, adv, mask, PPOLossConfig(entropy_coef=0.0),
                                    token_weights=weights)
    assert loss.item() == pytest.approx(-1.325)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)


def test_rollout_correction_in_the_ppo_loss_adapter_by_hand():
    """losses.ppo_loss with a cap: the sampler's log-probs weight each token, the metrics
    report the mean weight and the capped share. One row, tokens 1-3 scored; the update's
    own forward is the old policy (ratio 1), so each token's loss is -A * w: sampler gaps
    ln 2 (w 0.5), 0 (w 1) and -ln 4 (w 4, capped to 2) give -(0.5 + 1 + 2) / 3 with A = 1."""
    from megatron_prime.losses import StepBatch, ppo_loss
    from megatron_prime.models.schedule import TokenOutputs

    logprobs = torch.full((1, 4), -1.0, requires_grad=True)
    sampler = torch.tensor([[0.0, -1.0 + math.log(2.0), -1.0, -1.0 - math.log(4.0)]])
    batch = StepBatch(input_ids=torch.zeros(1, 4, dtype=torch.long), response_mask=torch.ones(1, 4),
                      outcome_rewards=torch.ones(1), rollout_logprobs=sampler,
                      advantages=torch.ones(1, 4))
    loss_sum, units, metrics = ppo_loss(PPOLossConfig(entropy_coef=0.0), old_from_current=True,
                                        correction_cap=2.0)(
        TokenOutputs(logprobs, torch.zeros(1, 4)), batch)
    assert units.item() == 3
    assert loss_sum.item() == pytest.approx(-(0.5 + 1.0 + 2.0))
    assert metrics["rollout_is_weight"].item() / 3 == pytest.approx((0.5 + 1.0 + 2.0) / 3)
    assert metrics["rollout_is_capped_fraction"].item() / 3 == pytest.approx(1 / 3)


def test_rollout_correction_settings_are_checked():
    from megatron_prime.update import AlgoConfig

    with pytest.raises(ValueError, match="algo.rollout_correction="):
        AlgoConfig(rollout_correction="is").validate()
    with pytest.raises(ValueError, match="algo.rollout_correction_cap"):
        AlgoConfig(rollout_correction="tis", rollout_correction_cap=0.5).validate()
