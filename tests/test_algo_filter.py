"""Accuracy-band filter against hand-computed groups and a per-prompt loop."""

import random

import pytest
import torch

from megatron_prime.algo import AccuracyFilterConfig, accuracy_band_filter

N = 4


def test_filter_by_hand():
    scores = torch.tensor(
        [
            1, 1, 1, 1,  # 1.0 -> dropped (too easy)
            1, 0, 0, 0,  # 0.25 -> kept
            0, 0, 0, 0,  # 0.0 -> dropped (too hard)
            1, 1, 1, 0,  # 0.75 -> kept
            1, 1, 0, 0,  # 0.5 -> kept
        ],
        dtype=torch.float32,
    )  # fmt: skip
    result = accuracy_band_filter(scores, N)
    assert result.prompt_accuracy.tolist() == [1.0, 0.25, 0.0, 0.75, 0.5]
    assert result.keep_prompt.tolist() == [False, True, False, True, True]
    assert result.keep_response.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 8
    assert (result.num_kept, result.num_prompts) == (3, 5)


def test_band_edges_are_inclusive():
    # n=5: 1/5 = 0.2 and 4/5 = 0.8 sit exactly on the default band edges and are kept.
    scores = torch.tensor([1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.float32)
    result = accuracy_band_filter(scores, 5)
    assert result.keep_prompt.tolist() == [True, True, False]
    narrow = accuracy_band_filter(scores, 5, AccuracyFilterConfig(low=0.3, high=0.7))
    assert narrow.num_kept == 0


def test_fractional_scores_use_the_mean():
    # Code rewards as fraction of tests passed: mean 0.9 > 0.8 dropped, mean 0.3 kept.
    scores = torch.tensor([1.0, 1.0, 0.8, 0.8, 0.3, 0.3, 0.3, 0.3])
    assert accuracy_band_filter(scores, N).keep_prompt.tolist() == [False, True]


def test_filter_matches_loop():
    rng = random.Random(3)
    for low, high in [(0.2, 0.8), (0.0, 0.5), (0.5, 1.0)]:
        scores = [float(rng.random() < 0.5) for _ in range(40 * N)]
        result = accuracy_band_filter(torch.tensor(scores), N, AccuracyFilterConfig(low, high))
        expected = [low <= sum(scores[p : p + N]) / N <= high for p in range(0, len(scores), N)]
        assert result.keep_prompt.tolist() == expected
        assert result.num_kept == sum(expected)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"low=0.9, high=0.1"):
        AccuracyFilterConfig(low=0.9, high=0.1)
    with pytest.raises(ValueError, match="batch size 6"):
        accuracy_band_filter(torch.ones(6), N)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        accuracy_band_filter(torch.ones(2, 4), N)


def test_truncated_prompts_are_dropped_before_the_band():
    scores = torch.tensor(
        [
            1, 0, 0, 0,  # 0.25, one response cut at the length limit -> dropped
            1, 1, 0, 0,  # 0.5, none cut -> kept
            0, 0, 0, 0,  # 0.0, two cut -> dropped (also outside the band; counted as truncated)
            1, 1, 1, 0,  # 0.75, none cut -> kept
        ],
        dtype=torch.float32,
    )  # fmt: skip
    truncated = torch.tensor(
        [0, 0, 0, 1,  0, 0, 0, 0,  1, 0, 1, 0,  0, 0, 0, 0], dtype=torch.bool
    )  # fmt: skip
    result = accuracy_band_filter(scores, N, truncated=truncated)
    assert result.keep_prompt.tolist() == [False, True, False, True]
    assert (result.num_kept, result.num_prompts, result.num_truncated_dropped) == (2, 4, 2)
    assert result.keep_response.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    # Without the flags the band alone keeps prompts 0, 1 and 3.
    assert accuracy_band_filter(scores, N).keep_prompt.tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match=r"truncated must have the shape of scores \(16,\)"):
        accuracy_band_filter(scores, N, truncated=truncated[:8])


def test_collect_filters_groups_with_a_truncated_response():
    from megatron_prime.rollout.collect import BatchConfig, ScoredGroup, filter_groups

    groups = [
        ScoredGroup([1], [[2], [3]], [1.0, 0.0], truncated=[False, True]),  # 0.5 but cut -> dropped
        ScoredGroup([4], [[5], [6]], [0.0, 1.0], truncated=[False, False]),  # 0.5 -> kept
        ScoredGroup([7], [[8], [9]], [1.0, 1.0], truncated=[False, False]),  # 1.0 -> band drops it
        ScoredGroup([10], [[11], [12]], [0.0, 1.0]),  # no flags sent: nothing cut -> kept
    ]
    kept, verdict = filter_groups(groups, 2, BatchConfig())
    assert kept == [groups[1], groups[3]]
    assert (verdict.num_kept, verdict.num_truncated_dropped) == (2, 1)
    kept, verdict = filter_groups(groups, 2, BatchConfig(filter_truncated=False))
    assert kept == [groups[0], groups[1], groups[3]]
    assert verdict.num_truncated_dropped == 0
