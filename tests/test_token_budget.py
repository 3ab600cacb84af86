"""Token-budget micro-batching (algo.max_tokens_per_micro_batch): which rows go together,
checked by hand; a row the budget cannot hold and a budget below the engine's longest row
are refused by name. The numbers of the budgeted passes are compared with the fixed form in
test_micro_batch_trim.py (schedule) and test_prime_step.py (the whole PRIME update)."""

from __future__ import annotations

import pytest

from megatron_prime.models.schedule import MicroBatching, token_budget_groups
from megatron_prime.update import AlgoConfig, check_mini_batches


def test_rows_go_longest_first_while_rows_times_the_first_length_fit():
    # Ends 12, 9, 30, 20, 6, 5 with a 40-token budget: [30] alone (2 x 30 > 40), [20, 12]
    # (2 x 20 = 40), [9, 6, 5] (3 x 9 = 27; a fourth row would need none left).
    assert token_budget_groups([12, 9, 30, 20, 6, 5], 40, 1) == [[2], [3, 0], [1, 4, 5]]
    # Rounded to a multiple of 8: 32, 24, 16, 16, 8, 8 -> [32], [24], [16, 16], [8, 8].
    assert token_budget_groups([12, 9, 30, 20, 6, 5], 40, 8) == [[2], [3], [0, 1], [4, 5]]
    # Equal lengths keep the batch's order; a row without scored tokens costs one multiple.
    assert token_budget_groups([4, 4, 4, 0], 8, 4) == [[0, 1], [2, 3]]


def test_every_row_is_in_exactly_one_micro_batch_within_the_budget():
    ends = [(7 * i) % 23 + 1 for i in range(50)]
    groups = token_budget_groups(ends, 64, 4)
    assert sorted(row for group in groups for row in group) == list(range(50))
    for group in groups:
        longest = -(-max(ends[row] for row in group) // 4) * 4
        assert len(group) * longest <= 64
        assert ends[group[0]] == max(ends[row] for row in group)


def test_a_row_longer_than_the_budget_is_refused_by_name():
    with pytest.raises(ValueError, match=r"max_tokens_per_micro_batch=16 is less than one row of 24"):
        token_budget_groups([10, 24], 16, 8)


def test_the_budget_must_hold_the_engines_longest_row_at_start_up():
    config = AlgoConfig(max_tokens_per_micro_batch=1024)
    with pytest.raises(ValueError, match=r"algo.max_tokens_per_micro_batch.*max_model_len=4096"):
        check_mini_batches(config, 16, max_model_len=4096)
    check_mini_batches(config, 16, max_model_len=1024)
    assert config.micro_batching == MicroBatching(4, 1024)
    with pytest.raises(ValueError, match="algo.max_tokens_per_micro_batch"):
        AlgoConfig(max_tokens_per_micro_batch=0).validate()
