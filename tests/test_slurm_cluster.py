"""SLURM submission on a real one-machine cluster (munged, slurmctld, slurmd started by
tools/slurm_local.sh; .ci/run installs and starts it).

- ``sbatch --test-only`` accepts the example scripts (Eurus-2-7B on 1, 2 and 4 nodes, Qwen2.5-32B
  on 4 and Qwen2.5-72B on 8 nodes of 8 H100s) against
  the cluster's H100-shaped ``gpu`` partition (nodes with no slurmd: nothing runs there), and
  refuses a 16-node one: the check is the controller's, not ours;
- a tiny PRIME run submitted through tools/submit.py as a 2-task CPU job (TP=2) completes,
  and metrics.jsonl holds every step;
- the same run signalled mid-run (``scancel --signal=USR1``, what ``--signal=USR1@N`` sends
  before the time limit) saves, requeues itself, resumes with no user action, and ends with
  bit-identical weights and optimizer state to the uninterrupted run;
- bad options (unknown partition, more GPUs or CPUs than a node has, a time limit shorter
  than one checkpoint interval) stop submit with one error line: nothing written, no job.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from launch import REPO
from test_train_loop import saved_tensors

pytestmark = pytest.mark.slow
LOCAL_CLUSTER = REPO / "tools" / "slurm_local.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
STEPS = 4


def _start_local_cluster() -> str | None:
    """None once the local cluster is up; otherwise why it cannot be (the skip reason)."""
    if subprocess.run(["bash", str(LOCAL_CLUSTER), "status"], capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return ("no local SLURM cluster is up, and installing and starting one needs root: "
                "sudo tools/slurm_local.sh install && sudo tools/slurm_local.sh start")
    for verb in ("install", "start"):
        done = subprocess.run(["bash", str(LOCAL_CLUSTER), verb], capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            return f"tools/slurm_local.sh {verb} failed: {(done.stdout + done.stderr).strip()[-2000:]}"
    return None


@pytest.fixture(scope="module")
def local_cluster() -> None:
    reason = _start_local_cluster()
    if reason is not None:
        pytest.skip(reason)


def job_fields(job_id: str) -> dict[str, str]:
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_for_job(job_id: str, log: Path, timeout: float = 900) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if fields["JobState"] in FINAL_STATES:
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            tail = log.read_text()[-6000:] if log.is_file() else "(no log)"
            raise AssertionError(f"job {job_id} still {fields['JobState']} after {timeout} s:\n{tail}")
        time.sleep(1)


def job_ids() -> set[str]:
    done = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory) -> Path:
    """A folder to submit from, holding the toy model, its data and the run config."""
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    root = tmp_path_factory.mktemp("slurm")
    model = write_toy_model(root / "model", num_layers=2)
    data = write_jsonl(make_rl_rows(64, seed=3), root / "rl.jsonl")
    config = {
        "model": {"path": str(model)},
        "data": {"paths": [str(data)]},
        "parallel": {"tensor_parallel_size": 2},
        "trainer": {"steps": STEPS, "device": "cpu"},
        "checkpoint": {"save_every": 0, "keep_last": 2},
        "rollout": {"batch": {"prompts_per_step": 4, "oversample_factor": 2,
                              # A random-weight model solves nothing: keep every prompt.
                              "filter": {"low": 0.0, "high": 1.0},
                              # ...and it rarely samples EOS: keep its cut responses.
                              "filter_truncated": False},
                    "sampling": {"max_new_tokens": 24}, "engine": {"max_model_len": 96}},
        "algo": {"micro_batch_size": 8},
        "policy_optimizer": {"lr": 1e-3},
        "prm_optimizer": {"lr": 1e-3},
        "logging": {"run_dir": "runs/tiny", "wandb_mode": "disabled"},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    # startup_seconds comes from a cluster YAML; the default (600 s) does not fit 30 minutes.
    (root / "local.yaml").write_text("startup_seconds: 120\n")
    return root


# The cluster options of the tiny CPU job: 2 trainer processes on the local node.
CPU_JOB = ["--partition", "debug", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--cpus-per-task", "1", "--time", "00:30:00", "--signal-seconds", "60"]


def submit_tiny_run(submit_dir: Path, name: str) -> tuple[str, Path]:
    """tools/submit.py, as a user runs it; returns the job id and its log path."""
    command = [sys.executable, str(REPO / "tools" / "submit.py"), "tiny.yaml", *CPU_JOB,
               "--job-name", name, "--venv", sys.prefix, f"logging.run_dir=runs/{name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*command, "--slurm", str(submit_dir / "local.yaml")], cwd=submit_dir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    match = re.search(r"submitted job (\d+)\nscript: (\S+)\nlog: (\S+)", done.stdout)
    assert match, done.stdout
    assert (submit_dir / match.group(2)).is_file()
    return match.group(1), submit_dir / match.group(3)


def metric_steps(run_dir: Path) -> list[int]:
    from megatron_prime.monitor import read_metrics

    return [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(local_cluster, submit_dir) -> Path:
    job_id, log = submit_tiny_run(submit_dir, "straight")
    fields = wait_for_job(job_id, log)
    assert fields["JobState"] == "COMPLETED", log.read_text()[-6000:]
    return submit_dir / "runs" / "straight"


def test_sbatch_test_only_accepts_the_example_scripts(local_cluster, tmp_path):
    from megatron_prime.launch.sbatch import load_run_config, load_slurm_config, render_sbatch

    for nodes, script in ((1, "eurus2_7b_prime_1node"), (2, "eurus2_7b_prime_2nodes"),
                          (4, "eurus2_7b_prime_4nodes"), (4, "qwen2.5_32b_prime_4nodes"),
                          (8, "qwen2.5_72b_prime_8nodes")):
        done = subprocess.run(["sbatch", "--test-only", f"examples/slurm/{script}.sbatch"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{script}: {done.stderr}"
        # --exclusive: whole DGX nodes, 112 cores each, in the H100 partition.
        nodelist = "h100-1" if nodes == 1 else f"h100-[1-{nodes}]"
        assert f"using {112 * nodes} processors on nodes {nodelist} in partition gpu" in done.stderr

    # The controller does check: 16 nodes are more than the partition has.
    prime = load_run_config(str(REPO / "examples" / "eurus2_7b_prime.yaml"), [])
    slurm = load_slurm_config(REPO / "examples" / "slurm" / "h100_4nodes.yaml", {"nodes": 16})
    too_big = tmp_path / "16nodes.sbatch"
    too_big.write_text(render_sbatch(slurm, "examples/eurus2_7b_prime.yaml", [], prime))
    done = subprocess.run(["sbatch", "--test-only", str(too_big)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "Requested node configuration is not available" in done.stderr


def test_tiny_run_submitted_with_two_tasks_completes_every_step(uninterrupted, submit_dir):
    assert metric_steps(uninterrupted) == list(range(1, STEPS + 1))
    log = next((submit_dir / "slurm-logs").glob("straight-*.out")).read_text()
    assert f"all {STEPS} steps done" in log
    assert "TP=2 x PP=1 x CP=1 per model replica, DP=1" in (submit_dir / "slurm-logs" / "straight.sbatch").read_text()
    checkpoints = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert checkpoints == [f"step_{STEPS:08d}"]


def test_preempted_run_requeues_resumes_and_matches_the_uninterrupted_one(uninterrupted, submit_dir):
    job_id, log = submit_tiny_run(submit_dir, "preempted")
    run_dir = submit_dir / "runs" / "preempted"
    deadline = time.monotonic() + 600
    # The pre-emption warning once the first step is logged: the trainers are in their loop.
    while not (run_dir / "metrics.jsonl").is_file() or not metric_steps(run_dir):
        state = job_fields(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"{state}:\n{log.read_text()[-6000:]}"
        assert time.monotonic() < deadline, "no step logged within 600 s"
        time.sleep(0.5)
    # Like --signal=USR1@N (no B:): every process of the job steps, not the batch shell.
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    fields = wait_for_job(job_id, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-6000:]
    assert fields["Restarts"] == "1", text[-6000:]
    stopped_at = int(re.search(r"stopped at step (\d+) of 4 \(time-limit signal\); requeueing", text)[1])
    assert 1 <= stopped_at < STEPS
    assert "SIGUSR1: saved" in text
    assert "resumed from" in text and f"at step {stopped_at}" in text
    assert f"all {STEPS} steps done" in text
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))

    final = f"step_{STEPS:08d}"
    expected = saved_tensors(uninterrupted / "checkpoints" / final)
    got = saved_tensors(run_dir / "checkpoints" / final)
    assert sorted(got) == sorted(expected)
    assert any("exp_avg" in name for name in got), "optimizer state missing from the checkpoint"
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_bad_options_are_refused_before_anything_is_submitted(local_cluster, submit_dir, tmp_path):
    options = tmp_path / "big_nodes.yaml"
    options.write_text("max_gpus_per_node: 16\nstartup_seconds: 120\n")
    cases = [
        ([*CPU_JOB, "--partition", "h200"], "slurm.partition='h200' is invalid: 'h200' is not a partition "
                                  "of this cluster; expected one of ['debug', 'gpu']"),
        (["--partition", "gpu", "--gpus-per-node", "16", "--cpus-per-task", "4", "--signal-seconds", "60",
          "trainer.device=auto", "rollout.batch.prompts_per_step=16"],
         "slurm.gpus_per_node=16 is invalid: expected at most 8: more GPUs than a node has "
         "(the nodes of partition 'gpu' have at most 8, says sinfo)"),
        ([*CPU_JOB, "--tasks-per-node", "4", "parallel.tensor_parallel_size=4"],
         "slurm.tasks_per_node=4 is invalid: expected at most 2: the nodes of partition "
         "'debug' have at most 2 CPUs (sinfo)"),
        ([*CPU_JOB, "--seconds-per-step-estimate", "30", "checkpoint.save_every=60"],
         "a time limit longer than one checkpoint interval: checkpoint.save_every=60 steps x "
         "30 s per step = 1800 s, but the job has 1560 s for steps"),
    ]
    before = job_ids()
    for extra, expected in cases:
        work = tmp_path / "submit_from"
        work.mkdir()
        (work / "tiny.yaml").write_text((submit_dir / "tiny.yaml").read_text())
        done = subprocess.run([sys.executable, str(REPO / "tools" / "submit.py"), "tiny.yaml",
                               "--slurm", str(options), "--output-dir", "logs", *extra], cwd=work,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (extra, done.stderr)
        assert expected in lines[0], (extra, lines[0])
        assert sorted(p.name for p in work.iterdir()) == ["tiny.yaml"], extra  # no logs/, no script
        (work / "tiny.yaml").unlink()
        work.rmdir()
    assert job_ids() <= before
