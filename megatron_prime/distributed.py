"""Process groups, set up once: torch.distributed + Megatron's TP/PP/CP/DP groups.

Launchers: ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or ``srun``
under SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the job's node list). NCCL on GPU,
gloo on CPU; the device, dtype and backend are decided here and nowhere else.

Everything else asks this module (``tp_group()``, ``is_last_pp_stage()``...) instead of
calling ``megatron.core.parallel_state`` directly.
"""

from __future__ import annotations

import datetime
import os
import socket
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_prime.config import ParallelConfig
from megatron_prime.device_memory import CudaMemory, DeviceMemory, HostMemory

# Host-side waits (rollout rounds, engine start-up, sleep/wake hand-offs) go over gloo groups
# with this timeout instead of NCCL: a rank parked in an NCCL collective busy-waits on the GPU
# vLLM decodes on, and NCCL's watchdog (the 30-minute process-group timeout) would kill a
# long rollout round (a 72B policy, 4096 samples). Gloo has no watchdog thread; a gloo
# collective only fails after this timeout. slime does the same: its rollout results and
# barriers travel over gloo groups while SGLang generates.
HOST_GROUP_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    # Which node of the job this process runs on (torchrun's GROUP_RANK, SLURM_NODEID): the
    # rollout engine of a replica may only use GPUs of its own node.
    node_rank: int = 0


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expands a SLURM node list such as ``gpu[001-003,007],login`` into host names.

    Why not ``scontrol show hostnames``: compute nodes of some clusters do not ship the
    SLURM client binaries inside containers, and the syntax is small.
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                start, end = item.split("-", 1)
                width = len(start)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(start), int(end) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """torchrun's variables win; otherwise SLURM's; otherwise a single local process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
            node_rank=int(env.get("GROUP_RANK", "0")),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        elif nodelist:
            master_addr = expand_slurm_nodelist(nodelist)[0]
        else:
            raise ValueError("SLURM launch without MASTER_ADDR or SLURM_JOB_NODELIST: "
                             "cannot tell where rank 0 listens")
        # A port derived from the job id keeps two jobs sharing a node from colliding.
        default_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=master_addr,
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
            node_rank=int(env.get("SLURM_NODEID", "0")),
        )
    # One process talks only to itself: any free port does, and two runs on one machine
    # (a benchmark beside a test) must not both take 29500.
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def free_port() -> int:
    """A port nothing listens on now (a rendezvous for a launcher started next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate_layout(parallel: ParallelConfig, world_size: int) -> None:
    """World size must be a whole number of model replicas."""
    parallel.validate()
    if world_size % parallel.model_parallel_size != 0:
        raise ValueError(
            f"world size {world_size} is not a multiple of tensor_parallel_size x "
            f"pipeline_parallel_size x context_parallel_size = {parallel.tensor_parallel_size} x "
            f"{parallel.pipeline_parallel_size} x {parallel.context_parallel_size} = "
            f"{parallel.model_parallel_size}; expected a world size that is a multiple of "
            f"{parallel.model_parallel_size}"
        )


@dataclass(frozen=True)
class Runtime:
    """The decisions made once at start-up."""

    device: torch.device
    backend: str
    launch: LaunchEnv
    parallel: ParallelConfig
    # The trainer's view of its device's memory: the caching allocator it releases before a
    # colocated engine wakes (CudaMemory on GPU; HostMemory on CPU, where nothing is cached).
    memory: DeviceMemory = field(default_factory=HostMemory)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


_RUNTIME: Runtime | None = None

# NCCL_CUMEM_ENABLE must be the same on every rank: NCCL's first collective hangs between
# ranks whose communicators were built with and without cuMem buffers. Some vLLM releases set
# "0" when imported, so without this only the ranks hosting an engine would have it. "0" is
# the value vLLM sets (cuMem buffers clash with its sleep-mode allocator), so an import of
# vLLM after this changes nothing. The batch script exports the same value
# (launch/sbatch.py). Anchor: verl's Ray runtime_env sets NCCL_CUMEM_ENABLE=0 for every
# worker; slime's scripts pass it to every Ray worker too.
NCCL_CUMEM_ENABLE_VALUE = "0"


def agree_nccl_cumem(environ: MutableMapping[str, str] | None = None) -> str:
    """Sets NCCL_CUMEM_ENABLE unless the user did (their value then holds on every rank, as
    they exported it for all); returns the value in force."""
    env = os.environ if environ is None else environ
    return env.setdefault("NCCL_CUMEM_ENABLE", NCCL_CUMEM_ENABLE_VALUE)


def init_distributed(
    parallel: ParallelConfig,
    seed: int = 1234,
    use_gpu: bool | None = None,
    timeout_minutes: int = 30,
    environ: Mapping[str, str] | None = None,
    memory: DeviceMemory | None = None,
) -> Runtime:
    """Starts torch.distributed and Megatron's groups. Call once per process.

    ``use_gpu=None`` means: GPU when CUDA is available. On CPU the Megatron patches in
    ``megatron_cpu_patches`` are applied here, before any Megatron module is built.
    ``memory`` replaces the device-memory view chosen from the device (the CPU simulation of
    the GPU path passes a ledger; tests/gpu_simulation.py).
    """
    global _RUNTIME
    if _RUNTIME is not None:
        raise RuntimeError("init_distributed() was already called in this process")
    launch = read_launch_env(environ)
    validate_layout(parallel, launch.world_size)
    # Before any process group (and any vLLM import, which happens after this call).
    agree_nccl_cumem()
    on_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    if on_gpu and not torch.cuda.is_available():
        raise ValueError("use_gpu=True but CUDA is not available on this machine")

    if on_gpu:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        from megatron_prime.megatron_cpu_patches import apply_cpu_patches

        apply_cpu_patches()
        device, backend = torch.device("cpu"), "gloo"

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    _create_host_groups()
    # Same seed on every rank; Megatron offsets it per TP rank for its model-parallel RNG.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if memory is None:
        memory = CudaMemory() if on_gpu else HostMemory()
    _RUNTIME = Runtime(device=device, backend=backend, launch=launch, parallel=parallel,
                       memory=memory)
    return _RUNTIME


def destroy_distributed() -> None:
    global _RUNTIME
    _HOST_GROUPS.clear()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _RUNTIME = None


def runtime() -> Runtime:
    if _RUNTIME is None:
        raise RuntimeError("init_distributed() has not been called in this process")
    return _RUNTIME


# Named accessors: the rest of the code never touches parallel_state directly.
def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def pp_group() -> dist.ProcessGroup:
    return parallel_state.get_pipeline_model_parallel_group()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_world_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def is_first_pp_stage(vp_stage: int | None = None) -> bool:
    return parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def is_last_pp_stage(vp_stage: int | None = None) -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def last_pp_stage_global_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_last_rank()


def dp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_world_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def fp8_amax_reduction_group(tp_only: bool) -> dist.ProcessGroup:
    """The group Megatron reduces FP8 amaxes over (megatron.core.fp8_utils.get_fp8_context):
    the TP x DP (x CP) ranks holding the same layers, or TP only."""
    return parallel_state.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=tp_only)


