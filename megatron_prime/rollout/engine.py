"""The rollout engine: vLLM's offline ``LLM``, colocated with the trainer.

Placement (``distributed.engine_slot``): each trainer data-parallel replica runs
``rollout.engine.engines_per_replica`` engines, by default on a GPU one per
``tensor_parallel_size`` GPUs of the replica, so every GPU hosts a vLLM worker whatever the
trainer's TP x PP; on CPU one per replica. The first rank of each chunk of the replica's ranks
owns an engine; vLLM's engine core runs in its own process, started fresh (spawn), so it never
sees the trainer's torch.distributed world. On GPU the engine process sees only its chunk's
GPUs (CUDA_VISIBLE_DEVICES), so vLLM's workers, which take ``cuda:0..TP-1`` of what they see,
land there. The replica's prompts are split over its engines (rollout/collect.py).

Memory hand-off (GPU, sleep mode): the engine sleeps at level 2 after every rollout (KV cache
and weights dropped: the next sync overwrites the weights anyway, and level 1 would keep a
host copy of every engine's weights), then wakes in two stages around the weight sync:
weights, sync, KV cache (rollout/bridge.py). The engine owns that state: ``generate`` on an
engine that sleeps or whose weights were dropped raises instead of sampling garbage.

The weight bridge hands full HF tensors to the owning rank, which passes them to vLLM through
vLLM's weight-transfer API (``start_weight_update`` / ``update_weights`` /
``finish_weight_update(weight_version=...)``) with megatron_prime's backend
(rollout/vllm_plugin.py, loaded into vLLM's processes as a general plugin).

The engine starts with dummy weights (``load_format="dummy"``) from a folder holding just
config.json and the tokenizer (a Megatron checkpoint's ``hf/`` folder): the real weights
arrive through ``RolloutEngine.load_weights`` (rollout/bridge.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import signal
from multiprocessing import shared_memory
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Sequence

import torch

from megatron_prime.config import require, require_choice, require_positive_int
from megatron_prime.host_memory import check_shared_memory_space
from megatron_prime.job_signals import children_outlive_job_signals
from megatron_prime.models.architectures import ModelShape


@dataclass
class SamplingConfig:
    """Per-step sampling; PRIME's reference: n=4, temperature 1.0."""

    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        require_positive_int("sampling.n", self.n)
        require_positive_int("sampling.max_new_tokens", self.max_new_tokens)
        require(self.temperature >= 0, "sampling.temperature", self.temperature, ">= 0")
        require(0 < self.top_p <= 1, "sampling.top_p", self.top_p, "in (0, 1]")
        require(self.top_k == -1 or self.top_k >= 1, "sampling.top_k", self.top_k, "-1 or >= 1")


VLLM_LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_vllm_logging(level: str) -> str:
    """Sets vLLM's log level for this process and the engine processes it spawns; returns the
    level in force. ``VLLM_LOGGING_LEVEL`` already in the environment (the user's) wins.

    vLLM reads the variable when ``vllm`` is first imported (here, and again in every spawned
    process); the ``vllm`` logger's level is set too, for a process that imported it already."""
    import logging

    effective = os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    if effective.upper() in VLLM_LOG_LEVELS:
        logging.getLogger("vllm").setLevel(effective.upper())
    return effective


