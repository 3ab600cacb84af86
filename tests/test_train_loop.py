"""The PRIME trainer end to end (python -m megatron_prime.train, real vLLM CPU engine).

- resume: 4 steps straight == 2 steps, SIGKILL, resume=auto, 2 more steps, bit for bit
  (every logged loss and every saved tensor of policy, PRM and their optimizers);
- bad config values, a missing model or data file, malformed rows: one clear error line,
  exit status != 0, and no run folder written.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import REPO

TINY_RUN = [
    "trainer.steps=4", "checkpoint.save_every=2", "checkpoint.keep_last=3",
    "rollout.batch.prompts_per_step=4", "rollout.batch.oversample_factor=2",
    # A random-weight model solves nothing: keep every prompt so the updates are real. It
    # rarely samples EOS either: most responses stop at max_new_tokens, and the truncation
    # filter would drop nearly every prompt.
    "rollout.batch.filter.low=0.0", "rollout.batch.filter.high=1.0",
    "rollout.batch.filter_truncated=false",
    "rollout.sampling.max_new_tokens=24", "rollout.engine.max_model_len=96",
    "algo.micro_batch_size=8", "policy_optimizer.lr=1e-3", "prm_optimizer.lr=1e-3",
    "logging.wandb_mode=disabled",
]


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory) -> dict[str, Path]:
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    root = tmp_path_factory.mktemp("toy")
    model = write_toy_model(root / "model", num_layers=2)
    data = write_jsonl(make_rl_rows(64, seed=3), root / "rl.jsonl")
    return {"model": model, "data": data}


def train_command(toy_inputs: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_prime.train", f"model.path={toy_inputs['model']}",
            f"data.paths=[{toy_inputs['data']}]", f"logging.run_dir={run_dir}", *TINY_RUN, *extra]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_to_end(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    from megatron_prime.monitor import read_metrics

    keys = ("policy/loss", "prm/loss", "policy/grad_norm", "prm/grad_norm", "reward/accuracy",
            "rollout/response_length")
    return {m["step"]: {k: m[k] for k in keys} for m in read_metrics(run_dir / "metrics.jsonl")}


def saved_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a train-state checkpoint (model weights and optimizer state)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tensors = {}
    for part in sorted(p for p in checkpoint.iterdir() if (p / ".metadata").is_file()):
        out = checkpoint.parent / f"{checkpoint.name}-{part.name}.pt"
        dcp_to_torch_save(str(part), str(out))
        for name, value in torch.load(out, weights_only=False).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{part.name}/{name}"] = value
        out.unlink()
    return tensors


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact(toy_inputs, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_to_end(train_command(toy_inputs, straight))

    # Same run, killed (SIGKILL, the whole process group: trainer and vLLM) once step 2's
    # checkpoint is complete, then started again with the same command (resume=auto).
    command = train_command(toy_inputs, resumed)
    process = subprocess.Popen(command, env=run_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    marker = resumed / "checkpoints" / "step_00000002" / "train_state.json"
    deadline = time.monotonic() + 600
    while not marker.is_file():
        assert process.poll() is None, f"run ended before its step-2 checkpoint:\n{process.stderr.read()[-6000:]}"
        assert time.monotonic() < deadline, "no step-2 checkpoint within 600 s"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (resumed / "checkpoints" / "step_00000004").exists()
    done = run_to_end(command)
    assert "resumed from" in done.stdout + done.stderr

    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    assert got == expected  # exact float equality, step by step
    assert expected[1]["policy/loss"] != expected[4]["policy/loss"]  # the runs did learn something
    # vLLM sampled every step with the weights the trainer had (the bridge synced each update).
    for step, metrics in sampler_gaps(straight).items():
        assert metrics["rollout/logprob_diff_max"] < 1e-3, (step, metrics)
    final_a = saved_tensors(straight / "checkpoints" / "step_00000004")
    final_b = saved_tensors(resumed / "checkpoints" / "step_00000004")
    assert sorted(final_a) == sorted(final_b)
    assert any("exp_avg" in name for name in final_a), "optimizer state missing from the checkpoint"
    for name, tensor in final_a.items():
        assert torch.equal(tensor, final_b[name]), name
    # ... and the weights did move from the SFT start between step 2 and step 4.
    step2 = saved_tensors(straight / "checkpoints" / "step_00000002")
    assert any(not torch.equal(step2[name], final_a[name]) for name in final_a if "policy" in name)


def sampler_gaps(run_dir: Path) -> dict[int, dict[str, float]]:
    from megatron_prime.monitor import read_metrics

    keys = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max")
    return {m["step"]: {k: m[k] for k in keys} for m in read_metrics(run_dir / "metrics.jsonl")}


@pytest.mark.slow
def test_shared_weight_sync_trains_with_the_engine_in_step(toy_inputs, tmp_path):
    """rollout.engine.weight_sync=shared end to end: after every update the engine's log-probs
    of its own samples are the trainer's (the trainer logs the gap), and the policy moves."""
    run_to_end(train_command(toy_inputs, tmp_path / "shared", "trainer.steps=3",
                             "rollout.engine.weight_sync=shared"))
    gaps = sampler_gaps(tmp_path / "shared")
    assert sorted(gaps) == [1, 2, 3]
    for step, metrics in gaps.items():
        assert metrics["rollout/logprob_diff_max"] < 1e-3, (step, metrics)
    run = losses(tmp_path / "shared")
    assert run[1]["policy/loss"] != run[3]["policy/loss"]

    # The trained policy and PRM of a step folder, published as HF folders.
    step = tmp_path / "shared" / "checkpoints" / "step_00000003"
    saved = saved_tensors(step)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import load_file

    exported = {}
    for role in ("policy", "prm"):
        out = tmp_path / f"{role}_hf"
        run_to_end([sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"),
                    "--checkpoint", str(step), "--role", role, "--output", str(out)])
        exported[role] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
        model = AutoModelForCausalLM.from_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(out)
        ids = tokenizer("1 + 2 =", return_tensors="pt").input_ids
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
        # Tensors the mapping copies unchanged equal the saved training state bit for bit.
        vocab = exported[role]["model.embed_tokens.weight"].shape[0]
        assert torch.equal(exported[role]["model.embed_tokens.weight"],
                           saved[f"{role}/embedding.word_embeddings.weight"][:vocab])
        # Megatron's dist-checkpoint stacks the layers: [num_layers, ...].
        assert torch.equal(exported[role]["model.layers.1.mlp.down_proj.weight"],
                           saved[f"{role}/decoder.layers.mlp.linear_fc2.weight"][1])
    assert not torch.equal(exported["policy"]["lm_head.weight"], exported["prm"]["lm_head.weight"])


