"""The NaN/inf guard: a non-finite loss or gradient skips the update, weights untouched, and
the trainer stops after K skipped steps in a row."""

from __future__ import annotations

import math

import pytest

from launch import run_json_worker
from megatron_prime.train import NonFiniteGuard


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "args"), [(1, []), (2, ["--tp", "2"]), (2, ["--distributed-optimizer"])],
                         ids=["single", "tp2", "dp2-distopt"])
def test_non_finite_loss_or_gradient_skips_the_update(tmp_path, nproc, args):
    nan_loss, nan_grad, normal = run_json_worker("tests/workers/guard_worker.py", nproc, args,
                                                 tmp_path / "out.json")
    assert nan_loss["skip_reason"].startswith("non-finite loss")
    assert math.isnan(nan_loss["loss"])
    assert nan_grad["skip_reason"].startswith("non-finite gradient norm")
    assert math.isfinite(nan_grad["loss"])
    for skipped in (nan_loss, nan_grad):
        assert skipped["update_successful"] is False
        assert skipped["weights_changed"] is False
        assert skipped["weights_finite"] is True
    # The next finite step updates normally: no NaN leaked into grads or optimizer state.
    assert normal["skip_reason"] == ""
    assert normal["update_successful"] is True
    assert normal["weights_changed"] is True
    assert normal["weights_finite"] is True


def test_guard_stops_after_k_consecutive_skips():
    guard = NonFiniteGuard(limit=3)
    guard.update(1, ["policy update skipped: non-finite loss nan"])
    guard.update(2, ["policy update skipped: non-finite loss nan"])
    guard.update(3, [])  # a good step resets the count
    assert guard.consecutive == 0
    guard.update(4, ["x"])
    guard.update(5, ["x"])
    with pytest.raises(FloatingPointError, match=r"step 6: 3 steps in a row .*max_consecutive_skips=3"):
        guard.update(6, ["PRM update skipped: non-finite gradient norm inf"])
