"""One PRIME update (old/ref/PRM log-probs, PRM update, advantages, PPO update) gives the
same metrics and updated weights at TP=2 and PP=2 as at TP=1/PP=1 (gloo processes)."""

from __future__ import annotations

import pytest

from launch import run_json_worker
from workers.parity_worker import make_hf_model

pytestmark = pytest.mark.slow

LAYOUTS = {"tp1pp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
_cache: dict = {}


def run(layout: str, prm_mode: str, tmp_path_factory) -> dict:
    if (layout, prm_mode) not in _cache:
        tp, pp = LAYOUTS[layout]
        out = tmp_path_factory.mktemp(f"step_{layout}_{prm_mode}") / "result.json"
        _cache[layout, prm_mode] = run_json_worker(
            "tests/workers/step_worker.py", tp * pp,
            ["--tp", str(tp), "--pp", str(pp), "--prm-mode", prm_mode], out)
    return _cache[layout, prm_mode]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_prime_update_matches_single_process(layout, tmp_path_factory):
    base, ours = run("tp1pp1", "before", tmp_path_factory), run(layout, "before", tmp_path_factory)
    for name, value in base["metrics"].items():
        if name.startswith("time/"):  # wall clock, not a result
            continue
        assert ours["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    for role in ("policy", "prm"):
        assert sorted(ours[role]) == sorted(base[role])
        for name, (total, absolute) in base[role].items():
            assert ours[role][name][0] == pytest.approx(total, rel=1e-5, abs=1e-5), (role, name)
            assert ours[role][name][1] == pytest.approx(absolute, rel=1e-5), (role, name)


def test_prime_update_moves_policy_and_prm(tmp_path_factory):
    result = run("tp1pp1", "before", tmp_path_factory)
    _, model = make_hf_model("qwen2")
    original = {name: float(t.double().abs().sum()) for name, t in model.state_dict().items()}
    for role in ("policy", "prm"):
        moved = [name for name, (_, absolute) in result[role].items()
                 if abs(absolute - original[name]) > 1e-3]
        assert len(moved) > len(original) // 2, role
    metrics = result["metrics"]
    assert metrics["reward/outcome_mean"] == 0.5
    assert 0.0 <= metrics["prm/accuracy"] <= 1.0 and metrics["prm/loss"] > 0
    assert metrics["policy/num_units"] == 11 + 8 + 7 + 5  # response tokens of the 4 rows


def test_outcome_only_mode_leaves_the_prm_untouched(tmp_path_factory):
    result = run("tp1pp1", "none", tmp_path_factory)
    assert not any(name.startswith("prm/") for name in result["metrics"])
    _, model = make_hf_model("qwen2")
    for name, tensor in model.state_dict().items():
        assert result["prm"][name][1] == pytest.approx(float(tensor.double().abs().sum()), rel=1e-7)
    with_prm = run("tp1pp1", "before", tmp_path_factory)
    assert result["metrics"]["policy/loss"] != pytest.approx(with_prm["metrics"]["policy/loss"])