@dataclass
class RolloutConfig:
    """How the vLLM engine is built."""

    tensor_parallel_size: int = 1
    # Engines per trainer replica (distributed.engine_slot): None is one per
    # tensor_parallel_size GPUs of the replica on a GPU (every GPU generates), one per replica
    # on CPU. The replica's prompts are split over them.
    engines_per_replica: int | None = None
    max_model_len: int = 4096
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    gpu_memory_utilization: float = 0.5
    # Free KV cache and weights while the trainer runs (GPU only).
    enable_sleep_mode: bool = True
    cpu_kv_cache_gib: int = 1  # vLLM reads whole GiB
    use_chat_template: bool = False
    enforce_eager: bool = False
    seed: int = 0
    # How trained weights reach the engine (rollout/vllm_plugin.py): "reload" hands buckets to
    # the model's load_weights (any device, any vLLM TP); "shared" has the trainer write straight
    # into the engine's parameters in shared memory (CPU engine, vLLM TP=1): several times
    # faster syncs, but GEMMs without vLLM's CPU weight packing decode 5-15% slower.
    weight_sync: str = "reload"
    # vLLM's own log level (its INFO lines, a dozen per engine start, bury the trainer's
    # progress on the job's console). A VLLM_LOGGING_LEVEL the user set in the environment
    # wins over this.
    log_level: str = "WARNING"
    extra_engine_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require_positive_int("rollout.tensor_parallel_size", self.tensor_parallel_size)
        if self.engines_per_replica is not None:
            require_positive_int("rollout.engine.engines_per_replica", self.engines_per_replica)
        require_positive_int("rollout.max_model_len", self.max_model_len)
        require_choice("rollout.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
                 self.gpu_memory_utilization, "in (0, 1]")
        require_positive_int("rollout.cpu_kv_cache_gib", self.cpu_kv_cache_gib)
        require_choice("rollout.weight_sync", self.weight_sync, ("reload", "shared"))
        require_choice("rollout.engine.log_level", self.log_level, VLLM_LOG_LEVELS)
        if self.weight_sync == "shared" and self.tensor_parallel_size != 1:
            raise ValueError(f"rollout.weight_sync=shared needs rollout.tensor_parallel_size=1 "
                             f"(got {self.tensor_parallel_size}): the trainer writes one "
                             f"engine's whole parameters; use weight_sync=reload")


@dataclass
class Rollout:
    """One sampled response."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    logprobs: list[float]  # the sampler's log-prob of each response token


def _rollouts_of(prompt_index: int, output: Any) -> list[Rollout]:
    """A vLLM RequestOutput's n samples as Rollouts."""
    rollouts = []
    for sample_index, sample in enumerate(output.outputs):
        logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
        rollouts.append(Rollout(prompt_index, sample_index, list(output.prompt_token_ids),
                                list(sample.token_ids), sample.text,
                                sample.finish_reason or "length", logprobs))
    return rollouts


_ALIGN = 64  # byte alignment of tensors in the shared block
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                       "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@contextlib.contextmanager
def _environment(values: dict[str, str | None]):
    """``os.environ`` with ``values`` set (None: removed) inside, as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Compile caches the engine (vLLM, Triton, TorchInductor, CUDA's JIT, torch extensions)
# writes, by default under $HOME: variable -> sub-folder of the node-local folder. The batch
# script exports the same (launch/sbatch.py); ``use_node_local_caches`` covers other launches.
COMPILE_CACHES: dict[str, str] = {
    "VLLM_CACHE_ROOT": "vllm",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "CUDA_CACHE_PATH": "cuda-jit",
    "TORCH_EXTENSIONS_DIR": "torch-extensions",
}


def node_local_cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """``${TMPDIR:-/tmp}/megatron-prime-<job>``: one folder per SLURM job (the batch script's
    choice too), else per user, so a local run reuses its compiled kernels."""
    import getpass

    env = os.environ if environ is None else environ
    owner = env.get("SLURM_JOB_ID") or getpass.getuser()
    return Path(env.get("TMPDIR") or "/tmp") / f"megatron-prime-{owner}"


def use_node_local_caches(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Points every compile cache the user did not set at the node-local folder (in $HOME,
    often NFS, every engine of every job shares and rewrites them); returns what it set.
    Called before vLLM is first imported: it reads the variables then, and the engine's
    processes inherit them."""
    env = os.environ if environ is None else environ
    root = node_local_cache_root(env)
    chosen = {variable: str(root / folder) for variable, folder in COMPILE_CACHES.items()
              if not env.get(variable)}
    env.update(chosen)
    return chosen


