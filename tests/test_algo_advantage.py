"""Outcome RLOO, leave-one-out process rewards, discounted returns, whitening, and the full
PRIME advantage, against hand-computed numbers and a plain per-sample loop.
"""

import random

import pytest
import torch

from megatron_prime.algo import (
    AdvantageConfig,
    compute_prime_advantages,
    discounted_returns,
    masked_whiten,
    outcome_rloo_rewards,
    process_rloo_rewards,
)

N = 4


def _mask(lengths, seq_len, offsets=None):
    offsets = offsets or [0] * len(lengths)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.float64)
    for row, (start, length) in enumerate(zip(offsets, lengths)):
        mask[row, start : start + length] = 1
    return mask


# --- plain per-sample reference ------------------------------------------------------------


def loop_prime_advantages(outcome, process, mask, n, outcome_coef, process_coef, gamma, whiten,
                          process_baseline):
    """Straight from PRIME.md, one response at a time, in Python floats."""
    batch, seq_len = len(mask), len(mask[0])
    positions = [[t for t in range(seq_len) if mask[i][t]] for i in range(batch)]
    combined = [[0.0] * seq_len for _ in range(batch)]
    for i in range(batch):
        group = range(i - i % n, i - i % n + n)
        others = [j for j in group if j != i]
        if positions[i]:
            outcome_adv = outcome[i] - sum(outcome[j] for j in others) / (n - 1)
            combined[i][positions[i][-1]] += outcome_coef * outcome_adv
        if process is not None:
            averages = {j: (sum(process[j][t] for t in positions[j]) / len(positions[j]) if positions[j] else 0.0) for j in group}
            for t in positions[i]:
                if process_baseline == "paper":  # r_it - mean_{j != i} m_j
                    value = process[i][t] - sum(averages[j] for j in others) / (n - 1)
                else:  # the PRIME code: r_it * n/(n-1) - sum_j m_j / (n-1)
                    value = process[i][t] * n / (n - 1) - sum(averages.values()) / (n - 1)
                combined[i][t] += process_coef * value
    returns = [[0.0] * seq_len for _ in range(batch)]
    for i in range(batch):
        running = 0.0
        for t in reversed(positions[i]):
            running = combined[i][t] + gamma * running
            returns[i][t] = running
    if not whiten:
        return returns, returns
    values = [returns[i][t] for i in range(batch) for t in positions[i]]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    advantages = [[0.0] * seq_len for _ in range(batch)]
    for i in range(batch):
        for t in positions[i]:
            advantages[i][t] = (returns[i][t] - mean) / (var + 1e-8) ** 0.5
    return advantages, returns


# --- hand-computed numbers -----------------------------------------------------------------

LENGTHS = [3, 5, 1, 4]  # one prompt, n=4, unequal lengths (right padded to 5)


def test_outcome_rloo_by_hand():
    mask = _mask(LENGTHS, 5)
    token = outcome_rloo_rewards(torch.tensor([1.0, 0.0, 0.0, 1.0]), mask, N)
    # i=0: 1 - (0+0+1)/3 = 2/3; i=1: 0 - (1+0+1)/3 = -2/3; i=2: -2/3; i=3: 2/3,
    # each on the last response token (indices 2, 4, 0, 3).
    expected = torch.zeros(4, 5)
    expected[0, 2], expected[1, 4], expected[2, 0], expected[3, 3] = 2 / 3, -2 / 3, -2 / 3, 2 / 3
    torch.testing.assert_close(token, expected)
    # Equivalent form from PRIME.md: r_i * n/(n-1) - sum_j r_j/(n-1).
    assert token[0, 2].item() == pytest.approx(1 * 4 / 3 - 2 / 3)


def test_outcome_rloo_last_token_with_left_offset():
    # Response tokens need not start at 0 (e.g. prompt tokens in front): last token is found.
    mask = _mask([2, 1, 3, 2], 6, offsets=[3, 0, 1, 4])
    token = outcome_rloo_rewards(torch.tensor([0.0, 0.0, 0.0, 1.0]), mask, N)
    assert token[0, 4].item() == pytest.approx(-1 / 3)
    assert token[1, 0].item() == pytest.approx(-1 / 3)
    assert token[2, 3].item() == pytest.approx(-1 / 3)
    assert token[3, 5].item() == pytest.approx(1.0)
    assert (token != 0).sum().item() == 4


