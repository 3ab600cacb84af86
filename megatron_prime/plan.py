"""Memory and layout planner for PRIME runs: does a run fit on these GPUs, and how to lay it out.

A PRIME step keeps four things on every GPU: the policy (trained), the implicit PRM (trained,
same architecture), the frozen reference, and a colocated vLLM engine (rollouts). This module
adds up, per GPU and per phase of the step, what each of them holds for every TP x PP x DP
layout of a cluster, says which layouts fit, and picks one. It is arithmetic only: nothing is
built and no GPU is needed (``megatron-prime-plan``, or ``python tools/plan.py``).

Units: sizes are printed in GB = 10^9 bytes. An "80GB" H100 is taken as 80e9 bytes
(``--gpu-memory-gb 80``); CUDA reports 79.6 GiB = 85.5e9 bytes on it, so this is conservative
by 5.5 GB, of which vLLM takes back its fraction (it sizes its share on the reported total:
0.3 x 5.5 = 1.6 GB more than shown). ``--reserved-gib`` (GiB = 2^30 bytes, default 3) is set
aside for what the trainer process holds outside PyTorch's allocator or cannot hand back; the
rest is the budget. That reserve, by its parts:

* the CUDA context of the trainer process: ~0.5 GiB with torch 2.x and CUDA's lazy module
  loading (the default since CUDA 11.7), plus cuBLAS workspaces;
* NCCL communicators, which keep their buffers for the life of the process group: 544-688 MB
  each measured through PyTorch on 4 NVLink A100s (NVIDIA/nccl issue 964), more on H100 with
  NVLink SHARP (NVIDIA's NeMo launcher sets NCCL_NVLS_ENABLE=0 to save it). A rank opens one
  per group it talks in: TP, DP, the pipeline neighbours, the model-parallel group of the
  grad norm; at TP=PP=1 only the DP and model-parallel ones;
* segments of PyTorch's caching allocator that still hold a live tensor beside freed blocks,
  which ``torch.cuda.empty_cache()`` cannot return.

tests/test_gpu_plan_memory.py measures the context and allocator part on a GPU
(benchmarks/gpu_check.sh). verl (rollout ``gpu_memory_utilization``, 0.5 in its PPO example
config, with ``free_cache_engine``) and slime (``--sglang-mem-fraction-static``) give the
engine a fixed fraction and offload the trainer's weights and optimizer state while it runs,
so what they must leave is little more than this reserve. This trainer releases its gradient
buffers and moves the optimizer state and frozen models to host memory during the rollout
(trainer.offload_during_rollout, models/offload.py; ``--no-offload-during-rollout`` plans a
run that keeps them), so the engine's fraction follows from the weights that stay (below).

Sources of the accounting (written from them, not copied):

* Megatron-LM's own estimate, ``megatron/training/theoretical_memory_usage.py``: parameter
  counts per layer (GQA attention + gated MLP + norms), the most loaded pipeline stage (first
  stage with the embedding, last stage with the output layer), bytes per parameter (18 = 2
  weight + 4 fp32 grad + 12 Adam; 6 + 12/DP with the distributed optimizer) and the pipeline's
  in-flight micro-batches (min(PP, micro-batches) on the first stage with 1F1B).
* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv:2205.05198), table 2: activations per layer as 34 s*b*h + 5 a*s^2*b bytes in 16-bit,
  sharded by t with tensor + sequence parallelism; selective recompute drops the s^2 terms.
  Redone here tensor by tensor for this repo's layers (RMSNorm, GQA, rotary embeddings,
  SwiGLU, no dropout) and checked against the tensors a real Megatron model saves for backward
  (tests/test_plan.py).

Phases of a step, each with its own peak; a layout fits when the largest is within budget:

* rollout: the vLLM engine holds ``gpu_memory_utilization x GPU memory`` (weights, overhead,
  KV cache; vLLM 0.32's ``request_memory`` takes that fraction of the reported total, per
  engine, and refuses to start when less is free) next to what the trainer keeps once it has
  released its memory with ``torch.cuda.empty_cache()``: activations, log-prob temporaries
  and cached free blocks are gone; the bf16 weights of policy and PRM and FP8 weight copies
  stay. The fp32 DDP grad buffers (released), the optimizer state (fp32 master copy and Adam
  moments, over DP with the distributed optimizer; to host memory) and the reference's (or a
  frozen PRM's) weights (to host memory) stay too when trainer.offload_during_rollout is off,
  the reference unless offloaded. The plan reports the host memory the offload pins and the
  largest ``gpu_memory_utilization`` that fits beside that resident state and the reserve,
  ``(GPU memory - reserve - trainer resident) / GPU memory`` rounded down to 0.01, and a
  configured fraction above it as the reason a layout does not fit. (On the card, vLLM's
  fraction of the larger reported total is matched by as much more memory: still fits.)
* reference forward: log-probs of the batch, forward-only (no saved activations; the peak is
  the vocab-parallel log-prob's temporaries on the last stage).
* PRM update, then policy update: training activations of that model on top of the state.

With vLLM's sleep mode the engine frees its weights and KV cache outside the rollout phase, so
the peak is the largest phase, not the sum; without it the engine is in every phase. An
offloaded reference or PRM (``--offload-*``) is assumed to be wholly on the GPU during its own
phase (reference forward; PRM update) and in host memory otherwise: the peak of its phase
includes all of its state. The trainer offloads the reference (trainer.offload_reference);
PRM offload is sized here only: the trainer keeps the PRM resident.

What is not modelled: CUDA graphs and kernels' private workspaces beyond the reserve,
allocator fragmentation beyond the reserve, the weight bridge's 512 MiB staging bucket, and
FP8 activations (counted as bf16, an over-estimate). Where a choice was needed the larger
number was taken.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.architectures import ModelShape, padded_vocab_size
from megatron_prime.rollout.collect import BatchConfig
from megatron_prime.rollout.engine import RolloutConfig, SamplingConfig
from megatron_prime.step_time import (
    ACCELERATORS,
    REFERENCE_STEP,
    REFERENCE_TOTAL,
    StepTime,
    StepTimeAssumptions,
    StepWork,
)
from megatron_prime.step_time import estimate as estimate_step_time
from megatron_prime.update import AlgoConfig

GB = 10**9
GIB = 2**30
COMMAND = "megatron-prime-plan"

# ---- models ----

_QWEN25 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064,
               tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1000000.0,
               rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False)

# HF config.json fields of the supported presets (Qwen2 always has q/k/v biases).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4},
    # Eurus-2-7B (PRIME's policy) is Qwen2.5-Math-7B: the 7B shape with a 4k context.
    "eurus-2-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0},
    # A PRM of its own size (model.prm_path) for the Eurus-2-7B policy: the Qwen2.5-Math family
    # shares one tokenizer; the 1.5B's 12 heads / 2 KV heads split at TP 1 or 2 only.
    "qwen2.5-math-1.5b": {**_QWEN25, "vocab_size": 151936, "tie_word_embeddings": True,
                          "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                          "num_attention_heads": 12, "num_key_value_heads": 2,
                          "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "qwen2.5-32b": {**_QWEN25, "hidden_size": 5120, "intermediate_size": 27648,
                    "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8},
    "qwen2.5-72b": {**_QWEN25, "hidden_size": 8192, "intermediate_size": 29568,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3.1-70b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192,
        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu", max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def load_hf_config(model: str, flag: str = "--model") -> Any:
    """A preset name or a config.json (file, or the folder holding it) as a transformers
    config, so that ``ModelShape.from_hf`` reads both the same way (``flag`` names it in
    errors)."""
    from transformers import AutoConfig

    if model in PRESETS:
        fields = dict(PRESETS[model])
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{flag}={model!r} is neither a preset nor a config.json: expected "
                             f"one of {sorted(PRESETS)} or the path of an HF config.json")
        fields = json.loads(path.read_text())
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{flag}={model!r}: config.json has no 'model_type'; expected e.g. "
                         "'qwen2' or 'llama'")
    return AutoConfig.for_model(model_type, **fields)


@functools.lru_cache(maxsize=16)
def _shape_of(model: str, flag: str) -> ModelShape:
    try:
        return ModelShape.from_hf(load_hf_config(model, flag))
    except (ValueError, KeyError, TypeError) as error:
        message = str(error)
        raise ValueError(message if message.startswith(flag) else f"{flag}={model!r}: {message}") from None


def prm_shape(shape: ModelShape, options: Options) -> ModelShape:
    """The PRM's and the reference's shape: ``options.prm_model`` (model.prm_path of another
    size), else the policy's ``shape``."""
    return shape if options.prm_model is None else _shape_of(options.prm_model, "--prm-model")


# ---- parameters ----

@dataclass(frozen=True)
class StageParams:
    """Parameters on one GPU: its TP shard of one pipeline stage, by kind."""

    num_layers: int
    # The layers' GEMM weights (q/k/v, output projection, fc1, fc2): sharded over TP, and what
    # Transformer Engine casts to FP8.
    layer_matrices: int
    # q/k/v bias shards (Qwen2) and the two RMSNorm weights per layer (replicated over TP).
    layer_vectors: int
    embedding: int
    output_layer: int
    final_norm: int

    @property
    def total(self) -> int:
        return (self.layer_matrices + self.layer_vectors + self.embedding + self.output_layer
                + self.final_norm)


