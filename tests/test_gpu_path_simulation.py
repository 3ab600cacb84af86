"""The colocated GPU path, simulated on CPU (tests/gpu_simulation.py): the real PRIME loop at
8 simulated GPUs per job, with vllm.LLM replaced by a stand-in that records where vLLM would
place its workers and keeps a memory ledger of every simulated GPU.

For each layout (one node DP=2 TP=4; two nodes of 4 GPUs, the second seeing physical GPUs
4-7; one node TP=2 PP=2 DP=2):
- each engine runs on its own replica's GPUs of its node, and every GPU generates;
- every wake happens after every trainer rank on the engine's GPUs released its cache (the
  weights wake, the sync, a second release, then the KV cache), and sleeps are level 2;
- no generate on a sleeping engine, with validation every step;
- every collective during a rollout round goes over a host (gloo) group;
- the trainer's gradients, optimizer state and reference are off the GPU whenever an engine
  is awake (models/offload.py), which is what lets the engines take 0.75 of each GPU;
- nothing fits unless all of the above hold (the ledger raises): a job that keeps its state
  through the rollout runs out of memory at the first engine start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpu_simulation as sim
from launch import REPO
from megatron_prime.distributed import free_port

pytestmark = pytest.mark.slow

LAYOUTS = {
    # name: (nodes, GPUs per node, CUDA_VISIBLE_DEVICES per node, trainer TP, PP, engine TP)
    "1node_dp2_tp4": (1, 8, [None], 4, 1, 4),
    "2nodes_dp2_tp4": (2, 4, [None, "4,5,6,7"], 4, 1, 4),
    "1node_tp2_pp2_dp2": (1, 8, [None], 2, 2, 4),
    # Rollout TP 2 under trainer TP 2 x PP 2: two engines per replica, one per stage's GPUs.
    "1node_tp2_pp2_dp2_rollout_tp2": (1, 8, [None], 2, 2, 2),
}
# Engine owner rank -> (node, physical GPUs) that the layout gives each replica's engine.
EXPECTED_ENGINES = {
    "1node_dp2_tp4": {0: ["n0g0", "n0g1", "n0g2", "n0g3"], 4: ["n0g4", "n0g5", "n0g6", "n0g7"]},
    "2nodes_dp2_tp4": {0: ["n0g0", "n0g1", "n0g2", "n0g3"], 4: ["n1g4", "n1g5", "n1g6", "n1g7"]},
    # Megatron orders ranks TP fastest, then DP, then PP: replica 0 is ranks 0, 1 (stage 0)
    # and 4, 5 (stage 1); replica 1 is ranks 2, 3 and 6, 7, owned by rank 2.
    "1node_tp2_pp2_dp2": {0: ["n0g0", "n0g1", "n0g4", "n0g5"], 2: ["n0g2", "n0g3", "n0g6", "n0g7"]},
    # The replicas' ranks cut in two chunks each: {0, 1}, {4, 5} and {2, 3}, {6, 7}.
    "1node_tp2_pp2_dp2_rollout_tp2": {0: ["n0g0", "n0g1"], 4: ["n0g4", "n0g5"],
                                      2: ["n0g2", "n0g3"], 6: ["n0g6", "n0g7"]},
}
# Settings of a layout beyond the common ones: two engines per replica (a CPU job's default
# is one), and two prompts per replica and round, so that each engine gets one to generate.
LAYOUT_OVERRIDES = {"1node_tp2_pp2_dp2_rollout_tp2": ("rollout.engine.engines_per_replica=2",
                                                      "rollout.batch.prompts_per_step=4")}
STEPS = 2


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    root = tmp_path_factory.mktemp("sim_toy")
    return {"model": write_toy_model(root / "model", num_layers=2, num_key_value_heads=4),
            "data": write_jsonl(make_rl_rows(32, seed=3), root / "rl.jsonl"),
            "val": write_jsonl(make_rl_rows(4, seed=9), root / "val.jsonl")}


def launch_job(layout: str, toy: dict[str, Path], folder: Path, timeout: int = 600,
               extra: tuple[str, ...] = ()) -> Path:
    """Starts every rank of every simulated node on this machine; kills all on a failure."""
    nodes, per_node, visible, tp, pp, engine_tp = LAYOUTS[layout]
    ledger = folder / "ledger"
    ledger.mkdir(parents=True)
    world = nodes * per_node
    overrides = [
        f"model.path={toy['model']}", f"data.paths=[{toy['data']}]", f"logging.run_dir={folder / 'run'}",
        f"parallel.tensor_parallel_size={tp}", f"parallel.pipeline_parallel_size={pp}",
        f"rollout.engine.tensor_parallel_size={engine_tp}", f"trainer.steps={STEPS}",
        "trainer.device=cpu", "checkpoint.save_every=0", "logging.wandb_mode=disabled",
        "rollout.batch.prompts_per_step=2", "rollout.batch.oversample_factor=1",
        "rollout.batch.filter.low=0.0", "rollout.batch.filter.high=1.0",
        "rollout.sampling.n=2", "algo.num_samples_per_prompt=2", "algo.micro_batch_size=2",
        # DP=2: one prompt x 2 samples per rank, so at most 2 PRM mini-batches.
        "algo.prm_mini_batches=2",
        "rollout.sampling.max_new_tokens=8", "rollout.engine.max_model_len=128",
        f"validation.paths=[{toy['val']}]", "validation.every=1", "validation.before_train=true",
        "validation.max_new_tokens=8",
        # The engines get what the trainer frees during a rollout (gpu_simulation.py's sizes).
        "rollout.engine.gpu_memory_utilization=0.75",
        *LAYOUT_OVERRIDES.get(layout, ()),
        *extra,
    ]
    port = free_port()
    processes = []
    logs = []
    for rank in range(world):
        node, local = divmod(rank, per_node)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
               "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
               "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if visible[node] is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible[node]
        log = open(folder / f"rank{rank}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "workers" / "gpu_sim_worker.py"),
             "--ledger", str(ledger), *overrides], env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    first_failure = None  # the rank that failed first: the others then lose their peers
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        first_failure = next((r for r, p in enumerate(processes) if p.returncode not in (None, 0)), None)
        if first_failure is not None:
            break
        time.sleep(0.5)
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    if first_failure is None:
        first_failure = next((r for r, p in enumerate(processes) if p.returncode != 0), None)
    if first_failure is not None:
        raise AssertionError(f"{layout}: rank {first_failure} failed first "
                             f"({processes[first_failure].returncode}):\n"
                             + (folder / f"rank{first_failure}.log").read_text()[-6000:])
    return ledger


def events(ledger: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (ledger / f"engine-{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_colocated_gpu_path(layout, toy, tmp_path):
    ledger = launch_job(layout, toy, tmp_path)
    nodes, per_node, *_ = LAYOUTS[layout]
    expected = EXPECTED_ENGINES[layout]
    started = sorted(int(p.stem.split("-")[1]) for p in ledger.glob("engine-*.jsonl"))
    assert started == sorted(expected), "each engine on the first rank of its chunk of a replica"

    generating = set()
    for owner, gpus in expected.items():
        log = events(ledger, owner)
        assert log[0]["event"] == "start" and log[0]["gpus"] == gpus, (owner, log[0])
        kinds = [e["event"] for e in log]
        # Validation before training and after each step, plus each step's rollout.
        assert kinds.count("generate") == 1 + 2 * STEPS, kinds
        for event in log:
            if event["event"] == "generate":
                generating.update(event["gpus"])
            if event["event"] == "sleep":
                assert event["level"] == 2, event
            if event["event"] == "wake" and event["why"] == "wake_up":
                # Every trainer rank on these GPUs had released its activations before the
                # weights woke (peers may already be allocating the sync's gather buffers),
                # and its gather buffers before the KV cache woke.
                assert set(event["trainer_cached"]) == set(gpus)
                allowed = {0.0, sim.GATHER_CACHE} if event["tag"] == "weights" else {0.0}
                assert set(event["trainer_cached"].values()) <= allowed, event
        # Each wake is staged: weights, the sync into them, then the KV cache.
        wakes = [(e["event"], e.get("tag")) for e in log if e["event"] in ("wake", "rpc", "generate")
                 and e.get("why") != "start"]
        for index, item in enumerate(wakes):
            if item == ("wake", "kv_cache"):
                assert wakes[index - 1] == ("rpc", None) and ("wake", "weights") in wakes[:index]
        # After start-up (until the first sync) and after every generate round.
        assert kinds.count("sleep") == 2 + 2 * STEPS
    assert generating == {f"n{n}g{g}" for n, g in _node_gpus(layout)}, "every GPU generates"

    ranks = [json.loads((ledger / f"rank-{r}.json").read_text()) for r in range(nodes * per_node)]
    for info in ranks:
        assert info["last_step"] == STEPS
        assert info["rollout_collectives"], "ranks did wait for the rollout"
        assert all(c.endswith(":host") for c in info["rollout_collectives"]), info
        # Two releases per wake (before the weights and before the KV cache).
        assert info["releases"] >= 2 * (1 + 2 * STEPS), info
        # The state left and came back around the engine start and every wake.
        assert info["state_moves"] == 2 * (1 + 1 + 2 * STEPS), info
    # Every rank logs the same step metrics (whole-batch values, not rank 0's); TP ranks sum
    # their parts of a norm in their own order, hence the tolerance.
    for info in ranks[1:]:
        assert len(info["history"]) == len(ranks[0]["history"])
        for ours, first in zip(info["history"], ranks[0]["history"]):
            assert ours == pytest.approx(first, rel=1e-5, abs=1e-6), (info["gpu"], first["step"])


def _node_gpus(layout: str) -> list[tuple[int, str]]:
    nodes, per_node, visible, *_ = LAYOUTS[layout]
    out = []
    for node in range(nodes):
        ids = visible[node].split(",") if visible[node] else [str(i) for i in range(per_node)]
        out += [(node, g) for g in ids]
    return out


def test_a_trainer_that_keeps_its_state_leaves_the_engine_no_room(toy, tmp_path):
    """trainer.offload_during_rollout=false at the same engine share: the first engine start
    finds the trainer's 30 GiB beside its 60 and the job stops with the ledger's
    out-of-memory (on a GPU, vLLM refuses to start for want of free memory)."""
    with pytest.raises(AssertionError):
        launch_job("1node_dp2_tp4", toy, tmp_path, timeout=300,
                   extra=("trainer.offload_during_rollout=false",))
    logs = "".join(path.read_text() for path in tmp_path.glob("rank*.log"))
    assert "SimulatedOutOfMemory: engine of rank" in logs
    assert "waking kv_cache (start)" in logs and "trainer {'resident': 30.0" in logs
