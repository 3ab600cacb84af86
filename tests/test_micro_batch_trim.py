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
    padded = result["padded"]
    for form in ("trimmed", "budget"):  # cut to 12, 30, 6; or rows [30], [20, 12], [9, 6, 5]
        cut = result[form]
        for key in ("logprobs", "entropy"):
            gap = (torch.tensor(cut[key]) - torch.tensor(padded[key])).abs().max().item()
            assert gap < 1e-5, (form, key, gap)
        # Unscored positions stay 0 (what follows a row's last scored token is not computed),
        # and the budget's reordered rows come back in the batch's order.
        assert torch.tensor(cut["logprobs"])[0, 12:].abs().max().item() == 0.0, form
        assert torch.tensor(cut["logprobs"])[0, 4:12].abs().min().item() > 0.0, form
        assert sorted(cut["metrics"]) == sorted(padded["metrics"])
        for name, value in padded["metrics"].items():
            assert cut["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-5), (form, name)
        assert cut["metrics"]["num_units"] == 8 + 6 + 20 + 12 + 4 + 4  # scored tokens
        assert cut["grad_abs_sum"] == pytest.approx(padded["grad_abs_sum"], rel=1e-5), form
        assert cut["grad_sum"] == pytest.approx(padded["grad_sum"], rel=1e-4, abs=1e-5), form
        # Shapes that vary: the stages sent them first only where there are stages.
        assert cut["variable_seq_lengths"] is (pp > 1), form
    assert padded["variable_seq_lengths"] is False