@pytest.mark.slow
def test_a_smaller_prm_trains_resumes_and_exports_at_its_own_size(toy_inputs, tmp_path):
    """model.prm_path with another architecture (a quarter of the policy's width, one layer
    against two): the PRM and its reference start there, its checkpoints carry its own
    config.json, a resumed run loads it, and its HF export has its shape."""
    import math

    from megatron_prime.toy.model import write_toy_model

    small = write_toy_model(tmp_path / "small_prm", seed=5, hidden_size=32, num_layers=1,
                            intermediate_size=64)
    run_dir = tmp_path / "run"
    common = (f"model.prm_path={small}", "algo.prm_mini_batches=1", "checkpoint.save_every=2")
    run_to_end(train_command(toy_inputs, run_dir, "trainer.steps=2", *common))
    # Step 1's PRM loss is at its forward before any update, where the PRM is its reference:
    # every implicit reward is 0, sigmoid(0) = 1/2 for every response, so the loss is ln 2.
    first = losses(run_dir)[1]
    assert abs(first["prm/loss"] - math.log(2)) < 1e-6

    step = run_dir / "checkpoints" / "step_00000002"
    marker = json.loads((step / "train_state.json").read_text())
    assert marker["hf_folders"] == {"policy": "hf", "prm": "hf_prm"}
    assert json.loads((step / "hf_prm" / "config.json").read_text()) == \
        json.loads((small / "config.json").read_text())
    saved = saved_tensors(step)
    assert saved["prm/decoder.layers.mlp.linear_fc2.weight"].shape == (1, 32, 64)
    assert saved["policy/decoder.layers.mlp.linear_fc2.weight"].shape == (2, 128, 384)

    done = run_to_end(train_command(toy_inputs, run_dir, "trainer.steps=3", *common))
    assert "resumed from" in done.stdout + done.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3]

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "prm_hf"
    run_to_end([sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"),
                "--checkpoint", str(step), "--role", "prm", "--output", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    exported = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert torch.equal(exported["model.layers.0.mlp.down_proj.weight"],
                       saved["prm/decoder.layers.mlp.linear_fc2.weight"][0])
    start = load_file(small / "model.safetensors")
    assert not torch.equal(exported["model.layers.0.mlp.down_proj.weight"],
                           start["model.layers.0.mlp.down_proj.weight"])  # it trained


def run_failing(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    return done


@pytest.mark.parametrize(("override", "message"), [
    ("algo.beta=-1", "algo.beta=-1.0 is invalid: expected a float > 0"),
    ("algo.prm_mode=sometimes", "algo.prm_mode='sometimes' is invalid"),
    ("algo.prm_mode=none", "algo.prm_mode='none' was renamed to 'outcome_only'"),
    ("algo.advantage.process_baseline=verl", "algo.advantage.process_baseline='verl' is not allowed"),
    ("rollout.sampling.n=3", "rollout.sampling.n=3 is invalid: expected equal to algo.num_samples_per_prompt=4"),
    ("trainer.steps=0", "trainer.steps=0 is invalid"),
    ("trainer.stpes=3", "trainer.stpes is not a known key"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 is invalid"),
    ("logging.wandb_mode=loud", "logging.wandb_mode='loud' is invalid"),
])
def test_bad_config_value_is_named_and_nothing_is_written(toy_inputs, tmp_path, override, message):
    from megatron_prime.train import main

    run_dir = tmp_path / "run"
    # Config errors are raised before any process group exists, so this runs in-process.
    with pytest.raises(SystemExit) as error:
        main(train_command(toy_inputs, run_dir, override)[3:])
    assert message in str(error.value)
    assert not run_dir.exists()


def test_mini_batches_must_fit_the_rows_of_a_rank():
    from megatron_prime.update import AlgoConfig, check_mini_batches, row_bounds

    # 2 prompts x 4 samples on a rank: 8 rows; 4 PRM mini-batches of 2 rows each.
    check_mini_batches(AlgoConfig(), 8)
    assert row_bounds(8, 4, "algo.prm_mini_batches") == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert row_bounds(6, 4, "algo.prm_mini_batches") == [(0, 2), (2, 3), (3, 4), (4, 6)]
    with pytest.raises(ValueError, match=r"algo.prm_mini_batches=4 is invalid: expected at most the 2 "
                                         r"responses a data-parallel rank trains on"):
        check_mini_batches(AlgoConfig(num_samples_per_prompt=2), 2)
    # A frozen PRM takes no optimizer steps: its mini-batch count is not checked.
    check_mini_batches(AlgoConfig(prm_mode="frozen"), 2)
    with pytest.raises(ValueError, match=r"algo.prm_mini_batches=4 is more than the 3 responses on this rank"):
        row_bounds(3, 4, "algo.prm_mini_batches")


@pytest.mark.slow
def test_missing_inputs_and_malformed_rows(toy_inputs, tmp_path):
    run_dir = tmp_path / "run"
    missing_model = run_failing(train_command(toy_inputs, run_dir, f"model.path={tmp_path / 'nope'}"))
    assert f"model.path='{tmp_path / 'nope'}'" in missing_model.stderr

    missing_data = run_failing(train_command(toy_inputs, run_dir, f"data.paths=[{tmp_path / 'none.jsonl'}]"))
    assert f"data file not found: {tmp_path / 'none.jsonl'}" in missing_data.stderr

    bad = tmp_path / "bad.jsonl"
    rows = toy_inputs["data"].read_text().splitlines()
    rows[4] = json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "ability": "math"})
    bad.write_text("\n".join(rows) + "\n")
    malformed = run_failing(train_command(toy_inputs, run_dir, f"data.paths=[{bad}]"))
    assert f"{bad}:5: malformed row" in malformed.stderr
    assert "reward_model" in malformed.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_sigusr1_to_the_whole_job_saves_and_stops_then_resumes(toy_inputs, tmp_path):
    """SLURM's pre-emption warning (sbatch --signal=USR1@N) reaches every process of the job:
    the trainer finishes its step, saves, exits 0; the vLLM engine survives until then."""
    from megatron_prime.monitor import read_metrics

    run_dir = tmp_path / "run"
    command = train_command(toy_inputs, run_dir, "trainer.steps=50", "checkpoint.save_every=0")
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert process.poll() is None, log.read_text()[-6000:]
        assert time.monotonic() < deadline, "no step logged within 600 s"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGUSR1)
    try:
        process.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group's leftovers, if any
    assert process.returncode == 0, log.read_text()[-6000:]
    assert "SIGUSR1: saved" in log.read_text()
    last = read_metrics(metrics)[-1]["step"]
    assert 1 <= last < 50
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step_{last:08d}"]

    done = run_to_end(train_command(toy_inputs, run_dir, f"trainer.steps={last + 1}"))
    assert f"at step {last}" in done.stdout + done.stderr
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, last + 2))