def test_process_rloo_by_hand():
    mask = _mask(LENGTHS, 5)
    rewards = torch.tensor(
        [
            [1.0, 2.0, 3.0, 0.0, 0.0],  # mean 2
            [0.0, 0.0, 0.0, 0.0, 5.0],  # mean 1
            [4.0, 0.0, 0.0, 0.0, 0.0],  # mean 4
            [1.0, 1.0, 1.0, 1.0, 0.0],  # mean 1
        ]
    )
    # The paper's form. Sum of response means = 8; baseline_i = (8 - mean_i) / 3 -> 2, 7/3, 4/3, 7/3.
    expected = torch.tensor(
        [
            [-1.0, 0.0, 1.0, 0.0, 0.0],
            [-7 / 3, -7 / 3, -7 / 3, -7 / 3, 8 / 3],
            [8 / 3, 0.0, 0.0, 0.0, 0.0],
            [-4 / 3, -4 / 3, -4 / 3, -4 / 3, 0.0],
        ]
    )
    torch.testing.assert_close(process_rloo_rewards(rewards, mask, N, "paper"), expected)


# n = 3, lengths 2, 4, 1 after a left offset, padding holding 9s that must be ignored.
SMALL_N = 3
SMALL_MASK = _mask([2, 4, 1], 6, offsets=[1, 0, 2])
SMALL_REWARDS = torch.tensor(
    [
        [9.0, 1.0, 3.0, 9.0, 9.0, 9.0],  # mean 2
        [0.0, 0.0, 0.0, 4.0, 9.0, 9.0],  # mean 1
        [9.0, 9.0, 3.0, 9.0, 9.0, 9.0],  # mean 3
    ],
    dtype=torch.float64,
)


