"""The rollout engine: vLLM's offline ``LLM``, colocated with the trainer.

Placement: one engine per trainer data-parallel replica, owned by the replica's first rank
(TP rank 0 of the first pipeline stage; ``hosts_engine()``). vLLM's engine core runs in its
own process, started fresh (spawn), so it never sees the trainer's torch.distributed world;
its tensor-parallel size is independent of the trainer's TP/PP. The weight bridge hands
full HF tensors to the owning rank, which passes them through a shared-memory block
(rollout/vllm_worker.py) to vLLM's in-place ``reload_weights``.

The engine starts with dummy weights (``load_format="dummy"``) from a folder holding just
config.json and the tokenizer (a Megatron checkpoint's ``hf/`` folder): the real weights
arrive through ``RolloutEngine.load_weights`` (rollout/bridge.py).
"""

from __future__ import annotations

import hashlib
import contextlib
import os
import signal
from multiprocessing import shared_memory
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_prime.config import require, require_choice, require_positive_int
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


@dataclass
class RolloutConfig:
    """How the vLLM engine is built."""

    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    gpu_memory_utilization: float = 0.5
    # Free KV cache and weights while the trainer runs (GPU only).
    enable_sleep_mode: bool = True
    cpu_kv_cache_gib: int = 1  # vLLM reads whole GiB
    use_chat_template: bool = False
    enforce_eager: bool = False
    seed: int = 0
    extra_engine_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require_positive_int("rollout.tensor_parallel_size", self.tensor_parallel_size)
        require_positive_int("rollout.max_model_len", self.max_model_len)
        require_choice("rollout.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
                 self.gpu_memory_utilization, "in (0, 1]")
        require_positive_int("rollout.cpu_kv_cache_gib", self.cpu_kv_cache_gib)


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


_ALIGN = 64  # byte alignment of tensors in the shared block
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                       "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@contextlib.contextmanager
def _without_env(names: Sequence[str]):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _ignoring(signum: int):
    """Processes started inside inherit an ignored ``signum`` (ignored dispositions survive
    fork and exec); this process gets its previous handler back."""
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt vLLM seed derived from the batch seed: reproducible, and unrelated
    between prompts (a hash, not seed + index, so neighbouring batches do not share seeds)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def hosts_engine(tp_rank: int, pp_rank: int) -> bool:
    """The first rank of each data-parallel replica owns that replica's engine."""
    return tp_rank == 0 and pp_rank == 0


class RolloutEngine:
    """A vLLM engine owned by this rank (see ``hosts_engine``)."""

    def __init__(self, hf_folder: str | Path, config: RolloutConfig, on_gpu: bool):
        config.validate()
        self.config, self.on_gpu = config, on_gpu
        self.hf_folder = Path(hf_folder)
        import json

        hf_config = json.loads((self.hf_folder / "config.json").read_text())
        self.shape = ModelShape.from_hf(hf_config)
        self._check_head_size()
        # The engine core gets its own fresh process: forking would hand it the trainer's
        # process groups, on which vLLM would then build its own.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
        from vllm import LLM

        dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        kwargs: dict[str, Any] = dict(
            model=str(self.hf_folder),
            load_format="dummy",  # real weights come from the trainer
            dtype=dtype,
            max_model_len=config.max_model_len,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            worker_extension_cls="megatron_prime.rollout.vllm_worker.BridgeWorkerExtension",
        )
        if on_gpu:
            kwargs.update(gpu_memory_utilization=config.gpu_memory_utilization,
                          enable_sleep_mode=config.enable_sleep_mode)
        kwargs.update(config.extra_engine_args)
        # The spawned engine must not take this process's launcher variables as its own, and
        # must outlive SIGUSR1: SLURM's pre-emption warning (sbatch --signal=USR1@N) reaches
        # every process of the job, and the trainer needs the engine until it has saved.
        with _without_env(_LAUNCHER_VARIABLES), _ignoring(signal.SIGUSR1):
            self.llm = LLM(**kwargs)
        self._block: shared_memory.SharedMemory | None = None
        self.tokenizer = self.llm.get_tokenizer()
        self._asleep = False

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
                 sampling: SamplingConfig) -> list[Rollout]:
        """n samples per prompt, with the sampler's log-probs. Checks lengths before sampling."""
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
                seed=None if sampling.seed is None else prompt_seed(sampling.seed, index))

        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_ids],
                                    [params(i) for i in range(len(token_ids))], use_tqdm=False)
        rollouts = []
        for prompt_index, output in enumerate(outputs):
            for sample_index, sample in enumerate(output.outputs):
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
                rollouts.append(Rollout(prompt_index, sample_index, list(output.prompt_token_ids),
                                        list(sample.token_ids), sample.text,
                                        sample.finish_reason or "length", logprobs))
        return rollouts

    # ---- weights and memory ----

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """In-place reload of one bucket of (HF name, full tensor); vLLM cuts its TP shards.

        One copy into shared memory here, one copy into the parameters in the engine.
        """
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
        self.llm.collective_rpc("load_weights_from_shared_memory", args=(block.name, entries))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def _shared_block(self, nbytes: int) -> shared_memory.SharedMemory:
        """One block, reused across buckets and syncs; grown when a bucket does not fit."""
        if self._block is None or self._block.size < nbytes:
            self._release_block()
            self._block = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        return self._block

    def _release_block(self) -> None:
        if self._block is not None:
            self._block.close()
            self._block.unlink()
            self._block = None

    def shutdown(self) -> None:
        self._release_block()
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """GPU: release KV cache and weights to the trainer (level 1 keeps weights in host RAM)."""
        if self.on_gpu and self.config.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