def torchrun_train(toy_inputs: dict[str, Path], run_dir: Path, nproc: int, *extra: str) -> None:
    from launch import free_port

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "megatron_prime.train",
               *train_command(toy_inputs, run_dir, *extra)[3:]]
    run_to_end(command)


@pytest.mark.slow
def test_full_step_matches_across_layouts(toy_inputs, tmp_path):
    """One whole PRIME step (sync, vLLM rollout, rewards, PRM and PPO updates, checkpoint) at
    TP=2, at PP=2 and at TP=2 with one engine per rank (rollout.engine.engines_per_replica=2:
    the replica's prompts split over two vLLM engines, each prompt seeded by its index in the
    round) gives the losses and updated weights of TP=1/PP=1 within 1e-5.

    The PP=2 run starts from a Megatron checkpoint converted at TP=2 (resharded on load), the
    others from the HF folder: the SFT start may be either."""
    from launch import free_port

    converted = tmp_path / "sft_megatron_tp2"
    run_to_end([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                f"--master-port={free_port()}", str(REPO / "tools" / "convert_hf_to_megatron.py"),
                "--hf-dir", str(toy_inputs["model"]), "--output", str(converted), "--tp", "2"])
    # Adam's eps well above float noise: an element whose gradient is ~0 would otherwise move
    # by +-lr on the sign of rounding noise. Updates stay ~lr * g / (|g| + eps) >> 1e-5.
    one_step = ("trainer.steps=1", "policy_optimizer.adam_eps=1e-3", "prm_optimizer.adam_eps=1e-3")
    runs = {"tp1pp1": (1, ()), "tp2": (2, ("parallel.tensor_parallel_size=2",)),
            "pp2": (2, ("parallel.pipeline_parallel_size=2", f"model.path={converted}")),
            "tp2_two_engines": (2, ("parallel.tensor_parallel_size=2",
                                    "rollout.engine.engines_per_replica=2"))}
    from megatron_prime.monitor import read_metrics

    metrics, weights = {}, {}
    for name, (nproc, layout) in runs.items():
        run_dir = tmp_path / name
        torchrun_train(toy_inputs, run_dir, nproc, *one_step, *layout)
        metrics[name] = losses(run_dir)[1]
        metrics[name]["rollout/engines"] = read_metrics(run_dir / "metrics.jsonl")[0]["rollout/engines"]
        weights[name] = saved_tensors(run_dir / "checkpoints" / "step_00000001")
    base = metrics["tp1pp1"]
    # The rollouts are the same tokens: the engine got the same weights at every layout.
    assert metrics["tp2"]["rollout/response_length"] == base["rollout/response_length"]
    assert metrics["pp2"]["rollout/response_length"] == base["rollout/response_length"]
    assert metrics["tp2_two_engines"]["rollout/response_length"] == base["rollout/response_length"]
    assert [metrics[name]["rollout/engines"] for name in runs] == [1, 1, 1, 2]
    model_keys = [k for k in weights["tp1pp1"] if "optimizer" not in k]
    assert any(k.startswith("policy/") for k in model_keys) and any(k.startswith("prm/") for k in model_keys)
    for layout in ("tp2", "pp2", "tp2_two_engines"):
        for key, value in base.items():
            if key == "rollout/engines":
                continue
            assert metrics[layout][key] == pytest.approx(value, abs=1e-5, rel=1e-5), (layout, key)
        for key in model_keys:
            a, b = weights["tp1pp1"][key], weights[layout][key]
            if a.shape != b.shape:  # the vocabulary is padded to a multiple of 128 * TP
                assert "word_embeddings" in key or "output_layer" in key, (layout, key)
                rows = min(a.shape[0], b.shape[0])
                assert not a[rows:].any() and not b[rows:].any(), (layout, key)
                a, b = a[:rows], b[:rows]
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (layout, key, (a - b).abs().max())