def layer_params(shape: ModelShape, tp: int) -> tuple[int, int]:
    """(GEMM weights, vectors) of one transformer layer on one TP rank.

    Column-parallel q/k/v (rows: heads*d + 2*kv_heads*d) and fc1 (rows: 2*ffn, gate and up
    fused) are split by rows, row-parallel proj and fc2 by columns; RMSNorm weights are whole on
    every rank. Needs ``shape.check_layout`` to have passed (heads, KV heads, ffn divide TP).
    """
    h = shape.hidden_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_query_groups * shape.head_dim
    qkv_rows = (q + 2 * kv) // tp
    ffn = shape.ffn_hidden_size // tp
    matrices = qkv_rows * h + h * (q // tp) + 2 * ffn * h + h * ffn
    vectors = (qkv_rows if shape.add_qkv_bias else 0) + 2 * h
    return matrices, vectors


def stage_params(shape: ModelShape, tp: int, pp: int, stage: int,
                 vocab_size: int | None = None) -> StageParams:
    """Parameters on one GPU of pipeline stage ``stage`` (0-based) at TP=tp, PP=pp.

    The (padded) embedding sits on the first stage, the output layer and final norm on the
    last. Tied embeddings share one matrix when PP=1; with PP>1 Megatron keeps a copy of it on
    the last stage (grads summed across the two), so it counts on both. ``vocab_size``
    defaults to Megatron's padded vocabulary at this TP.
    """
    vocab = padded_vocab_size(shape.vocab_size, tp) if vocab_size is None else vocab_size
    layers = shape.num_layers // pp
    matrices, vectors = layer_params(shape, tp)
    first, last = stage == 0, stage == pp - 1
    embedding = vocab // tp * shape.hidden_size if first else 0
    has_output = last and (not shape.tie_word_embeddings or pp > 1)
    return StageParams(
        num_layers=layers,
        layer_matrices=layers * matrices,
        layer_vectors=layers * vectors,
        embedding=embedding,
        output_layer=vocab // tp * shape.hidden_size if has_output else 0,
        final_norm=shape.hidden_size if last else 0,
    )


def model_params(shape: ModelShape, vocab_size: int | None = None) -> int:
    """All parameters of the model at TP=1 (``vocab_size``: the HF vocabulary for the HF
    count; default: Megatron's vocabulary padded to a multiple of 128)."""
    return stage_params(shape, tp=1, pp=1, stage=0, vocab_size=vocab_size).total


# ---- bytes per parameter ----

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Megatron's DDP is built with grad_reduce_in_fp32=True (models/builder.py): one fp32 grad
# buffer, which is also the optimizer's main grad. The distributed optimizer reduce-scatters
# into it but keeps the whole buffer.
GRAD_BYTES = 4
# Adam's exp_avg and exp_avg_sq in fp32.
ADAM_MOMENT_BYTES = 8
# Transformer Engine's FP8 path keeps an FP8 copy of each GEMM weight next to the bf16 one.
FP8_WEIGHT_BYTES = 1


def optimizer_bytes_per_param(param_bytes: int) -> int:
    """Adam state per parameter: fp32 moments, plus an fp32 master copy when the model's own
    weights are 16-bit (Megatron's Float16 optimizer). float32 weights are their own master
    (the CPU case: 8 bytes, not 12)."""
    return ADAM_MOMENT_BYTES + (4 if param_bytes < 4 else 0)


def dtype_bytes(dtype: str, on_gpu: bool) -> int:
    """Bytes per weight of ``precision.dtype``; "auto" is bfloat16 on a GPU, float32 on CPU
    (as models/architectures resolves it)."""
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    return DTYPE_BYTES[dtype]


def train_state_bytes(trained: Sequence[ModelShape], param_bytes: int) -> int:
    """Bytes of one train-state checkpoint: each trained model's (``trained``: the policy's
    shape, and the PRM's when it trains) weights and its Adam state
    (``optimizer_bytes_per_param``); the frozen reference is not saved. Sizes the disk a
    checkpoint interval needs (megatron-prime-doctor) and its save time (the USR1 margin)."""
    per_param = param_bytes + optimizer_bytes_per_param(param_bytes)
    return sum(model_params(shape) for shape in trained) * per_param


# ---- activations ----

RSTD_BYTES = 4  # RMSNorm's saved 1/rms, one fp32 per token
INPUT_ID_BYTES = 8  # int64 token ids, saved by the embedding lookup


# The layer implementations the activation model knows (ActivationShape.attention).
ATTENTION_KINDS: tuple[str, ...] = ("flash", "sdpa", "unfused")


@dataclass(frozen=True)
class ActivationShape:
    """What sets the size of the activations of one micro-batch."""

    seq_length: int
    micro_batch_size: int
    tp: int
    sequence_parallel: bool
    # "flash": Transformer Engine's layers (GPU): flash attention, fused LayerNorm-linear, fused
    # SwiGLU. "unfused": Megatron's local layers with its own DotProductAttention: the s x s
    # softmax is stored and GQA's K/V are expanded to every head before the matmuls. "sdpa":
    # the local layers with torch's fused attention (the local spec's default, on CPU or a GPU
    # without TE; models/attention.py): norms and MLP as "unfused", attention as "flash".
    attention: str
    dtype_bytes: int

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch_size


def layer_activation_bytes(shape: ModelShape, act: ActivationShape,
                           checkpoint_core_attention: bool = False) -> int:
    """Bytes one transformer layer saves for its backward pass, for one micro-batch.

    Per token, e = bytes of the parameter dtype, h hidden, q = heads*d, kv = kv_heads*d,
    f = ffn (Korthikanti et al. table 2, redone for RMSNorm + GQA + RoPE + SwiGLU, dropout 0):

    * the two RMSNorms: input, output (the next linear's saved input) and fp32 1/rms: TE's
      fused LayerNorm-linear keeps (2h e + 4) each; torch's RMSNorm in the local layers (as run
      on CPU) keeps its input upcast to fp32 and the fp32 normalised input, (8h + 4 + h e).
      Whole on every TP rank unless sequence parallel.
    * attention, sharded over TP: post-RoPE q, k and v, and the core's output (linear_proj's
      input, q). Unfused with GQA: k and v are expanded copies (q each); otherwise v is a view
      of the fused qkv output, whose whole storage (q + 2kv) stays. Flash adds its fp32
      log-sum-exp (4 bytes per head); unfused adds the s x s softmax: fp32 output (4 bytes) and,
      for 16-bit weights, the probabilities cast back (e), per head and key position.
      Selective recompute keeps only the core's inputs (q, k, qkv storage).
    * SwiGLU MLP, sharded over TP: fc1's output (2f, gate and up), fc2's input (f); unfused adds
      silu(gate) and the up half copied by ``x + glu_linear_offset`` (2f more).
    * per layer, independent of the batch: RoPE's cos and sin for q and k (4 s d e).
    """
    h, d = shape.hidden_size, shape.head_dim
    q = shape.num_attention_heads * d
    kv = shape.num_query_groups * d
    f = shape.ffn_hidden_size
    e = act.dtype_bytes
    unfused = act.attention == "unfused"
    local_layers = act.attention in ("unfused", "sdpa")
    replicated = 2 * _norm_bytes_per_token(h, e, local_layers) / (act.tp if act.sequence_parallel else 1)

    expanded = unfused and not checkpoint_core_attention
    if expanded and shape.num_query_groups < shape.num_attention_heads:
        attention = q + q + q  # q, expanded k, expanded v
    else:
        attention = q + kv + (q + 2 * kv)  # q, k, the qkv storage behind v
    attention += q  # linear_proj's input
    mlp = (5 if local_layers else 3) * f
    sharded_bytes = (attention + mlp) * e
    if unfused and not checkpoint_core_attention:
        sharded_bytes += shape.num_attention_heads * act.seq_length * (4 + (e if e < 4 else 0))
    elif not unfused:
        sharded_bytes += shape.num_attention_heads * 4
    per_token = replicated + sharded_bytes / act.tp
    rope = 4 * act.seq_length * d * e
    return math.ceil(act.tokens * per_token) + rope


def _norm_bytes_per_token(hidden: int, dtype_bytes: int, local_layers: bool) -> int:
    """One RMSNorm and the following linear's saved input (the norm's output)."""
    if local_layers:
        return 8 * hidden + RSTD_BYTES + hidden * dtype_bytes  # fp32 input and x/rms
    return 2 * hidden * dtype_bytes + RSTD_BYTES


def logits_bytes_per_element(dtype_bytes: int) -> tuple[int, int, int]:
    """(saved, forward peak, backward peak) bytes per element of this rank's
    [tokens, vocab/TP] logits slice in the vocab-parallel log-prob (models/logprobs.py).

    Saved: the fp32 probabilities. Forward peak: the logits (e), their fp32 copy (none when e is
    already 4), the shifted logits, the probabilities, p * shifted and its masked copy (4 each).
    Backward peak: probabilities, gradient, log p, two products and their product (4 each).
    """
    forward = dtype_bytes + (4 if dtype_bytes < 4 else 0) + 4 * 4
    return 4, forward, 6 * 4


@dataclass(frozen=True)
class StageActivations:
    """Activation memory of one pipeline stage of a trained model, per GPU."""

    stored_per_microbatch: int  # saved for backward by one micro-batch
    in_flight: int  # micro-batches whose activations are held at once (1F1B)
    working: int  # transient on top: recomputed layers, or the log-prob's temporaries
    forward_only: int  # peak of a forward-only (no-grad) pass, e.g. reference log-probs

    @property
    def training_peak(self) -> int:
        return self.in_flight * self.stored_per_microbatch + self.working


def stage_activations(shape: ModelShape, act: ActivationShape, recompute: str,
                      recompute_num_layers: int | None, num_layers: int, first: bool, last: bool,
                      in_flight: int, padded_vocab: int) -> StageActivations:
    """Activations of a stage holding ``num_layers`` layers (and the embedding / the output
    layer when ``first`` / ``last``).

    Recompute as in architectures._recompute_kwargs: "selective" checkpoints each layer's core
    attention; "full" uses Megatron's "uniform" method with groups of ``recompute_num_layers``
    layers (None: 1, as the trainer does): only each group's input is stored, and the
    backward re-runs one group at a time, so one group's full activations are the working set.
    """
    sp_div = act.tp if act.sequence_parallel else 1
    layer = layer_activation_bytes(shape, act)
    if recompute == "full":
        group = recompute_num_layers or 1  # as architectures._recompute_kwargs
        stored = math.ceil(num_layers / group) * math.ceil(act.tokens * shape.hidden_size
                                                           * act.dtype_bytes / sp_div)
        working = min(group, num_layers) * layer
        # Each checkpoint also saves the rotary table [s, 1, 1, d] (fp32, one storage).
        stored += act.seq_length * shape.head_dim * 4
    elif recompute == "selective":
        checkpointed = layer_activation_bytes(shape, act, checkpoint_core_attention=True)
        stored = num_layers * checkpointed
        working = layer - checkpointed  # one layer's core attention, re-run in its backward
    else:
        stored, working = num_layers * layer, 0
    # The attention mask (bool, s x s) is built once per micro-batch and saved by the softmax;
    # SDPA gets none for the trainer's right-padded rows (it masks causally in the kernel).
    if act.attention != "sdpa":
        stored += act.seq_length ** 2
    forward_only = layer
    if first:
        stored += act.tokens * INPUT_ID_BYTES
    if last:
        # Final norm as in the layers, plus the output layer's input (the norm's output).
        stored += math.ceil(act.tokens * _norm_bytes_per_token(
            shape.hidden_size, act.dtype_bytes, act.attention in ("unfused", "sdpa")) / sp_div)
        elements = act.tokens * (padded_vocab // act.tp)
        saved, forward_peak, backward_peak = logits_bytes_per_element(act.dtype_bytes)
        stored += elements * saved
        working = max(working, elements * (max(forward_peak, backward_peak) - saved))
        forward_only = max(forward_only, elements * forward_peak)
    return StageActivations(stored, in_flight, working, forward_only)


# ---- inputs ----

@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # decimal GB: H100 80GB = 80e9 bytes
    reserved_gib: float = 3.0  # CUDA context, NCCL, fragmentation

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_bytes(self) -> int:
        return round(self.gpu_memory_gb * GB)

    @property
    def budget_bytes(self) -> int:
        return self.gpu_bytes - round(self.reserved_gib * GIB)


@dataclass(frozen=True)
class Workload:
    """One PRIME step; defaults are the trainer's config defaults."""

    prompt_tokens: int = 1024
    response_tokens: int = SamplingConfig().max_new_tokens
    micro_batch_size: int = AlgoConfig().micro_batch_size
    samples_per_prompt: int = SamplingConfig().n
    prompts_per_step: int = BatchConfig().prompts_per_step  # trained, after the accuracy filter
    oversample_factor: int = BatchConfig().oversample_factor  # prompts generated per trained one
    ppo_mini_batches: int = AlgoConfig().ppo_mini_batches

    @property
    def seq_length(self) -> int:
        return self.prompt_tokens + self.response_tokens


@dataclass(frozen=True)
class Options:
    """Memory-relevant settings, named after the trainer's config keys where one exists."""

    distributed_optimizer: bool = OptimizerConfig().use_distributed_optimizer
    recompute: str = ParallelConfig().recompute_granularity  # parallel.recompute_granularity
    recompute_num_layers: int | None = ParallelConfig().recompute_num_layers
    sequence_parallel: bool = ParallelConfig().sequence_parallel  # used where TP > 1
    attention: str = "flash"
    param_dtype: str = "bfloat16"
    policy_fp8: bool = False
    prm_fp8: bool = False  # forward and PRM update in FP8
    reference_fp8: bool = False  # forward only
    offload_reference: bool = False
    offload_prm: bool = False
    # trainer.offload_during_rollout (on by default): grads released, optimizer state and
    # frozen models in host memory while the engine is awake.
    offload_during_rollout: bool = True
    with_prm: bool = True  # algo.prm_mode != "outcome_only": a PRM scores the batch
    # rollout.engine.engines_per_replica; None: one engine per vLLM-TP GPUs of a replica (the
    # trainer's GPU default: every GPU hosts a vLLM worker).
    engines_per_replica: int | None = None
    # model.prm_path of another size (a preset or config.json, as --model): the PRM's and the
    # reference's shape. None: the policy's.
    prm_model: str | None = None
    # algo.prm_mode before/after: the PRM has gradients, Adam state and an update phase;
    # frozen: its weights only, like the reference.
    prm_trains: bool = True
    vllm_memory_fraction: float = RolloutConfig().gpu_memory_utilization
    vllm_tensor_parallel_size: int = RolloutConfig().tensor_parallel_size
    vllm_sleep_mode: bool = RolloutConfig().enable_sleep_mode
    # Inside the engine's share: profile-run activations, sampler logits, CUDA graphs, its own
    # CUDA context (the engine is a separate process).
    vllm_overhead_gib: float = 2.0
    # Left on the GPU while the engine sleeps (level 1 frees weights and KV cache only): its
    # CUDA context and graph pool.
    vllm_asleep_gib: float = 1.0
    # KV cache must hold this many full-length sequences at once (None: one prompt's samples).
    vllm_min_sequences: int | None = None

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]


def validate(shape: ModelShape, cluster: Cluster, work: Workload, options: Options) -> None:
    """User errors name the flag, the value and what is allowed."""
    for name, value in [("--nodes", cluster.nodes), ("--gpus-per-node", cluster.gpus_per_node),
                        ("--prompt-tokens", work.prompt_tokens),
                        ("--response-tokens", work.response_tokens),
                        ("--micro-batch-size", work.micro_batch_size),
                        ("--samples-per-prompt", work.samples_per_prompt),
                        ("--prompts-per-step", work.prompts_per_step),
                        ("--oversample-factor", work.oversample_factor),
                        ("--ppo-mini-batches", work.ppo_mini_batches),
                        ("--vllm-tensor-parallel-size", options.vllm_tensor_parallel_size),
                        ("--engines-per-replica", options.engines_per_replica or 1)]:
        if value < 1:
            raise ValueError(f"{name}={value} is invalid: expected an integer >= 1")
    checks = [
        (cluster.gpu_memory_gb > 0, "--gpu-memory-gb", cluster.gpu_memory_gb, "> 0"),
        (0 <= cluster.reserved_gib * GIB < cluster.gpu_bytes, "--reserved-gib",
         cluster.reserved_gib, "at least 0 and below the GPU memory"),
        (options.recompute in ("none", "selective", "full"), "--recompute", options.recompute,
         "one of ['none', 'selective', 'full']"),
        (options.recompute_num_layers is None or options.recompute == "full",
         "--recompute-num-layers", options.recompute_num_layers, "unset unless --recompute full"),
        (options.recompute_num_layers is None or options.recompute_num_layers >= 1,
         "--recompute-num-layers", options.recompute_num_layers, "an integer >= 1"),
        (options.attention in ATTENTION_KINDS, "--attention", options.attention,
         f"one of {list(ATTENTION_KINDS)}"),
        (options.param_dtype in DTYPE_BYTES, "--param-dtype", options.param_dtype,
         f"one of {sorted(DTYPE_BYTES)}"),
        (0 < options.vllm_memory_fraction <= 1, "--vllm-memory-fraction",
         options.vllm_memory_fraction, "in (0, 1]"),
        (cluster.gpus_per_node % options.vllm_tensor_parallel_size == 0,
         "--vllm-tensor-parallel-size", options.vllm_tensor_parallel_size,
         f"a divisor of --gpus-per-node={cluster.gpus_per_node} (one engine stays in a node)"),
        (shape.num_attention_heads % options.vllm_tensor_parallel_size == 0,
         "--vllm-tensor-parallel-size", options.vllm_tensor_parallel_size,
         f"a divisor of num_attention_heads={shape.num_attention_heads} (vLLM's requirement)"),
        (work.seq_length <= shape.max_position_embeddings, "--prompt-tokens + --response-tokens",
         work.seq_length, f"<= the model's max_position_embeddings={shape.max_position_embeddings}"),
        (options.vllm_min_sequences is None or options.vllm_min_sequences >= 1,
         "--vllm-min-sequences", options.vllm_min_sequences, "an integer >= 1"),
    ]
    if options.with_prm:
        scorer = prm_shape(shape, options)
        checks.append((work.seq_length <= scorer.max_position_embeddings,
                       "--prompt-tokens + --response-tokens", work.seq_length,
                       f"<= the PRM's max_position_embeddings={scorer.max_position_embeddings} "
                       f"(--prm-model={options.prm_model})"))
    for ok, name, value, allowed in checks:
        if not ok:
            raise ValueError(f"{name}={value} is invalid: expected {allowed}")


# ---- one layout ----

@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp}"


