"""SLURM batch scripts for a PRIME run: the cluster options (``SlurmConfig``) and the script.

The script asks for ``nodes x gpus_per_node`` tasks and starts one trainer process per GPU
with ``srun`` (a CPU job, ``gpus_per_node=0``, asks for ``tasks_per_node`` instead); ``megatron_prime.distributed`` reads SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID in each task. The run always resumes (``checkpoint.resume=auto``), so a job
that SLURM restarts (node failure, pre-emption, or our own requeue) goes on from the newest
complete checkpoint.

Time limits. ``#SBATCH --signal=USR1@<signal_seconds>``, *without* ``B:``: SLURM then sends
USR1 to the processes of every job step (the trainers that ``srun`` started, and their
children), not to the batch shell. ``B:USR1`` would reach only the batch shell: it would have
to run ``srun`` in the background, trap USR1 and forward it (bash defers a trap while a
foreground command runs), and a forwarded signal (``scancel --signal``, or srun's own
forwarding) again reaches every process of the step. The trainer (``train.StopRequest``)
finishes its current step, saves a checkpoint and exits 0; every process it starts (vLLM's
engine core and workers, verifier workers, sandboxes) starts with USR1 and SIGTERM blocked
(``job_signals.py``), so they live until the trainer has saved and stops them. The margin
(``signal_seconds: auto``) is derived from the step and save times (``launch/margin.py``).

Requeue. After ``srun`` returns 0, the script compares the step of the newest complete
checkpoint (``step_*/train_state.json``, what ``checkpoint.resume=auto`` picks) with
``trainer.steps``: done, or stopped early with progress (``scontrol requeue``), or stopped
without a new checkpoint (exit 1: a restart would loop without progress). A failed trainer
(non-zero status) is never requeued. The checkpoint, not metrics.jsonl, is the measure: a
resumed run truncates metrics.jsonl to its start step, and only a checkpoint is progress a
restart keeps.

The rendered text is deterministic (no dates, no absolute paths of this machine), so the
example scripts in examples/slurm/ double as golden files for the tests.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_prime.config import config_from_dict, require, require_positive_int
from megatron_prime.launch.margin import SignalMargin, signal_margin

if TYPE_CHECKING:
    from megatron_prime.train import PrimeConfig

# SLURM may deliver the --signal up to this many seconds before the requested time.
SIGNAL_EARLY_SECONDS = 60
# The trainer's checkpoint layout (checkpoint/train_state.py): a complete checkpoint is a
# folder step_XXXXXXXX holding this marker, written last.
CHECKPOINT_MARKER = "train_state.json"

# Sensible defaults for InfiniBand clusters. NCCL_SOCKET_IFNAME (the interface NCCL's
# bootstrap uses, e.g. "ib0" or "^lo,docker") is site-specific: set it in the cluster YAML.
DEFAULT_NCCL_ENV: dict[str, str] = {
    # Use the InfiniBand/RoCE verbs transport (NCCL falls back to TCP sockets otherwise).
    "NCCL_IB_DISABLE": "0",
    # A failed or hung collective tears the process down instead of blocking forever, so
    # srun --kill-on-bad-exit ends the job and no GPU hours are lost to a hang.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}

_TIME = re.compile(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME_LIST = re.compile(r"[A-Za-z0-9._-]+(?:,[A-Za-z0-9._-]+)*")
_JOB_ID = re.compile(r"\d+(?:_\d+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Linux interface names: up to 15 characters, no spaces or '/' (ip-link(8)); NCCL and gloo
# take a comma list, NCCL a leading '^' (all but these) or '=' (exact names, not prefixes).
_IFNAME = r"[A-Za-z0-9_.:@-]{1,15}"
_IFNAME_LIST = re.compile(rf"{_IFNAME}(?:,{_IFNAME})*")
_NCCL_IFNAME_LIST = re.compile(rf"[\^=]?{_IFNAME}(?:,{_IFNAME})*")
# SlurmConfig key -> the variable it is exported as.
SOCKET_IFNAME_KEYS = {"nccl_socket_ifname": "NCCL_SOCKET_IFNAME",
                      "gloo_socket_ifname": "GLOO_SOCKET_IFNAME"}


def parse_time_limit(key: str, value: Any) -> int:
    """``"HH:MM:SS"`` or ``"D-HH:MM:SS"`` -> seconds; errors name ``key``."""
    allowed = 'a string "HH:MM:SS" or "D-HH:MM:SS" (e.g. "04:00:00", "1-12:00:00")'
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 12:00:00 as the base-60 integer 43200.
        allowed += "; quote it in YAML: unquoted, 12:00:00 is read as a number"
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    require(match is not None, key, value, allowed)
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    require(minutes < 60 and seconds < 60 and (match.group(1) is None or hours < 24), key,
            value, allowed + " with minutes and seconds < 60 (and hours < 24 after a day count)")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    require(total > 0, key, value, "a time limit longer than 0")
    return total


@dataclass
class SlurmConfig:
    """Cluster options of one SLURM job (a YAML file, e.g. examples/slurm/h100_2nodes.yaml,
    plus command-line flags). Keys are named ``slurm.<key>`` in errors."""

    nodes: int = 1
    # 0: a CPU job (trainer.device=cpu), for debugging and the local test cluster.
    gpus_per_node: int = 8
    # What a node has; checks gpus_per_node before sinfo is asked (at submit time).
    max_gpus_per_node: int = 8
    # Trainer processes per node: None means one per GPU, the only layout a GPU job has.
    # A CPU job (gpus_per_node=0) must name it.
    tasks_per_node: int | None = None
    # CPU cores per task (= per GPU): data loading, tokenisation, the vLLM engine process
    # and the math verifier run on them.
    cpus_per_task: int = 8
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    # Time limit of one job: "HH:MM:SS" or "D-HH:MM:SS". A run longer than this goes on in
    # requeued jobs.
    time: str = "04:00:00"
    job_name: str = "megatron-prime"
    # Job logs (<output_dir>/<job_name>-<job id>.out) and the submitted script go here.
    output_dir: str = "slurm-logs"
    # Pyxis/enroot image (srun --container-image); the submit folder is mounted and is the
    # working folder inside the container.
    container_image: str | None = None
    # More container mounts, "SRC:DST" or "SRC:DST:FLAGS" (data, checkpoints, caches).
    container_mounts: list[str] = field(default_factory=list)
    # A virtual environment with megatron_prime installed: activated in the batch script,
    # or (with a container) its bin/python runs the trainer.
    venv: str | None = None
    # Verbatim "#SBATCH <line>" lines, e.g. "--exclusive", "--mem=0", "--constraint=h100".
    extra_sbatch_lines: list[str] = field(default_factory=list)
    # USR1 this many seconds before the time limit: one step plus a checkpoint save must fit.
    # "auto": derived from the step and save times (launch/margin.py); a number shorter than
    # one step + one save (when either is known) is refused.
    signal_seconds: int | str = "auto"
    # "auto" multiplies (step + save) by this: a step can run longer than any measured one.
    signal_safety_factor: float = 1.5
    # Requeue the job when the signal stopped the run before trainer.steps.
    requeue: bool = True
    # Start after this job ends, whatever its state (--dependency=afterany:<id>).
    dependency: int | str | None = None
    # Exported before srun; DEFAULT_NCCL_ENV when not given.
    nccl_env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_NCCL_ENV))
    # Rough seconds from job start to the first step (model loading, vLLM start-up); the
    # time limit must leave room for it, the signal window and some steps.
    startup_seconds: int = 600
    # Measured seconds per training step, when known: enables the checks that one step fits
    # in the signal window and one checkpoint interval in the time limit.
    seconds_per_step_estimate: float | None = None
    # Seconds one checkpoint save takes, when known and not yet measured (time/checkpoint in
    # the run's metrics.jsonl wins); None: estimated from the model size at the bandwidth below.
    checkpoint_seconds_estimate: float | None = None
    # GB/s the whole job writes a checkpoint at (shared file system, all nodes together): 1
    # is an NFS-class figure; Lustre/GPFS give several. Only used for that estimate.
    checkpoint_write_gbps: float = 1.0
    # The interfaces NCCL's and gloo's bootstrap sockets use (NCCL_SOCKET_IFNAME,
    # GLOO_SOCKET_IFNAME), e.g. "ib0" or "eth0,eth1"; NCCL also takes "^lo,docker" (exclude)
    # and "=eth0" (exact). None: each library picks one, sometimes a docker or VPN interface
    # the other nodes cannot reach.
    nccl_socket_ifname: str | None = None
    gloo_socket_ifname: str | None = None
    # Node-local folder for compile caches (vLLM, Triton, TorchInductor, CUDA's JIT cache),
    # one sub-folder per job: in $HOME (often NFS) every engine of every job shares and
    # rewrites them. A shell expression, expanded by the batch script.
    node_local_dir: str = "${TMPDIR:-/tmp}"

    @property
    def ntasks_per_node(self) -> int:
        return self.gpus_per_node if self.tasks_per_node is None else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def time_seconds(self) -> int:
        return parse_time_limit("slurm.time", self.time)

    def validate(self, prime: PrimeConfig | None = None) -> None:
        """Cluster options alone; with ``prime``, also whether the run fits the job."""
        require_positive_int("slurm.nodes", self.nodes)
        require_positive_int("slurm.max_gpus_per_node", self.max_gpus_per_node)
        require(_is_int(self.gpus_per_node) and 0 <= self.gpus_per_node <= self.max_gpus_per_node,
                "slurm.gpus_per_node", self.gpus_per_node,
                f"an integer in [1, {self.max_gpus_per_node}] (0 for a CPU job): more GPUs than "
                f"a node has (slurm.max_gpus_per_node={self.max_gpus_per_node})")
        if self.gpus_per_node == 0:
            require(_is_int(self.tasks_per_node) and self.tasks_per_node >= 1,
                    "slurm.tasks_per_node", self.tasks_per_node,
                    "a positive integer for a CPU job (slurm.gpus_per_node=0)")
        else:
            require(self.tasks_per_node in (None, self.gpus_per_node), "slurm.tasks_per_node",
                    self.tasks_per_node, f"None or {self.gpus_per_node}: a GPU job runs one "
                    f"trainer process per GPU (slurm.gpus_per_node={self.gpus_per_node})")
        require_positive_int("slurm.cpus_per_task", self.cpus_per_task)
        time_seconds = self.time_seconds
        require(isinstance(self.job_name, str) and _NAME.fullmatch(self.job_name) is not None,
                "slurm.job_name", self.job_name, "letters, digits, '.', '_' and '-'")
        require(isinstance(self.output_dir, str) and self.output_dir != ""
                and not re.search(r"[\s%'\"\\]", self.output_dir), "slurm.output_dir",
                self.output_dir, "a folder path without spaces, quotes or '%'")
        require(self.partition is None or _NAME_LIST.fullmatch(self.partition) is not None,
                "slurm.partition", self.partition, "None or a partition name (or a comma list)")
        for key in ("account", "qos"):
            value = getattr(self, key)
            require(value is None or _NAME.fullmatch(value) is not None, f"slurm.{key}", value,
                    "None or a name of letters, digits, '.', '_' and '-'")
        require(self.container_image is None or _is_word(self.container_image),
                "slurm.container_image", self.container_image, "None or an image name without spaces")
        for i, mount in enumerate(self.container_mounts):
            require(_is_word(mount) and "," not in mount and ":" in mount,
                    f"slurm.container_mounts[{i}]", mount, '"SRC:DST" or "SRC:DST:FLAGS" without '
                    "spaces or commas")
        require(not self.container_mounts or self.container_image is not None,
                "slurm.container_mounts", self.container_mounts, "[] unless slurm.container_image is set")
        require(self.venv is None or (isinstance(self.venv, str) and self.venv.strip() != ""
                                      and "\n" not in self.venv),
                "slurm.venv", self.venv, "None or the path of a virtual environment")
        for i, line in enumerate(self.extra_sbatch_lines):
            require(isinstance(line, str) and line.startswith("-") and "\n" not in line,
                    f"slurm.extra_sbatch_lines[{i}]", line,
                    'one sbatch option per entry, such as "--exclusive" (without "#SBATCH")')
        require(self.signal_seconds == "auto" or (_is_int(self.signal_seconds)
                                                  and 1 <= self.signal_seconds <= 65535),
                "slurm.signal_seconds", self.signal_seconds, "'auto' or an integer in [1, 65535]")
        require(_is_number(self.signal_safety_factor) and self.signal_safety_factor >= 1,
                "slurm.signal_safety_factor", self.signal_safety_factor, "a number >= 1")
        for key in ("checkpoint_seconds_estimate", "checkpoint_write_gbps"):
            value = getattr(self, key)
            require((value is None and key != "checkpoint_write_gbps")
                    or (_is_number(value) and value > 0), f"slurm.{key}", value,
                    "a number > 0" + (" or None" if key != "checkpoint_write_gbps" else ""))
        for key, variable in SOCKET_IFNAME_KEYS.items():
            value = getattr(self, key)
            exclude = "'^' (exclude) or '=' (exact) and " if key == "nccl_socket_ifname" else ""
            pattern = _NCCL_IFNAME_LIST if key == "nccl_socket_ifname" else _IFNAME_LIST
            require(value is None
                    or (isinstance(value, str) and pattern.fullmatch(value) is not None),
                    f"slurm.{key}", value,
                    f"None or interface names separated by commas, optionally after {exclude}"
                    "without spaces (e.g. 'ib0' or 'eth0,eth1'; see ip -brief link)")
            require(value is None or variable not in self.nccl_env, f"slurm.nccl_env.{variable}",
                    self.nccl_env.get(variable), f"unset when slurm.{key} is set (one place)")
        require(isinstance(self.node_local_dir, str) and self.node_local_dir != ""
                and not re.search(r"[\s\"'`\\]|\$\(", self.node_local_dir), "slurm.node_local_dir",
                self.node_local_dir, "a folder path (shell variables allowed) without spaces, "
                "quotes, backslashes or command substitution")
        require(self.dependency is None or _JOB_ID.fullmatch(str(self.dependency)) is not None,
                "slurm.dependency", self.dependency, "None or a job id such as 12345 or 12345_7")
        for name, value in self.nccl_env.items():
            require(isinstance(name, str) and _ENV_NAME.fullmatch(name) is not None,
                    "slurm.nccl_env", name, "environment variable names (letters, digits, '_')")
            require(isinstance(value, (str, int, float)) and not isinstance(value, bool)
                    and "\n" not in str(value), f"slurm.nccl_env.{name}", value,
                    "a string or a number (quote true/false in YAML)")
        require(_is_int(self.startup_seconds) and self.startup_seconds >= 0,
                "slurm.startup_seconds", self.startup_seconds, "an integer >= 0")
        estimate = self.seconds_per_step_estimate
        require(estimate is None or estimate > 0, "slurm.seconds_per_step_estimate", estimate,
                "None or a number of seconds > 0")

        if prime is None:
            # Without the run config an "auto" margin is not known yet: validate(prime) checks it.
            if self.signal_seconds != "auto":
                self._check_time_limit(self.signal_seconds, time_seconds)
            return
        margin = self.signal_margin(prime)
        needed = self._check_time_limit(margin.seconds, time_seconds)
        self._validate_run(prime, time_seconds - needed, margin.step_seconds)

    def signal_margin(self, prime: PrimeConfig) -> SignalMargin:
        """The USR1 margin (launch/margin.py): derived for "auto", checked when fixed."""
        return signal_margin(self, prime)

    def _check_time_limit(self, signal_seconds: int, time_seconds: int) -> int:
        """The signal comes signal_seconds (up to SIGNAL_EARLY_SECONDS more) before the limit,
        and nothing is saved before the first step ends. Returns the seconds not for steps."""
        needed = signal_seconds + SIGNAL_EARLY_SECONDS + self.startup_seconds
        require(time_seconds > needed, "slurm.time", self.time,
                f"longer than signal_seconds + {SIGNAL_EARLY_SECONDS} s (SLURM may signal that "
                f"much early) + startup_seconds = {signal_seconds} + {SIGNAL_EARLY_SECONDS} + "
                f"{self.startup_seconds} = {needed} s; the limit is {time_seconds} s, so the job "
                "would be signalled before it could save a checkpoint")
        return needed

    def _validate_run(self, prime: PrimeConfig, seconds_for_steps: int,
                      step_seconds: float | None) -> None:
        if self.gpus_per_node == 0:
            require(prime.trainer.device == "cpu", "trainer.device", prime.trainer.device,
                    "'cpu' for a CPU job (slurm.gpus_per_node=0)")
        else:
            require(prime.trainer.device != "cpu", "trainer.device", prime.trainer.device,
                    f"'auto' or 'cuda': the job holds slurm.gpus_per_node={self.gpus_per_node} "
                    "GPUs per node (set slurm.gpus_per_node=0 and slurm.tasks_per_node for a "
                    "CPU job)")
        parallel = prime.parallel
        model_parallel = parallel.model_parallel_size
        per_node_key = "slurm.gpus_per_node" if self.gpus_per_node else "slurm.tasks_per_node"
        require(self.world_size % model_parallel == 0, f"slurm.nodes x {per_node_key}",
                self.world_size,
                f"a multiple of parallel.tensor_parallel_size x parallel.pipeline_parallel_size x "
                f"parallel.context_parallel_size = {parallel.tensor_parallel_size} x "
                f"{parallel.pipeline_parallel_size} x {parallel.context_parallel_size} = "
                f"{model_parallel} (the job has {self.nodes} x {self.ntasks_per_node} = "
                f"{self.world_size} processes{', one per GPU' if self.gpus_per_node else ''})")
        dp_size = self.world_size // model_parallel
        require(prime.rollout.batch.prompts_per_step % dp_size == 0,
                "rollout.batch.prompts_per_step", prime.rollout.batch.prompts_per_step,
                f"a multiple of the data-parallel size {dp_size} ({self.world_size} processes / "
                f"{model_parallel} per model replica)")
        save_every = prime.checkpoint.save_every
        # save_every == 0: the signal checkpoint is the only save before the end.
        if step_seconds is not None and save_every > 0:
            interval = save_every * step_seconds
            require(seconds_for_steps >= interval, "slurm.time", self.time,
                    f"a time limit longer than one checkpoint interval: checkpoint.save_every="
                    f"{save_every} steps x {step_seconds:g} s per step = "
                    f"{interval:g} s, but the job has {seconds_for_steps} s for steps (time - "
                    "signal_seconds - 60 - startup_seconds); raise slurm.time or lower "
                    "checkpoint.save_every (0 = save only at the signal and the end)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_word(value: Any) -> bool:
    return isinstance(value, str) and value != "" and not re.search(r"\s", value)


def load_slurm_config(path: str | Path | None = None,
                      overrides: Mapping[str, Any] | None = None) -> SlurmConfig:
    """Cluster YAML (optional) + typed overrides (command-line flags) -> validated config.

    The overrides are values, not ``key=value`` strings: a time such as 12:00:00 must not
    go through YAML, which would read it as a number.
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"SLURM options file not found: {file}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{file}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a mapping of SLURM options at the top level")
    data.update({key: value for key, value in (overrides or {}).items()})
    if isinstance(data.get("time"), int) and not isinstance(data["time"], bool):
        parse_time_limit("slurm.time", data["time"])  # raises with the quoting hint
    slurm = config_from_dict(SlurmConfig, data, prefix="slurm.")
    slurm.validate()
    return slurm