@pytest.mark.slow
def test_held_out_validation_runs_before_training_every_k_steps_and_at_the_end(toy_inputs, tmp_path):
    """validation.* : greedy pass@1 on held-out rows at step 0 (the SFT start), every 2 steps
    and after the last step, over all held-out prompts."""
    from megatron_prime.monitor import read_metrics
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl

    held_out = write_jsonl(make_rl_rows(10, seed=99), tmp_path / "held_out.jsonl")
    run_dir = tmp_path / "run"
    run_to_end(train_command(toy_inputs, run_dir, "trainer.steps=3", "checkpoint.save_every=0",
                             f"validation.paths=[{held_out}]", "validation.every=2",
                             "validation.before_train=true", "validation.max_prompts=7",
                             "validation.max_new_tokens=16"))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in records] == [0, 1, 2, 3]
    validated = {m["step"]: m for m in records if "val/accuracy" in m}
    assert sorted(validated) == [0, 2, 3]
    for metrics in validated.values():
        assert metrics["val/prompts"] == 7  # max_prompts of the 10 rows, one greedy sample each
        assert 0.0 <= metrics["val/accuracy"] <= 1.0
        assert 1.0 <= metrics["val/response_length"] <= 16.0
    assert "time/validation" in validated[2] and "time/validation" not in records[1]


