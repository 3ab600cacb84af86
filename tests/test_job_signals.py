"""Every child the trainer starts leaves the job's SIGTERM to the trainer (job_signals.py).

A real trainer-side process (train.StopRequest, the math verifier's worker processes, a code
sandbox running a program) gets SIGTERM as ``scancel`` sends it: to the process group and to
every descendant. The children must survive and keep working, and the trainer's StopRequest
must have seen the signal. Before the change the math workers died (the verifier started new
ones). A sandboxed program survived already (unshare's parent holds SIGTERM off, and the
program runs as its namespace's pid 1); its test guards that, and the trainer's handler, from
regressions. The vLLM engine's processes are tested in test_rollout_bridge.py (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import descendants

REPO = Path(__file__).resolve().parents[1]

TRAINER = r'''
import json, os, sys, threading, time
from pathlib import Path
from megatron_prime.train import StopRequest
from megatron_prime.rewards.math_verifier import MathVerifier, MathVerifierConfig

def children():
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return sorted(pids)

stop = StopRequest()
verifier = MathVerifier(MathVerifierConfig(workers=2))
# Two answers at once start both worker processes.
before_scores = verifier.score_batch([r"\boxed{2}", r"\boxed{3}"], ["2", "2"])
workers = children()
sandbox = {}
if sys.argv[1] == "sandbox":
    from megatron_prime.rewards.sandbox import SandboxConfig, run_python
    def run():
        result = run_python("import time\ntime.sleep(4)\nprint('survived')",
                            config=SandboxConfig(wall_timeout_s=30))
        sandbox.update(status=result.status.value, stdout=result.stdout.decode())
    thread = threading.Thread(target=run)
    thread.start()
print("ready", flush=True)
deadline = time.monotonic() + 60
while stop.signal_name is None and time.monotonic() < deadline:
    time.sleep(0.05)
if sys.argv[1] == "sandbox":
    thread.join()
after_scores = verifier.score_batch([r"\boxed{2}", r"\boxed{3}"], ["2", "2"])
print(json.dumps({"signal": stop.signal_name, "workers": workers, "workers_after": children(),
                  "before": before_scores, "after": after_scores, "sandbox": sandbox}), flush=True)
verifier.close()
'''


def sigterm_like_scancel(trainer: subprocess.Popen) -> list[int]:
    """SIGTERM to the trainer's process group and to each of its descendants (a sandbox has
    its own session; slurmstepd signals every process of the step, whatever its group)."""
    children = descendants(trainer.pid)
    os.killpg(trainer.pid, signal.SIGTERM)
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return children


def run_trainer(mode: str) -> tuple[dict, list[int]]:
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, mode], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        assert trainer.stdout.readline().strip() == "ready", trainer.stderr.read()
        time.sleep(1.0)  # the sandboxed program is asleep now
        signalled = sigterm_like_scancel(trainer)
        out, err = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
    assert trainer.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), signalled


@pytest.mark.slow  # ~30 s: math-verify (sympy) loads in two workers on a busy machine
def test_math_workers_survive_sigterm_and_the_trainer_sees_it():
    report, signalled = run_trainer("verifier")
    assert report["signal"] == "SIGTERM"
    assert len(report["workers"]) == 2 and set(report["workers"]) <= set(signalled)
    # The same two processes, still answering (a dead one would have been replaced).
    assert report["workers_after"] == report["workers"]
    assert report["before"] == report["after"] == [1.0, 0.0]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root to build namespaces")
def test_a_sandboxed_program_survives_sigterm():
    report, signalled = run_trainer("sandbox")
    assert report["signal"] == "SIGTERM"
    assert len(signalled) > 2  # the two workers and the sandbox's processes
    assert report["sandbox"] == {"status": "ok", "stdout": "survived\n"}
    assert report["workers_after"] == report["workers"]


def test_the_block_is_inherited_and_the_caller_keeps_its_mask():
    """What the above relies on: a child started inside has both signals blocked from its
    first instruction (SigBlk in /proc), and the caller's own mask is back afterwards."""
    from megatron_prime.job_signals import JOB_SIGNALS, children_outlive_job_signals

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with children_outlive_job_signals():
        child = subprocess.Popen(["sleep", "5"])
    try:
        blocked = int(next(line.split()[1] for line in Path(f"/proc/{child.pid}/status").read_text()
                           .splitlines() if line.startswith("SigBlk:")), 16)
        for job_signal in JOB_SIGNALS:
            assert blocked & (1 << (job_signal - 1)), job_signal.name
        os.kill(child.pid, signal.SIGTERM)
        time.sleep(0.2)
        assert child.poll() is None  # pending, not delivered
    finally:
        child.kill()
        child.wait()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


SPAWN_CHILD = r"""
import multiprocessing as mp, os, sys
from pathlib import Path
from megatron_prime.job_signals import children_outlive_job_signals

def child(out):
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    Path(out).write_text(status.split("SigBlk:")[1].split()[0])

if __name__ == "__main__":
    # No resource tracker yet in this process: the spawn below would start one.
    with children_outlive_job_signals(spawn=sys.argv[2] == "spawn"):
        process = mp.get_context("spawn").Process(target=child, args=(sys.argv[1],))
        process.start()
    process.join()
"""


def test_a_spawned_child_keeps_sigterm_blocked(tmp_path):
    """vLLM starts its engine core with multiprocessing's spawn, whose first use starts the
    resource tracker and unblocks SIGTERM in the caller (Python's resource_tracker). Before
    the fix the engine core came up with only SIGUSR1 blocked and shut down on scancel."""
    script = tmp_path / "spawn_child.py"
    script.write_text(SPAWN_CHILD)
    out = tmp_path / "sigblk"

    def blocked_in_child(mode: str) -> tuple[bool, bool]:
        subprocess.run([sys.executable, str(script), str(out), mode], check=True, timeout=120,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        blocked = int(out.read_text(), 16)
        return bool(blocked & (1 << (signal.SIGTERM - 1))), bool(blocked & (1 << (signal.SIGUSR1 - 1)))

    assert blocked_in_child("spawn") == (True, True)
    assert blocked_in_child("plain") == (False, True)  # what spawn=True is for
