"""Core attention for Megatron's local layer spec on torch's fused scaled-dot-product kernel.

Megatron's own ``DotProductAttention`` (the local spec's default) materialises the
[batch, heads, seq, seq] score matrix, runs a separate softmax and a second batched matmul,
and repeats every key/value head up to the query heads first: on a GPU without Transformer
Engine that is where the time goes (the 10-16% MFU measured in
benchmarks/results/gpu_train_step_*.txt). ``torch.nn.functional.scaled_dot_product_attention``
does the same maths in one fused kernel (flash or memory-efficient attention on CUDA, a
blocked kernel on CPU) and reads grouped key/value heads as they are (``enable_gqa``).

It replaces ``core_attention`` inside the local spec only (``architectures.layer_spec``):
the projections, RoPE, tensor-parallel linears and checkpoint names stay Megatron's, and
the module has no parameters, so checkpoints and the HF mapping do not change. Selected by
``precision.local_attention`` (``sdpa``, the default, or ``unfused`` for Megatron's module);
on GPU the local spec is what runs when Transformer Engine is not installed.

Masks: the trainer's micro-batches are right-padded rows (causal attention alone keeps a
real token from seeing the padding after it) or packed rows (a block-causal mask per
segment). For the first the schedule passes no mask and this module asks the kernel for
causal attention, the case flash attention serves; a given boolean mask (True = may not
attend, Megatron's convention) is inverted into SDPA's (True = may attend).

Anchors: Megatron-LM's own answer is TE's ``DotProductAttention`` (flash-attn inside);
verl and slime run HF models with ``attn_implementation="flash_attention_2"`` or "sdpa";
NeMo-RL's DTensor path uses HF's SDPA attention. This module is the same kernel choice for
Megatron's local spec, where none of them has one.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor


class SDPACoreAttention(MegatronModule):
    """``DotProductAttention``'s interface (query [sq, b, np, hn], key/value [sk, b, ng, hn]
    -> context [sq, b, np * hn]) on ``scaled_dot_product_attention``."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        # Features of Megatron's module this one does not carry: refused by name rather than
        # computed differently.
        if config.context_parallel_size != 1:
            raise ValueError("precision.local_attention=sdpa: context parallelism needs "
                             "Transformer Engine's attention")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("precision.local_attention=sdpa: sliding-window attention is not "
                             "supported; use precision.local_attention=unfused")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"precision.local_attention=sdpa: softmax_type="
                             f"{config.softmax_type!r} is not supported; use unfused")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        head_dim = config.kv_channels
        self.hidden_size_per_partition = self.heads_per_partition * head_dim
        # Megatron's query-key layer scaling divides the scale by the layer number and the
        # softmax multiplies it back: the net scale is 1/sqrt(head_dim) either way.
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: Any = None) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("precision.local_attention=sdpa: packed_seq_params and attention "
                             "bias need Transformer Engine's attention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and mask_type == AttnMaskType.causal and q.size(2) > 1
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0 and not self.config.sequence_parallel:
            # Megatron draws attention dropout from the tensor-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._attend(q, k, v, mask, causal, dropout)
        else:
            context = self._attend(q, k, v, mask, causal, dropout)
        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1),
                                                   self.hidden_size_per_partition)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                dropout: float) -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=self.groups_per_partition != self.heads_per_partition)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        return {}  # no parameters, no buffers