def device() -> torch.device:
    return runtime().device


def gather_tp_shards(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All TP ranks' shards of a tensor, in TP-rank order (an all-gather in the TP group)."""
    if tp_world_size() == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(tp_world_size())]
    dist.all_gather(shards, tensor.contiguous(), group=tp_group())
    return shards


def is_initialized() -> bool:
    """Whether ``init_distributed`` ran (the default job runs SFT, then PRIME, in one process)."""
    return _RUNTIME is not None


def model_parallel_group() -> dist.ProcessGroup:
    """The ranks of one model replica (all its TP and PP ranks)."""
    return parallel_state.get_model_parallel_group()


def model_parallel_src_rank() -> int:
    """Global rank of the replica's TP rank 0 on pipeline stage 0: Megatron orders ranks with
    TP fastest and PP slowest, so it is the smallest rank of the model-parallel group."""
    return min(dist.get_process_group_ranks(model_parallel_group()))


def broadcast_in_replica(obj: object) -> object:
    """The replica's first rank's ``obj`` on every rank of the replica (pickled; host data,
    over the replica's gloo group: the other ranks wait here while the engine generates)."""
    if runtime().parallel.model_parallel_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=model_parallel_src_rank(), group=replica_host_group())
    return holder[0]


def all_gather_in_replica(obj: object) -> list[object]:
    """Every rank of the replica's ``obj``, in rank order (pickled; host data, over the
    replica's gloo group: ranks wait here while the engines generate)."""
    if runtime().parallel.model_parallel_size == 1:
        return [obj]
    group = replica_host_group()
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


# ---- host (gloo) groups: waits and small host data around the rollout engines ----

_HOST_GROUPS: dict[str, dist.ProcessGroup] = {}


def _create_host_groups() -> None:
    """A gloo group over the world, one per model replica and one per data-parallel group.

    Every rank must create every group, in the same order (torch.distributed's rule), so the
    rank lists are gathered first and created in sorted order.
    """
    world = dist.new_group(backend="gloo", timeout=HOST_GROUP_TIMEOUT)
    mine = (tuple(dist.get_process_group_ranks(model_parallel_group())),
            tuple(dist.get_process_group_ranks(dp_group())))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=world)
    _HOST_GROUPS["world"] = world
    for kind, index in (("replica", 0), ("dp", 1)):
        for ranks in sorted({entry[index] for entry in everyone}):
            group = dist.new_group(list(ranks), backend="gloo", timeout=HOST_GROUP_TIMEOUT)
            if ranks == mine[index]:
                _HOST_GROUPS[kind] = group


def host_group() -> dist.ProcessGroup:
    """All ranks, over gloo (host tensors only)."""
    return _HOST_GROUPS["world"]


def replica_host_group() -> dist.ProcessGroup:
    """The ranks of this model replica (its TP and PP ranks), over gloo."""
    return _HOST_GROUPS["replica"]


