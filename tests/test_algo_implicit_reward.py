"""Implicit process rewards, PRM cross-entropy loss and PRM pairwise accuracy.

Numbers are checked against values computed by hand here, and against plain per-sample Python
loops written below (independent of the batched implementation).
"""

import math
import random

import pytest
import torch

from megatron_prime.algo import (
    implicit_process_rewards,
    prm_cross_entropy_loss,
    prm_group_ranking_agreement,
    prm_pairwise_accuracy,
    sequence_log_ratio,
)

N = 4


def _mask(lengths: list[int], seq_len: int, offset: list[int] | None = None) -> torch.Tensor:
    """Response mask with response i occupying [offset_i, offset_i + length_i)."""
    offset = offset or [0] * len(lengths)
    mask = torch.zeros(len(lengths), seq_len)
    for row, (start, length) in enumerate(zip(offset, lengths)):
        mask[row, start : start + length] = 1
    return mask


def _random_batch(num_prompts: int, seq_len: int, seed: int):
    rng = random.Random(seed)
    lengths = [rng.randint(1, seq_len - 2) for _ in range(num_prompts * N)]
    offsets = [rng.randint(0, seq_len - length) for length in lengths]
    gen = torch.Generator().manual_seed(seed)
    prm = -torch.rand(num_prompts * N, seq_len, generator=gen, dtype=torch.float64) * 3
    ref = -torch.rand(num_prompts * N, seq_len, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([float(rng.random() < 0.5) for _ in lengths], dtype=torch.float64)
    return prm, ref, _mask(lengths, seq_len, offsets).double(), labels


# --- plain per-sample reference implementations -------------------------------------------


def loop_implicit_rewards(prm, ref, mask, beta, normalization):
    rows = []
    for i in range(len(prm)):
        rows.append([beta * (prm[i][t] - ref[i][t]) if mask[i][t] else 0.0 for t in range(len(prm[i]))])
    if normalization == "batch_norm":
        largest = 0.0
        for row in rows:
            running = 0.0
            for value in reversed(row):
                running += value
                largest = max(largest, abs(running))
        rows = [[value / (largest + 1e-6) for value in row] for row in rows]
    return rows


def loop_prm_loss(prm, ref, mask, labels, beta):
    losses = []
    for i in range(len(prm)):
        logit = beta * sum(float(prm[i][t] - ref[i][t]) for t in range(len(prm[i])) if mask[i][t])
        p = 1 / (1 + math.exp(-logit))
        y = float(labels[i])
        losses.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    return sum(losses) / len(losses)


def loop_pairwise_accuracy(scores, labels, n):
    numerator = denominator = 0.0
    for start in range(0, len(scores), n):
        for i in range(start, start + n):
            for j in range(start, start + n):
                if labels[i] > labels[j]:
                    weight = labels[i] - labels[j]
                    hit = 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
                    numerator += weight * hit
                    denominator += weight
    return numerator / denominator if denominator else 0.5


# --- hand-computed numbers -----------------------------------------------------------------


def test_implicit_rewards_by_hand():
    # One prompt, n=4, response lengths 3, 5, 1, 4 (right padded to 5).
    mask = _mask([3, 5, 1, 4], 5)
    ref = torch.zeros(4, 5)
    prm = torch.tensor(
        [
            [1.0, -2.0, 3.0, 9.0, 9.0],  # tokens 3, 4 are padding: their 9s must not count
            [-5.0, 0.0, 0.0, 0.0, 0.0],
            [2.0, 7.0, 7.0, 7.0, 7.0],
            [0.5, 0.5, 0.5, 0.5, 7.0],
        ]
    )
    rewards = implicit_process_rewards(prm, ref, mask, beta=0.5)
    expected = torch.tensor(
        [
            [0.5, -1.0, 1.5, 0.0, 0.0],
            [-2.5, 0.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.25, 0.25, 0.25, 0.25, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)
    # Reverse cumulative sums: row0 [1.0, 0.5, 1.5], row1 [-2.5, 0, ...], row2 [1.0], row3 [1.0,
    # 0.75, 0.5, 0.25] -> the largest absolute value is 2.5.
    normalized = implicit_process_rewards(prm, ref, mask, beta=0.5, normalization="batch_norm")
    torch.testing.assert_close(normalized, expected / (2.5 + 1e-6))


def test_prm_loss_by_hand():
    # beta * sum(log ratio) = 0.5 * 2 = 1 for both rows; label 1 then label 0.
    mask = _mask([2, 1], 3)
    prm = torch.tensor([[1.5, 0.5, 4.0], [2.0, 3.0, 3.0]])
    ref = torch.zeros(2, 3)
    labels = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(sequence_log_ratio(prm, ref, mask), torch.tensor([2.0, 2.0]))
    per_sample = prm_cross_entropy_loss(prm, ref, mask, labels, beta=0.5, reduction="none")
    # -log(sigmoid(1)) = log(1 + e^-1); -log(1 - sigmoid(1)) = log(1 + e)
    torch.testing.assert_close(per_sample, torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.e)]))
    mean = prm_cross_entropy_loss(prm, ref, mask, labels, beta=0.5)
    torch.testing.assert_close(mean, torch.tensor((0.313262 + 1.313262) / 2), atol=1e-5, rtol=0)


