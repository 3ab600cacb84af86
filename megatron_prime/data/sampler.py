"""Which prompts each data-parallel rank gets, in an order that survives a resume exactly.

Pure Python/torch, no torch.distributed: every rank builds the same global order from the
seed and takes its own slice, so no communication is needed and the data position is a few
integers that every rank holds identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size={dp_size!r} is invalid: expected an integer >= 1")
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r} is invalid: expected an integer in [0, {dp_size})")


def shard(records: Sequence[T], dp_rank: int, dp_size: int) -> list[T]:
    """Every dp_size-th record from dp_rank on: the shards are disjoint and cover all records,
    and their sizes differ by at most one (for evaluation sets, where every prompt counts)."""
    _check_rank(dp_rank, dp_size)
    return list(records[dp_rank::dp_size])


def epoch_permutation(num_records: int, seed: int, epoch: int) -> list[int]:
    """The order of one epoch: a function of (seed, epoch) only, the same on every rank."""
    # Mix seed and epoch so that (seed, epoch + 1) and (seed + 1, epoch) give different orders.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_records, generator=generator).tolist()


class PromptSampler:
    """Global batches of ``batch_size`` prompts, shuffled per epoch; this rank gets its slice.

    Each epoch is a fresh permutation of all records, cut into ``len(records) // batch_size``
    global batches (the remainder waits for a later epoch's order, so no batch mixes two
    epochs and no prompt appears twice in one batch). Rank r gets the r-th contiguous block
    of ``batch_size // dp_size`` prompts of each global batch.

    The position (epoch, batch within epoch) does not depend on the rank or on dp_size, so a
    run can resume with another data-parallel size and still see the same global batches.
    """

    def __init__(self, records: Sequence[T], batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        _check_rank(dp_rank, dp_size)
        if not isinstance(batch_size, int) or batch_size < 1 or batch_size % dp_size:
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive multiple of dp_size={dp_size}")
        if len(records) < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset ({len(records)} prompts)")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.batches_per_epoch = len(records) // batch_size
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order = epoch_permutation(len(records), seed, 0)

    def next_batch(self) -> list[T]:
        """This rank's prompts of the next global batch; moves the position on by one batch."""
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._order = epoch_permutation(len(self.records), self.seed, self.epoch)
        per_rank = self.batch_size // self.dp_size
        start = self.batch_in_epoch * self.batch_size + self.dp_rank * per_rank
        self.batch_in_epoch += 1
        return [self.records[i] for i in self._order[start:start + per_rank]]

    def state_dict(self) -> dict[str, Any]:
        """The data position, plus what must match for it to mean the same thing on resume."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "batch_size": self.batch_size, "num_records": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a different seed, batch size or dataset size is an error,
        because the same position would then point at different prompts."""
        for key, current in (("seed", self.seed), ("batch_size", self.batch_size), ("num_records", len(self.records))):
            if state.get(key) != current:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this run has {key}={current!r}; "
                                 f"resuming would give different prompts")
        epoch, batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        if not 0 <= batch_in_epoch <= self.batches_per_epoch or epoch < 0:
            raise ValueError(f"sampler state epoch={epoch!r}, batch_in_epoch={batch_in_epoch!r} is invalid: expected "
                             f"epoch >= 0 and batch_in_epoch in [0, {self.batches_per_epoch}]")
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._order = epoch_permutation(len(self.records), self.seed, epoch)
