"""Data-parallel sharding and the epoch-aware sampler: determinism and exact resume."""

import pytest

from megatron_prime.data import PromptSampler, epoch_permutation, shard


def test_shard_is_disjoint_and_covers_everything():
    records = list(range(11))
    shards = [shard(records, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shards, [])) == records
    assert shard(records, 0, 1) == records


@pytest.mark.parametrize("rank, size, message", [
    (2, 2, "dp_rank=2 is invalid: expected an integer in [0, 2)"),
    (-1, 2, "dp_rank=-1 is invalid: expected an integer in [0, 2)"),
    (0, 0, "dp_size=0 is invalid: expected an integer >= 1"),
])
def test_shard_rejects_bad_ranks(rank, size, message):
    with pytest.raises(ValueError) as error:
        shard([1, 2], rank, size)
    assert str(error.value) == message


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    assert epoch_permutation(10, 0, 0) == [4, 1, 7, 5, 3, 9, 0, 8, 6, 2]
    assert epoch_permutation(10, 0, 1) == [5, 6, 1, 2, 0, 8, 9, 3, 7, 4]
    assert epoch_permutation(10, 1, 0) == [4, 1, 8, 6, 3, 9, 5, 7, 2, 0]
    assert epoch_permutation(10, 0, 0) == epoch_permutation(10, 0, 0)


def test_sampler_batches_exact_values():
    # 10 prompts, global batch 4: 2 batches per epoch, the last 2 prompts of each order wait.
    sampler = PromptSampler(list(range(10)), batch_size=4, seed=0, dp_rank=1, dp_size=2)
    assert [sampler.next_batch() for _ in range(4)] == [[7, 5], [0, 8], [1, 2], [9, 3]]
    assert sampler.state_dict() == {"epoch": 1, "batch_in_epoch": 2, "seed": 0, "batch_size": 4, "num_records": 10}


def test_ranks_split_each_global_batch_without_overlap():
    records = list(range(23))
    single = PromptSampler(records, batch_size=6, seed=5)
    ranks = [PromptSampler(records, batch_size=6, seed=5, dp_rank=r, dp_size=3) for r in range(3)]
    for _ in range(12):  # more than three epochs
        global_batch = single.next_batch()
        assert len(set(global_batch)) == 6
        assert sum((sampler.next_batch() for sampler in ranks), []) == global_batch


def test_every_prompt_once_per_epoch_when_batches_divide_it():
    sampler = PromptSampler(list(range(12)), batch_size=4, seed=3)
    for _ in range(3):
        epoch = sum((sampler.next_batch() for _ in range(3)), [])
        assert sorted(epoch) == list(range(12))


def test_resume_continues_the_uninterrupted_sequence():
    records = [f"p{i}" for i in range(13)]
    straight = PromptSampler(records, batch_size=4, seed=7, dp_rank=0, dp_size=2)
    expected = [straight.next_batch() for _ in range(10)]
    for stop in (0, 1, 3, 6, 9):  # 3 batches per epoch: stops at, inside and at the end of epochs
        first = PromptSampler(records, batch_size=4, seed=7, dp_rank=0, dp_size=2)
        before = [first.next_batch() for _ in range(stop)]
        state = dict(first.state_dict())
        resumed = PromptSampler(records, batch_size=4, seed=7, dp_rank=0, dp_size=2)
        resumed.load_state_dict(state)
        assert before + [resumed.next_batch() for _ in range(10 - stop)] == expected


def test_resume_with_another_dp_size_sees_the_same_global_batches():
    records = list(range(16))
    one_rank = PromptSampler(records, batch_size=4, seed=1)
    [one_rank.next_batch() for _ in range(5)]
    state = one_rank.state_dict()
    expected = [one_rank.next_batch() for _ in range(3)]
    halves = [PromptSampler(records, batch_size=4, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for sampler in halves:
        sampler.load_state_dict(state)
    assert [halves[0].next_batch() + halves[1].next_batch() for _ in range(3)] == expected


@pytest.mark.parametrize("change, message", [
    ({"seed": 8}, "sampler state has seed=8 but this run has seed=7; resuming would give different prompts"),
    ({"num_records": 12}, "sampler state has num_records=12 but this run has num_records=13; "
                          "resuming would give different prompts"),
    ({"batch_in_epoch": 4}, "sampler state epoch=0, batch_in_epoch=4 is invalid: expected epoch >= 0 "
                            "and batch_in_epoch in [0, 3]"),
])
def test_mismatched_state_is_refused(change, message):
    sampler = PromptSampler(list(range(13)), batch_size=4, seed=7)
    with pytest.raises(ValueError) as error:
        sampler.load_state_dict({**sampler.state_dict(), **change})
    assert str(error.value) == message


@pytest.mark.parametrize("batch_size, dp_size, message", [
    (3, 2, "batch_size=3 is invalid: expected a positive multiple of dp_size=2"),
    (0, 1, "batch_size=0 is invalid: expected a positive multiple of dp_size=1"),
    (8, 1, "batch_size=8 is larger than the dataset (5 prompts)"),
])
def test_bad_sampler_arguments(batch_size, dp_size, message):
    with pytest.raises(ValueError) as error:
        PromptSampler(list(range(5)), batch_size=batch_size, seed=0, dp_size=dp_size)
    assert str(error.value) == message