def test_prm_loss_gradient_direction():
    """Raising the log-ratio of a correct response lowers the loss; of a wrong one raises it."""
    mask = _mask([3, 2, 4, 1], 4)
    ref = torch.full((4, 4), -1.0)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    prm = torch.full((4, 4), -1.2, requires_grad=True)
    loss = prm_cross_entropy_loss(prm, ref, mask, labels, beta=0.05)
    loss.backward()
    grad = prm.grad
    assert (grad[0, :3] < 0).all() and (grad[2, :4] < 0).all()  # descent raises correct log-ratios
    assert (grad[1, :2] > 0).all() and (grad[3, :1] > 0).all()  # and lowers wrong ones
    assert (grad * (1 - mask) == 0).all()  # padding gets no gradient

    with torch.no_grad():
        raised_correct = prm.clone()
        raised_correct[0, :3] += 0.5
        raised_wrong = prm.clone()
        raised_wrong[1, :2] += 0.5
        assert prm_cross_entropy_loss(raised_correct, ref, mask, labels, beta=0.05) < loss
        assert prm_cross_entropy_loss(raised_wrong, ref, mask, labels, beta=0.05) > loss


def test_prm_loss_large_logits_stay_finite():
    mask = torch.ones(2, 2)
    prm = torch.tensor([[500.0, 500.0], [-500.0, -500.0]])
    loss = prm_cross_entropy_loss(prm, torch.zeros(2, 2), mask, torch.tensor([0.0, 1.0]), beta=1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1000.0)


def test_pairwise_accuracy_by_hand():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # Group 0: the 4 discordant pairs (0,1), (0,3), (2,1), (2,3) all ranked right -> 1.
    # Group 1: all correct, no ranking signal -> skipped.
    perfect = torch.tensor([3.0, 1.0, 2.0, 0.0, 9.0, -9.0, 0.0, 0.0])
    assert prm_pairwise_accuracy(perfect, labels, N).item() == pytest.approx(1.0)
    # (0,1) right, (0,3) right, (2,1) wrong (0 < 1), (2,3) tie (0.5) -> 2.5 / 4.
    mixed = torch.tensor([3.0, 1.0, 0.0, 0.0, 9.0, -9.0, 0.0, 0.0])
    assert prm_pairwise_accuracy(mixed, labels, N).item() == pytest.approx(0.625)
    # Fractional labels weigh by label gap: only pair (0,1) gap 1 wrong, (0,2) gap 0.5 right,
    # (2,1) gap 0.5 right, pairs with label 0 vs 0 skipped -> (0.5 + 0.5) / 2.
    fractional = torch.tensor([1.0, 0.0, 0.5, 0.0])
    scores = torch.tensor([0.0, 1.0, -1.0, 5.0])
    # pairs: (0,1) g1 wrong, (0,2) g.5 right, (0,3) g1 wrong, (2,1) g.5 wrong, (2,3) g.5 wrong
    assert prm_pairwise_accuracy(scores, fractional, N).item() == pytest.approx(0.5 / 3.5)
    # No informative pair anywhere -> chance, never NaN.
    assert prm_pairwise_accuracy(torch.randn(4), torch.ones(4), N).item() == 0.5


