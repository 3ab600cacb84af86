"""One PRIME update (old/ref/PRM log-probs, PRM update, advantages, PPO update) gives the
same metrics and updated weights at TP=2, PP=2 and DP=2 as at TP=1/PP=1/DP=1 (gloo processes).
"""

from __future__ import annotations

import math

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


def run_global(dp: int, tmp_path_factory) -> dict:
    """The 4 prompts x 4 responses batch, at DP=dp (TP=PP=1); Adam eps 1e-6 (see worker);
    one PRM mini-batch (with more, each rank cuts its own rows and the layouts differ)."""
    if ("global", dp) not in _cache:
        out = tmp_path_factory.mktemp(f"step_global_dp{dp}") / "result.json"
        _cache["global", dp] = run_json_worker(
            "tests/workers/step_worker.py", dp,
            ["--batch", "global", "--adam-eps", "1e-6", "--prm-mini-batches", "1"], out)
    return _cache["global", dp]


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
            # A signed sum cancels: its float32 noise scales with the sum of magnitudes (a
            # 130-weight down_proj moves its signed sum by 2e-5 between kernels' roundings).
            assert ours[role][name][0] == pytest.approx(total, rel=1e-5, abs=max(1e-5, 1e-6 * absolute)), \
                (role, name)
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
    result = run("tp1pp1", "outcome_only", tmp_path_factory)
    assert not any(name.startswith("prm/") for name in result["metrics"])
    _, model = make_hf_model("qwen2")
    for name, tensor in model.state_dict().items():
        assert result["prm"][name][1] == pytest.approx(float(tensor.double().abs().sum()), rel=1e-7)
    # The process rewards change the advantages, so the policy's update differs. (Not its
    # policy/loss: the first update is on-policy, where the whitened advantages' zero mean
    # makes pg_loss 0 in both modes and the loss is the same entropy term up to rounding.)
    with_prm = run("tp1pp1", "before", tmp_path_factory)
    differences = [abs(result["policy"][name][0] - with_prm["policy"][name][0])
                   for name in result["policy"]]
    assert max(differences) > 1e-3
    assert result["metrics"]["policy/grad_norm"] != pytest.approx(
        with_prm["metrics"]["policy/grad_norm"], rel=1e-3)


def test_one_update_at_dp2_equals_dp1(tmp_path_factory):
    """A fixed global batch of 4 prompts x 4 responses: DP=1 updates on all of it, DP=2 on
    two groups per rank. Advantage whitening, batch_norm of process rewards and every metric
    are over the whole batch, so losses, metrics and updated weights agree within 1e-5.
    (With per-rank whitening or a per-rank batch_norm scale the policy's grad norm differs by
    ~5e-3 to 2e-2 and weight sums by up to 0.2: checked by reverting either reduction.)"""
    one, two = run_global(1, tmp_path_factory), run_global(2, tmp_path_factory)
    names = [name for name in one["metrics"] if not name.startswith("time/")]
    assert sorted(names) == sorted(n for n in two["metrics"] if not n.startswith("time/"))
    for name in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "prm/ranking_accuracy",
                 "reward/process_mean", "reward/outcome_mean", "policy/loss", "prm/loss"):
        assert name in names
    for name in names:
        assert two["metrics"][name] == pytest.approx(one["metrics"][name], rel=1e-5, abs=1e-5), name
    # 7 of the 16 responses are correct; rank 0's half alone has 4 of 8.
    assert two["metrics"]["reward/outcome_mean"] == pytest.approx(7 / 16)
    assert two["metrics"]["policy/num_units"] == one["metrics"]["policy/num_units"] == 108
    for role in ("policy", "prm"):
        assert sorted(two[role]) == sorted(one[role])
        for name, (total, absolute) in one[role].items():
            assert two[role][name][0] == pytest.approx(total, abs=1e-5), (role, name)
            assert two[role][name][1] == pytest.approx(absolute, abs=1e-5), (role, name)