@contextlib.contextmanager
def _restored_after(name: str):
    """``os.environ[name]`` as it was before, whatever the body set (an import that writes
    it on some ranks only)."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def prompt_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt vLLM seed derived from the batch seed: reproducible, and unrelated
    between prompts (a hash, not seed + index, so neighbouring batches do not share seeds)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def engine_core_processes(client: Any) -> list[Any]:
    """The engine-core processes of vLLM's multiprocess client (``[]`` for an in-process
    engine). vLLM's names: ``MPClient.resources.engine_manager.processes``."""
    resources = getattr(client, "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return list(getattr(manager, "processes", []))


class EngineStateError(RuntimeError):
    """The engine was asked to do something its sleep/weight state does not allow."""


# vLLM's CPU default token budget per engine step (EngineArgs: 4096 x world size).
CPU_TOKENS_PER_STEP = 4096


PLUGIN_BACKEND = "megatron_prime"  # rollout/vllm_plugin.py's BACKEND
PLUGIN_GROUP = "vllm.general_plugins"


def check_plugin_installed() -> None:
    """vLLM finds megatron_prime's weight-transfer backend through an installed entry point
    (setup.py): a source tree used without ``pip install -e .`` has none, and vLLM would
    fail after its start-up with "Invalid weight transfer backend". VLLM_PLUGINS, where set,
    must let it load."""
    from importlib.metadata import entry_points

    if not entry_points(group=PLUGIN_GROUP, name=PLUGIN_BACKEND):
        raise RuntimeError(f"vLLM plugin {PLUGIN_BACKEND!r} ({PLUGIN_GROUP} entry point) is not "
                           "installed: run `pip install -e .` in the megatron_prime checkout "
                           "(the engine's weight sync is that plugin)")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_BACKEND not in allowed.split(","):
        raise RuntimeError(f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_BACKEND!r}, the engine's "
                           "weight sync: add it or unset VLLM_PLUGINS")


def cpu_scheduler_arguments(config: RolloutConfig) -> dict[str, Any]:
    """Scheduler settings a CPU engine needs: no chunked prefill.

    When a round's prompts pass the step's token budget, vLLM splits a prefill over several
    steps and then rewinds the seeded per-request sampler of the unfinished one with
    ``Generator.set_offset``, which only CUDA generators have: the CPU engine dies with "CPU
    Generator does not use offset" on the first large round (every rollout request carries a
    seed). Without chunking a prompt is prefilled whole, so the budget must hold the longest
    one. vLLM warns that this model "does not officially support disabling chunked prefill";
    the engine-vs-trainer log-prob tests (test_rollout_bridge) check the outputs stay right.
    GPU engines keep chunked prefill (CUDA generators rewind). ``extra_engine_args`` can
    still override both keys.
    """
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(CPU_TOKENS_PER_STEP * config.tensor_parallel_size,
                                          config.max_model_len)}


