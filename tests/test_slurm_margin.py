"""The USR1 margin (launch/margin.py) from a crafted metrics.jsonl, from the cluster YAML's
estimates and from the model size; every number below is computed by hand in a comment."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from megatron_prime.launch.margin import checkpoint_bytes, measured_times, model_config_path
from megatron_prime.launch.sbatch import SlurmConfig, load_run_config, render_sbatch
from megatron_prime.launch.submit import NodeShape, Partitions, main

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIG = str(REPO / "examples" / "eurus2_7b_prime.yaml")


def write_metrics(run_dir: Path) -> Path:
    """25 steps: time/step = 100 + s, except
    step 3: 500 s (outside the last 20 steps: not counted),
    step 5: 300 s of which 40 s checkpoint (outside the window, but its save counts),
    step 10: 180 s (a validation step; the largest in the window),
    step 20: 230 s of which 60 s checkpoint (170 s without the save).
    Plus a step-0 validation line without time/step, which is skipped.
    Step time: max over steps 6..25 of (time/step - time/checkpoint) = 180 s.
    Save time: max(40, 60) = 60 s."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "time": 0.0, "val/pass@1": 0.25}]
    for step in range(1, 26):
        record = {"step": step, "time": float(step), "time/step": 100.0 + step}
        if step == 3:
            record["time/step"] = 500.0
        if step == 5:
            record.update({"time/step": 300.0, "time/checkpoint": 40.0})
        if step == 10:
            record["time/step"] = 180.0
        if step == 20:
            record.update({"time/step": 230.0, "time/checkpoint": 60.0})
        lines.append(record)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_config(tmp_path: Path, *overrides: str):
    return load_run_config(RUN_CONFIG, [f"logging.run_dir={tmp_path / 'run'}", *overrides])


def slurm(**changes) -> SlurmConfig:
    config = SlurmConfig(time="1-00:00:00", **changes)
    config.validate()
    return config


def test_measured_step_and_save_times(tmp_path):
    path = write_metrics(tmp_path / "run")
    assert measured_times(path) == (180.0, 60.0)
    assert measured_times(tmp_path / "missing.jsonl") == (None, None)


def test_auto_margin_from_the_last_run(tmp_path):
    write_metrics(tmp_path / "run")
    prime = run_config(tmp_path)
    margin = slurm().signal_margin(prime)
    assert margin.seconds == 360  # (180 + 60) x 1.5
    assert "largest of the last 20 steps in" in margin.step_source
    assert slurm(signal_safety_factor=1.25).signal_margin(prime).seconds == 300  # 240 x 1.25
    # A measurement wins over the estimates.
    assert slurm(seconds_per_step_estimate=10.0, checkpoint_seconds_estimate=1.0
                 ).signal_margin(prime).seconds == 360
    text = render_sbatch(slurm(), "run.yaml", [], prime)
    assert "#SBATCH --signal=USR1@360\n" in text
    assert "# USR1 360 s before the time limit = (step 180 s (largest of the last 20 steps" in text


def test_auto_margin_from_the_estimates(tmp_path):
    prime = run_config(tmp_path)  # no metrics.jsonl yet
    margin = slurm(seconds_per_step_estimate=100.0, checkpoint_seconds_estimate=20.0).signal_margin(prime)
    assert margin.seconds == 180  # (100 + 20) x 1.5
    assert (margin.step_source, margin.save_source) == ("slurm.seconds_per_step_estimate",
                                                       "slurm.checkpoint_seconds_estimate")
    # 7 s + 0.5 s = 7.5 s, x 1.5 = 11.25 -> rounded up to 12
    assert slurm(seconds_per_step_estimate=7.0, checkpoint_seconds_estimate=0.5
                 ).signal_margin(prime).seconds == 12


def test_auto_without_a_step_time_names_the_key(tmp_path):
    prime = run_config(tmp_path)
    with pytest.raises(ValueError) as error:
        slurm(checkpoint_seconds_estimate=20.0).signal_margin(prime)
    message = str(error.value)
    assert message.startswith("slurm.signal_seconds='auto' needs a step time")
    assert "set slurm.seconds_per_step_estimate" in message and "metrics.jsonl" in message
    # The example's model folder (ckpt/eurus2-7b-sft) is not here: no size to estimate from.
    with pytest.raises(ValueError, match=r"needs a checkpoint save time: no config.json in "
                                         r"model.path='ckpt/eurus2-7b-sft'.*checkpoint_seconds_estimate"):
        slurm(seconds_per_step_estimate=100.0).signal_margin(prime)


def test_fixed_margin_shorter_than_step_plus_save_is_refused(tmp_path):
    write_metrics(tmp_path / "run")
    prime = run_config(tmp_path)
    with pytest.raises(ValueError) as error:
        slurm(signal_seconds=239).validate(prime)
    message = str(error.value)
    assert message.startswith("slurm.signal_seconds=239 is invalid: expected at least one step + "
                              "one save = 240 s (step 180 s")
    assert slurm(signal_seconds=240).signal_margin(prime).seconds == 240  # no safety factor
    # Estimates are checked the same way: 300 < 250 + 60.
    with pytest.raises(ValueError, match=r"slurm.signal_seconds=300 is invalid: expected at least "
                                         r"one step \+ one save = 310 s"):
        slurm(signal_seconds=300, seconds_per_step_estimate=250.0,
              checkpoint_seconds_estimate=60.0).validate(run_config(tmp_path / "other"))
    # Nothing known: a fixed number cannot be checked, and is taken as it is.
    assert slurm(signal_seconds=300).signal_margin(run_config(tmp_path / "other")).seconds == 300


