"""Kill at random across checkpoint writes: metrics.jsonl keeps every step exactly once, and
each start resumes from the newest complete checkpoint.

The trainer (tests/workers/kill_resume_worker.py: the real loop with the stand-in engine of
tests/gpu_simulation.py, so a start takes seconds) saves after every step and is SIGKILLed,
process group and all, ten times: half at a random moment inside a checkpoint write (a
random delay after its staging folder appears), half the moment a checkpoint is renamed into
place (the window between the rename and the step's metrics line). After each kill the next
start must say it resumed from the newest complete checkpoint on disk at that moment; a last
start runs to the end.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO

WORKER = REPO / "tests" / "workers" / "kill_resume_worker.py"
STEPS = 12
KILLS = 10
POLL_S = 0.002


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory) -> dict[str, Path]:
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    root = tmp_path_factory.mktemp("toy")
    return {"model": write_toy_model(root / "model", num_layers=2),
            "data": write_jsonl(make_rl_rows(64, seed=3), root / "rl.jsonl")}


def _overrides(toy_inputs: dict[str, Path], run_dir: Path) -> list[str]:
    return [
        f"model.path={toy_inputs['model']}", f"data.paths=[{toy_inputs['data']}]",
        f"logging.run_dir={run_dir}", f"trainer.steps={STEPS}",
        "checkpoint.save_every=1", "checkpoint.keep_last=2",
        "rollout.batch.prompts_per_step=2", "rollout.batch.oversample_factor=1",
        # The random-weight model rarely stops before max_new_tokens: keep its cut responses.
        "rollout.batch.filter_truncated=false",
        "rollout.batch.filter.low=0.0", "rollout.batch.filter.high=1.0",
        "rollout.sampling.max_new_tokens=8", "rollout.engine.max_model_len=64",
        "algo.micro_batch_size=8", "logging.wandb_mode=disabled", "logging.progress_bar=false",
        # A step-0 validation line: written again by a start that redoes step 0.
        f"validation.paths=[{toy_inputs['data']}]",
        "validation.max_prompts=2", "validation.every=0", "validation.before_train=true",
    ]


def _start(toy_inputs: dict[str, Path], run_dir: Path, ledger: Path) -> subprocess.Popen:
    ledger.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--ledger", str(ledger), *_overrides(toy_inputs, run_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def _complete_steps(root: Path) -> set[int]:
    from megatron_prime.checkpoint.train_state import MARKER

    return {int(p.name.removeprefix("step_")) for p in root.glob("step_*") if (p / MARKER).is_file()}


def _wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{process.stdout.read()[-6000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(POLL_S)


def _resumed_from(output: str) -> str | None:
    match = re.search(r"resumed from (\S+) at step (\d+)", output)
    return match.group(1) if match else None


@pytest.mark.slow
def test_kills_across_checkpoint_writes_lose_no_metrics_line(toy_inputs, tmp_path):
    from megatron_prime.checkpoint.train_state import find_latest_checkpoint
    from megatron_prime.monitor import read_metrics

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    rng = random.Random(20261202)
    expected_resume: Path | None = None
    torn_writes = 0
    for kill in range(KILLS):
        process = _start(toy_inputs, run_dir, tmp_path / f"ledger-{kill}")
        before = _complete_steps(root)
        if kill % 2 == 0:
            # Inside a write: a random delay after the staging folder of a new save appears.
            _wait_for(process, lambda: any(root.glob(".step_*.partial")), "a checkpoint write")
            time.sleep(rng.uniform(0.0, 0.25))
        else:
            # Right after a rename: before the step's metrics line, if it comes after.
            _wait_for(process, lambda: _complete_steps(root) - before, "a new checkpoint")
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        assert _resumed_from(output) == (str(expected_resume) if expected_resume else None), output[-3000:]
        torn_writes += bool(list(root.glob(".step_*.partial")))
        expected_resume = find_latest_checkpoint(root)

    process = _start(toy_inputs, run_dir, tmp_path / "ledger-last")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-6000:]
    assert _resumed_from(output) == str(expected_resume)

    steps = [record["step"] for record in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(STEPS + 1)), steps  # 0 (validation) .. STEPS, each once, in order
    assert find_latest_checkpoint(root) == root / f"step_{STEPS:08d}"
    assert expected_resume is not None and expected_resume.name != "step_00000000"
    # The kills did land inside writes (a staging folder was left behind), not only between.
    assert torn_writes >= KILLS // 4, torn_writes