PHASES = ("rollout", "reference forward", "PRM update", "policy update")


@dataclass
class VllmPlan:
    """One GPU's share of a vLLM engine (``engines`` of them in the job: engines per replica
    x DP, distributed.engine_slot)."""

    engine_bytes: int
    weight_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    sequence_tokens: int  # prompt + response, rounded up to vLLM's 16-token blocks
    concurrent_sequences: int
    min_sequences: int
    rollouts_per_engine: int  # per rollout round
    waves: int  # rounds of concurrent sequences the engine runs per rollout round
    engines: int = 1


@dataclass
class LayoutPlan:
    layout: Layout
    stage: str  # the worst stage: "first", "last" or "only" (PP=1)
    params_per_gpu: int
    num_microbatches: int  # per optimizer step per DP rank
    pipeline_bubble: float
    # component -> phase -> bytes on one GPU of the worst stage (absent: not on the GPU)
    components: dict[str, dict[str, int]]
    phase_totals: dict[str, int]
    peak_phase: str
    peak_bytes: int
    budget_bytes: int
    vllm: VllmPlan
    problem: str | None  # why it does not fit; None when it fits
    largest_component: str  # in the peak phase
    shortfall_bytes: int  # how far from fitting (0 when it fits)
    # What the trainer keeps on the GPU beside the engine (the rollout phase; every phase
    # without sleep mode), at the stage that keeps most, after torch.cuda.empty_cache().
    trainer_resident_bytes: int = 0
    # The largest vLLM gpu_memory_utilization that fits beside it and the reserve.
    max_vllm_memory_fraction: float = 0.0
    # Pinned host memory per GPU that the rollout offload copies the optimizer state and the
    # frozen models' weights into (the grad buffers are released, not copied).
    rollout_host_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.problem is None

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.peak_bytes