def test_the_time_limit_must_hold_the_derived_margin(tmp_path):
    write_metrics(tmp_path / "run")
    # 360 s margin + 60 s early signal + 600 s startup = 1020 s > 15 min = 900 s
    with pytest.raises(ValueError, match=r"slurm.time='00:15:00' is invalid: .* = 360 \+ 60 \+ 600 "
                                         r"= 1020 s"):
        SlurmConfig(time="00:15:00").validate(run_config(tmp_path))


def save_tiny_qwen2(folder: Path) -> Path:
    """hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 256, untied.
    Per layer: q 64x64+64, k and v 64x32+32 each, o 64x64, gate/up 2x64x128, down 128x64,
    2 norms of 64 = 4160 + 2080 + 2080 + 4096 + 16384 + 8192 + 128 = 37120.
    Model: 2 x 37120 + embedding 256x64 + head 256x64 + final norm 64 = 107072 parameters."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}))
    return folder


def test_save_time_estimated_from_the_model_size(tmp_path):
    model = save_tiny_qwen2(tmp_path / "model")
    prime = run_config(tmp_path, f"model.path={model}")
    assert model_config_path(str(model)) == model / "config.json"
    # policy + PRM, bf16 weights (2 B) + fp32 master and Adam moments (12 B): 2 x 107072 x 14
    assert checkpoint_bytes(prime, model / "config.json") == 2_998_016
    # a PRM of its own size (model.prm_path): the same model with one layer, 107072 - 37120
    # = 69952 parameters; 14 x (107072 + 69952) = 2,478,336
    small = tmp_path / "small"
    small.mkdir()
    fields = json.loads((model / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**fields, "num_hidden_layers": 1}))
    assert checkpoint_bytes(run_config(tmp_path, f"model.path={model}", f"model.prm_path={small}"),
                            model / "config.json") == 14 * (107072 + 69952) == 2_478_336
    # outcome-only (no PRM trained): one model
    assert checkpoint_bytes(run_config(tmp_path, f"model.path={model}", "algo.prm_mode=outcome_only"),
                            model / "config.json") == 1_499_008
    # a frozen PRM is never saved (it is reloaded from model.prm_path): one model too
    assert checkpoint_bytes(run_config(tmp_path, f"model.path={model}", "algo.prm_mode=frozen"),
                            model / "config.json") == 1_499_008
    # float32 weights are their own master: 4 + 8 B per parameter, 2 x 107072 x 12
    assert checkpoint_bytes(run_config(tmp_path, f"model.path={model}", "precision.dtype=float32"),
                            model / "config.json") == 2_569_728
    # precision.dtype=auto (the default) is float32 in a CPU job and bfloat16 on GPUs.
    auto = run_config(tmp_path, f"model.path={model}", "precision.dtype=auto")
    assert checkpoint_bytes(auto, model / "config.json", on_gpu=False) == 2_569_728
    assert checkpoint_bytes(auto, model / "config.json", on_gpu=True) == 2_998_016
    cpu_job = slurm(seconds_per_step_estimate=10.0, checkpoint_write_gbps=0.001, gpus_per_node=0,
                    tasks_per_node=2)
    assert cpu_job.signal_margin(auto).save_seconds == pytest.approx(2.569728)
    # At 0.001 GB/s (1 MB/s) the save takes 2.998016 s; (10 + 2.998016) x 1.5 = 19.497 -> 20.
    margin = slurm(seconds_per_step_estimate=10.0, checkpoint_write_gbps=0.001).signal_margin(prime)
    assert margin.seconds == 20
    assert margin.save_source == (f"0.003 GB checkpoint of {model / 'config.json'} at "
                                  "slurm.checkpoint_write_gbps=0.001 GB/s")
    # A megatron_prime checkpoint keeps the HF config in hf/.
    converted = tmp_path / "converted"
    (converted / "hf").mkdir(parents=True)
    (converted / "hf" / "config.json").write_text((model / "config.json").read_text())
    assert model_config_path(str(converted)) == converted / "hf" / "config.json"


def test_hand_count_of_the_tiny_model_matches_transformers(tmp_path):
    """The 107072 above is what transformers itself counts for that config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = save_tiny_qwen2(tmp_path / "model")
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    assert sum(p.numel() for p in hf.parameters()) == 107072


def test_submit_prints_the_margin_and_where_it_came_from(tmp_path, monkeypatch):
    metrics = write_metrics(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text('time: "1-00:00:00"\npartition: gpu\n')
    out, err = io.StringIO(), io.StringIO()
    status = main([RUN_CONFIG, "--slurm", str(cluster), f"logging.run_dir={tmp_path / 'run'}",
                   "--dry-run"], list_partitions=lambda: Partitions({"gpu": [NodeShape(112, 8)]}),
                  stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    assert err.getvalue() == (
        f"signal: USR1 360 s before the time limit = (step 180 s (largest of the last 20 steps in "
        f"{metrics}) + save 60 s (measured in {metrics})) x 1.5 (slurm.signal_safety_factor)\n")
    assert "#SBATCH --signal=USR1@360\n" in out.getvalue()
    # "auto" or a number on the command line; anything else is one error line.
    err = io.StringIO()
    assert main([RUN_CONFIG, "--slurm", str(cluster), "--signal-seconds", "soon", "--dry-run"],
                stdout=io.StringIO(), stderr=err) == 2
    assert err.getvalue().startswith("error: argument --signal-seconds: expected 'auto' or a whole")