@pytest.mark.slow
def test_offloaded_reference_gives_the_same_step(toy_inputs, tmp_path):
    """trainer.offload_reference moves the frozen reference to host memory between its
    forward passes; the step's numbers must not change (on CPU the moves are host to host, the
    same code path as on GPU)."""
    runs = {}
    for name, extra in (("resident", ()), ("offloaded", ("trainer.offload_reference=true",))):
        run_to_end(train_command(toy_inputs, tmp_path / name, "trainer.steps=1", *extra))
        runs[name] = losses(tmp_path / name)
    # Exact equality of every logged loss and gradient norm (a seed change moves all of them:
    # test_resume_after_kill_is_bit_exact compares such numbers across runs as well).
    assert runs["offloaded"] == runs["resident"]
    assert runs["resident"][1]["prm/grad_norm"] > 0 and runs["resident"][1]["policy/grad_norm"] > 0


@pytest.mark.slow
def test_whole_loop_at_dp2_runs_two_engines(toy_inputs, tmp_path):
    """DP=2 on CPU: two replicas, each with its own vLLM engine (one per replica, on its first
    rank), sample their shards of every step; validation wakes and sleeps both engines; every
    step trains on the whole batch of prompts_per_step prompts."""
    from megatron_prime.monitor import read_metrics
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl

    held_out = write_jsonl(make_rl_rows(6, seed=99), tmp_path / "held_out.jsonl")
    run_dir = tmp_path / "dp2"
    torchrun_train(toy_inputs, run_dir, 2, "trainer.steps=2", "checkpoint.save_every=0",
                   f"validation.paths=[{held_out}]", "validation.every=1",
                   "validation.max_new_tokens=8")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in records] == [1, 2]
    for metrics in records:
        assert metrics["rollout/prompts_trained"] == 4  # 2 per replica
        assert metrics["rollout/kept_prompt_fraction"] == 1.0  # the filter keeps all here
        assert metrics["val/prompts"] == 6  # 3 held-out prompts per replica
        assert metrics["policy/num_units"] > 0
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
