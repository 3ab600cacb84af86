"""Every vLLM name megatron_prime relies on, as data: where vLLM defines it and which
parameter names the project passes or overrides.

Why a registry: the engine and the weight bridge call past vLLM's documented surface (the
worker's in-place ``reload_weights(weights_iterator=...)``, ``collective_rpc``, sleep levels
and wake-up tags, the engine core's ``shutdown``, the quantization hook, environment
variables), and those move between releases. The tests check this one table three ways
(tests/test_vllm_api_pins.py): the project's source uses no vLLM name missing from it (so it
cannot fall behind the code), the installed CPU build has every entry, and the CUDA wheel
pinned in setup.py (``vllm-gpu``) has every entry in its source, read from PyPI without
installing it. A cluster user thus learns of a renamed keyword from a CPU test, not from a
job that died after vLLM started.

Entries name the module that *defines* a name (``vllm.entrypoints.llm`` for ``vllm.LLM``),
because that is what the wheel's source is searched for; ``imported_as`` lists how the
project imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["callable", "attribute", "literal", "environment", "reads"]


@dataclass(frozen=True)
class VllmName:
    """One vLLM name the project depends on.

    kind:
      ``callable``: a class, function or method; ``parameters`` (the names the project passes
        by keyword, or its overrides' parameter names) must be among its parameter names (a
        class: its ``__init__`` or, for a dataclass or msgspec struct, its fields).
        A callable that passes ``**kwargs`` on names the receiver in ``forwards_to``; a
        parameter it does not name itself must then be the receiver's.
      ``attribute``: an instance attribute (set as ``self.<name>`` in a method of the class,
        or annotated in its body); ``value_type`` is the class of its value, so attribute
        chains (``llm.llm_engine.engine_core``) resolve through the table.
      ``literal``: a ``Literal[...]`` alias; ``parameters`` are values the project passes.
      ``environment``: a variable vLLM reads (defined in ``vllm.envs``).
      ``reads``: a function whose body must still reference the attribute names in
        ``parameters`` (attributes the project sets on vLLM's layers for vLLM to find).
    """

    module: str
    qualname: str
    kind: Kind = "callable"
    parameters: tuple[str, ...] = ()
    imported_as: tuple[str, ...] = ()
    forwards_to: str | None = None  # "module:qualname"
    value_type: str | None = None  # "module:qualname"
    why: str = ""

    @property
    def key(self) -> str:
        return f"{self.module}:{self.qualname}"


LLM = "vllm.entrypoints.llm:LLM"
ENGINE_ARGS = "vllm.engine.arg_utils:EngineArgs"
WORKER = "vllm.v1.worker.gpu_worker:Worker"

# Keyword arguments the project gives ``vllm.LLM`` (rollout/engine.py; tests/workers).
LLM_KEYWORDS = (
    "model", "load_format", "dtype", "max_model_len", "tensor_parallel_size", "seed",
    "enforce_eager", "worker_extension_cls", "logprobs_mode", "gpu_memory_utilization",
    "enable_sleep_mode", "quantization", "hf_overrides", "skip_tokenizer_init",
    "enable_chunked_prefill", "max_num_batched_tokens",
)

VLLM_API: tuple[VllmName, ...] = (
    # ---- the offline engine (rollout/engine.py) ----
    VllmName("vllm.entrypoints.llm", "LLM", parameters=LLM_KEYWORDS, imported_as=("vllm.LLM",),
             forwards_to=ENGINE_ARGS, why="the rollout engine; extra keywords go to EngineArgs"),
    VllmName("vllm.engine.arg_utils", "EngineArgs", parameters=LLM_KEYWORDS,
             why="receives LLM(**kwargs); one field per keyword the project passes"),
    VllmName("vllm.config.model", "LogprobsMode", kind="literal",
             parameters=("processed_logprobs",),
             why="log-probs after temperature, the distribution the trainer scores"),
    VllmName("vllm.entrypoints.llm", "LLM.generate", parameters=("use_tqdm",)),
    VllmName("vllm.entrypoints.llm", "LLM.enqueue", parameters=("use_tqdm",),
             why="queues a round; the trainer steps the engine and scores each prompt as it "
                 "finishes (RolloutEngine.generate's on_finished)"),
    VllmName("vllm.v1.engine.llm_engine", "LLMEngine.step",
             why="one engine step of the streamed round; returns RequestOutputs"),
    VllmName("vllm.v1.engine.llm_engine", "LLMEngine.has_unfinished_requests"),
    VllmName("vllm.v1.engine.llm_engine", "LLMEngine.abort_request", parameters=("internal",),
             why="a round that failed mid-way leaves nothing queued (enqueue's ids are internal)"),
    VllmName("vllm.entrypoints.llm", "LLM.get_tokenizer"),
    VllmName("vllm.entrypoints.llm", "LLM.collective_rpc", parameters=("args",),
             why="calls BridgeWorkerExtension's methods in every vLLM worker"),
    VllmName("vllm.entrypoints.llm", "LLM.reset_prefix_cache",
             why="cached prefixes hold the old weights' KV after a sync"),
    VllmName("vllm.entrypoints.llm", "LLM.sleep", parameters=("level",),
             why="level 2 drops weights and KV cache while the trainer runs"),
    VllmName("vllm.entrypoints.llm", "LLM.wake_up", parameters=("tags",),
             why="two-stage wake: tags=['weights'], then ['kv_cache']"),
    VllmName("vllm.entrypoints.llm", "LLM.llm_engine", kind="attribute",
             value_type="vllm.v1.engine.llm_engine:LLMEngine"),
    VllmName("vllm.v1.engine.llm_engine", "LLMEngine.engine_core", kind="attribute",
             value_type="vllm.v1.engine.core_client:EngineCoreClient"),
    VllmName("vllm.v1.engine.core_client", "EngineCoreClient.shutdown",
             why="stops the engine-core process (LLM has no public shutdown)"),
    VllmName("vllm.sampling_params", "SamplingParams",
             parameters=("n", "temperature", "top_p", "top_k", "max_tokens", "stop", "logprobs",
                         "seed", "min_tokens", "ignore_eos", "detokenize"),
             imported_as=("vllm.SamplingParams",)),
    VllmName("vllm.outputs", "RequestOutput",
             parameters=("prompt_token_ids", "outputs", "request_id", "finished"),
             why="read from LLM.generate's results and the streamed round's steps"),
    VllmName("vllm.outputs", "CompletionOutput",
             parameters=("text", "token_ids", "logprobs", "finish_reason"),
             why="read from LLM.generate's results"),
    VllmName("vllm.logprobs", "Logprob", parameters=("logprob",),
             why="read from CompletionOutput.logprobs"),
    VllmName("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend.get_supported_head_sizes",
             imported_as=("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend",),
             why="a CPU engine refuses head sizes its attention lacks, before it starts"),
    # ---- inside vLLM's worker (rollout/vllm_worker.py, mixed in by worker_extension_cls) ----
    VllmName("vllm.v1.worker.gpu_worker", "Worker.reload_weights",
             forwards_to="vllm.v1.worker.gpu_model_runner:GPUModelRunner.reload_weights",
             parameters=("weights_iterator",),
             why="in-place weight reload (CPUWorker inherits it from Worker)"),
    VllmName("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.reload_weights",
             parameters=("weights_iterator",)),
    VllmName("vllm.v1.worker.gpu_worker", "Worker.model_runner", kind="attribute",
             value_type="vllm.v1.worker.gpu_model_runner:GPUModelRunner"),
    VllmName("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_model"),
    VllmName("vllm.model_executor.layers.linear", "LinearBase",
             imported_as=("vllm.model_executor.layers.linear.LinearBase",)),
    VllmName("vllm.model_executor.layers.linear", "UnquantizedLinearMethod.create_weights",
             parameters=("layer",),
             imported_as=("vllm.model_executor.layers.linear.UnquantizedLinearMethod",)),
    VllmName("vllm.model_executor.layers.linear",
             "UnquantizedLinearMethod.process_weights_after_loading", kind="reads",
             parameters=("_cpu_skip_gemm_dispatch",),
             why="the per-layer switch that keeps a CPU GEMM reading layer.weight"),
    VllmName("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding",
             imported_as=("vllm.model_executor.layers.vocab_parallel_embedding.VocabParallelEmbedding",)),
    VllmName("vllm.model_executor.layers.vocab_parallel_embedding",
             "UnquantizedEmbeddingMethod.process_weights_after_loading", parameters=("layer",),
             imported_as=("vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod",)),
    VllmName("vllm.model_executor.layers.utils", "cpu_unquantized_gemm", kind="reads",
             parameters=("cpu_linear",),
             why="the CPU GEMM calls layer.cpu_linear, which _InPlaceEmbeddingMethod sets"),
    VllmName("vllm.model_executor.layers.quantization", "register_quantization_config",
             imported_as=("vllm.model_executor.layers.quantization.register_quantization_config",)),
    VllmName("vllm.model_executor.layers.quantization.base_config", "QuantizationConfig",
             imported_as=("vllm.model_executor.layers.quantization.base_config.QuantizationConfig",)),
    *(VllmName("vllm.model_executor.layers.quantization.base_config", f"QuantizationConfig.{method}",
               parameters=parameters, why="overridden by SharedWeightsConfig")
      for method, parameters in (("get_name", ()), ("get_supported_act_dtypes", ()),
                                 ("get_min_capability", ()), ("get_config_filenames", ()),
                                 ("from_config", ("config",)),
                                 ("get_quant_method", ("layer", "prefix")))),
    # ---- environment variables the project sets ----
    *(VllmName("vllm.envs", name, kind="environment", why=why) for name, why in (
        ("VLLM_ENABLE_V1_MULTIPROCESSING", "engine core in its own process"),
        ("VLLM_WORKER_MULTIPROC_METHOD", "spawn: no inherited process groups"),
        ("VLLM_CPU_KVCACHE_SPACE", "rollout.cpu_kv_cache_gib"),
        ("VLLM_LOGGING_LEVEL", "rollout.engine.log_level"),
        ("VLLM_CACHE_ROOT", "compile caches on node-local disk, not $HOME"),
    )),
)


# Keywords whose values must be among a vLLM ``Literal``'s values (the key of a ``literal``
# entry): a misspelt mode is otherwise refused only when the engine starts.
LITERAL_KEYWORDS: dict[str, str] = {"logprobs_mode": "vllm.config.model:LogprobsMode"}


def by_key() -> dict[str, VllmName]:
    """The table keyed by ``module:qualname``."""
    return {name.key: name for name in VLLM_API}


def modules() -> list[str]:
    """The vLLM modules whose source the table refers to (also the forward targets')."""
    found = {name.module for name in VLLM_API}
    found |= {target.split(":")[0] for name in VLLM_API
              for target in (name.forwards_to, name.value_type) if target}
    found.add("vllm")  # the package's lazy re-exports (vllm.LLM, vllm.SamplingParams)
    return sorted(found)