def load_run_config(config_path: str, overrides: Sequence[str]) -> PrimeConfig:
    """The PrimeConfig the job runs: the YAML, the overrides and ``checkpoint.resume=auto``
    (a requeued job must resume); an explicit other ``checkpoint.resume`` is an error."""
    from megatron_prime.config import load_config
    from megatron_prime.train import PrimeConfig

    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "checkpoint.resume" and value.strip() != "auto":
            raise ValueError(f"checkpoint.resume={value!r} is invalid for a SLURM job: expected "
                             "'auto' (requeued jobs resume from the newest checkpoint under "
                             "<logging.run_dir>/checkpoints); start from another checkpoint "
                             "with a local run, or copy it there")
    return load_config(PrimeConfig, config_path, [*overrides, "checkpoint.resume=auto"])


def checkpoint_root(prime: PrimeConfig) -> str:
    """Where the trainer keeps train-state checkpoints (as train.py resolves it)."""
    root = Path(prime.checkpoint.dir)
    return str(root if root.is_absolute() else Path(prime.logging.run_dir) / root)


def log_path(slurm: SlurmConfig, job_id: str = "%j") -> str:
    return f"{slurm.output_dir.rstrip('/')}/{slurm.job_name}-{job_id}.out"


def render_sbatch(slurm: SlurmConfig, config_path: str, overrides: Sequence[str],
                  prime: PrimeConfig | None = None) -> str:
    """The batch script (text) that runs ``python -m megatron_prime.train`` on the job.

    ``prime`` is the run config the overrides produce (``load_run_config``); loaded here
    when not given. Both configs are validated first.
    """
    if prime is None:
        prime = load_run_config(config_path, overrides)
    slurm.validate(prime)
    margin = slurm.signal_margin(prime)
    parallel = prime.parallel
    dp_size = slurm.world_size // parallel.model_parallel_size
    trainer_args = ["-m", "megatron_prime.train", config_path, *overrides, "checkpoint.resume=auto"]
    lines = [
        "#!/bin/bash",
        "# PRIME on SLURM, rendered by megatron-prime-submit (megatron_prime/launch/sbatch.py).",
        "# Change the cluster YAML and render again rather than editing this file.",
        f"# {slurm.nodes} node(s) x {_per_node(slurm)} = {slurm.world_size} trainer "
        f"processes: TP={parallel.tensor_parallel_size} x PP={parallel.pipeline_parallel_size} x "
        f"CP={parallel.context_parallel_size} per model replica, DP={dp_size}.",
        *_comment(margin.describe() + "."),
        *(f"#SBATCH {option}" for option in _sbatch_options(slurm, margin.seconds)),
        "",
        "set -euo pipefail",
        "",
        "# Relative paths of the run config (model, data, logging.run_dir) are relative to the",
        "# folder sbatch was called from.",
        'cd "$SLURM_SUBMIT_DIR"',
        *_software_lines(slurm),
        "",
        "# Rendezvous: rank 0 runs on the first node; megatron_prime.distributed reads each",
        "# task's SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID. MASTER_PORT is the port it",
        "# would derive from the job id anyway; both are exported to show them in the log.",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
        "export MASTER_ADDR",
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export PYTHONUNBUFFERED=1",
        "",
        "# NCCL (InfiniBand). Set nccl_socket_ifname / gloo_socket_ifname in the cluster YAML",
        "# if a bootstrap picks the wrong interface.",
        *(f"export {name}={shlex.quote(str(value))}" for name, value in slurm.nccl_env.items()),
        *_network_lines(slurm),
        "",
        *_cache_lines(slurm),
        "",
        f"RUN_STEPS={prime.trainer.steps}",
        f"CHECKPOINT_ROOT={shlex.quote(checkpoint_root(prime))}",
        "",
        "# Step of the newest complete checkpoint (what checkpoint.resume=auto resumes from).",
        "newest_checkpoint_step() {",
        "  local newest=0 marker step",
        f'  for marker in "$CHECKPOINT_ROOT"/step_*/{CHECKPOINT_MARKER}; do',
        '    step="${marker%/*}"',
        '    step="${step##*/step_}"',
        '    if [[ -f "$marker" && "$step" =~ ^[0-9]+$ ]] && (( 10#$step > newest )); then',
        "      newest=$((10#$step))",
        "    fi",
        "  done",
        '  echo "$newest"',
        "}",
        "",
        'start_step="$(newest_checkpoint_step)"',
        'echo "megatron_prime: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on '
        '$SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, from step $start_step of $RUN_STEPS"',
        "",
        *_doctor_lines(slurm, config_path, overrides),
        "",
        "# One trainer process per GPU. USR1 (--signal, without B:) is delivered to these tasks,",
        "# not to this shell: the trainer saves a checkpoint and exits 0.",
        "status=0",
        *_srun_lines(slurm, trainer_args),
        "",
        'if (( status != 0 )); then',
        '  echo "megatron_prime: the trainer failed with exit status $status; not requeued" >&2',
        '  exit "$status"',
        "fi",
        'end_step="$(newest_checkpoint_step)"',
        "if (( end_step >= RUN_STEPS )); then",
        '  echo "megatron_prime: all $RUN_STEPS steps done"',
        "  exit 0",
        "fi",
        "if (( end_step <= start_step )); then",
        '  echo "megatron_prime: stopped without a new checkpoint (newest: step $end_step); not '
        'requeued, as a restart would make no progress" >&2',
        "  exit 1",
        "fi",
        *_requeue_lines(slurm),
    ]
    return "\n".join(lines) + "\n"