def test_step_keeps_its_tensors_on_the_training_device(tmp_path_factory):
    """Both losses saw every tensor on distributed.device() and got the fields they read as
    typed StepBatch fields; megatron_prime made no Tensor.cpu()/.numpy() call during the step.

    What this CPU run can and cannot see: the training device is the host here, so a tensor
    left on the host would not be caught by the device comparison (it is on a GPU run of the
    same worker). The host-copy recorder does catch a .cpu() round trip on any machine (the
    former step moved log-probs to the host and back, and read the log-prob gap on the host).
    """
    result = run_global(2, tmp_path_factory)
    # One on-policy update: no old-policy pass, the PPO loss takes its own forward's log-probs.
    for loss, fields in (("ppo", {"advantages"}),
                         ("prm", {"ref_logprobs", "outcome_rewards"})):
        seen = result["losses_saw"][loss]
        assert seen["devices"] == [result["expected_device"]], loss
        assert fields <= set(seen["fields"]), loss
    assert "old_logprobs" not in result["losses_saw"]["ppo"]["fields"]
    assert result["host_copies"] == []


def test_skipping_the_old_policy_pass_changes_no_number(tmp_path_factory):
    """ppo_epochs = ppo_mini_batches = 1: the update's own forward (detached) stands in for
    the old-policy pass. Against the separate pass (algo.old_logprob_pass=always), on the
    global batch with the HF sampler's log-probs: every metric (the sampler gap included, now
    measured in the update's forward) and the updated weights agree within 1e-5, and the
    old-policy pass is gone from the step's time."""
    if ("always",) not in _cache:
        out = tmp_path_factory.mktemp("step_old_pass_always") / "result.json"
        _cache["always",] = run_json_worker(
            "tests/workers/step_worker.py", 1,
            ["--batch", "global", "--adam-eps", "1e-6", "--prm-mini-batches", "1", "--sampler", "hf",
             "--old-logprob-pass", "always"], out)
    if ("auto",) not in _cache:
        out = tmp_path_factory.mktemp("step_old_pass_auto") / "result.json"
        _cache["auto",] = run_json_worker(
            "tests/workers/step_worker.py", 1,
            ["--batch", "global", "--adam-eps", "1e-6", "--prm-mini-batches", "1", "--sampler", "hf"], out)
    always, auto = _cache["always",], _cache["auto",]
    assert "old_logprobs" in always["losses_saw"]["ppo"]["fields"]
    assert "old_logprobs" not in auto["losses_saw"]["ppo"]["fields"]
    names = sorted(n for n in always["metrics"] if not n.startswith("time/"))
    assert names == sorted(n for n in auto["metrics"] if not n.startswith("time/"))
    assert "rollout/logprob_diff_max" in names and "rollout/logprob_diff_mean" in names
    # The HF sampler's log-probs differ from Megatron's by kernel rounding only.
    assert 0 < auto["metrics"]["rollout/logprob_diff_max"] < 1e-4
    assert_same_update(always, auto)


def assert_same_update(reference: dict, other: dict) -> None:
    """Every metric (times aside) and every updated policy and PRM weight sum within 1e-5."""
    names = sorted(n for n in reference["metrics"] if not n.startswith("time/"))
    assert names == sorted(n for n in other["metrics"] if not n.startswith("time/"))
    for name in names:
        assert other["metrics"][name] == pytest.approx(reference["metrics"][name], rel=1e-5, abs=1e-5), name
    for role in ("policy", "prm"):
        for name, (total, absolute) in reference[role].items():
            assert other[role][name][0] == pytest.approx(total, abs=max(1e-5, 1e-6 * absolute)), (role, name)
            assert other[role][name][1] == pytest.approx(absolute, rel=1e-5), (role, name)


def test_token_budget_micro_batches_change_no_number(tmp_path_factory):
    """algo.max_tokens_per_micro_batch: every forward and backward pass of the step cuts the
    rows by a token budget (longest first, varying rows per micro-batch) instead of 2 rows
    each. The PPO and PRM losses are sums normalised by global counts, so every metric and
    every updated weight equals the fixed micro-batches' within 1e-5 (on the global batch:
    16 responses of up to 16 tokens; a 24-token budget gives micro-batches of 1 to 4 rows)."""
    # The fixed run is the old-pass test's "auto" run (the same arguments): run once.
    if ("auto",) not in _cache:
        out = tmp_path_factory.mktemp("step_old_pass_auto") / "result.json"
        _cache["auto",] = run_json_worker(
            "tests/workers/step_worker.py", 1,
            ["--batch", "global", "--adam-eps", "1e-6", "--prm-mini-batches", "1", "--sampler", "hf"], out)
    out = tmp_path_factory.mktemp("step_tokens_budget") / "result.json"
    budget = run_json_worker(
        "tests/workers/step_worker.py", 1,
        ["--batch", "global", "--adam-eps", "1e-6", "--prm-mini-batches", "1", "--sampler", "hf",
         "--max-tokens-per-micro-batch", "24"], out)
    assert_same_update(_cache["auto",], budget)


