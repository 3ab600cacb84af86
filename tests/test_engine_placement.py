"""Where a replica's engine may run, and the checks around the engine's memory, on CPU.

The multi-process placement of whole jobs is tests/test_gpu_path_simulation.py; these are
the pieces it relies on, each against a hand-written answer.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_prime import distributed
from megatron_prime.rollout.engine import RolloutEngine


@pytest.fixture
def cpu_rank(monkeypatch):
    """A runtime as init_distributed leaves it on CPU, for local rank 3 of its node."""
    launch = distributed.LaunchEnv(rank=11, world_size=16, local_rank=3, master_addr="x",
                                   master_port=1, launcher="torchrun", node_rank=1)
    monkeypatch.setattr(distributed, "_RUNTIME", SimpleNamespace(on_gpu=False, launch=launch))


def test_physical_gpu_goes_through_this_process_visible_devices(cpu_rank):
    assert distributed.physical_device_id({}) == "3"
    # SLURM gave the job GPUs 4-7 of the node: local index 3 is physical GPU 7.
    assert distributed.physical_device_id({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "7"
    with pytest.raises(ValueError, match=r"names only 1 GPUs \(srun must not bind one GPU per task"):
        distributed.physical_device_id({"CUDA_VISIBLE_DEVICES": "2"})


def test_launch_env_knows_the_node():
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "GROUP_RANK": "1"}
    assert distributed.read_launch_env(env).node_rank == 1
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_JOB_NODELIST": "gpu[01-02]"}
    assert distributed.read_launch_env(slurm).node_rank == 1


def test_reload_bucket_refuses_a_full_dev_shm(monkeypatch):
    """weight_sync=reload copies each bucket through /dev/shm: a block larger than the free
    space is refused by name before it is written (a full tmpfs kills with SIGBUS)."""
    import megatron_prime.host_memory as host_memory

    monkeypatch.setattr(host_memory.os, "statvfs",
                        lambda path: SimpleNamespace(f_bavail=16, f_frsize=2**20))
    engine = object.__new__(RolloutEngine)  # the block logic only; no vLLM needed
    engine._block = None
    with pytest.raises(RuntimeError, match=r"rollout.weight_sync=reload .* needs 64 MiB in "
                                           r"/dev/shm, but only 16 MiB are free"):
        engine._shared_block(64 * 2**20)
    assert engine._block is None


def test_compile_caches_go_to_a_node_local_folder_unless_set(monkeypatch):
    """vLLM, Triton, Inductor and CUDA JIT caches default to $HOME (often NFS, shared by every
    engine of every job): the engine points the unset ones at ${TMPDIR:-/tmp}/megatron-prime-
    <SLURM job id, else user> before vLLM is imported (the batch script's folders, too)."""
    import getpass

    from megatron_prime.rollout.engine import use_node_local_caches

    environ = {"SLURM_JOB_ID": "77", "TMPDIR": "/local", "TRITON_CACHE_DIR": "/mine"}
    chosen = use_node_local_caches(environ)
    assert chosen == {"VLLM_CACHE_ROOT": "/local/megatron-prime-77/vllm",
                      "TORCHINDUCTOR_CACHE_DIR": "/local/megatron-prime-77/torchinductor",
                      "CUDA_CACHE_PATH": "/local/megatron-prime-77/cuda-jit",
                      "TORCH_EXTENSIONS_DIR": "/local/megatron-prime-77/torch-extensions"}
    assert environ["TRITON_CACHE_DIR"] == "/mine" and environ["VLLM_CACHE_ROOT"] == chosen["VLLM_CACHE_ROOT"]
    local = use_node_local_caches({})  # a local run: per user, under /tmp
    assert local["VLLM_CACHE_ROOT"] == f"/tmp/megatron-prime-{getpass.getuser()}/vllm"