def _comment(text: str, width: int = 92) -> list[str]:
    import textwrap

    return [f"# {line}" for line in textwrap.wrap(text, width - 2, break_on_hyphens=False)]


def _network_lines(slurm: SlurmConfig) -> list[str]:
    """NCCL_CUMEM_ENABLE and the socket interfaces, the same on every rank.

    NCCL_CUMEM_ENABLE: some vLLM releases set it on import, i.e. only on the ranks that host
    an engine; ranks whose values differ hang in NCCL's first collective. The script exports
    the value ``megatron_prime.distributed`` also sets (the user's ``nccl_env`` wins).
    Anchors: verl's Ray runtime_env gives every worker NCCL_CUMEM_ENABLE=0 (against the
    hang of the weight sync with vLLM); slime's example scripts pass NCCL_CUMEM_ENABLE=0 and
    GLOO_SOCKET_IFNAME to every Ray worker in ``ray job submit``'s env_vars. Here the batch
    script is the one place every rank's environment comes from.
    """
    from megatron_prime.distributed import NCCL_CUMEM_ENABLE_VALUE

    lines = []
    if "NCCL_CUMEM_ENABLE" not in slurm.nccl_env:
        lines += ["# One value on every rank: vLLM sets this on import on some releases, i.e.",
                  "# only on the ranks hosting an engine, and mismatched values hang NCCL's",
                  "# first collective.",
                  f"export NCCL_CUMEM_ENABLE={NCCL_CUMEM_ENABLE_VALUE}"]
    for key, variable in SOCKET_IFNAME_KEYS.items():
        value = getattr(slurm, key)
        if value is not None:
            lines.append(f"export {variable}={shlex.quote(value)}  # slurm.{key}")
    return lines