def vllm_weight_params(shape: ModelShape, vtp: int) -> int:
    """Parameters on one GPU of a vLLM engine at tensor-parallel size ``vtp``: the HF tensors
    sharded like Megatron's, except that KV heads are replicated when vtp exceeds them and
    the vocabulary is padded to 64 per rank."""
    h, d = shape.hidden_size, shape.head_dim
    q = shape.num_attention_heads * d // vtp
    kv = max(1, shape.num_query_groups // vtp) * d
    ffn = math.ceil(shape.ffn_hidden_size / vtp)
    layer = h * (q + 2 * kv) + q * h + 3 * h * ffn + 2 * h
    layer += (q + 2 * kv) if shape.add_qkv_bias else 0
    vocab = math.ceil(shape.vocab_size / (64 * vtp)) * 64
    vocab_matrices = 1 if shape.tie_word_embeddings else 2
    return shape.num_layers * layer + vocab_matrices * vocab * h + h


def vllm_plan(shape: ModelShape, cluster: Cluster, work: Workload, options: Options,
              engines: int) -> VllmPlan:
    """The engine gets ``fraction x GPU memory`` on each of its GPUs: bf16 weights / vLLM TP,
    the overhead, and the rest as KV cache of 2 (K, V) x layers x KV heads x d x e bytes per
    token / vLLM TP (KV heads are replicated when vLLM TP exceeds them)."""
    vtp = options.vllm_tensor_parallel_size
    e = options.param_bytes
    engine = round(options.vllm_memory_fraction * cluster.gpu_bytes)
    weights = vllm_weight_params(shape, vtp) * e
    overhead = round(options.vllm_overhead_gib * GIB)
    kv_cache = max(0, engine - weights - overhead)  # none when the weights do not fit
    kv_heads = max(1, shape.num_query_groups // vtp)
    per_token = 2 * shape.num_layers * kv_heads * shape.head_dim * e
    sequence_tokens = math.ceil(work.seq_length / 16) * 16
    concurrent = kv_cache // (per_token * sequence_tokens)
    rollouts = math.ceil(work.prompts_per_step * work.oversample_factor * work.samples_per_prompt
                         / max(engines, 1))
    return VllmPlan(
        engine_bytes=engine, weight_bytes=weights, overhead_bytes=overhead,
        kv_cache_bytes=kv_cache, kv_bytes_per_token=per_token, sequence_tokens=sequence_tokens,
        concurrent_sequences=concurrent,
        min_sequences=options.vllm_min_sequences or work.samples_per_prompt,
        rollouts_per_engine=rollouts, engines=engines,
        waves=math.ceil(rollouts / concurrent) if concurrent else 0,
    )


def _trained_state(prefix: str, params: StageParams, fp8: bool, options: Options,
                   dp: int) -> dict[str, int]:
    e = options.param_bytes
    optimizer = params.total * optimizer_bytes_per_param(e)
    if options.distributed_optimizer:
        optimizer = math.ceil(optimizer / dp)
    state = {f"{prefix} weights": params.total * e}
    if fp8:
        state[f"{prefix} FP8 weight copy"] = params.layer_matrices * FP8_WEIGHT_BYTES
    state[f"{prefix} grads (fp32)"] = params.total * GRAD_BYTES
    state[f"{prefix} optimizer"] = optimizer
    return state


def _stage_components(shape: ModelShape, work: Workload, options: Options,
                      layout: Layout, stage: int, num_microbatches: int,
                      vllm: VllmPlan) -> dict[str, dict[str, int]]:
    """component -> phase -> bytes for one stage; a phase is absent where the component is
    not on the GPU (an offloaded model outside its phase, a sleeping engine)."""
    tp, pp = layout.tp, layout.pp
    params = stage_params(shape, tp, pp, stage)
    act_shape = ActivationShape(work.seq_length, work.micro_batch_size, tp,
                                options.sequence_parallel and tp > 1, options.attention,
                                options.param_bytes)
    # 1F1B: stage i holds the activations of min(PP - i, micro-batches) micro-batches.
    in_flight = min(pp - stage, num_microbatches)
    acts = stage_activations(shape, act_shape, options.recompute, options.recompute_num_layers,
                             params.num_layers, stage == 0, stage == pp - 1, in_flight,
                             padded_vocab_size(shape.vocab_size, tp))

    # The PRM and the reference: the policy's shape unless model.prm_path is another size.
    scorer = prm_shape(shape, options)
    if scorer is shape:
        scorer_params, scorer_acts = params, acts
    else:
        scorer_params = stage_params(scorer, tp, pp, stage)
        scorer_acts = stage_activations(scorer, act_shape, options.recompute,
                                        options.recompute_num_layers, scorer_params.num_layers,
                                        stage == 0, stage == pp - 1, in_flight,
                                        padded_vocab_size(scorer.vocab_size, tp))
    everywhere = set(PHASES)
    components: dict[str, dict[str, int]] = {}

    def put(name: str, nbytes: int, phases: set[str]) -> None:
        if nbytes:
            components[name] = {phase: nbytes for phase in PHASES if phase in phases}

    # What models/offload.py takes off the GPU while the engine is awake.
    off_in_rollout = everywhere - {"rollout"} if options.offload_during_rollout else everywhere

    def trained_phases(name: str, phases: set[str]) -> set[str]:
        return phases & off_in_rollout if name.endswith(("grads (fp32)", "optimizer")) else phases

    for name, nbytes in _trained_state("policy", params, options.policy_fp8, options,
                                       layout.dp).items():
        put(name, nbytes, trained_phases(name, everywhere))
    put("policy activations", acts.training_peak, {"policy update"})
    if options.with_prm and options.prm_trains:
        prm_phases = {"PRM update"} if options.offload_prm else everywhere
        for name, nbytes in _trained_state("PRM", scorer_params, options.prm_fp8, options,
                                           layout.dp).items():
            put(name, nbytes, trained_phases(name, prm_phases))
        put("PRM activations", scorer_acts.training_peak, {"PRM update"})
    elif options.with_prm:  # frozen: forward only, its weights stay on the GPU
        put("PRM weights (frozen)", scorer_params.total * options.param_bytes, off_in_rollout)
        if options.prm_fp8:
            put("PRM FP8 weight copy", scorer_params.layer_matrices * FP8_WEIGHT_BYTES, everywhere)
    if options.with_prm:  # outcome-only RLOO builds no reference
        ref_phases = {"reference forward"} if options.offload_reference else everywhere
        put("reference weights", scorer_params.total * options.param_bytes,
            ref_phases & off_in_rollout)
        if options.reference_fp8:
            put("reference FP8 weight copy", scorer_params.layer_matrices * FP8_WEIGHT_BYTES,
                ref_phases)
    # The old-policy and the reference forward passes, one at a time.
    put("forward working set", max(acts.forward_only, scorer_acts.forward_only if options.with_prm else 0),
        {"reference forward"})
    # The engine never takes more than its share: vLLM refuses to start when its weights and
    # overhead do not leave room for the KV cache (reported as a problem of the layout).
    engine_phases = {"rollout"} if options.vllm_sleep_mode else everywhere
    weights = min(vllm.weight_bytes, vllm.engine_bytes)
    overhead = min(vllm.overhead_bytes, vllm.engine_bytes - weights)
    put("vLLM weights", weights, engine_phases)
    put("vLLM overhead", overhead, engine_phases)
    put("vLLM KV cache", vllm.engine_bytes - weights - overhead, engine_phases)
    if options.vllm_sleep_mode:
        put("vLLM asleep", round(options.vllm_asleep_gib * GIB), everywhere - {"rollout"})
    return components


def plan_layout(shape: ModelShape, cluster: Cluster, work: Workload, options: Options,
                layout: Layout) -> LayoutPlan:
    """Per-GPU memory of each phase at the worst pipeline stage (first or last), and whether
    it fits. Middle stages hold fewer in-flight micro-batches than the first and no embedding
    or output layer, so they are never the worst."""
    rollouts_per_rank = work.prompts_per_step * work.samples_per_prompt // layout.dp
    num_microbatches = max(1, math.ceil(rollouts_per_rank / work.ppo_mini_batches
                                        / work.micro_batch_size))
    per_replica = engines_per_replica(layout, options)
    vllm = vllm_plan(shape, cluster, work, options, per_replica * layout.dp)
    candidates = []
    resident = host = 0
    for stage in sorted({0, layout.pp - 1}):
        components = _stage_components(shape, work, options, layout, stage, num_microbatches,
                                       vllm)
        totals = {phase: sum(c.get(phase, 0) for c in components.values()) for phase in PHASES
                  if (options.with_prm and options.prm_trains) or phase != "PRM update"}
        peak_phase = max(totals, key=lambda phase: totals[phase])
        candidates.append((totals[peak_phase], stage, components, totals, peak_phase))
        resident = max(resident, trainer_resident_bytes(components, options))
        host = max(host, rollout_host_bytes(components, options))
    peak, stage, components, totals, peak_phase = max(candidates, key=lambda c: (c[0], -c[1]))
    stage_name = "only" if layout.pp == 1 else ("first" if stage == 0 else "last")
    budget = cluster.budget_bytes
    largest, largest_bytes = _largest_component(components, peak_phase)
    max_fraction = max_vllm_memory_fraction(cluster, resident)
    problem, shortfall = None, 0
    if peak > budget:
        problem = (f"over by {_gb(peak - budget)} GB in the {peak_phase} phase; largest: "
                   f"{largest} {_gb(largest_bytes)} GB")
        shortfall = peak - budget
        # Name the engine's share when a smaller one alone would let the trainer's resident
        # state and the engine fit together.
        engine_phases = ("rollout",) if options.vllm_sleep_mode else tuple(totals)
        if any(totals[phase] > budget for phase in engine_phases if phase in totals) \
                and 0 < max_fraction < options.vllm_memory_fraction:
            problem += (f"; vLLM gpu_memory_utilization {options.vllm_memory_fraction:g} > "
                        f"{max_fraction:.2f}, the most that fits beside the trainer's "
                        f"{_gb(resident)} GB")
    if vllm.weight_bytes + vllm.overhead_bytes >= vllm.engine_bytes:
        vllm_problem = (f"vLLM weights {_gb(vllm.weight_bytes)} GB + overhead "
                        f"{_gb(vllm.overhead_bytes)} GB per GPU leave no KV cache in its share "
                        f"{_gb(vllm.engine_bytes)} GB")
        problem = vllm_problem if problem is None else f"{problem}; {vllm_problem}"
        shortfall += vllm.weight_bytes + vllm.overhead_bytes - vllm.engine_bytes \
            + vllm.min_sequences * vllm.kv_bytes_per_token * vllm.sequence_tokens
    elif vllm.concurrent_sequences < vllm.min_sequences:
        missing = (vllm.min_sequences - vllm.concurrent_sequences) * vllm.kv_bytes_per_token \
            * vllm.sequence_tokens
        vllm_problem = (f"vLLM KV cache holds {vllm.concurrent_sequences} sequences of "
                        f"{vllm.sequence_tokens} tokens; needs {vllm.min_sequences}")
        problem = vllm_problem if problem is None else f"{problem}; {vllm_problem}"
        shortfall += missing
    # The trainer refuses these too (distributed.engine_slot).
    engine_problem = engine_placement_problem(layout, cluster.gpus_per_node, per_replica,
                                              options.vllm_tensor_parallel_size)
    if engine_problem is not None:
        problem = engine_problem if problem is None else f"{problem}; {engine_problem}"
        shortfall = max(shortfall, 1)
    if work.prompts_per_step % layout.dp:
        problem = (f"prompts per step {work.prompts_per_step} is not a multiple of DP="
                   f"{layout.dp} (rollout.batch.prompts_per_step)")
        shortfall = max(shortfall, 1)
    return LayoutPlan(
        layout=layout, stage=stage_name,
        params_per_gpu=stage_params(shape, layout.tp, layout.pp, stage).total,
        num_microbatches=num_microbatches,
        pipeline_bubble=(layout.pp - 1) / (num_microbatches + layout.pp - 1),
        components=components, phase_totals=totals, peak_phase=peak_phase, peak_bytes=peak,
        budget_bytes=budget, vllm=vllm, problem=problem, largest_component=largest,
        shortfall_bytes=shortfall, trainer_resident_bytes=resident,
        max_vllm_memory_fraction=max_fraction, rollout_host_bytes=host,
    )


def rollout_host_bytes(components: dict[str, dict[str, int]], options: Options) -> int:
    """Host memory per GPU the rollout offload copies into: the optimizer states and the frozen
    weights that are on the GPU in some phase but not in the rollout (an offloaded reference
    lives in host memory anyway and is not counted twice)."""
    if not options.offload_during_rollout:
        return 0
    copied = ("optimizer", "reference weights", "PRM weights (frozen)")
    return sum(max(by_phase.values()) for name, by_phase in components.items()
               if name.endswith(copied) and by_phase and "rollout" not in by_phase
               and not (name == "reference weights" and options.offload_reference))


def trainer_resident_bytes(components: dict[str, dict[str, int]], options: Options) -> int:
    """What the trainer holds on one GPU while the engine is awake: the non-vLLM components
    of the rollout phase (with sleep mode; otherwise of the fullest phase, since the engine
    never leaves). Activations and working sets belong to other phases, so this is the state
    that survives ``torch.cuda.empty_cache()``: weights, fp32 grad buffers, optimizer state,
    the reference's weights, FP8 weight copies, minus whatever is offloaded then."""
    phases = ("rollout",) if options.vllm_sleep_mode else PHASES
    return max(sum(by_phase.get(phase, 0) for name, by_phase in components.items()
                   if not name.startswith("vLLM")) for phase in phases)


def max_vllm_memory_fraction(cluster: Cluster, resident_bytes: int) -> float:
    """The largest ``gpu_memory_utilization`` (to 0.01, rounded down) whose share fits in
    the GPU beside the trainer's resident bytes and the reserve; 0.0 when nothing does."""
    free = cluster.budget_bytes - resident_bytes
    return max(0, math.floor(free * 100 / cluster.gpu_bytes)) / 100


def _largest_component(components: dict[str, dict[str, int]], phase: str) -> tuple[str, int]:
    """The biggest component in ``phase``; the engine's parts count as one, "vLLM engine",
    since its share is one setting (gpu_memory_utilization)."""
    merged: dict[str, int] = {}
    for name, by_phase in components.items():
        if phase in by_phase:
            key = "vLLM engine" if name.startswith("vLLM") else name
            merged[key] = merged.get(key, 0) + by_phase[phase]
    name = max(merged, key=lambda key: merged[key])
    return name, merged[name]


def engines_per_replica(layout: Layout, options: Options) -> int:
    """rollout.engine.engines_per_replica, or its GPU default: one engine per vLLM-TP GPUs
    of the replica (0 when the replica has fewer GPUs than one engine needs)."""
    return options.engines_per_replica or (layout.tp * layout.pp // options.vllm_tensor_parallel_size)


def engine_placement_problem(layout: Layout, gpus_per_node: int, per_replica: int,
                             vtp: int) -> str | None:
    """Why the replicas' engines cannot be placed (None: they can), as
    distributed.engine_slot places them: the replica's ranks cut into ``per_replica`` equal
    chunks, each engine on its chunk's first ``vtp`` GPUs, which must share a node. Megatron
    orders ranks TP fastest, then DP, then PP: replica d's stage s holds ranks s*TP*DP + d*TP
    .. + TP - 1."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    size = tp * pp
    if per_replica < 1:
        return (f"vLLM TP {vtp} needs {vtp} GPUs of one replica per engine; this layout's "
                f"replica has {size}")
    if size % per_replica:
        return f"{per_replica} engines per replica do not split a replica's {size} GPUs evenly"
    chunk = size // per_replica
    if vtp > chunk:
        return (f"vLLM TP {vtp} needs {vtp} GPUs per engine; {per_replica} engines per replica "
                f"get {chunk} each")
    for d in range(dp):
        replica = [s * tp * dp + d * tp + t for s in range(pp) for t in range(tp)]
        for k in range(per_replica):
            members = replica[k * chunk:k * chunk + vtp]
            if len({rank // gpus_per_node for rank in members}) > 1:
                return (f"an engine's {vtp} GPUs would span nodes (ranks {members[0]}.."
                        f"{members[-1]} of replica {d}); vLLM TP must stay within a node")
    return None


def candidate_layouts(shape: ModelShape, cluster: Cluster,
                      also: Sequence[ModelShape] = ()) -> list[Layout]:
    """Every TP that divides the GPUs of a node and the model's heads, KV heads and ffn (TP
    stays inside a node), with every PP that divides the layers and leaves a whole DP. The
    models in ``also`` (a PRM of its own size) share the layout and must split under it too."""
    shapes = [shape, *also]
    layouts = []
    for tp in range(1, cluster.gpus_per_node + 1):
        if cluster.gpus_per_node % tp or any(
                m.num_attention_heads % tp or m.num_query_groups % tp or m.ffn_hidden_size % tp
                for m in shapes):
            continue
        for pp in range(1, shape.num_layers + 1):
            if all(m.num_layers % pp == 0 for m in shapes) and cluster.world_size % (tp * pp) == 0:
                layouts.append(Layout(tp, pp, cluster.world_size // (tp * pp)))
    return layouts


def rank_key(plan: LayoutPlan) -> tuple:
    """Preference among fitting layouts: the smallest TP x PP (more DP replicas: more vLLM
    engines, more optimizer sharding, less model-parallel traffic), then the smaller PP (TP
    stays on NVLink inside a node; PP adds a bubble of (PP-1)/(m+PP-1)), then more headroom."""
    return (plan.layout.tp * plan.layout.pp, plan.layout.pp, -plan.headroom_bytes)


# ---- the whole plan ----

@dataclass
class Plan:
    model: str
    shape: ModelShape
    cluster: Cluster
    workload: Workload
    options: Options
    layouts: list[LayoutPlan]
    best: LayoutPlan | None
    closest: LayoutPlan | None  # the layout nearest to fitting, when none fits
    # When none fits: single changes that make one fit -> the layout they would pick.
    remedies: list[tuple[str, LayoutPlan]] = field(default_factory=list)
    # The best layout's estimated step time (step_time.py) and what it assumed.
    step_time: StepTime | None = None
    step_assumptions: StepTimeAssumptions = field(default_factory=StepTimeAssumptions)


def plan_run(model: str, cluster: Cluster, work: Workload, options: Options,
             suggest: bool = True, step_assumptions: StepTimeAssumptions | None = None) -> Plan:
    """Every layout of ``cluster`` for ``model`` (a preset or a config.json path)."""
    shape = ModelShape.from_hf(load_hf_config(model))
    return plan_for_shape(model, shape, cluster, work, options, suggest, step_assumptions)


def step_work(shape: ModelShape, cluster: Cluster, work: Workload, options: Options,
              p: LayoutPlan) -> StepWork:
    """What one step of layout ``p`` computes, for step_time.estimate."""
    scorer = prm_shape(shape, options)
    return StepWork(
        params=model_params(shape), num_layers=shape.num_layers,
        q_dim=shape.num_attention_heads * shape.head_dim,
        prm_params=model_params(scorer), prm_num_layers=scorer.num_layers,
        prm_q_dim=scorer.num_attention_heads * scorer.head_dim,
        prompts_per_step=work.prompts_per_step, oversample_factor=work.oversample_factor,
        samples_per_prompt=work.samples_per_prompt, prompt_tokens=work.prompt_tokens,
        response_tokens=work.response_tokens, world_size=cluster.world_size,
        engines=p.vllm.engines, engine_gpus=options.vllm_tensor_parallel_size,
        engine_weight_bytes_per_gpu=p.vllm.weight_bytes,
        kv_bytes_per_token_per_gpu=p.vllm.kv_bytes_per_token,
        kv_sequences=p.vllm.concurrent_sequences, pipeline_bubble=p.pipeline_bubble,
        recompute_full=options.recompute == "full",
        skips_old_logprob_pass=work.ppo_mini_batches == 1,
        prm_trains=options.prm_trains, with_prm=options.with_prm,
        host_bytes_per_gpu=p.rollout_host_bytes)


def plan_for_shape(model: str, shape: ModelShape, cluster: Cluster, work: Workload,
                   options: Options, suggest: bool = True,
                   step_assumptions: StepTimeAssumptions | None = None) -> Plan:
    step_assumptions = step_assumptions or StepTimeAssumptions()
    step_assumptions.validate()
    validate(shape, cluster, work, options)
    scorer = prm_shape(shape, options)
    also = [scorer] if options.with_prm and scorer is not shape else []
    layouts = [plan_layout(shape, cluster, work, options, layout)
               for layout in candidate_layouts(shape, cluster, also)]
    if not layouts:
        models = "this model" + (f" and --prm-model={options.prm_model}" if also else "")
        raise ValueError(f"no TP x PP layout of {cluster.world_size} GPUs splits {models}: TP "
                         f"must divide --gpus-per-node={cluster.gpus_per_node} and the heads, "
                         f"PP the layers ({', '.join(str(m.num_layers) for m in [shape, *also])})")
    fitting = sorted((p for p in layouts if p.fits), key=rank_key)
    best = fitting[0] if fitting else None
    closest = None if best else min(layouts, key=lambda p: (p.shortfall_bytes, rank_key(p)))
    result = Plan(model, shape, cluster, work, options, layouts, best, closest,
                  step_assumptions=step_assumptions)
    if best is not None and best.vllm.concurrent_sequences > 0:
        result.step_time = estimate_step_time(step_work(shape, cluster, work, options, best),
                                              step_assumptions)
    if best is None and suggest:
        result.remedies = _remedies(model, shape, cluster, work, options)
    return result


Request = tuple[Cluster, Workload, Options]


def _memory_savers(shape: ModelShape, cluster: Cluster, work: Workload,
                   options: Options) -> list[tuple[str, Request]]:
    """Each setting that lowers per-GPU memory and is not on yet, as (flags, new request)."""
    savers: list[tuple[str, Request]] = []

    def add(label: str, cluster_: Cluster = cluster, work_: Workload = work,
            **changes: Any) -> None:
        savers.append((label, (cluster_, work_, replace(options, **changes))))

    if not options.distributed_optimizer:
        add("--distributed-optimizer", distributed_optimizer=True)
    if options.recompute != "full" or (options.recompute_num_layers or 1) != 1:
        add("--recompute full", recompute="full", recompute_num_layers=None)
    if not options.sequence_parallel:
        add("--sequence-parallel", sequence_parallel=True)
    if not options.offload_reference:
        add("--offload-reference", offload_reference=True)
    if options.with_prm and options.prm_trains and not options.offload_prm:
        add("--offload-prm", offload_prm=True)
    if not options.vllm_sleep_mode:
        add("--vllm-sleep-mode", vllm_sleep_mode=True)
    wider = [vtp for vtp in (2, 4, 8) if vtp > options.vllm_tensor_parallel_size
             and cluster.gpus_per_node % vtp == 0 and shape.num_attention_heads % vtp == 0]
    if wider:
        add(f"--vllm-tensor-parallel-size {wider[-1]}", vllm_tensor_parallel_size=wider[-1])
    if work.micro_batch_size > 1:
        add("--micro-batch-size 1", work_=replace(work, micro_batch_size=1))
    return savers


def _remedies(model: str, shape: ModelShape, cluster: Cluster, work: Workload,
              options: Options) -> list[tuple[str, LayoutPlan]]:
    """Changes that make some layout fit: each memory saver alone, a lower vLLM share, more
    nodes (the fewest that fit); when none of these alone is enough, the savers together,
    pruned of those it fits without, and failing that with the fewest nodes that fit."""
    savers = _memory_savers(shape, cluster, work, options)
    singles = list(savers)
    singles += [(f"--vllm-memory-fraction {fraction}",
                 (cluster, work, replace(options, vllm_memory_fraction=fraction)))
                for fraction in (0.4, 0.3, 0.2) if fraction < options.vllm_memory_fraction]
    remedies = [(label, fit) for label, request in singles
                if (fit := _best_of(model, shape, request)) is not None]
    remedies += _fewest_nodes(model, shape, "", (cluster, work, options))
    if remedies or not savers:
        return remedies
    chosen = list(savers)
    if _best_of(model, shape, _combine(chosen, (cluster, work, options))) is None:
        combined = _combine(chosen, (cluster, work, options))
        return _fewest_nodes(model, shape, " ".join(label for label, _ in chosen) + " ",
                             combined)
    for saver in savers:  # greedy: drop what is not needed
        rest = [s for s in chosen if s is not saver]
        if _best_of(model, shape, _combine(rest, (cluster, work, options))) is not None:
            chosen = rest
    fit = _best_of(model, shape, _combine(chosen, (cluster, work, options)))
    assert fit is not None
    return [(" ".join(label for label, _ in chosen), fit)]


def _combine(savers: list[tuple[str, Request]], base: Request) -> Request:
    """``base`` with every saver's change applied (each saver changes one thing)."""
    cluster, work, options = base
    for _, (_, new_work, new_options) in savers:
        if new_work != base[1]:
            work = new_work
        changed = {key: value for key, value in asdict(new_options).items()
                   if value != getattr(base[2], key)}
        options = replace(options, **changed)
    return cluster, work, options


def _fewest_nodes(model: str, shape: ModelShape, prefix: str,
                  request: Request) -> list[tuple[str, LayoutPlan]]:
    cluster, work, options = request
    for factor in (2, 4, 8, 16):
        nodes = cluster.nodes * factor
        fit = _best_of(model, shape, (replace(cluster, nodes=nodes), work, options))
        if fit is not None:
            return [(f"{prefix}--nodes {nodes}", fit)]
    return []


def _best_of(model: str, shape: ModelShape, request: Request) -> LayoutPlan | None:
    try:
        return plan_for_shape(model, shape, *request, suggest=False).best
    except ValueError:  # e.g. a vLLM TP that the new cluster cannot hold
        return None


# ---- report ----

def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f}"


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f}B"


