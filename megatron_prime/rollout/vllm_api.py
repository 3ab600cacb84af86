"""Every vLLM name megatron_prime relies on, as data: where vLLM defines it and which
parameter names the project passes or overrides.

Why a registry: the engine and the weight bridge call past vLLM's documented surface (the
weight-transfer engine base class and its layerwise reload, sleep levels
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
      ``callable``: a class, function or method (a method the class inherits: found in
        ``inherited_from``); ``parameters`` (the names the project passes
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
    # An inherited method: the "module:Class" that defines it, which the owner class
    # (``qualname``'s first part) must still list among its bases.
    inherited_from: str | None = None
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
    "enforce_eager", "weight_transfer_config", "logprobs_mode", "gpu_memory_utilization",
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
    # vLLM's RL weight-transfer API (LLM inherits it from RLOfflineMixin): one sync is
    # start, an update per bucket, finish with the policy version (rollout/engine.py).
    VllmName("vllm.config.weight_transfer", "WeightTransferConfig", parameters=("backend",),
             why="LLM(weight_transfer_config={'backend': 'megatron_prime'})"),
    *(VllmName("vllm.entrypoints.llm", f"LLM.{method}", parameters=parameters,
               inherited_from="vllm.entrypoints.rl.offline:RLOfflineMixin", why=why)
      for method, parameters, why in (
          ("init_weight_transfer_engine", (), "the handshake: mode, shared mode's layout file"),
          ("start_weight_update", (), "opens a sync"),
          ("update_weights", (), "one bucket"),
          ("finish_weight_update", ("weight_version",), "closes it; the bridge names the version"),
          ("get_weight_version", (), "what the engine holds"))),
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
    # ---- inside vLLM's processes (rollout/vllm_plugin.py, a vllm.general_plugins entry) ----
    VllmName("vllm.distributed.weight_transfer.factory", "WeightTransferEngineFactory.register_engine",
             imported_as=("vllm.distributed.weight_transfer.factory.WeightTransferEngineFactory",),
             why="adds the megatron_prime backend in every vLLM process"),
    *(VllmName("vllm.distributed.weight_transfer.base", name,
               imported_as=(f"vllm.distributed.weight_transfer.base.{name}",))
      for name in ("WeightTransferInitInfo", "WeightTransferUpdateInfo")),
    VllmName("vllm.distributed.weight_transfer.base", "WeightTransferEngine",
             parameters=("config", "vllm_config", "device", "model"),
             imported_as=("vllm.distributed.weight_transfer.base.WeightTransferEngine",),
             why="BridgeTransferEngine's base; the factory builds it with these"),
    *(VllmName("vllm.distributed.weight_transfer.base", f"WeightTransferEngine.{method}",
               parameters=parameters, why="overridden by BridgeTransferEngine")
      for method, parameters in (("init_transfer_engine", ("init_info",)),
                                 ("start_weight_update", ()), ("update_weights", ("update_info",)),
                                 ("receive_weights", ("update_info",)),
                                 ("finish_weight_update", ()), ("shutdown", ()),
                                 ("parse_update_info", ("update_dict",)))),
    *(VllmName("vllm.distributed.weight_transfer.base", f"WeightTransferEngine.{name}",
               kind="attribute", why="read by BridgeTransferEngine")
      for name in ("model", "model_config", "device", "parallel_config")),
    *(VllmName("vllm.model_executor.model_loader.reload.layerwise", name, parameters=parameters,
               imported_as=(f"vllm.model_executor.model_loader.reload.{name}",),
               why="one layerwise reload per sync, around the buckets' load_weights")
      for name, parameters in (("initialize_layerwise_reload", ("model",)),
                               ("finalize_layerwise_reload", ()))),
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
        ("VLLM_PLUGINS", "read: a list that leaves out megatron_prime is refused"),
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
              for target in (name.forwards_to, name.value_type, name.inherited_from) if target}
    found.add("vllm")  # the package's lazy re-exports (vllm.LLM, vllm.SamplingParams)
    return sorted(found)