class RolloutEngine:
    """A vLLM engine owned by this rank (see ``distributed.engine_slot``).

    States: awake with the trainer's weights (``ready``; only then ``generate``), asleep
    (KV cache and weights dropped), weights awake but not yet loaded (during a sync). A new
    engine is awake with dummy weights: it needs a sync before it can generate.
    """

    def __init__(self, hf_folder: str | Path, config: RolloutConfig, on_gpu: bool,
                 visible_devices: Sequence[str] | None = None):
        config.validate()
        configure_vllm_logging(config.log_level)  # before the first import of vllm
        use_node_local_caches()
        self.config, self.on_gpu = config, on_gpu
        self.hf_folder = Path(hf_folder)
        import json

        hf_config = json.loads((self.hf_folder / "config.json").read_text())
        self.shape = ModelShape.from_hf(hf_config)
        self._check_head_size()
        if config.weight_sync == "shared" and on_gpu:
            raise ValueError("rollout.weight_sync=shared is for the CPU engine (its parameters "
                             "live in host shared memory); on GPU use weight_sync=reload")
        # The engine core gets its own fresh process: forking would hand it the trainer's
        # process groups, on which vLLM would then build its own.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)

        dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        kwargs: dict[str, Any] = dict(
            model=str(self.hf_folder),
            load_format="dummy",  # real weights come from the trainer
            dtype=dtype,
            max_model_len=config.max_model_len,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            # rollout/vllm_plugin.py's backend, registered in vLLM's processes by the plugin.
            weight_transfer_config={"backend": PLUGIN_BACKEND},
            # The sampler's log-probs after temperature, like the trainer's (update.py): the
            # rollout/logprob_diff_* check then compares the same distribution at any T.
            logprobs_mode="processed_logprobs",
        )
        if on_gpu:
            kwargs.update(gpu_memory_utilization=config.gpu_memory_utilization,
                          enable_sleep_mode=config.enable_sleep_mode)
        if config.weight_sync == "shared":
            from megatron_prime.rollout.vllm_plugin import SHARED_WEIGHTS_METHOD

            kwargs.update(quantization=SHARED_WEIGHTS_METHOD,
                          hf_overrides={"quantization_config": {"quant_method": SHARED_WEIGHTS_METHOD}})
        if not on_gpu:
            kwargs.update(cpu_scheduler_arguments(config))
        kwargs.update(config.extra_engine_args)
        # The spawned engine must not take this process's launcher variables as its own.
        environment: dict[str, str | None] = dict.fromkeys(_LAUNCHER_VARIABLES)
        if on_gpu and visible_devices is not None:
            if len(visible_devices) < config.tensor_parallel_size:
                raise ValueError(
                    f"rollout.engine.tensor_parallel_size={config.tensor_parallel_size}: this "
                    f"replica has only {len(visible_devices)} GPUs on this node "
                    f"({','.join(visible_devices)}); expected at most that many")
            # The engine process and its workers inherit this at spawn.
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(visible_devices[:config.tensor_parallel_size])
        # The engine must outlive SIGUSR1 and SIGTERM (sbatch --signal=USR1@N, scancel,
        # pre-emption reach every process of the job): the trainer needs it until it has
        # saved, and stops it itself (job_signals.py; vLLM's engine core and workers install
        # SIGTERM handlers, which a blocked mask holds off and an ignored disposition would not). NCCL_CUMEM_ENABLE stays what every rank agreed on
        # (distributed.agree_nccl_cumem), whatever importing vLLM does to it.
        check_plugin_installed()
        with _environment(environment), children_outlive_job_signals(spawn=True), \
                _restored_after("NCCL_CUMEM_ENABLE"):
            self.llm = self._start_llm(kwargs)
        self._block: shared_memory.SharedMemory | None = None
        self._shared: SharedParameters | None = None
        self._updating = False
        self._transfer_ready = False  # vLLM's weight-transfer handshake, at the first sync
        self.tokenizer = self.llm.get_tokenizer()
        self._asleep = False
        self._weights_awake = True
        # Dummy weights until the first sync (an evaluation engine loads its own).
        self._weights_loaded = kwargs["load_format"] != "dummy"

    @staticmethod
    def _start_llm(kwargs: dict[str, Any]) -> Any:
        """vLLM's offline engine (its engine core and workers start in fresh processes, which
        inherit this process's environment as it is now)."""
        from vllm import LLM

        return LLM(**kwargs)

    def _check_head_size(self) -> None:
        if self.on_gpu:
            return  # vLLM's GPU backends cover every head size of the supported families
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if self.shape.head_dim not in supported:
            raise ValueError(f"{self.hf_folder / 'config.json'}: head size {self.shape.head_dim} "
                             f"(hidden_size / num_attention_heads) is not supported by vLLM's CPU "
                             f"attention; supported: {supported}")

    # ---- prompts and sampling ----

    def render(self, prompts: Sequence[str | list[dict[str, str]] | list[int]]) -> list[list[int]]:
        """Token ids for each prompt: chat messages through the chat template, text raw."""
        rendered = []
        for prompt in prompts:
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                rendered.append(list(prompt))
            elif isinstance(prompt, list) or self.config.use_chat_template:
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                rendered.append(self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True))
            else:
                rendered.append(self.tokenizer.encode(prompt, add_special_tokens=False))
        return rendered

    def generate(self, prompts: Sequence[str | list[dict[str, str]] | list[int]],
                 sampling: SamplingConfig,
                 on_finished: Callable[[list[Rollout]], None] | None = None,
                 first_prompt_index: int = 0) -> list[Rollout]:
        """n samples per prompt, with the sampler's log-probs. Checks lengths before sampling.

        ``on_finished`` is called with a prompt's n rollouts as soon as vLLM has finished all
        of them, while it still generates the others (the rollout scores them meanwhile):
        the requests are queued with ``LLM.enqueue`` and the engine is stepped here, as
        ``LLM.generate`` steps it, so the batch and the samples are the same. The result is
        in prompt order either way. ``first_prompt_index``: where these prompts start in the
        round they were cut from (each prompt's seed follows its index in the round, so a
        round split over several engines samples what one engine would)."""
        from vllm import SamplingParams

        sampling.validate()
        token_ids = self.render(prompts)
        for index, ids in enumerate(token_ids):
            if len(ids) + sampling.max_new_tokens > self.config.max_model_len:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens; with sampling.max_new_tokens="
                    f"{sampling.max_new_tokens} that exceeds rollout.max_model_len="
                    f"{self.config.max_model_len}")
        def params(index: int) -> SamplingParams:
            # vLLM seeds each request's generator with its own seed: one batch-wide seed would
            # make sample j of every prompt draw the same random numbers (correlated rollouts).
            return SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None, logprobs=0,
                seed=None if sampling.seed is None else prompt_seed(sampling.seed,
                                                                    first_prompt_index + index))

        self._check_ready("generate")
        requests = [{"prompt_token_ids": ids} for ids in token_ids]
        all_params = [params(i) for i in range(len(token_ids))]
        if on_finished is None or not hasattr(self.llm, "enqueue"):
            outputs = self.llm.generate(requests, all_params, use_tqdm=False)
            per_prompt = [_rollouts_of(index, output) for index, output in enumerate(outputs)]
            if on_finished is not None:
                for prompt_rollouts in per_prompt:
                    on_finished(prompt_rollouts)
            return [rollout for prompt_rollouts in per_prompt for rollout in prompt_rollouts]
        # Anchors: verl's agent loop and slime's rollout score each sample as its generation
        # returns (async engines); LLM.enqueue + stepping gives the same with the offline LLM.
        request_ids = [str(r) for r in self.llm.enqueue(requests, all_params, use_tqdm=False)]
        # vLLM 0.32 returns its internal ids ("<id>-<8 hex>") and reports outputs under the
        # caller's "<id>": either finds the prompt.
        index_of = {request_id: index for index, request_id in enumerate(request_ids)}
        index_of.update({request_id.rsplit("-", 1)[0]: index
                         for index, request_id in enumerate(request_ids) if "-" in request_id})
        finished: dict[int, list[Rollout]] = {}
        engine = self.llm.llm_engine
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        index = index_of[str(output.request_id)]
                        finished[index] = _rollouts_of(index, output)
                        on_finished(finished[index])
        except BaseException:
            # The caller's error (or a signal) ends this round: no request may stay queued
            # for the next generate.
            engine.abort_request([request_id for index, request_id in enumerate(request_ids)
                                  if index not in finished], internal=True)
            raise
        if len(finished) != len(requests):
            raise RuntimeError(f"vLLM finished {len(finished)} of {len(requests)} prompts")
        return [rollout for index in range(len(requests)) for rollout in finished[index]]

    # ---- weights and memory ----

    def _init_weight_transfer(self) -> None:
        """vLLM's weight-transfer handshake, once per engine, at its first sync (the engine
        is awake then); in ``shared`` mode the engine moves its parameters into shared memory
        and says where each lies."""
        import json
        import secrets
        import tempfile

        self._transfer_ready = True
        if self.config.weight_sync == "reload":
            self.llm.init_weight_transfer_engine({"init_info": {"mode": "reload"}})
            return
        layout = Path(tempfile.gettempdir()) / f"megatron_prime_layout_{os.getpid()}_{secrets.token_hex(4)}.json"
        try:
            self.llm.init_weight_transfer_engine({"init_info": {"mode": "shared",
                                                                "layout_file": str(layout)}})
            found = json.loads(layout.read_text())
        finally:
            layout.unlink(missing_ok=True)
        self._shared = SharedParameters(found["path"], found["size"], found["entries"],
                                        found["packed"], self.shape)

    def start_weight_update(self) -> None:
        """Opens a sync (vLLM's ``start_weight_update``): ``load_weights`` or ``write_weight``
        for every tensor, then ``weights_written``."""
        self._check_weights_awake("start_weight_update")
        if self._updating:
            raise EngineStateError("start_weight_update while a sync is open: weights_written first")
        if not self._transfer_ready:
            self._init_weight_transfer()
        self.llm.start_weight_update()
        self._updating = True

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """One bucket of (HF name, full tensor) into vLLM (``update_weights``); vLLM cuts its
        TP shards. One copy into shared memory here, one out of it in the engine."""
        self._check_updating("load_weights")
        entries, offset = [], 0
        for name, tensor in bucket:
            offset = -(-offset // _ALIGN) * _ALIGN
            entries.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset))
            offset += tensor.nbytes
        block = self._shared_block(offset)
        for (name, tensor), (_, _, _, start) in zip(bucket, entries):
            flat = tensor.detach().reshape(-1)
            target = torch.frombuffer(block.buf, dtype=flat.dtype, count=flat.numel(), offset=start)
            target.copy_(flat)
            del target
        self.llm.update_weights({"update_info": {"block_name": block.name, "entries": entries}})

    def write_weight(self, name: str, tensor: torch.Tensor) -> None:
        """``weight_sync=shared``: copies one full HF tensor straight into the engine's
        parameter (its rows of a fused vLLM tensor)."""
        self._check_updating("write_weight")
        if self._shared is None:
            raise EngineStateError("write_weight needs rollout.weight_sync=shared")
        self._shared.write(name, tensor)

    def weights_written(self, version: int) -> None:
        """Closes the sync (vLLM's ``finish_weight_update``): the whole model was loaded,
        and it is the policy after ``version`` optimizer steps (vLLM tags every output with
        it; ``weight_version`` reads it back)."""
        self._check_updating("weights_written")
        self.llm.finish_weight_update(weight_version=str(version))
        self._updating = False
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self._weights_loaded = True

    @property
    def weight_version(self) -> str:
        return self.llm.get_weight_version()

    def _check_updating(self, what: str) -> None:
        self._check_weights_awake(what)
        if not self._updating:
            raise EngineStateError(f"{what} outside a sync: start_weight_update first")

    def _shared_block(self, nbytes: int) -> shared_memory.SharedMemory:
        """One block, reused across buckets and syncs; grown when a bucket does not fit."""
        if self._block is None or self._block.size < nbytes:
            self._release_block()
            check_shared_memory_space(max(nbytes, 1), "rollout.weight_sync=reload (one bucket "
                                      "of rollout.bridge.bucket_bytes)")
            self._block = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        return self._block

    def _release_block(self) -> None:
        if self._block is not None:
            self._block.close()
            self._block.unlink()
            self._block = None

    def shutdown(self) -> None:
        """Stops the engine: SIGINT to its engine-core processes, then vLLM's own shutdown.

        They block SIGTERM (job_signals.py), which is what vLLM's shutdown sends them; its
        handler takes SIGINT as it takes SIGTERM, so the engine core starts the same clean
        teardown (its workers exit when it tells them). vLLM's manager then waits up to 5 s
        for it and kills what is left, as it does without the block."""
        self._release_block()
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        client = self.llm.llm_engine.engine_core
        for process in engine_core_processes(client):
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        client.shutdown()

    # ---- sleep and wake (GPU memory hand-off; the same states on CPU) ----

    def _sleep_mode(self) -> bool:
        return self.on_gpu and self.config.enable_sleep_mode

    def sleep(self) -> None:
        """Hands the GPU memory to the trainer: level 2 drops the KV cache and the weights
        (verl and slime do the same for colocated rollouts; the next sync overwrites the
        weights, so level 1's host copy of them would only cost host RAM). On CPU, or without
        sleep mode, nothing is freed, but the state is the same: the next generate needs a sync.
        """
        if self._asleep:
            return
        if self._sleep_mode():
            self.llm.sleep(level=2)
        self._asleep = True
        self._weights_loaded = False
        self._weights_awake = False

    def wake_weights(self) -> None:
        """First wake stage: the weights' memory, before the trainer pushes them."""
        if self._asleep and not self._weights_awake:
            if self._sleep_mode():
                self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def wake_kv_cache(self) -> None:
        """Second wake stage, after the sync and after the trainer released its gather
        buffers: the KV cache is the largest allocation, so it goes last."""
        if not self._weights_loaded:
            raise EngineStateError("wake_kv_cache before the weights were loaded: sync first")
        if self._asleep:
            if self._sleep_mode():
                self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def _check_weights_awake(self, what: str) -> None:
        if self._asleep and not self._weights_awake:
            raise EngineStateError(f"{what} on a sleeping engine: wake_weights() first")

    def _check_ready(self, what: str) -> None:
        if self._asleep:
            raise EngineStateError(f"{what} on a sleeping engine (its KV cache and weights were "
                                   f"released); the weight bridge must sync and wake it first")
        if not self._weights_loaded:
            raise EngineStateError(f"{what} before the trainer's weights were loaded (dummy or "
                                   f"dropped weights); the weight bridge must sync first")