def dp_host_group() -> dist.ProcessGroup:
    """This rank's data-parallel group, over gloo."""
    return _HOST_GROUPS["dp"]


def is_host_group(group: dist.ProcessGroup | None) -> bool:
    return group is not None and any(group is g for g in _HOST_GROUPS.values())


def host_barrier() -> None:
    """Every rank waits on the host (no GPU busy-wait, no NCCL watchdog)."""
    dist.barrier(group=host_group())


# ---- placement of the colocated rollout engines ----

def physical_device_id(environ: Mapping[str, str] | None = None) -> str:
    """The id of this rank's GPU as the node's driver numbers it (what a child process's
    CUDA_VISIBLE_DEVICES must name), through this process's own CUDA_VISIBLE_DEVICES.

    On CPU the simulated GPU is the rank's local rank (tests/gpu_simulation.py)."""
    env = os.environ if environ is None else environ
    index = torch.cuda.current_device() if runtime().on_gpu else runtime().launch.local_rank
    visible = [item.strip() for item in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    if not visible:
        return str(index)
    if index >= len(visible):
        raise ValueError(f"local rank {runtime().launch.local_rank} uses GPU index {index}, but "
                         f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} names only "
                         f"{len(visible)} GPUs (srun must not bind one GPU per task: --gpu-bind=none)")
    return visible[index]


@dataclass(frozen=True)
class EngineSlot:
    """This rank's part in its replica's rollout engines (``engine_slot``)."""

    index: int | None  # which of the replica's engines this rank hosts; None: none
    count: int  # engines per replica
    devices: list[str]  # the hosted engine's physical GPUs (its vLLM TP of them)


def engine_slot(engines_per_replica: int | None, engine_tp: int,
                environ: Mapping[str, str] | None = None) -> EngineSlot:
    """Where this replica's rollout engines run (collective over the world, host data).

    The replica's ranks, in rank order, are cut into ``engines_per_replica`` equal chunks
    (None: one engine per ``engine_tp`` GPUs of the replica on a GPU, so every GPU hosts a
    vLLM worker; one engine per replica on CPU, where an engine costs cores, not a GPU). A
    chunk's first rank hosts its engine on the chunk's first ``engine_tp`` GPUs, which must
    be on that rank's node: an engine started with the node's whole CUDA_VISIBLE_DEVICES
    would put its workers on GPUs 0..TP-1 like every other engine of the node. verl computes
    the same per rollout server (its workers' CUDA_VISIBLE_DEVICES from the placement
    group's bundles); NeMo-RL places one vLLM worker group per TP-sized bundle.
    """
    mine = (runtime().launch.node_rank, physical_device_id(environ))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=host_group())
    replica = sorted(dist.get_process_group_ranks(model_parallel_group()))
    size, position = len(replica), replica.index(dist.get_rank())
    on_gpu = runtime().on_gpu
    count = engines_per_replica or (size // engine_tp if on_gpu else 1)
    if count < 1 or size % count:
        raise ValueError(f"rollout.engine.engines_per_replica={count}: a replica has {size} "
                         f"ranks (parallel TP x PP); expected a divisor of {size}"
                         + (f" (with rollout.engine.tensor_parallel_size={engine_tp} there is "
                            "room for none)" if count < 1 else ""))
    chunk = size // count
    if on_gpu and engine_tp > chunk:
        raise ValueError(f"rollout.engine.tensor_parallel_size={engine_tp}: each of the "
                         f"replica's {count} engine(s) has {chunk} GPUs; expected at most that")
    if position % chunk:
        return EngineSlot(None, count, [])
    # The engine's GPUs: the chunk's first engine_tp ranks' (on CPU, where vLLM's TP workers
    # are processes, the devices only matter to the placement simulation).
    members = replica[position:position + min(engine_tp, chunk)]
    nodes = {everyone[rank][0] for rank in members}
    if len(nodes) > 1:
        raise ValueError(f"rollout engine {position // chunk} of this replica would span nodes "
                         f"{sorted(nodes)} (ranks {members}); a vLLM engine stays in one node: "
                         "lower rollout.engine.tensor_parallel_size or keep TP within a node")
    return EngineSlot(position // chunk, count, [everyone[rank][1] for rank in members])


# ---- whole-batch reductions of the PRIME step (device tensors, over the DP group) ----

def dp_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the data-parallel ranks (a new tensor; the input is kept).

    The reduce callable the PRIME step hands to algo/ (whitening statistics, metric sums),
    so that what is computed over a rank's rows becomes the whole step batch's.
    """
    return _dp_all_reduce(tensor, dist.ReduceOp.SUM)


def dp_max(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s element-wise maximum over the data-parallel ranks (a new tensor)."""
    return _dp_all_reduce(tensor, dist.ReduceOp.MAX)


def _dp_all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    reduced = tensor.clone()
    if dp_world_size() > 1:
        dist.all_reduce(reduced, op=op, group=dp_group())
    return reduced