def _options_line(options: Options, cluster: Cluster) -> list[str]:
    recompute = options.recompute
    if recompute == "full":
        group = options.recompute_num_layers
        recompute += f" ({group or 1} layer(s) per group)"
    fp8 = [name for name, on in (("policy", options.policy_fp8), ("PRM", options.prm_fp8),
                                 ("reference", options.reference_fp8)) if on]
    offload = [name for name, on in (("reference", options.offload_reference),
                                     ("PRM", options.offload_prm)) if on]
    if options.offload_during_rollout:
        offload.append("grads, optimizer state and frozen models during the rollout")
    return [
        f"Trainer: {options.param_dtype} weights, fp32 grads, Adam "
        f"(distributed optimizer {'on' if options.distributed_optimizer else 'off'}), recompute "
        f"{recompute}, sequence parallel {'on' if options.sequence_parallel else 'off'}, "
        f"{options.attention} attention; FP8: {', '.join(fp8) or 'none'}; "
        f"CPU offload: {', '.join(offload) or 'none'}; PRM: {('yes' if options.prm_trains else 'frozen') if options.with_prm else 'no'}",
        f"vLLM: {options.vllm_memory_fraction:.2f} x {cluster.gpu_memory_gb:.1f} GB per GPU, "
        f"TP {options.vllm_tensor_parallel_size}, sleep mode "
        f"{'on' if options.vllm_sleep_mode else 'off'}, {options.vllm_overhead_gib:.1f} GiB "
        f"engine overhead" + (f", {options.vllm_asleep_gib:.1f} GiB left while asleep"
                              if options.vllm_sleep_mode else ""),
    ]