class SharedParameters:
    """The trainer's view of an engine whose parameters live in a shared-memory file
    (``rollout.weight_sync=shared``, rollout/vllm_plugin.py).

    Each full HF tensor is copied into its place: its own vLLM parameter, or its rows of a
    fused one (vLLM stacks q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, in the
    order of the model's ``packed_modules_mapping``; its vocabulary rows are padded). After
    each tensor its pages are dropped from this process's page tables (``MADV_DONTNEED``; the
    data stays in the file), so the trainer's RSS grows by one tensor at most, not a model.
    """

    def __init__(self, path: str, size: int, entries: list, packed: dict[str, list[str]],
                 shape: ModelShape):
        from megatron_prime.checkpoint.hf_mapping import expected_hf_shapes

        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
            os.unlink(path)  # both processes keep their mappings; nothing is left behind
        self._targets = self._place(entries, packed, expected_hf_shapes(shape))

    @staticmethod
    def _place(entries: list, packed: dict[str, list[str]], hf_shapes: dict[str, tuple[int, ...]]
               ) -> dict[str, tuple[str, torch.dtype, list[int], int, int]]:
        """HF name -> (vLLM name, dtype, vLLM shape, byte offset, first row); checks that the
        HF tensors tile every vLLM parameter."""
        part_of = {part: fused for fused, parts in packed.items() for part in parts}
        rows_written: dict[str, int] = {}
        targets = {}
        by_name = {name: (getattr(torch, dtype), shape, offset) for name, dtype, shape, offset in entries}
        for hf_name, hf_shape in hf_shapes.items():
            module, _, leaf = hf_name.rpartition(".")
            parent, _, local = module.rpartition(".")
            fused = part_of.get(local)
            vllm_name = f"{parent}.{fused}.{leaf}" if fused else hf_name
            if vllm_name not in by_name:
                raise ValueError(f"HF tensor {hf_name!r}: the vLLM engine has no parameter "
                                 f"{vllm_name!r} to hold it")
            dtype, vllm_shape, offset = by_name[vllm_name]
            first = 0
            if fused:
                for part in packed[fused][: packed[fused].index(local)]:
                    first += hf_shapes[f"{parent}.{part}.{leaf}"][0]
            if list(hf_shape[1:]) != vllm_shape[1:] or first + hf_shape[0] > vllm_shape[0]:
                raise ValueError(f"HF tensor {hf_name!r} {tuple(hf_shape)} does not fit rows "
                                 f"{first}.. of vLLM parameter {vllm_name!r} {tuple(vllm_shape)}")
            targets[hf_name] = (vllm_name, dtype, vllm_shape, offset, first)
            rows_written[vllm_name] = rows_written.get(vllm_name, 0) + hf_shape[0]
        for name, (_, vllm_shape, _) in by_name.items():
            rows = rows_written.get(name, 0)
            padded_vocabulary = name.endswith(("embed_tokens.weight", "lm_head.weight"))
            if rows != vllm_shape[0] and not (padded_vocabulary and 0 < rows < vllm_shape[0]):
                raise ValueError(f"vLLM parameter {name!r} {tuple(vllm_shape)}: the HF tensors "
                                 f"cover {rows} of its {vllm_shape[0]} rows")
        return targets

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._targets:
            raise KeyError(f"no vLLM parameter holds HF tensor {name!r}")
        _, dtype, vllm_shape, offset, first = self._targets[name]
        row = 1
        for dim in vllm_shape[1:]:
            row *= dim
        itemsize = dtype.itemsize
        start = offset + first * row * itemsize
        count = tensor.numel()
        target = torch.frombuffer(self._map, dtype=dtype, count=count, offset=start)
        target.view(tensor.shape).copy_(tensor)

    def close(self) -> None:
        self._map.close()