def _cache_lines(slurm: SlurmConfig) -> list[str]:
    """Compile caches on node-local disk, one folder per job (a variable the user exported
    before sbatch wins). Anchors: verl, slime and NeMo-RL leave these caches at their
    defaults under $HOME; moving Triton's and Inductor's caches to node-local /tmp is common
    practice on clusters (concurrent compiles on NFS fail with stale file handles)."""
    from megatron_prime.rollout.engine import COMPILE_CACHES

    lines = ["# Compile caches (vLLM, Triton, TorchInductor, CUDA JIT) on node-local disk, one",
             "# folder per job: in $HOME (often NFS) every engine of every job would share them.",
             f'NODE_LOCAL_DIR="{slurm.node_local_dir}/megatron-prime-$SLURM_JOB_ID"']
    lines += [f'export {variable}="${{{variable}:-$NODE_LOCAL_DIR/{folder}}}"'
              for variable, folder in COMPILE_CACHES.items()]
    return lines


def _sbatch_options(slurm: SlurmConfig, signal_seconds: int) -> list[str]:
    options = [
        f"--job-name={slurm.job_name}",
        f"--nodes={slurm.nodes}",
        f"--ntasks-per-node={slurm.ntasks_per_node}",
        *([f"--gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []),
        f"--cpus-per-task={slurm.cpus_per_task}",
        f"--time={slurm.time}",
    ]
    options += [f"--{key}={getattr(slurm, key)}" for key in ("partition", "account", "qos")
                if getattr(slurm, key) is not None]
    options.append(f"--output={log_path(slurm)}")
    # No "B:": USR1 goes to the tasks srun started (the trainers), not to the batch shell.
    options.append(f"--signal=USR1@{signal_seconds}")
    if slurm.requeue:
        # A requeued job starts this script again with the same job id, so the same log
        # file: append to it instead of truncating it.
        options += ["--requeue", "--open-mode=append"]
    else:
        options.append("--no-requeue")
    if slurm.dependency is not None:
        options.append(f"--dependency=afterany:{slurm.dependency}")
    return options + list(slurm.extra_sbatch_lines)


def _per_node(slurm: SlurmConfig) -> str:
    if slurm.gpus_per_node:
        return f"{slurm.gpus_per_node} GPUs"
    return f"{slurm.ntasks_per_node} CPU task(s)"


def _software_lines(slurm: SlurmConfig) -> list[str]:
    if slurm.venv is None or slurm.container_image is not None:
        return []  # a container's venv python is named on the srun line instead
    return ["", "set +u  # activate scripts may read unset variables",
            f"source {shlex.quote(str(Path(slurm.venv) / 'bin' / 'activate'))}", "set -u"]


def _doctor_lines(slurm: SlurmConfig, config_path: str, overrides: Sequence[str]) -> list[str]:
    """One task per node runs the doctor's node checks (versions, GPUs, /dev/shm, sandbox,
    NCCL/gloo interfaces) before the trainers start: a node that cannot run the job stops it
    in seconds, with the reason in the log, instead of minutes into the run."""
    from megatron_prime.doctor import NODE_CHECKS

    args = ["-m", "megatron_prime.doctor", config_path, *overrides, "checkpoint.resume=auto",
            "--only", ",".join(NODE_CHECKS), "--nodes", str(slurm.nodes),
            *(["--gpus-per-node", str(slurm.gpus_per_node)] if slurm.gpus_per_node else [])]
    return ["# Preflight on every node (megatron-prime-doctor): nothing runs if a check fails.",
            "doctor_status=0",
            *_srun_lines(slurm, args, tasks_per_node=1, status_variable="doctor_status"),
            "if (( doctor_status != 0 )); then",
            '  echo "megatron_prime: the preflight check (megatron-prime-doctor) failed on a node '
            '(exit status $doctor_status, FAIL lines above); the trainer was not started" >&2',
            "  exit 1",
            "fi"]


def _srun_lines(slurm: SlurmConfig, trainer_args: Sequence[str], tasks_per_node: int | None = None,
                status_variable: str = "status") -> list[str]:
    options = [
        f"--nodes={slurm.nodes}",
        f"--ntasks-per-node={tasks_per_node or slurm.ntasks_per_node}",
        # Since SLURM 22.05 srun no longer takes --cpus-per-task from the batch job.
        f"--cpus-per-task={slurm.cpus_per_task}",
        # One dead rank ends the step instead of leaving the others blocked in a collective.
        "--kill-on-bad-exit=1",
    ]
    if slurm.gpus_per_node:
        # Every task sees all GPUs of its node: each trainer takes cuda:LOCAL_RANK, and each
        # replica's vLLM engine is started on its replica's GPUs (distributed.
        # engine_slot), which a per-task binding would hide from it.
        options.append("--gpu-bind=none")
    python = "python"
    if slurm.container_image is not None:
        mounts = '"$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR"'
        if slurm.container_mounts:
            mounts += "," + shlex.quote(",".join(slurm.container_mounts))
        options += [f"--container-image={shlex.quote(slurm.container_image)}",
                    f"--container-mounts={mounts}",
                    '--container-workdir="$SLURM_SUBMIT_DIR"']
        if slurm.venv is not None:
            python = shlex.quote(str(Path(slurm.venv) / "bin" / "python"))
    command = " ".join([python, *(shlex.quote(arg) for arg in trainer_args)])
    return ["srun \\", *(f"  {option} \\" for option in options),
            f"  {command} || {status_variable}=$?"]


def _requeue_lines(slurm: SlurmConfig) -> list[str]:
    if not slurm.requeue:
        return ['echo "megatron_prime: stopped at step $end_step of $RUN_STEPS; submit again to '
                'go on from there (requeue is off)"']
    return ['echo "megatron_prime: stopped at step $end_step of $RUN_STEPS (time-limit signal); '
            'requeueing job $SLURM_JOB_ID"',
            'scontrol requeue "$SLURM_JOB_ID"']