def _prm_model_lines(shape: ModelShape, options: Options) -> list[str]:
    """The PRM's and the reference's own size, where model.prm_path is another model."""
    if options.prm_model is None or not options.with_prm:
        return []
    scorer = prm_shape(shape, options)
    return [f"PRM and reference: {options.prm_model} ({scorer.architecture.hf_architecture}): "
            f"{scorer.num_layers} layers, hidden {scorer.hidden_size}, {scorer.num_attention_heads} "
            f"heads / {scorer.num_query_groups} KV heads of {scorer.head_dim}, ffn "
            f"{scorer.ffn_hidden_size}, vocab {scorer.vocab_size}; "
            f"{model_params(scorer, vocab_size=scorer.vocab_size):,} parameters (HF)"]


def format_plan(result: Plan, argv: Sequence[str]) -> str:
    shape, cluster, work, options = result.shape, result.cluster, result.workload, result.options
    hf_params = model_params(shape, vocab_size=shape.vocab_size)
    lines = [
        f"# {COMMAND} {shlex.join(argv)}",
        f"Model: {result.model} ({shape.architecture.hf_architecture}): {shape.num_layers} "
        f"layers, hidden {shape.hidden_size}, {shape.num_attention_heads} heads / "
        f"{shape.num_query_groups} KV heads of {shape.head_dim}, ffn {shape.ffn_hidden_size}, "
        f"vocab {shape.vocab_size}",
        f"  parameters: {hf_params:,} (HF); {model_params(shape):,} in Megatron at TP=1 "
        f"(vocabulary padded to {padded_vocab_size(shape.vocab_size, 1)})",
        *_prm_model_lines(shape, options),
        f"Cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs = {cluster.world_size} "
        f"GPUs of {cluster.gpu_memory_gb:.1f} GB; {cluster.reserved_gib:.1f} GiB reserved -> "
        f"budget {_gb(cluster.budget_bytes)} GB per GPU (1 GB = 10^9 bytes)",
        f"Run: {work.prompt_tokens} prompt + {work.response_tokens} response = "
        f"{work.seq_length} tokens per sequence, micro-batch {work.micro_batch_size}; "
        f"{work.prompts_per_step} prompts x {work.samples_per_prompt} samples = "
        f"{work.prompts_per_step * work.samples_per_prompt} trained rollouts per step "
        f"({work.oversample_factor}x generated), {work.ppo_mini_batches} PPO mini-batch(es)",
        *_options_line(options, cluster),
        "",
        "Layouts (GB per GPU at the worst pipeline stage, by phase of the step; max util: the "
        "largest vLLM gpu_memory_utilization that fits beside the trainer):",
        f"  {'TP':>2} {'PP':>3} {'DP':>3}  {'stage':<5} {'params':>7} {'rollout':>8} "
        f"{'ref-fwd':>8} {'PRM-upd':>8} {'pol-upd':>8} {'peak':>7} {'vLLM seqs':>9} "
        f"{'max util':>8} {'bubble':>6}  status",
    ]
    for p in result.layouts:
        totals = [_gb(p.phase_totals[phase]) if phase in p.phase_totals else "-"
                  for phase in PHASES]
        status = "fits" if p.fits else p.problem
        if p is result.best:
            status = "BEST: fits"
        lines.append(
            f"  {p.layout.tp:>2} {p.layout.pp:>3} {p.layout.dp:>3}  {p.stage:<5} "
            f"{_billions(p.params_per_gpu):>7} {totals[0]:>8} {totals[1]:>8} {totals[2]:>8} "
            f"{totals[3]:>8} {_gb(p.peak_bytes):>7} {p.vllm.concurrent_sequences:>9} "
            f"{p.max_vllm_memory_fraction:>8.2f} {p.pipeline_bubble:>6.1%}  {status}")
    lines.append("")
    if result.best is not None:
        best = result.best
        lines += [f"Best layout: {best.layout}",
                  *[f"  - {reason}" for reason in _reasons(result, best)]]
        lines += _breakdown(best, options, cluster)
        lines += _step_time_lines(result)
    else:
        closest = result.closest
        assert closest is not None
        lines += [
            f"No layout fits {cluster.world_size} GPUs.",
            f"Closest: {closest.layout} ({closest.stage} stage): {closest.problem}",
        ]
        if result.remedies:
            lines.append("Changes that would make a layout fit:")
            lines += [f"  {label}\n      -> {p.layout}, peak {_gb(p.peak_bytes)} GB"
                      for label, p in result.remedies]
        else:
            lines.append("Nothing tried makes it fit (distributed optimizer, recompute, "
                         "sequence parallel, offload, vLLM settings, micro-batch 1, together "
                         "and with up to 16x the nodes).")
        lines += _breakdown(closest, options, cluster)
    return "\n".join(lines) + "\n"


