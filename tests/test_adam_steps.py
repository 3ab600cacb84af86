"""Adam's step count is put where the loading job's Adam reads it (checkpoint/train_state.py):
one tensor per parameter for torch's Adam (our CPU runs), one int per param group for the fused
Adams of the GPU path. Checked here with torch's real Adam; the fused side runs on a GPU in
tests/test_gpu_fused_adam.py."""

from __future__ import annotations

import torch

from megatron_prime.checkpoint.train_state import (
    _loaded_step_count,
    _restore_adam_steps,
    adam_step_count,
)

GRADS = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([[1.0, 0.25], [-0.5, 3.0]])]


def stepped_adam(steps: int) -> tuple[list[torch.nn.Parameter], torch.optim.Adam]:
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0])),
              torch.nn.Parameter(torch.tensor([[0.5, -0.5], [1.5, 0.0]]))]
    adam = torch.optim.Adam(params, lr=0.1)
    for step in range(steps):
        for param, grad in zip(params, GRADS):
            param.grad = grad * (step + 1)
        adam.step()
    return params, adam


def next_step(params: list[torch.nn.Parameter], adam: torch.optim.Adam) -> list[torch.Tensor]:
    for param, grad in zip(params, GRADS):
        param.grad = grad * 4
    adam.step()
    return [p.detach().clone() for p in params]


def test_step_count_is_read_per_implementation():
    assert adam_step_count([stepped_adam(0)[1]]) is None  # no step yet
    _, adam = stepped_adam(3)
    assert adam_step_count([adam]) == 3
    adam.param_groups[0]["step"] = 1.0  # a stale group value left by a distributed load
    assert adam_step_count([adam]) == 3  # torch's Adam reads its parameters' counts
    assert _loaded_step_count([adam]) == 1  # an old checkpoint's load left it in the group


def test_a_shared_step_tensor_is_split_per_parameter():
    """Megatron's distributed load gives every parameter one shared step tensor holding the
    pre-load count; torch's Adam would then advance it once per parameter and step."""
    params, adam = stepped_adam(2)
    shared = torch.tensor(0.0)
    for state in adam.state.values():
        state["step"] = shared
    adam.param_groups[0]["step"] = 2.0  # where the distributed load put the saved count
    _restore_adam_steps([adam], _loaded_step_count([adam]))
    steps = [adam.state[p]["step"] for p in params]
    assert steps[0] is not steps[1] and float(shared) == 0.0
    # Bias correction continues at step 3: the same update as an optimizer never saved.
    reference_params, reference = stepped_adam(2)
    expected = next_step(reference_params, reference)
    assert all(torch.equal(a, b) for a, b in zip(next_step(params, adam), expected))
    assert [float(adam.state[p]["step"]) for p in params] == [3.0, 3.0]


def test_no_count_leaves_a_fresh_optimizer_alone():
    params, adam = stepped_adam(0)
    _restore_adam_steps([adam], None)
    assert not adam.state and "step" not in adam.param_groups[0]