def test_rollout_correction_with_a_faithful_sampler_changes_nothing(tmp_path_factory):
    """algo.rollout_correction=tis with the HF sampler's log-probs (equal to the trainer's up
    to kernel round-off): every importance weight is 1 within 1e-4, none is capped, and the
    update is the uncorrected one's within 1e-4; the weights come from the batch's sampler
    log-probs (test_algo_ppo_loss.py checks them by hand where they differ)."""
    out = tmp_path_factory.mktemp("step_tis") / "result.json"
    tis = run_json_worker(
        "tests/workers/step_worker.py", 1,
        ["--batch", "global", "--adam-eps", "1e-6", "--prm-mini-batches", "1", "--sampler", "hf",
         "--rollout-correction", "tis"], out)
    if ("auto",) not in _cache:
        out = tmp_path_factory.mktemp("step_old_pass_auto") / "result.json"
        _cache["auto",] = run_json_worker(
            "tests/workers/step_worker.py", 1,
            ["--batch", "global", "--adam-eps", "1e-6", "--prm-mini-batches", "1", "--sampler", "hf"], out)
    plain = _cache["auto",]
    assert tis["metrics"]["policy/rollout_is_weight"] == pytest.approx(1.0, abs=1e-4)
    assert tis["metrics"]["policy/rollout_is_capped_fraction"] == 0.0
    for name, value in plain["metrics"].items():
        if not name.startswith("time/"):
            assert tis["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-4), name


def test_prm_metrics_before_any_update_by_hand(tmp_path_factory):
    """The PRM starts as the reference, so before its first update every implicit score is
    0: the cross-entropy is ln 2 for each response and "correct" is never predicted, so the
    accuracy is the share of wrong responses, 2 of 4 ([1, 0, 1, 0]); every (correct, wrong)
    pair is a tie, so both ranking accuracies are 0.5 in the scoring modes that score with
    the untouched PRM (after, frozen)."""
    for mode in ("after", "frozen"):
        metrics = run("tp1pp1", mode, tmp_path_factory)["metrics"]
        assert metrics["prm/loss_before_update"] == pytest.approx(math.log(2), abs=1e-6), mode
        assert metrics["prm/accuracy_before_update"] == pytest.approx(0.5), mode
        assert metrics["prm/ranking_accuracy"] == pytest.approx(0.5), mode
        assert metrics["prm/group_ranking_accuracy"] == pytest.approx(0.5), mode
    after = run("tp1pp1", "after", tmp_path_factory)["metrics"]
    # "after": 4 PRM steps of one row each; the first sees the untouched PRM (ln 2 on its
    # row), the later ones a PRM already moved by the earlier rows.
    assert after["prm/loss"] != pytest.approx(math.log(2), abs=1e-4)
    # "before": each mini-batch's loss at its own forward pass, averaged: prm/loss itself.
    before = run("tp1pp1", "before", tmp_path_factory)["metrics"]
    assert before["prm/loss_before_update"] == before["prm/loss"]
    assert before["prm/accuracy_before_update"] == before["prm/accuracy"]


def test_frozen_prm_scores_but_never_moves(tmp_path_factory):
    result = run("tp1pp1", "frozen", tmp_path_factory)
    _, model = make_hf_model("qwen2")
    for name, tensor in model.state_dict().items():
        assert result["prm"][name][1] == pytest.approx(float(tensor.double().abs().sum()), rel=1e-7)
    # Scored, not updated: no update metrics; the process rewards are all 0 (PRM = reference).
    assert "prm/loss" not in result["metrics"] and "prm/grad_norm" not in result["metrics"]
    assert result["metrics"]["reward/process_mean"] == pytest.approx(0.0, abs=1e-9)


def test_global_batch_prm_loss_before_update_is_the_dp_mean(tmp_path_factory):
    """DP=2 reports the same before-update loss as DP=1 (a global mean, not rank 0's), and with
    one PRM mini-batch in "before" mode it is the PRM update's own loss."""
    one, two = run_global(1, tmp_path_factory), run_global(2, tmp_path_factory)
    assert one["metrics"]["prm/loss_before_update"] == pytest.approx(math.log(2), abs=1e-6)
    assert two["metrics"]["prm/loss_before_update"] == pytest.approx(math.log(2), abs=1e-6)
    assert two["metrics"]["prm/accuracy_before_update"] == pytest.approx(1 - 7 / 16)
