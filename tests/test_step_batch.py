"""losses.StepBatch: the PRIME step's typed batch. ``to`` moves every field, micro-batching
and padding split every field with the tokens, the rollout's sampler log-probs become a typed
field, and a loss reading a field the step has not filled says which one."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch import Tensor

from megatron_prime.losses import StepBatch
from megatron_prime.models.schedule import TokenBatch


def full_step_batch(rows: int = 6, seq: int = 5) -> StepBatch:
    """Every tensor field set, each row's values equal to its row index (to follow splits)."""
    def per_row(*shape) -> Tensor:
        return torch.arange(rows, dtype=torch.float32).view(rows, *[1] * len(shape)).expand(rows, *shape).clone()

    return StepBatch(
        input_ids=per_row(seq).long(), response_mask=torch.ones(rows, seq),
        segment_ids=per_row(seq).long(), extras={"other": per_row(seq)},
        outcome_rewards=per_row(), rollout_logprobs=per_row(seq), old_logprobs=per_row(seq),
        ref_logprobs=per_row(seq), prm_logprobs=per_row(seq), advantages=per_row(seq))


def tensor_field_names() -> set[str]:
    return {spec.name for spec in fields(StepBatch) if spec.name != "extras"}


def test_every_field_is_set_in_the_fixture():
    batch = full_step_batch()
    assert {name for name in tensor_field_names() if getattr(batch, name) is None} == set()


def test_to_moves_every_field():
    moved = full_step_batch().to(torch.device("meta"))
    assert isinstance(moved, StepBatch)
    devices = {name: t.device.type for name, t in moved.tensors().items()}
    assert set(devices) == tensor_field_names() | {"extras/other"}
    assert set(devices.values()) == {"meta"}


def test_micro_batches_and_padding_split_every_field_along_the_batch():
    batch = full_step_batch(rows=6)
    padded, real = batch.padded_to_multiple(4)
    assert real == 6 and isinstance(padded, StepBatch)
    micro = padded.micro_batches(4)
    assert len(micro) == 2
    for index, part in enumerate(micro):
        for name, tensor in part.tensors().items():
            assert tensor.shape[0] == 4, name
            if name != "response_mask":
                expected = [4.0 * index + i if 4 * index + i < 6 else 0.0 for i in range(4)]
                assert tensor.reshape(4, -1)[:, 0].tolist() == expected, name
    # Filler rows are fully masked, so they add nothing to a loss or unit count.
    assert micro[1].response_mask[2:].sum() == 0


def test_from_rollout_types_the_sampler_logprobs():
    sampler = torch.full((2, 3), -1.5)
    tokens = TokenBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3),
                        extras={"rollout_logprobs": sampler})
    step = StepBatch.from_rollout(tokens, torch.tensor([1, 0]))
    assert step.rollout_logprobs is sampler and step.extras == {}
    assert step.outcome_rewards.dtype == torch.float32
    assert step.old_logprobs is None
    with pytest.raises(ValueError, match="StepBatch.old_logprobs is None"):
        step.require("old_logprobs")


def test_with_fields_detaches():
    step = StepBatch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    grad = torch.ones(1, 2, requires_grad=True) * 2
    assert not step.with_fields(advantages=grad).advantages.requires_grad


def test_prm_loss_sums_by_hand():
    """The PRM loss adapter (also what prm/loss_before_update reads from a scoring pass):
    beta * sum_t log(pi_psi / pi_ref) is the logit of "correct"."""
    import math

    from megatron_prime.losses import prm_loss
    from megatron_prime.models.schedule import TokenOutputs

    # Position 0 is never scored; rows' scored log ratios sum to 2, -2 and 4 (a padding row
    # with no response tokens adds nothing).
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0]])
    ref = torch.full((4, 4), -1.0)
    prm = ref + torch.tensor([[9.0, 1.0, 1.0, 9.0], [0.0, -1.0, -0.5, -0.5], [0.0, 4.0, 0.0, 0.0],
                              [5.0, 5.0, 5.0, 5.0]])
    batch = StepBatch(input_ids=torch.zeros(4, 4, dtype=torch.long), response_mask=mask,
                      outcome_rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]), ref_logprobs=ref)
    loss_sum, units, sums = prm_loss(0.5)(TokenOutputs(prm, torch.zeros(4, 4)), batch)
    # Logits 1, -1, 2 with labels 1, 1, 0: -log sigmoid(1) - log sigmoid(-1) - log(1 - sigmoid(2)).
    expected = math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log1p(math.exp(2))
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert units.item() == 3
    assert sums["accuracy"].item() == 1.0  # only row 0 is on the right side of 0
