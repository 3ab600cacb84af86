"""Builds the three PRIME models as Megatron GPTModels on this rank's pipeline stage.

Policy and implicit PRM are trainable and wrapped in Megatron's DistributedDataParallel
(needed by Megatron's optimizer and the distributed optimizer). The reference is a frozen
copy of the SFT model: no grads, no DDP buffers, no optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_prime import distributed
from megatron_prime.config import ParallelConfig, PrecisionConfig
from megatron_prime.models.architectures import (
    ModelShape,
    layer_spec,
    padded_vocab_size,
    sequence_length_multiple,
    transformer_config,
    uses_transformer_engine,
)

Role = Literal["policy", "prm", "reference"]
ROLES: tuple[str, ...] = ("policy", "prm", "reference")


@dataclass
class BuiltModel:
    """Model chunks of one role on this rank (one chunk unless virtual pipelining)."""

    role: str
    chunks: list[torch.nn.Module]
    config: TransformerConfig
    shape: ModelShape
    padded_vocab_size: int
    # "transformer_engine" or "local": which Megatron layer spec built the chunks; it decides
    # the module names (checkpoint/spec_names.py translates between them).
    layer_spec: str = "local"
    # Whether unpacked (right-padded) micro-batches may pass no attention mask: the core
    # attention then applies causal masking itself (models/attention.py).
    causal_mask_implicit: bool = False
    # Each micro-batch is cut after its own last scored token (schedule.py): no compute on
    # the padding that its rows share with the step's longest row. False: every micro-batch
    # at the batch's length (the padded form the tests compare against).
    trim_micro_batches: bool = True
    # What this model's kernels need: every batch it sees is padded to a multiple of this many
    # tokens (FP8, sequence parallelism; models/architectures.sequence_length_multiple).
    sequence_length_multiple: int = 1
    # Forward only, no gradients or DDP buffers: the reference always, a PRM in
    # algo.prm_mode=frozen.
    frozen: bool = False

    @property
    def trainable(self) -> bool:
        return not self.frozen

    def gpt_chunks(self) -> list[GPTModel]:
        """The bare GPTModels, without the DDP wrapper."""
        return [c.module if isinstance(c, DistributedDataParallel) else c for c in self.chunks]

    def train(self) -> None:
        for chunk in self.chunks:
            chunk.train()

    def eval(self) -> None:
        for chunk in self.chunks:
            chunk.eval()


def build_model(
    hf_config: Any,
    role: str,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None = None,
    use_distributed_optimizer: bool = False,
    initialize_weights: bool = True,
    device: torch.device | None = None,
    frozen: bool = False,
) -> BuiltModel:
    """Creates this rank's part of the model. Weights are random until loaded (checkpoint/);
    the reference, or any role with ``frozen=True``, is built for forward passes only;
    ``initialize_weights=False`` leaves them uninitialised for a caller that loads them next.
    ``device=torch.device("meta")`` builds it without memory (shapes only), for a converter
    that materialises one layer at a time."""
    if role not in ROLES:
        raise ValueError(f"model role={role!r} is invalid: expected one of {list(ROLES)}")
    precision = precision or PrecisionConfig()
    runtime = distributed.runtime()
    shape = ModelShape.from_hf(hf_config)
    config = transformer_config(shape, parallel, precision, on_gpu=runtime.on_gpu,
                                initialize_weights=initialize_weights, role=role)
    use_transformer_engine = uses_transformer_engine(precision, runtime.on_gpu)
    if runtime.on_gpu and precision.layer_spec == "auto" and not use_transformer_engine:
        _say_once("Transformer Engine is not importable here: Megatron's local layer spec with "
                  f"precision.local_attention={precision.local_attention} (no FP8)")
    spec = layer_spec(config, use_transformer_engine, precision.local_attention)
    vocab = padded_vocab_size(shape.vocab_size, parallel.tensor_parallel_size)

    device = device or runtime.device
    num_chunks = parallel.virtual_pipeline_parallel_size or 1
    chunks: list[torch.nn.Module] = []
    with torch.device("meta") if device.type == "meta" else nullcontext():
        for vp_stage in range(num_chunks):
            chunks.append(_build_chunk(config, spec, vocab, shape, vp_stage, parallel,
                                       initialize_weights, device))
    built = _wrap(chunks, role, config, shape, vocab, use_distributed_optimizer,
                  frozen or role == "reference")
    built.layer_spec = "transformer_engine" if use_transformer_engine else "local"
    # SDPA builds the causal mask inside its kernel (flash attention's case); Megatron's
    # unfused module would build one on "cuda" whatever the device, so it gets it passed.
    built.causal_mask_implicit = not use_transformer_engine and precision.local_attention == "sdpa"
    built.sequence_length_multiple = sequence_length_multiple(parallel, precision, shape_alignment=1)
    return built


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """One line on the first rank that builds a model this way (the builder runs per role)."""
    if message not in _SAID and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(f"[megatron_prime] {message}", flush=True)
    _SAID.add(message)


def _build_chunk(config: Any, spec: Any, vocab: int, shape: ModelShape, vp_stage: int,
                 parallel: ParallelConfig, initialize_weights: bool, device: torch.device
                 ) -> torch.nn.Module:
    stage = vp_stage if parallel.virtual_pipeline_parallel_size else None
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=distributed.is_first_pp_stage(stage),
        post_process=distributed.is_last_pp_stage(stage),
        # Keep logits sharded over the vocabulary: log-probs are computed vocab-parallel.
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
        rope_scaling=shape.rope_scaling_factor is not None,
        rope_scaling_factor=shape.rope_scaling_factor or 8.0,
        vp_stage=stage,
    )
    if not initialize_weights:
        _mark_tensor_parallel_weights(model)
    return model.to(device)


def _wrap(chunks: list[torch.nn.Module], role: str, config: Any, shape: ModelShape, vocab: int,
          use_distributed_optimizer: bool, frozen: bool) -> BuiltModel:
    if frozen:
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
    else:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        chunks = [
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                # Bucketing only pays off when overlapping communication; the first chunk
                # holds the embedding, whose grad is reduced last.
                disable_bucketing=index > 0,
            )
            for index, chunk in enumerate(chunks)
        ]
    return BuiltModel(role=role, chunks=chunks, config=config, shape=shape, padded_vocab_size=vocab,
                      frozen=frozen)


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tags TP-sharded weights the way Megatron's initialisers would have.

    Megatron sets ``tensor_model_parallel`` / ``partition_dim`` inside its weight
    initialisers, which ``perform_initialization=False`` skips (megatron-core 0.16). Untagged
    shards count as TP duplicates, so the grad norm (and clipping) would leave out every TP
    rank but the first.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    partition_dims = ((ColumnParallelLinear, 0), (RowParallelLinear, 1), (VocabParallelEmbedding, 0))
    for module in model.modules():
        for layer_type, dim in partition_dims:
            weight = getattr(module, "weight", None)
            if isinstance(module, layer_type) and weight is not None \
                    and not hasattr(weight, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def move_to(model: BuiltModel, device: torch.device) -> None:
    """Moves a frozen model's weights (no DDP buffers, no optimizer) between host and GPU."""
    if model.trainable:
        raise ValueError(f"only the frozen reference can be offloaded, not the {model.role}")
    for chunk in model.chunks:
        chunk.to(device)


@contextmanager
def resident(model: BuiltModel, offloaded: bool) -> Iterator[None]:
    """The model on this rank's device for the block, and back in host memory after it, when
    ``offloaded`` (trainer.offload_reference): the reference is used once per step, so its
    GPU memory serves the PRM and policy updates the rest of the time."""
    if not offloaded:
        yield
        return
    move_to(model, distributed.device())
    try:
        yield
    finally:
        move_to(model, torch.device("cpu"))