def test_group_ranking_accuracy_by_hand():
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    scores = torch.tensor([2.0, 1.0, 3.0, 0.0, 5.0, 0.0, 1.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    # Group 0 (1 right, 3 wrong): (0,1) right, (0,2) wrong, (0,3) right -> 2/3.
    # Group 1 (2 right, 2 wrong): (0,2), (0,3), (1,3) right, (1,2) wrong (0 < 1) -> 3/4.
    # Group 2 all right: left out.
    fractions, groups = prm_group_ranking_agreement(scores, labels, N)
    assert fractions.item() == pytest.approx(2 / 3 + 3 / 4)
    assert groups.item() == 2  # mean (2/3 + 3/4) / 2 = 17/24
    # The pair-weighted accuracy of the same batch is (2 + 3) / (3 + 4) = 5/7, not 17/24.
    assert prm_pairwise_accuracy(scores, labels, N).item() == pytest.approx(5 / 7)
    # A tie counts half: group 0 with s_2 = s_0 -> (1 + 0.5 + 1) / 3.
    tied = scores.clone()
    tied[2] = 2.0
    assert prm_group_ranking_agreement(tied, labels, N)[0].item() == pytest.approx(2.5 / 3 + 3 / 4)
    # No group with both outcomes: nothing summed (the trainer reports chance, 0.5).
    fractions, groups = prm_group_ranking_agreement(torch.randn(4), torch.zeros(4), N)
    assert (fractions.item(), groups.item()) == (0.0, 0.0)


# --- batched vs per-sample loop ------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["none", "batch_norm"])
def test_implicit_rewards_match_loop(normalization):
    prm, ref, mask, _ = _random_batch(num_prompts=3, seq_len=11, seed=1)
    batched = implicit_process_rewards(prm, ref, mask, beta=0.05, normalization=normalization)
    expected = torch.tensor(loop_implicit_rewards(prm.tolist(), ref.tolist(), mask.tolist(), 0.05, normalization))
    torch.testing.assert_close(batched, expected.double())


def test_prm_loss_and_accuracy_match_loop():
    prm, ref, mask, labels = _random_batch(num_prompts=3, seq_len=11, seed=2)
    loss = prm_cross_entropy_loss(prm, ref, mask, labels, beta=0.3)
    assert loss.item() == pytest.approx(loop_prm_loss(prm.tolist(), ref.tolist(), mask.tolist(), labels.tolist(), 0.3))
    scores = sequence_log_ratio(prm, ref, mask)
    accuracy = prm_pairwise_accuracy(scores, labels, N)
    assert accuracy.item() == pytest.approx(loop_pairwise_accuracy(scores.tolist(), labels.tolist(), N))


def test_bad_inputs_name_the_problem():
    mask = torch.ones(4, 3)
    with pytest.raises(ValueError, match="normalization='layer_norm'"):
        implicit_process_rewards(mask, mask, mask, beta=0.05, normalization="layer_norm")
    with pytest.raises(ValueError, match="same"):
        implicit_process_rewards(mask, torch.ones(4, 2), mask, beta=0.05)
    with pytest.raises(ValueError, match="not a multiple of num_samples_per_prompt=3"):
        prm_pairwise_accuracy(torch.ones(4), torch.ones(4), 3)
    with pytest.raises(ValueError, match=r"outcome_labels must have shape \[batch\]"):
        prm_cross_entropy_loss(mask, mask, mask, torch.ones(3), beta=0.05)
