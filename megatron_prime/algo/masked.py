"""Masked reductions and group views shared by the PRIME algorithm functions.

Batch layout used throughout ``megatron_prime.algo``:

* Token tensors are ``[batch, seq]``. ``response_mask`` is 1 on the response tokens of each row
  and 0 elsewhere (prompt tokens, padding). Responses have different lengths; each row's
  response tokens must be contiguous (one span), which is how rollouts are laid out.
* The ``num_samples_per_prompt`` responses to one prompt are consecutive rows: rows
  ``p * n ... p * n + n - 1`` belong to prompt ``p``. ``batch`` must be a multiple of ``n``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Sums a tensor of per-shard statistics over every shard of the batch and returns the total
# (the trainer passes an all-reduce over the data-parallel group; None = this batch is all).
# Kept a callable so algo/ stays free of torch.distributed.
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def check_groups(batch_size: int, num_samples_per_prompt: int, *, min_samples: int = 1) -> int:
    """Validate the grouped layout and return the number of prompts.

    Leave-one-out baselines need at least two samples per prompt, so callers computing them
    pass ``min_samples=2``.
    """
    if num_samples_per_prompt < min_samples:
        raise ValueError(
            f"num_samples_per_prompt={num_samples_per_prompt} is not allowed here: "
            f"need at least {min_samples} samples per prompt"
        )
    if batch_size % num_samples_per_prompt != 0:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of num_samples_per_prompt="
            f"{num_samples_per_prompt}; the responses of a prompt must be consecutive rows"
        )
    return batch_size // num_samples_per_prompt


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the tensors whose shapes disagree."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"tensors must have the same [batch, seq] shape, got {shapes}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set; ``values`` outside the mask may be anything."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked entries; an empty mask gives 0 rather than NaN (an empty response
    contributes nothing instead of poisoning the batch)."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  reduce_sum: ReduceFn | None = None) -> torch.Tensor:
    """Shift to zero mean and scale to unit variance over the masked entries of the batch.

    Variance uses Bessel's correction (n - 1), as the PRIME reference does. Entries outside the
    mask are set to 0 so they can never leak into a loss.

    ``values`` may be one shard of a larger batch (a data-parallel rank's rows): then
    ``reduce_sum`` sums the shard's statistics over all shards, so the mean and variance are
    the whole batch's and the result does not depend on how the batch was split. Two
    reductions (sum and count, then squared deviations) keep the two-pass variance's accuracy;
    the statistics are summed in float64 so the shard order barely changes the rounding.
    """
    mask_f = mask.to(values.dtype)
    totals = torch.stack([masked_sum(values, mask).double(), mask_f.sum().double()])
    if reduce_sum is not None:
        totals = reduce_sum(totals)
    total, count = totals[0], totals[1]
    mean = (total / count.clamp(min=1)).to(values.dtype)
    centered = (values - mean) * mask_f
    squares = (centered.double() ** 2).sum()
    if reduce_sum is not None:
        squares = reduce_sum(squares)
    variance = (squares / (count - 1).clamp(min=1)).to(values.dtype)
    return centered * torch.rsqrt(variance + eps)


def last_token_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last response token of each row, and whether the row has any.

    Rows without response tokens get index 0 and ``has_tokens`` False; callers must not write
    there.
    """
    seq_len = response_mask.shape[-1]
    has_tokens = response_mask.bool().any(dim=-1)
    # argmax returns the first maximum, so search the reversed mask for its first 1.
    last_from_end = response_mask.bool().flip(-1).to(torch.int8).argmax(dim=-1)
    index = torch.where(has_tokens, seq_len - 1 - last_from_end, torch.zeros_like(last_from_end))
    return index, has_tokens


def leave_one_out_mean(values: torch.Tensor, num_samples_per_prompt: int) -> torch.Tensor:
    """For each entry of a ``[batch]`` vector, the mean of the other n - 1 entries of its group."""
    n = num_samples_per_prompt
    groups = values.view(-1, n)
    group_sum = groups.sum(dim=-1, keepdim=True)
    return ((group_sum - groups) / (n - 1)).reshape(values.shape)