def test_process_baseline_prime_code_by_hand():
    # Sum of response means 2 + 1 + 3 = 6: every token gets r * 3/2 - 6/2 = 1.5 r - 3.
    expected = torch.tensor(
        [
            [0.0, -1.5, 1.5, 0.0, 0.0, 0.0],
            [-3.0, -3.0, -3.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, 1.5, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    got = process_rloo_rewards(SMALL_REWARDS, SMALL_MASK, SMALL_N, "prime_code")
    torch.testing.assert_close(got, expected)
    # prime_code is the default.
    torch.testing.assert_close(process_rloo_rewards(SMALL_REWARDS, SMALL_MASK, SMALL_N), expected)


def test_process_baseline_paper_by_hand():
    # Leave-one-out means: row 0 (1 + 3) / 2 = 2, row 1 (2 + 3) / 2 = 2.5, row 2 (2 + 1) / 2 = 1.5.
    expected = torch.tensor(
        [
            [0.0, -1.0, 1.0, 0.0, 0.0, 0.0],
            [-2.5, -2.5, -2.5, 1.5, 0.0, 0.0],
            [0.0, 0.0, 1.5, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(process_rloo_rewards(SMALL_REWARDS, SMALL_MASK, SMALL_N, "paper"), expected)


def test_process_baselines_differ_by_own_deviation_and_share_first_token_return():
    code = process_rloo_rewards(SMALL_REWARDS, SMALL_MASK, SMALL_N, "prime_code")
    paper = process_rloo_rewards(SMALL_REWARDS, SMALL_MASK, SMALL_N, "paper")
    means = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    # (r_it - m_i) / (n - 1) on response tokens, 0 elsewhere: row 0 [-0.5, 0.5], row 1
    # [-0.5 x3, 1.5], row 2 [0].
    difference = (SMALL_REWARDS - means.unsqueeze(-1)) / (SMALL_N - 1) * SMALL_MASK
    torch.testing.assert_close(code - paper, difference)
    assert difference.abs().sum() > 0  # the forms really differ on this group
    # The return at each response's first token is the same: 0, -6, 1.5.
    code_returns = discounted_returns(code, SMALL_MASK)
    paper_returns = discounted_returns(paper, SMALL_MASK)
    first = [1, 0, 2]
    for row, position in enumerate(first):
        assert code_returns[row, position].item() == pytest.approx([0.0, -6.0, 1.5][row])
        assert paper_returns[row, position].item() == pytest.approx(code_returns[row, position].item())
    # ... and not at later tokens (row 1, second token: -3 vs -3.5).
    assert code_returns[1, 1].item() == pytest.approx(-3.0)
    assert paper_returns[1, 1].item() == pytest.approx(-3.5)


def test_discounted_returns_by_hand():
    mask = _mask([3, 2], 4)
    rewards = torch.tensor([[1.0, 2.0, 4.0, 100.0], [3.0, 1.0, 100.0, 100.0]])
    # gamma = 1: reverse cumsum [7, 6, 4], [4, 1]; padding rewards ignored, returns 0 there.
    torch.testing.assert_close(
        discounted_returns(rewards, mask, 1.0), torch.tensor([[7.0, 6.0, 4.0, 0.0], [4.0, 1.0, 0.0, 0.0]])
    )
    # gamma = 0.5: G2 = 4, G1 = 2 + 2 = 4, G0 = 1 + 2 = 3; second row G1 = 1, G0 = 3.5.
    torch.testing.assert_close(
        discounted_returns(rewards, mask, 0.5), torch.tensor([[3.0, 4.0, 4.0, 0.0], [3.5, 1.0, 0.0, 0.0]])
    )


def test_whitening_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 50.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    # mean 2, unbiased variance 1 -> [-1, 0, 1], padding 0.
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=torch.float64))


def test_prime_advantages_by_hand_unwhitened():
    mask = _mask(LENGTHS, 5)
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0])
    process = torch.tensor(
        [
            [1.0, 2.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 5.0],
            [4.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0, 1.0, 0.0],
        ]
    )
    config = AdvantageConfig(outcome_coef=3.0, process_coef=0.5, whiten=False, process_baseline="paper")
    advantages, returns = compute_prime_advantages(outcome, process, mask, N, config)
    # The paper's process baseline (test_process_rloo_by_hand). Row 0 combined: 0.5 * [-1, 0, 1] + 3 * [0, 0, 2/3] = [-0.5, 0, 2.5] -> returns [2, 2.5, 2.5].
    # Row 2 combined: 0.5 * 8/3 + 3 * (-2/3) = -2/3.
    # Row 3 combined: 0.5 * -4/3 each, + 2 on the last -> [-2/3, -2/3, -2/3, 4/3] -> [-2/3, 0, 2/3, 4/3].
    torch.testing.assert_close(returns[0, :3], torch.tensor([2.0, 2.5, 2.5]))
    torch.testing.assert_close(returns[2, :1], torch.tensor([-2 / 3]))
    torch.testing.assert_close(returns[3, :4], torch.tensor([-2 / 3, 0.0, 2 / 3, 4 / 3]))
    # Row 1 combined: 0.5 * [-7/3 x4, 8/3] + 3 * [0,0,0,0,-2/3] = [-7/6 x4, -2/3] -> last is -2/3,
    # first is 4 * -7/6 - 2/3 = -16/3.
    assert returns[1, 4].item() == pytest.approx(-2 / 3)
    assert returns[1, 0].item() == pytest.approx(-16 / 3)
    torch.testing.assert_close(advantages, returns)
    assert (returns * (1 - mask) == 0).all()


def test_all_equal_outcomes_give_zero_outcome_advantage():
    mask = _mask(LENGTHS, 5)
    advantages, returns = compute_prime_advantages(
        torch.ones(4), None, mask, N, AdvantageConfig(process_coef=0.0, whiten=False)
    )
    assert (returns == 0).all() and (advantages == 0).all()


# --- batched vs per-sample loop ------------------------------------------------------------


@pytest.mark.parametrize("process_baseline", ["prime_code", "paper"])
@pytest.mark.parametrize(
    "outcome_coef,process_coef,gamma,whiten",
    [(5.0, 5.0, 1.0, True), (5.0, 5.0, 1.0, False), (1.0, 2.0, 0.9, True), (5.0, 0.0, 1.0, True)],
)
def test_prime_advantages_match_loop(outcome_coef, process_coef, gamma, whiten, process_baseline):
    rng = random.Random(7)
    num_prompts, seq_len = 3, 9
    lengths = [rng.randint(1, seq_len - 1) for _ in range(num_prompts * N)]
    lengths[5] = 0  # an empty response must not break the batch
    offsets = [rng.randint(0, seq_len - length) for length in lengths]
    mask = _mask(lengths, seq_len, offsets)
    outcome = torch.tensor([float(rng.random() < 0.5) for _ in lengths], dtype=torch.float64)
    process = torch.randn(num_prompts * N, seq_len, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    config = AdvantageConfig(outcome_coef=outcome_coef, process_coef=process_coef, gamma=gamma, whiten=whiten,
                             process_baseline=process_baseline)
    advantages, returns = compute_prime_advantages(outcome, process, mask, N, config)
    loop_adv, loop_ret = loop_prime_advantages(
        outcome.tolist(), process.tolist(), mask.tolist(), N, outcome_coef, process_coef, gamma, whiten,
        process_baseline
    )
    torch.testing.assert_close(returns.double(), torch.tensor(loop_ret, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(advantages.double(), torch.tensor(loop_adv, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_bad_config_and_layout_name_the_problem():
    with pytest.raises(ValueError, match="gamma=1.5"):
        AdvantageConfig(gamma=1.5)
    with pytest.raises(ValueError, match="outcome_coef=-1"):
        AdvantageConfig(outcome_coef=-1)
    with pytest.raises(ValueError, match=r"algo.advantage.process_baseline='verl'.*'prime_code', 'paper'"):
        AdvantageConfig(process_baseline="verl")
    with pytest.raises(ValueError, match="num_samples_per_prompt=1"):
        outcome_rloo_rewards(torch.ones(4), torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match="batch size 6 is not a multiple"):
        compute_prime_advantages(torch.ones(6), None, torch.ones(6, 3), N)