def _reasons(result: Plan, best: LayoutPlan) -> list[str]:
    fitting = [p for p in result.layouts if p.fits]
    size = best.layout.tp * best.layout.pp
    reasons = [
        f"{len(fitting)} of {len(result.layouts)} layouts fit; this one has the smallest "
        f"model-parallel size that fits (TP x PP = {size}), so DP = {best.layout.dp} "
        f"replica(s), each with {best.vllm.engines // best.layout.dp} vLLM engine(s)",
    ]
    if best.layout.pp == 1:
        reasons.append("no pipeline stages: no bubble, TP stays on the node's NVLink")
    else:
        reasons.append(f"pipeline bubble {best.pipeline_bubble:.1%} of each update "
                       f"({best.num_microbatches} micro-batches over {best.layout.pp} stages)")
    reasons.append(f"headroom {_gb(best.headroom_bytes)} GB at the peak ({best.peak_phase} "
                   f"phase)")
    return reasons


def _breakdown(p: LayoutPlan, options: Options, cluster: Cluster) -> list[str]:
    phases = list(p.phase_totals)
    names = {"reference forward": "ref-fwd", "PRM update": "PRM-upd", "policy update": "pol-upd"}
    header = "".join(f"{names.get(phase, phase):>9}" for phase in phases)
    lines = ["", f"Per-GPU memory of {p.layout} ({p.stage} stage), GB "
                 f"('-': not on the GPU in that phase):",
             f"  {'component':<28}{header}"]
    for name, by_phase in p.components.items():
        cells = "".join(f"{_gb(by_phase[phase]) if phase in by_phase else '-':>9}"
                        for phase in phases)
        lines.append(f"  {name:<28}{cells}")
    lines.append(f"  {'total':<28}" + "".join(f"{_gb(p.phase_totals[ph]):>9}" for ph in phases))
    lines.append(f"  {'budget':<28}" + "".join(f"{_gb(p.budget_bytes):>9}" for _ in phases))
    v = p.vllm
    lines += [
        "",
        f"Trainer resident while vLLM runs (after torch.cuda.empty_cache(): "
        + ("weights; grads released, optimizer state and frozen weights in host memory, "
           f"{_gb(p.rollout_host_bytes)} GB pinned per GPU"
           if options.offload_during_rollout else "weights, fp32 grads, optimizer state, reference")
        + f") {_gb(p.trainer_resident_bytes)} GB + reserve "
        f"{_gb(cluster.gpu_bytes - cluster.budget_bytes)} GB -> vLLM gpu_memory_utilization at "
        f"most {p.max_vllm_memory_fraction:.2f} (configured {options.vllm_memory_fraction:g}: "
        + ("fits)" if options.vllm_memory_fraction <= p.max_vllm_memory_fraction
           else "does not fit)") + f"; the engine needs at least {_min_vllm_fraction(p, cluster):.2f} "
        f"for its weights, overhead and {v.min_sequences} sequences",
        f"vLLM engine share per GPU: {_gb(v.engine_bytes)} GB = weights {_gb(v.weight_bytes)} + "
        f"overhead {_gb(v.overhead_bytes)} + KV cache {_gb(v.kv_cache_bytes)}; "
        f"{v.kv_bytes_per_token:,} KV bytes per token -> {v.concurrent_sequences} sequences of "
        f"{v.sequence_tokens} tokens at once (needs {v.min_sequences}); "
        f"{v.rollouts_per_engine} rollouts per engine per round -> {v.waves} wave(s)",
        f"Rollouts: {v.engines} engine(s) ({v.engines // p.layout.dp} per DP replica) x vLLM TP "
        f"{options.vllm_tensor_parallel_size} = {v.engines * options.vllm_tensor_parallel_size}"
        f" of {p.layout.dp * p.layout.tp * p.layout.pp} GPUs generate",
        f"Update: {p.num_microbatches} micro-batches per optimizer step per DP rank",
    ]
    if options.offload_reference or options.offload_prm:
        lines.append("Offload assumption: an offloaded model's whole state (weights, and for the "
                     "PRM grads and optimizer) is on the GPU during its own phase and in host "
                     "memory otherwise; the trainer offloads the reference (trainer.offload_reference), not yet the PRM.")
    return lines


def _step_time_lines(result: Plan) -> list[str]:
    estimate, assumed = result.step_time, result.step_assumptions
    if estimate is None or result.best is None:
        return []
    chip = ACCELERATORS[assumed.accelerator]
    phases = " + ".join(f"{name} {seconds:.0f}" for name, seconds in estimate.seconds.items())
    lines = [
        "",
        f"Step time (an estimate, megatron_prime/step_time.py) of {result.best.layout} on "
        f"{result.cluster.world_size} {chip.name}: {estimate.total:.0f} s = {phases}; "
        f"{estimate.sequences_in_flight} sequences in flight per engine, "
        f"{estimate.decode_tokens_per_s_per_engine:,.0f} decode tokens/s per engine",
        f"  assumed: mean prompt {estimate.mean_prompt_tokens} and response "
        f"{estimate.mean_response_tokens} tokens, training MFU {assumed.train_mfu:.2f}, prefill "
        f"MFU {assumed.prefill_mfu:.2f}, decode at {assumed.decode_bandwidth_efficiency:.2f} "
        f"of HBM bandwidth; not counted: weight sync, rewards outlasting generation, checkpoints",
    ]
    if result.model.startswith("eurus-2-7b"):
        measured = " + ".join(f"{name} {seconds:.0f}" for name, seconds in REFERENCE_STEP.items())
        lines.append(f"  PRIME reference (Eurus-2-7B, 8 A800, measured): {REFERENCE_TOTAL:.0f} s "
                     f"= {measured}")
    return lines


def _min_vllm_fraction(p: LayoutPlan, cluster: Cluster) -> float:
    """The smallest share (to 0.01, rounded up) that holds the engine's weights, overhead
    and its minimum number of full-length sequences of KV cache."""
    v = p.vllm
    need = v.weight_bytes + v.overhead_bytes + v.min_sequences * v.kv_bytes_per_token \
        * v.sequence_tokens
    return math.ceil(need * 100 / cluster.gpu_bytes) / 100


