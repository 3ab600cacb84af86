"""Each micro-batch computes up to its own last scored token (models/schedule.py) and gives
the numbers of the padded form: forward-only log-probs and entropy, a loss, its metrics (a
*_max one too) and the gradients, within 1e-5, at PP=1 and at PP=2 (where the stages then
exchange activations of varying length, Megatron's variable_seq_lengths)."""

from __future__ import annotations

import pytest
import torch

from launch import run_json_worker

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("pp", [1, 2])
def test_trimmed_micro_batches_equal_the_padded_form(pp, tmp_path):
    result = run_json_worker("tests/workers/trim_worker.py", pp, ["--pp", str(pp)], tmp_path / "out.json")
    padded, trimmed = result["padded"], result["trimmed"]
    for key in ("logprobs", "entropy"):
        gap = (torch.tensor(trimmed[key]) - torch.tensor(padded[key])).abs().max().item()
        assert gap < 1e-5, (key, gap)
    # Unscored positions stay 0 in both (what follows a row's last scored token is not computed).
    assert torch.tensor(trimmed["logprobs"])[0, 12:].abs().max().item() == 0.0
    assert sorted(trimmed["metrics"]) == sorted(padded["metrics"])
    for name, value in padded["metrics"].items():
        assert trimmed["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert trimmed["metrics"]["num_units"] == 8 + 6 + 20 + 12 + 4 + 4  # scored tokens
    assert trimmed["grad_abs_sum"] == pytest.approx(padded["grad_abs_sum"], rel=1e-5)
    assert trimmed["grad_sum"] == pytest.approx(padded["grad_sum"], rel=1e-4, abs=1e-5)
    # Micro-batch lengths 12, 30, 6: the stages sent shapes first only where there are stages.
    assert result["variable_seq_lengths"] is (pp > 1)
