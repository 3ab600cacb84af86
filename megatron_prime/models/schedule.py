"""Forward-only and forward-backward passes through Megatron's pipeline schedule.

Both go through ``get_forward_backward_func`` (no pipelining, 1F1B or interleaved, chosen by
Megatron from the layout), with a ``forward_step`` closure per micro-batch. Log-probs and
entropy are computed vocab-parallel on the last stage; a pluggable ``LossFn`` turns them into
a loss, following Megatron's 3-tuple contract ``(loss_sum, num_units, metric_sums)``.

Normalisation: ``calculate_per_token_loss=True`` (models/architectures.py), so Megatron does
*not* divide each micro-batch's loss; ``finalize_model_grads`` divides the gradients once by
the global ``num_units`` (summed over micro-batches and DP ranks). A loss function therefore
returns an un-normalised sum and the count it should be averaged over (tokens for PPO,
sequences for the PRM's cross-entropy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from megatron_prime import distributed
from megatron_prime.models.architectures import padded_sequence_length
from megatron_prime.models.builder import BuiltModel
from megatron_prime.models.logprobs import token_logprobs_and_entropy


@dataclass
class TokenBatch:
    """Token rows plus the tensors a loss needs.

    Layouts: right-padded (one prompt+response per row, ``segment_ids=None``) or packed
    (several sequences per row; ``segment_ids`` numbers them from 1, 0 = padding).

    Every tensor field (and every tensor in ``extras``) has the batch as its first dimension;
    ``map_tensors`` walks the dataclass fields, so a subclass that adds typed tensor fields
    (losses.StepBatch: old/ref/PRM log-probs, advantages...) is moved, micro-batched and
    padded with its tokens without further code. ``extras`` only carries what the rollout
    attaches (the sampler's log-probs) until the step turns it into a typed field.
    """

    input_ids: Tensor  # [batch, seq] int64
    response_mask: Tensor  # [batch, seq]; 1 where the token's log-prob is wanted
    segment_ids: Tensor | None = None  # [batch, seq] for packed rows
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]

    def position_ids(self) -> Tensor:
        """Positions restart at 0 in each packed sequence (RoPE is relative, so masks decide)."""
        if self.segment_ids is None:
            return torch.arange(self.seq_length, device=self.input_ids.device).expand_as(self.input_ids)
        starts = torch.ones_like(self.segment_ids, dtype=torch.bool)
        starts[:, 1:] = self.segment_ids[:, 1:] != self.segment_ids[:, :-1]
        index = torch.arange(self.seq_length, device=self.input_ids.device).expand_as(self.input_ids)
        start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        return index - start_index

    def attention_mask(self) -> Tensor:
        """Boolean mask, True = may NOT attend (Megatron's convention): causal, within a segment."""
        seq = self.seq_length
        future = torch.ones(seq, seq, dtype=torch.bool, device=self.input_ids.device).triu(1)
        if self.segment_ids is None:
            return future.view(1, 1, seq, seq)
        other_segment = self.segment_ids.unsqueeze(2) != self.segment_ids.unsqueeze(1)
        return (future.unsqueeze(0) | other_segment).unsqueeze(1)

    def scored_token_mask(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Response tokens that have a prediction (position 0 never does); a new tensor."""
        mask = self.response_mask.to(dtype).clone()
        mask[:, 0] = 0
        return mask

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> TokenBatch:
        """The same batch (same class) with ``fn`` applied to every tensor field and every
        tensor in ``extras``; ``None`` fields stay ``None``."""
        changes: dict[str, object] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Tensor):
                changes[spec.name] = fn(value)
            elif isinstance(value, dict):
                changes[spec.name] = {k: fn(v) for k, v in value.items()}
        return replace(self, **changes)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor the batch holds, by field name (``extras/<key>`` for extras)."""
        found: dict[str, Tensor] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Tensor):
                found[spec.name] = value
            elif isinstance(value, dict):
                found.update({f"{spec.name}/{k}": v for k, v in value.items()})
        return found

    def to(self, device: torch.device) -> TokenBatch:
        """Every tensor on ``device``; tensors already there are not copied."""
        return self.map_tensors(lambda t: t.to(device))

    def micro_batches(self, micro_batch_size: int) -> list[TokenBatch]:
        if self.batch_size % micro_batch_size:
            raise ValueError(f"batch of {self.batch_size} rows is not divisible by "
                             f"micro_batch_size={micro_batch_size}")
        return [self.map_tensors(lambda t, i=i: t[i:i + micro_batch_size])
                for i in range(0, self.batch_size, micro_batch_size)]

    def trimmed_to_length(self, length: int) -> TokenBatch:
        """The first ``length`` tokens of every per-token tensor (per-row tensors unchanged)."""
        if length >= self.seq_length:
            return self
        return self._map_per_token(lambda t: t[:, :length])

    def scored_lengths(self, micro_batch_size: int, multiple: int) -> list[int]:
        """Per micro-batch: the tokens up to its last scored one, rounded up to ``multiple``
        (at least one multiple). What follows a row's last scored token changes none of its
        log-probs (causal attention), so a micro-batch need not compute it. One host read."""
        positions = torch.arange(1, self.seq_length + 1, device=self.input_ids.device)
        ends = (self.response_mask.ne(0) * positions).amax(dim=1)  # 0 for rows without any
        per_micro_batch = ends.view(-1, micro_batch_size).amax(dim=1).tolist()
        return [padded_sequence_length(end, multiple) for end in per_micro_batch]

    def padded_to_length(self, length: int) -> TokenBatch:
        """Right-pads every per-token tensor (second dimension = the sequence) with zeros to
        ``length``: padding tokens are outside the response mask (and segment 0 in packed
        rows), and causal attention keeps them from changing any earlier position."""
        missing = length - self.seq_length
        if missing < 0:
            raise ValueError(f"cannot pad a batch of {self.seq_length} tokens to {length}")
        if missing == 0:
            return self
        return self._map_per_token(
            lambda t: torch.cat([t, t.new_zeros(t.shape[0], missing, *t.shape[2:])], dim=1))

    def _map_per_token(self, fn: Callable[[Tensor], Tensor]) -> TokenBatch:
        """``fn`` on every per-token tensor (second dimension = the sequence); per-row tensors
        (labels, rewards) unchanged."""
        seq = self.seq_length
        return self.map_tensors(lambda t: fn(t) if t.dim() >= 2 and t.shape[1] == seq else t)

    def padded_to_multiple(self, multiple: int) -> tuple[TokenBatch, int]:
        """Adds fully masked rows so the batch splits evenly; returns the real row count."""
        missing = -self.batch_size % multiple
        if missing == 0:
            return self, self.batch_size
        return self.map_tensors(
            lambda t: torch.cat([t, t.new_zeros(missing, *t.shape[1:])])), self.batch_size


@dataclass
class TokenOutputs:
    """What the last stage computes for a micro-batch, aligned with ``input_ids``."""

    logprobs: Tensor  # [batch, seq] float32, 0 outside the response mask
    entropy: Tensor  # [batch, seq] float32, 0 outside the response mask


@dataclass(frozen=True)
class MicroBatching:
    """How a batch is cut into micro-batches.

    ``size`` rows each (the batch is padded with masked rows to a multiple), or, with
    ``max_tokens``, micro-batches of varying rows whose padded size (rows x the longest row's
    tokens up to its last scored one) stays within that budget: verl's dynamic batch size
    (``use_dynamic_bsz``, ``ppo_max_token_len_per_gpu``) for Megatron's ``[b, s]`` micro-batches.
    Long responses then run a few rows at a time and short ones many, so activation memory
    is bounded by the budget rather than by the longest response times ``size``.
    """

    size: int
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"micro-batch size {self.size} is not allowed; need >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens_per_micro_batch={self.max_tokens} is not allowed; "
                             f"need None or >= 1")


def as_micro_batching(value: int | MicroBatching) -> MicroBatching:
    return value if isinstance(value, MicroBatching) else MicroBatching(value)


def token_budget_groups(ends: list[int], max_tokens: int, multiple: int) -> list[list[int]]:
    """Rows of each micro-batch under a token budget, longest rows first.

    ``ends[i]``: row i's tokens up to its last scored one. Rows are taken longest first
    (stable among equals), and a micro-batch takes rows while its row count times its first
    (longest) row's length, rounded up to ``multiple``, stays within ``max_tokens``: sorted
    rows waste only the rounding on padding. A row longer than the budget cannot be
    computed within it and is refused by name.
    """
    order = sorted(range(len(ends)), key=lambda row: -ends[row])
    groups: list[list[int]] = []
    group_length = 0
    for row in order:
        length = padded_sequence_length(ends[row], multiple)
        if groups and (len(groups[-1]) + 1) * group_length <= max_tokens:
            groups[-1].append(row)
            continue
        if length > max_tokens:
            raise ValueError(
                f"algo.max_tokens_per_micro_batch={max_tokens} is less than one row of {length} "
                f"tokens (prompt and response up to its last scored token, rounded up to the "
                f"model's sequence-length multiple {multiple}); expected at least the longest "
                f"prompt plus rollout.sampling.max_new_tokens")
        groups.append([row])
        group_length = length
    return groups


# loss_fn(outputs, micro_batch) -> (loss_sum, num_units, metric_sums). ``loss_sum`` is a scalar
# summed (not averaged) over units; ``num_units`` an int tensor; metrics are sums too and are
# reported divided by the global number of units.
LossFn = Callable[[TokenOutputs, TokenBatch], tuple[Tensor, Tensor, dict[str, Tensor]]]


def _forward_step_func(model: BuiltModel, loss_fn: LossFn | None, collected: list[Tensor],
                       temperature: float, seq_length: int):
    vocab_size = model.shape.vocab_size

    def loss_func(micro_batch: TokenBatch, logits: Tensor):
        logprobs, entropy = token_logprobs_and_entropy(
            logits, micro_batch.input_ids, micro_batch.response_mask, vocab_size, temperature
        )
        outputs = TokenOutputs(logprobs, entropy)
        if loss_fn is None:  # forward-only: keep the outputs, report nothing
            # A trimmed micro-batch's outputs go back to the batch's length (zeros: unscored).
            outputs_kept = torch.stack([logprobs.detach(), entropy.detach()])
            collected.append(torch.nn.functional.pad(outputs_kept, (0, seq_length - outputs_kept.shape[-1])))
            return logprobs.new_zeros(()), torch.zeros((), dtype=torch.int), {}
        loss_sum, num_units, metric_sums = loss_fn(outputs, micro_batch)
        metric_sums = {"loss": loss_sum.detach(), "num_units": num_units.detach().double(),
                       **{k: v.detach() for k, v in metric_sums.items()}}
        return loss_sum, num_units.to(torch.int), metric_sums

    def forward_step(data_iterator: Iterator[TokenBatch], chunk: torch.nn.Module):
        micro_batch = next(data_iterator)
        # Right-padded rows need causal attention only; an attention that masks causally by
        # itself then runs its mask-free kernel (flash attention on CUDA).
        implicit = model.causal_mask_implicit and micro_batch.segment_ids is None
        logits_or_hidden = chunk(
            micro_batch.input_ids, micro_batch.position_ids(),
            None if implicit else micro_batch.attention_mask()
        )
        return logits_or_hidden, partial(loss_func, micro_batch)

    return forward_step


def _run_schedule(model: BuiltModel, batch: TokenBatch, micro_batching: MicroBatching,
                  loss_fn: LossFn | None, forward_only: bool,
                  temperature: float) -> tuple[list[dict], list[Tensor], Tensor | None]:
    """Runs Megatron's schedule; returns its store, the forward-only outputs per micro-batch,
    and the row order those hold (None: the batch's own order)."""
    # A no-op for a batch the caller already moved (prime_update moves its batch once).
    batch = batch.to(distributed.device())
    # A no-op for the trainer's batches (rollout/collect.py and sft.py pad them already).
    batch = batch.padded_to_length(padded_sequence_length(batch.seq_length,
                                                          model.sequence_length_multiple))
    micro_batches, order = _cut_micro_batches(model, batch, micro_batching)
    # Pipeline stages exchange activations of varying shape when micro-batches differ in
    # length or rows: Megatron then sends each one's shape first (a 3-int message).
    model.config.variable_seq_lengths = (
        distributed.pp_world_size() > 1
        and len({(m.batch_size, m.seq_length) for m in micro_batches}) > 1)
    collected: list[Tensor] = []
    num_chunks = len(model.chunks)
    # Interleaved schedules take one iterator per model chunk, each over all micro-batches.
    data_iterator = [iter(micro_batches) for _ in range(num_chunks)] if num_chunks > 1 \
        else iter(micro_batches)
    forward_backward = get_forward_backward_func()
    store = forward_backward(
        forward_step_func=_forward_step_func(model, loss_fn, collected, temperature, batch.seq_length),
        data_iterator=data_iterator,
        model=model.chunks,
        num_microbatches=len(micro_batches),
        seq_length=max(m.seq_length for m in micro_batches),
        micro_batch_size=max(m.batch_size for m in micro_batches),
        forward_only=forward_only,
    )
    return store, collected, order


def _cut_micro_batches(model: BuiltModel, batch: TokenBatch,
                       micro_batching: MicroBatching) -> tuple[list[TokenBatch], Tensor | None]:
    """The micro-batches, each cut after its own last scored token (when the model trims),
    and the row order they hold when a token budget reordered the rows."""
    multiple = model.sequence_length_multiple
    interleaved = distributed.pp_world_size() > 1 and len(model.chunks) > 1
    if micro_batching.max_tokens is not None:
        if interleaved:
            # Megatron's interleaved schedule hung on shapes that vary between micro-batches.
            raise ValueError("algo.max_tokens_per_micro_batch cannot run with "
                             "parallel.virtual_pipeline_parallel_size > 1 (the interleaved "
                             "schedule needs one micro-batch shape); use algo.micro_batch_size")
        if model.trim_micro_batches:
            ends = batch.scored_lengths(1, 1)
        else:
            ends = [batch.seq_length] * batch.batch_size
        groups = token_budget_groups(ends, micro_batching.max_tokens, multiple)
        order = torch.tensor([row for group in groups for row in group], dtype=torch.long)
        micro_batches = []
        for group in groups:
            index = torch.tensor(group, dtype=torch.long, device=batch.input_ids.device)
            micro_batch = batch.map_tensors(lambda t, i=index: t.index_select(0, i))
            length = padded_sequence_length(ends[group[0]], multiple)
            micro_batches.append(micro_batch.trimmed_to_length(length))
        return micro_batches, order
    size = micro_batching.size
    micro_batches = batch.micro_batches(size)
    if model.trim_micro_batches:
        # Anchors: verl removes padding altogether (use_remove_padding packs a micro-batch's
        # rows into one varlen sequence for flash-attn) and slime packs too; this keeps
        # Megatron's [b, s] micro-batches and drops only the tail no row of them needs.
        lengths = batch.scored_lengths(size, multiple)
        if interleaved:
            # Megatron's interleaved schedule hangs on shapes that vary between micro-batches
            # (measured: TP=1 PP=2 VP=2 never returned); there every micro-batch is cut to the
            # longest one's scored length instead.
            lengths = [max(lengths)] * len(lengths)
        micro_batches = [m.trimmed_to_length(length) for m, length in zip(micro_batches, lengths)]
    return micro_batches, None


def _broadcast_from_last_stage(tensor: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """Every pipeline stage gets the last stage's tensor (float32)."""
    if distributed.pp_world_size() == 1:
        assert tensor is not None
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=torch.float32, device=distributed.device())
    dist.broadcast(tensor, src=distributed.last_pp_stage_global_rank(), group=distributed.pp_group())
    return tensor


@torch.no_grad()
def forward_only(model: BuiltModel, batch: TokenBatch, micro_batch_size: int | MicroBatching,
                 temperature: float = 1.0) -> TokenOutputs:
    """Per-token log-probs and entropy for the whole batch, on every rank of the model.

    Used for the old policy, the reference and the PRM. The batch is padded with masked rows
    to a multiple of ``micro_batch_size`` (not under a token budget, see ``MicroBatching``;
    and with masked columns to the model's sequence
    length multiple) and trimmed back. ``temperature`` divides the logits first, so the
    log-probs are those of the distribution the sampler drew from.
    """
    return forward_outputs(model, batch, micro_batch_size, temperature)


def forward_outputs(model: BuiltModel, batch: TokenBatch, micro_batch_size: int | MicroBatching,
                    temperature: float = 1.0) -> TokenOutputs:
    """``forward_only`` with autograd as the caller set it: the FP8 calibration (models/fp8.py)
    needs one forward pass with autograd on, because Transformer Engine recomputes its
    delayed scales only when it leaves an FP8 region with autograd enabled."""
    micro_batching = as_micro_batching(micro_batch_size)
    rows_multiple = 1 if micro_batching.max_tokens is not None else micro_batching.size
    padded, real_rows = batch.padded_to_multiple(rows_multiple)
    padded = padded.padded_to_length(padded_sequence_length(padded.seq_length,
                                                            model.sequence_length_multiple))
    model.eval()
    _, collected, order = _run_schedule(model, padded, micro_batching, None, forward_only=True,
                                        temperature=temperature)
    stacked = torch.cat(collected, dim=1) if collected else None  # [2, batch, seq]
    if stacked is not None and order is not None:
        # Back to the batch's row order (the token budget took rows longest first).
        restored = torch.empty_like(stacked)
        restored[:, order.to(stacked.device)] = stacked
        stacked = restored
    stacked = _broadcast_from_last_stage(stacked, (2, padded.batch_size, padded.seq_length))
    seq = batch.seq_length
    return TokenOutputs(logprobs=stacked[0, :real_rows, :seq], entropy=stacked[1, :real_rows, :seq])


def forward_backward(
    model: BuiltModel, batch: TokenBatch, micro_batch_size: int | MicroBatching, loss_fn: LossFn,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Accumulates gradients of ``loss_fn`` over the batch's micro-batches.

    ``temperature`` divides the logits before the log-probs and entropy the loss reads
    (gradients flow through the division).

    Returns global metrics: each metric's sum over micro-batches and DP ranks divided by the
    global number of units, identical on every rank. Gradients end up divided by that same
    count (see module docstring). Host sync: the metrics are read with ``.item()``.
    """
    if not model.trainable:
        raise ValueError(f"model role {model.role!r} is frozen; forward_backward needs a trainable model")
    model.train()
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in model.chunks] if len(model.chunks) > 1 \
        else model.chunks[0].no_sync
    micro_batching = as_micro_batching(micro_batch_size)
    # Filler rows have no scored tokens, so they add nothing to any loss or unit count.
    padded, _ = batch.padded_to_multiple(
        1 if micro_batching.max_tokens is not None else micro_batching.size)
    store, _, _ = _run_schedule(model, padded, micro_batching, loss_fn, forward_only=False,
                                temperature=temperature)
    return _reduce_metrics(store)


def _reduce_metrics(store: list[dict[str, Tensor]]) -> dict[str, float]:
    """Sums per-micro-batch metric sums over micro-batches, DP ranks and PP stages; a metric
    named ``*_max`` is a maximum instead, reported as it is (not divided by the units)."""
    names = sorted(store[0]) if store else []
    # Non-last stages have no metrics; agree on the names through the last stage.
    name_list = [names]
    if distributed.pp_world_size() > 1:
        dist.broadcast_object_list(name_list, src=distributed.last_pp_stage_global_rank(),
                                   group=distributed.pp_group())
    names = name_list[0]
    summed = [name for name in names if not name.endswith("_max")]
    maxima = [name for name in names if name.endswith("_max")]
    device = distributed.device()
    totals = torch.zeros(len(summed), dtype=torch.float64, device=device)
    peaks = torch.full((len(maxima),), -math.inf, dtype=torch.float64, device=device)
    for entry in store:
        totals += torch.stack([entry[name].double().to(device) for name in summed])
        if maxima:
            peaks = torch.maximum(peaks, torch.stack([entry[name].double().to(device) for name in maxima]))
    dist.all_reduce(totals, group=distributed.dp_group())
    if maxima:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=distributed.dp_group())
    if distributed.pp_world_size() > 1:
        dist.broadcast(totals, src=distributed.last_pp_stage_global_rank(), group=distributed.pp_group())
        if maxima:
            dist.broadcast(peaks, src=distributed.last_pp_stage_global_rank(), group=distributed.pp_group())
    values = totals.tolist()  # host sync
    units = max(values[summed.index("num_units")], 1.0) if summed else 1.0
    reduced = {name: (value if name == "num_units" else value / units)
               for name, value in zip(summed, values)}
    reduced.update(zip(maxima, peaks.tolist()))
    return reduced