def plan_to_dict(result: Plan) -> dict[str, Any]:
    """The plan for machines (``--json``): inputs, every layout, the best or closest."""
    def layout_dict(p: LayoutPlan) -> dict[str, Any]:
        return {
            **asdict(p.layout), "stage": p.stage, "fits": p.fits, "problem": p.problem,
            "params_per_gpu": p.params_per_gpu, "num_microbatches": p.num_microbatches,
            "pipeline_bubble": p.pipeline_bubble, "peak_phase": p.peak_phase,
            "peak_bytes": p.peak_bytes, "budget_bytes": p.budget_bytes,
            "headroom_bytes": p.headroom_bytes, "largest_component": p.largest_component,
            "trainer_resident_bytes": p.trainer_resident_bytes,
            "max_vllm_memory_fraction": p.max_vllm_memory_fraction,
            "rollout_host_bytes": p.rollout_host_bytes,
            "components": p.components, "phase_totals": p.phase_totals, "vllm": asdict(p.vllm),
        }
    shape = result.shape
    scorer = prm_shape(shape, result.options)
    return {
        "model": result.model,
        "shape": {k: v for k, v in asdict(shape).items() if k != "architecture"}
        | {"architecture": shape.architecture.hf_architecture},
        "parameters": {"hf": model_params(shape, vocab_size=shape.vocab_size),
                       "megatron_tp1": model_params(shape)},
        "prm_parameters": ({"hf": model_params(scorer, vocab_size=scorer.vocab_size),
                            "megatron_tp1": model_params(scorer)} if result.options.with_prm else None),
        "cluster": asdict(result.cluster) | {"budget_bytes": result.cluster.budget_bytes},
        "workload": asdict(result.workload),
        "options": asdict(result.options),
        "layouts": [layout_dict(p) for p in result.layouts],
        "best": layout_dict(result.best) if result.best else None,
        "closest": layout_dict(result.closest) if result.closest else None,
        "remedies": [{"change": label, **asdict(p.layout)} for label, p in result.remedies],
        "step_time": (None if result.step_time is None else
                      {**result.step_time.seconds, "total": result.step_time.total,
                       "assumptions": asdict(result.step_assumptions)}),
    }


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Per-GPU memory of a PRIME run (policy, PRM, reference, vLLM) for every "
                    "TP x PP x DP layout of a cluster, and the layout to use.")
    defaults_w, defaults_o, defaults_c = Workload(), Options(), Cluster()
    model = parser.add_argument_group("model and cluster")
    model.add_argument("--model", required=True,
                       help=f"a preset ({', '.join(PRESETS)}) or an HF config.json path")
    model.add_argument("--prm-model", default=None,
                       help="model.prm_path of another size: the PRM's and the reference's preset "
                            "or config.json (default: the policy's --model)")
    model.add_argument("--nodes", type=int, default=defaults_c.nodes)
    model.add_argument("--gpus-per-node", type=int, default=defaults_c.gpus_per_node)
    model.add_argument("--gpu-memory-gb", type=float, default=defaults_c.gpu_memory_gb,
                       help="GB = 10^9 bytes per GPU (H100 80GB: 80)")
    model.add_argument("--reserved-gib", type=float, default=defaults_c.reserved_gib,
                       help="GiB per GPU kept for CUDA context, NCCL, fragmentation")
    run = parser.add_argument_group("run")
    run.add_argument("--prompt-tokens", type=int, default=defaults_w.prompt_tokens)
    run.add_argument("--response-tokens", type=int, default=defaults_w.response_tokens,
                     help="rollout.sampling.max_new_tokens")
    run.add_argument("--micro-batch-size", type=int, default=defaults_w.micro_batch_size,
                     help="algo.micro_batch_size")
    run.add_argument("--samples-per-prompt", type=int, default=defaults_w.samples_per_prompt,
                     help="rollout.sampling.n")
    run.add_argument("--prompts-per-step", type=int, default=defaults_w.prompts_per_step,
                     help="rollout.batch.prompts_per_step")
    run.add_argument("--oversample-factor", type=int, default=defaults_w.oversample_factor,
                     help="rollout.batch.oversample_factor")
    run.add_argument("--ppo-mini-batches", type=int, default=defaults_w.ppo_mini_batches,
                     help="algo.ppo_mini_batches")
    trainer = parser.add_argument_group("trainer")
    trainer.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction,
                         default=defaults_o.distributed_optimizer,
                         help="*_optimizer.use_distributed_optimizer")
    trainer.add_argument("--recompute", choices=("none", "selective", "full"),
                         default=defaults_o.recompute, help="parallel.recompute_granularity")
    trainer.add_argument("--recompute-num-layers", type=int,
                         default=defaults_o.recompute_num_layers,
                         help="parallel.recompute_num_layers (default: all layers of a stage)")
    trainer.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                         default=defaults_o.sequence_parallel, help="parallel.sequence_parallel")
    trainer.add_argument("--attention", choices=ATTENTION_KINDS,
                         default=defaults_o.attention,
                         help="flash: Transformer Engine layers (GPU); sdpa: Megatron's local "
                              "layers with torch's fused attention; unfused: local layers "
                              "with Megatron's attention (s x s softmax stored)")
    trainer.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES),
                         default=defaults_o.param_dtype, help="precision.dtype")
    trainer.add_argument("--policy-fp8", action="store_true", help="policy GEMMs in FP8")
    trainer.add_argument("--prm-fp8", action="store_true", help="PRM GEMMs in FP8")
    trainer.add_argument("--reference-fp8", action="store_true",
                         help="reference forward in FP8")
    trainer.add_argument("--offload-reference", action="store_true",
                         help="reference weights in host memory outside its forward")
    trainer.add_argument("--offload-prm", action="store_true",
                         help="PRM weights, grads and optimizer in host memory outside its phase")
    trainer.add_argument("--offload-during-rollout", action=argparse.BooleanOptionalAction,
                         default=defaults_o.offload_during_rollout,
                         help="trainer.offload_during_rollout: grads released, optimizer state "
                              "and frozen models in host memory while vLLM runs")
    trainer.add_argument("--no-prm", action="store_true", help="algo.prm_mode=outcome_only")
    trainer.add_argument("--frozen-prm", action="store_true",
                         help="algo.prm_mode=frozen: PRM weights only, no update")
    vllm = parser.add_argument_group("vLLM (rollout.engine)")
    vllm.add_argument("--vllm-memory-fraction", type=float,
                      default=defaults_o.vllm_memory_fraction, help="gpu_memory_utilization")
    vllm.add_argument("--vllm-tensor-parallel-size", type=int,
                      default=defaults_o.vllm_tensor_parallel_size, help="tensor_parallel_size")
    vllm.add_argument("--engines-per-replica", type=int, default=None,
                      help="rollout.engine.engines_per_replica (default: one per vLLM-TP GPUs "
                           "of a replica, so every GPU generates)")
    vllm.add_argument("--vllm-sleep-mode", action=argparse.BooleanOptionalAction,
                      default=defaults_o.vllm_sleep_mode, help="enable_sleep_mode")
    vllm.add_argument("--vllm-overhead-gib", type=float, default=defaults_o.vllm_overhead_gib)
    vllm.add_argument("--vllm-asleep-gib", type=float, default=defaults_o.vllm_asleep_gib)
    vllm.add_argument("--vllm-min-sequences", type=int, default=None,
                      help="full-length sequences the KV cache must hold (default: "
                           "--samples-per-prompt)")
    timing = parser.add_argument_group("step-time estimate (assumptions, megatron_prime/step_time.py)")
    defaults_t = StepTimeAssumptions()
    timing.add_argument("--accelerator", choices=sorted(ACCELERATORS), default=defaults_t.accelerator)
    timing.add_argument("--train-mfu", type=float, default=defaults_t.train_mfu)
    timing.add_argument("--prefill-mfu", type=float, default=defaults_t.prefill_mfu)
    timing.add_argument("--decode-bandwidth-efficiency", type=float,
                        default=defaults_t.decode_bandwidth_efficiency)
    timing.add_argument("--mean-prompt-tokens", type=int, default=None,
                        help="default: a third of --prompt-tokens")
    timing.add_argument("--mean-response-tokens", type=int, default=None,
                        help="default: a third of --response-tokens")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def request_from_args(args: argparse.Namespace) -> tuple[Cluster, Workload, Options]:
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.reserved_gib)
    work = Workload(args.prompt_tokens, args.response_tokens, args.micro_batch_size,
                    args.samples_per_prompt, args.prompts_per_step, args.oversample_factor,
                    args.ppo_mini_batches)
    options = Options(
        distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
        recompute_num_layers=args.recompute_num_layers, sequence_parallel=args.sequence_parallel,
        attention=args.attention, param_dtype=args.param_dtype, policy_fp8=args.policy_fp8,
        prm_fp8=args.prm_fp8, reference_fp8=args.reference_fp8,
        offload_reference=args.offload_reference, offload_prm=args.offload_prm,
        offload_during_rollout=args.offload_during_rollout, with_prm=not args.no_prm, prm_trains=not args.frozen_prm,
        prm_model=args.prm_model, vllm_memory_fraction=args.vllm_memory_fraction,
        vllm_tensor_parallel_size=args.vllm_tensor_parallel_size,
        engines_per_replica=args.engines_per_replica,
        vllm_sleep_mode=args.vllm_sleep_mode, vllm_overhead_gib=args.vllm_overhead_gib,
        vllm_asleep_gib=args.vllm_asleep_gib, vllm_min_sequences=args.vllm_min_sequences)
    return cluster, work, options


def main(argv: Sequence[str] | None = None) -> int:
    """``megatron-prime-plan --model qwen2.5-32b --nodes 4 ...``: prints the plan; exits 1
    when no layout fits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    assumptions = StepTimeAssumptions(
        accelerator=args.accelerator, train_mfu=args.train_mfu, prefill_mfu=args.prefill_mfu,
        decode_bandwidth_efficiency=args.decode_bandwidth_efficiency,
        mean_prompt_tokens=args.mean_prompt_tokens, mean_response_tokens=args.mean_response_tokens)
    try:
        result = plan_run(args.model, *request_from_args(args), step_assumptions=assumptions)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.json:
        print(json.dumps(plan_to_dict(result), indent=1, sort_keys=True))
    else:
        print(format_plan(result, argv), end="")
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
