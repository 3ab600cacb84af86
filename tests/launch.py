"""Starts a worker script under torchrun with N gloo processes (real multi-process runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_prime.distributed import free_port

REPO = Path(__file__).resolve().parent.parent


def torchrun(script: str, nproc: int, args: list[str], timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", str(REPO / script), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}")


def run_json_worker(script: str, nproc: int, args: list[str], out: Path, timeout: int = 600) -> dict:
    torchrun(script, nproc, [*args, "--out", str(out)], timeout=timeout)
    return json.loads(out.read_text())


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (through /proc's task children lists); a process that
    exits while being walked is skipped."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            queue += kids
    return found
