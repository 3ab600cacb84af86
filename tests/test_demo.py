"""The default job (README's first command), shortened by config: SFT, then PRIME with vLLM
rollouts; the outcome accuracy rises (fixed seed) and the trained PRM's credit is drawn.

The slow test runs the job on its one-step arithmetic task (``task=arithmetic`` with that
task's model and SFT, as the default job was before running sums): the same code path, at
the cost the suite can afford. The running-sum default's SFT (500 steps of a 2.0M-parameter
model) alone takes longer than this whole test; its rows, model and checks are covered by
the fast test below and by tests/test_toy_running_sum.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from launch import REPO


# The earlier default job: one-step sums, the 0.86M-parameter model, 150 SFT steps.
ARITHMETIC_JOB = ("task=arithmetic", "model_hidden_size=128", "model_intermediate_size=384",
                  "num_sft_examples=2000", "sft.steps=150")


@pytest.mark.slow
def test_default_job_shortened_raises_accuracy(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    command = [sys.executable, "-m", "megatron_prime.demo", f"work_dir={tmp_path}", *ARITHMETIC_JOB,
               "prime.trainer.steps=60"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (run,) = tmp_path.iterdir()
    metrics = [json.loads(line) for line in (run / "prime" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 61))
    accuracy = [m["reward/accuracy"] for m in metrics]
    first, last = sum(accuracy[:10]) / 10, sum(accuracy[-10:]) / 10
    # Measured on this seed: 0.21 -> 0.41 (256 sampled responses per step).
    assert last > first + 0.08, f"accuracy {first:.3f} -> {last:.3f}: {accuracy}"
    assert f"accuracy over the first 10 steps {first:.3f} -> last 10 steps {last:.3f}" in done.stdout
    # The SFT started from random weights and learned the format; PRIME logged PRM metrics.
    assert all(0.0 <= m["prm/accuracy"] <= 1.0 for m in metrics if "prm/accuracy" in m)
    assert any(m["rollout/kept_prompt_fraction"] < 1.0 for m in metrics)  # the filter worked
    png = run / "curves.png"
    assert f"curves: {png}" in done.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 0
    # The credit heatmap of the trained PRM: two right and two wrong samples, titled so.
    credit = run / "credit.png"
    assert f"implicit process rewards per token: {credit}" in done.stdout
    with Image.open(credit) as image:
        assert image.format == "PNG" and image.height > 100
    assert list((run / "prime" / "wandb").glob("offline-run-*"))
    step = run / "prime" / "checkpoints" / "step_00000060"
    assert (step / "train_state.json").is_file()
    prm_best_of_n_beats_random_choice(run, step, tmp_path, env)


def prm_best_of_n_beats_random_choice(run, step, tmp_path, env) -> None:
    """The PRM the demo trained, exported to HF, ranks 4 samples of the SFT model per held-out
    problem (sum of beta*log(pi_prm/pi_ref); the reference is the SFT model). Best-of-4 must
    beat random choice among the 4, whose expected accuracy is the samples' mean (pass@1)."""
    from megatron_prime.data.templates import MATH_SUFFIX
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl

    prm = tmp_path / "prm_hf"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"),
                           "--checkpoint", str(step), "--role", "prm", "--output", str(prm)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Problems the run never trained on (the demo's RL prompts use seed + 2 = 2).
    rows = [{"question": r["prompt"][-1]["content"].removesuffix(MATH_SUFFIX),
             "answer": r["reward_model"]["ground_truth"]} for r in make_rl_rows(48, seed=1234)]
    bench = write_jsonl(rows, tmp_path / "held_out.jsonl")
    out = tmp_path / "bon"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), "--model", str(run / "sft"),
                           "--prm", str(prm), "--reference", str(run / "sft"), "--benchmarks", str(bench),
                           "--n", "4", "--ks", "1,4", "--temperature", "1.0", "--seed", "0",
                           "--no-system-prompt", "--max-new-tokens", "48", "--verifier-workers", "1",
                           "--out-dir", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    # Reference computation from the saved samples: random choice = the samples' mean
    # correctness; best-of-4 = the correctness of the highest-scoring sample (first on ties).
    random_choice = sum(sum(r["correct"]) / 4 for r in records) / len(records)
    best = [max(range(4), key=lambda i: (r["prm_scores"][i], -i)) for r in records]
    best_of_4 = sum(r["correct"][i] for r, i in zip(records, best)) / len(records)
    result = json.loads((out / "results.json").read_text())["average"]
    assert result["pass@1"] == pytest.approx(100 * random_choice)
    assert result["bon@4"] == pytest.approx(100 * best_of_4)
    assert best_of_4 > random_choice + 0.05, (best_of_4, random_choice)
    # The PRM moved away from the reference: a PRM equal to it would score every sample 0.
    assert len({s for r in records for s in r["prm_scores"]}) > 1


def test_demo_config_tasks_and_checks(tmp_path):
    """The default job's task is running sums of 4 steps on a ~2M-parameter Qwen2; the earlier
    arithmetic task stays selectable; bad settings are refused naming the key."""
    from safetensors.torch import load_file

    from megatron_prime.config import load_config
    from megatron_prime.demo import DemoConfig
    from megatron_prime.toy.running_sum import parse_chain

    config = load_config(DemoConfig, None, [])
    assert (config.task, config.num_steps) == ("running_sum", 4)
    rl = config.rl_rows(50, seed=2)
    assert {len(parse_chain(r["prompt"][0]["content"]).deltas) for r in rl} == {4}
    assert {r["data_source"] for r in rl} == {"toy_running_sum"}
    sft = config.sft_rows(400, seed=1)
    assert {len(parse_chain(r["messages"][0]["content"]).deltas) for r in sft} == set(range(1, 9))
    arithmetic = load_config(DemoConfig, None, ["task=arithmetic"])
    assert {r["data_source"] for r in arithmetic.rl_rows(5, seed=2)} == {"toy_arithmetic"}
    weights = load_file(config.write_base_model(tmp_path / "base") / "model.safetensors")
    # 4 layers x (Q, O 192x192; K, V 192x96; Q, K, V biases; MLP 3 x 192x640; 2 norms)
    # + embedding and head 2 x 278x192 + the final norm = 2,026,944
    per_layer = 192 * 192 * 2 + 192 * 96 * 2 + 192 + 96 * 2 + 3 * 192 * 640 + 2 * 192
    assert sum(t.numel() for t in weights.values()) == 4 * per_layer + 2 * 278 * 192 + 192
    for override, message in (
            ("task=sums", r"task='sums' is invalid: expected one of \['running_sum', 'arithmetic'\]"),
            ("num_steps=0", "num_steps=0 is invalid"),
            ("num_steps=65", "num_steps=65 is invalid: expected an integer in 1..64"),
            ("num_steps=8", r"prime.rollout.sampling.max_new_tokens=48 is invalid: expected >= 77 "
                            "for num_steps=8"),
            ("model_hidden_size=160", "model_hidden_size=160 is invalid"),
            ("sft_num_steps=[]", r"sft_num_steps=\[\] is invalid")):
        with pytest.raises(ValueError, match=message):
            load_config(DemoConfig, None, [override])
    # The longest K=8 solution fits the bound the check uses.
    from megatron_prime.demo import max_response_tokens
    from megatron_prime.toy import build_toy_tokenizer, make_chains

    tokenizer = build_toy_tokenizer()
    longest = max(len(tokenizer(c.solution, add_special_tokens=False)["input_ids"]) + 1
                  for c in make_chains(2000, seed=0, num_steps=8))
    assert longest <= max_response_tokens(8) == 77
