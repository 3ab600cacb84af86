"""The batch-wide statistics of algo/ (advantage whitening, batch_norm's scale, the PRM's
pairwise accuracy) give the same values when the batch is split into shards that each see
only their rows and combine statistics through a reduce callable, as data-parallel ranks do.

The shards run in threads and the reduce callable is an all-reduce built from a barrier,
so each shard really calls the function on its own rows only.
"""

from __future__ import annotations

import threading

import pytest
import torch

from megatron_prime.algo import (
    AdvantageConfig,
    compute_prime_advantages,
    implicit_process_rewards,
    masked_whiten,
    prm_pairwise_accuracy,
    prm_pairwise_agreement,
)

N = 4


class ThreadAllReduce:
    """An all-reduce among ``shards`` threads: every caller gets op over all callers' tensors."""

    def __init__(self, shards: int, op: str) -> None:
        self.barrier = threading.Barrier(shards)
        self.slots: dict[int, torch.Tensor] = {}
        self.op = op

    def for_shard(self, shard: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[shard] = tensor.clone()
            self.barrier.wait()
            stacked = torch.stack([self.slots[i] for i in sorted(self.slots)])
            result = stacked.sum(0) if self.op == "sum" else stacked.max(0).values
            self.barrier.wait()  # everyone has read before the next reduction overwrites
            return result
        return reduce


def run_sharded(shards: int, fn, *row_tensors: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """fn(shard's rows..., reduce) in one thread per shard; the shards' outputs concatenated."""
    reducer = ThreadAllReduce(shards, op)
    outputs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(shard: int) -> None:
        try:
            parts = [t.chunk(shards)[shard] for t in row_tensors]
            outputs[shard] = fn(*parts, reducer.for_shard(shard))
        except BaseException as error:  # surfaced below, not lost in the thread
            errors.append(error)
            reducer.barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return torch.cat([outputs[i] for i in range(shards)])


def grouped_batch(prompts: int = 4, seq: int = 12):
    generator = torch.Generator().manual_seed(3)
    rows = prompts * N
    mask = torch.zeros(rows, seq)
    for row in range(rows):
        start = 1 + row % 3
        mask[row, start:start + 2 + (7 * row) % 8] = 1
    values = torch.randn(rows, seq, generator=generator) * 3 + 1
    outcomes = (torch.rand(rows, generator=generator) > 0.5).float()
    prm = -torch.rand(rows, seq, generator=generator) * 4
    ref = -torch.rand(rows, seq, generator=generator) * 4
    return values, mask, outcomes, prm, ref


def test_whiten_by_hand_over_two_shards():
    # Masked entries 1, 3 | 5, 7: mean 4, Bessel variance (9 + 1 + 1 + 9) / 3 = 20 / 3.
    values = torch.tensor([[1.0, 3.0, 99.0], [5.0, 7.0, -99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = run_sharded(2, lambda v, m, reduce: masked_whiten(v, m, reduce_sum=reduce), values, mask)
    scale = (20 / 3) ** -0.5
    expected = torch.tensor([[-3 * scale, -scale, 0.0], [scale, 3 * scale, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # Without the reduction, each shard would whiten itself: [-1/sqrt(2), 1/sqrt(2)] per row.
    alone = masked_whiten(values[:1], mask[:1])
    assert alone[0, 0] == pytest.approx(-(2 ** -0.5), abs=1e-6)


@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_advantages_equal_the_whole_batch(shards):
    values, mask, outcomes, prm, ref = grouped_batch()
    process = implicit_process_rewards(prm, ref, mask, 0.05, "batch_norm")
    whole, _ = compute_prime_advantages(outcomes, process, mask, N, AdvantageConfig())

    def shard_advantages(o, p, m, reduce):
        return compute_prime_advantages(o, p, m, N, AdvantageConfig(), reduce_sum=reduce)[0]

    sharded = run_sharded(shards, shard_advantages, outcomes, process, mask)
    torch.testing.assert_close(sharded, whole, atol=1e-6, rtol=1e-6)
    # The same shards without the reduction whiten per shard, and differ.
    per_shard = torch.cat([compute_prime_advantages(o, p, m, N)[0] for o, p, m in
                           zip(outcomes.chunk(shards), process.chunk(shards), mask.chunk(shards))])
    assert (per_shard - whole).abs().max() > 1e-2


@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_batch_norm_equals_the_whole_batch(shards):
    _, mask, _, prm, ref = grouped_batch()
    whole = implicit_process_rewards(prm, ref, mask, 0.05, "batch_norm")
    sharded = run_sharded(
        shards, lambda p, r, m, reduce: implicit_process_rewards(p, r, m, 0.05, "batch_norm", reduce),
        prm, ref, mask, op="max")
    torch.testing.assert_close(sharded, whole, atol=1e-7, rtol=1e-6)
    # By hand: the scale is the largest |reverse cumulative sum| of beta * (prm - ref).
    raw = 0.05 * (prm - ref) * mask
    largest = raw.flip(-1).cumsum(-1).flip(-1).abs().max()
    torch.testing.assert_close(whole, raw / (largest + 1e-6))


def test_pairwise_agreement_sums_add_over_shards():
    # Group 1: labels [1, 0, 1, 0], scores [2, 1, 0, 3]: pairs (0>1 yes, 0>3 no, 2>1 no, 2>3 no)
    # = 1 of 4. Group 2: labels [1, 1, 1, 1]: no pair. Group 3: [1, 0, 0, 0], scores [1, 1, 0, 0]:
    # (0 vs 1 tie 0.5, 0>2 yes, 0>3 yes) = 2.5 of 3. Whole batch: 3.5 / 7.
    scores = torch.tensor([2.0, 1, 0, 3, 5, 5, 5, 5, 1, 1, 0, 0])
    labels = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0])
    assert float(prm_pairwise_accuracy(scores, labels, N)) == pytest.approx(3.5 / 7)
    agreeing, pairs = zip(*(prm_pairwise_agreement(s, l, N)
                            for s, l in zip(scores.chunk(3), labels.chunk(3))))
    assert [float(a) for a in agreeing] == [1.0, 0.0, 2.5]
    assert [float(p) for p in pairs] == [4.0, 0.0, 3.0]
    assert float(sum(agreeing) / sum(pairs)) == pytest.approx(3.5 / 7)
    # A mean of per-shard accuracies (0.25, 0.5 for "no pair", 0.833) would give 0.528.
