"""The one table between Hugging Face names/layouts and Megatron's, for Qwen2 and Llama.

Used by in-memory loading (tests, the demo), the checkpoint converters and the live weight
bridge to vLLM. It knows, per tensor:
- which HF tensors make up a Megatron tensor (q/k/v -> fused ``linear_qkv``; gate/up ->
  fused ``linear_fc1``);
- how Megatron shards it over tensor-parallel ranks (``Split``);
- the vocabulary padding (rows beyond the HF vocabulary are zero and dropped on export).

Megatron's fused QKV layout with grouped-query attention, per query group g (``ng`` groups,
``q_per_group = heads / ng``): ``[q heads of g (q_per_group*d rows), k_g (d rows), v_g (d rows)]``,
groups stacked along dim 0; TP rank r owns groups ``r*ng/tp .. (r+1)*ng/tp``. Megatron's
fused ``linear_fc1`` on TP rank r is ``[gate rows of r ; up rows of r]``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import torch
from torch import Tensor

from megatron_prime.checkpoint.spec_names import te_name
from megatron_prime.models.architectures import ModelShape

if TYPE_CHECKING:
    from megatron_prime.models.builder import BuiltModel


class Split(enum.Enum):
    REPLICATED = "replicated"  # same full tensor on every TP rank (norms)
    VOCAB = "vocab"  # dim 0 over the padded vocabulary (embedding, output layer)
    COLUMN = "column"  # dim 0 (column-parallel linear)
    ROW = "row"  # dim 1 (row-parallel linear)
    QKV = "qkv"  # dim 0 by query groups, q/k/v interleaved per group
    GATE_UP = "gate_up"  # dim 0, [gate shard; up shard] per rank


@dataclass(frozen=True)
class WeightRule:
    """One Megatron tensor and the HF tensor(s) it is made of. ``{layer}`` is the global index."""

    megatron: str
    hf: tuple[str, ...]
    split: Split


_LAYER = "decoder.layers.{layer}."
_HF_LAYER = "model.layers.{layer}."

# Megatron names in the Transformer Engine spec's naming; a local-spec name (the CPU path:
# ``input_layernorm``, ``pre_mlp_layernorm``) is translated by ``spec_names.te_name`` first.
RULES: tuple[WeightRule, ...] = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Split.VOCAB),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), Split.REPLICATED),
    WeightRule("output_layer.weight", ("lm_head.weight",), Split.VOCAB),
    WeightRule(_LAYER + "self_attention.linear_qkv.layer_norm_weight",
               (_HF_LAYER + "input_layernorm.weight",), Split.REPLICATED),
    WeightRule(_LAYER + "self_attention.linear_qkv.weight",
               tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"), Split.QKV),
    WeightRule(_LAYER + "self_attention.linear_qkv.bias",
               tuple(_HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"), Split.QKV),
    WeightRule(_LAYER + "self_attention.linear_proj.weight",
               (_HF_LAYER + "self_attn.o_proj.weight",), Split.ROW),
    WeightRule(_LAYER + "mlp.linear_fc1.layer_norm_weight",
               (_HF_LAYER + "post_attention_layernorm.weight",), Split.REPLICATED),
    WeightRule(_LAYER + "mlp.linear_fc1.weight",
               (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
               Split.GATE_UP),
    WeightRule(_LAYER + "mlp.linear_fc2.weight",
               (_HF_LAYER + "mlp.down_proj.weight",), Split.ROW),
)

_RULE_PATTERNS: tuple[tuple[re.Pattern[str], WeightRule], ...] = tuple(
    (re.compile("^" + re.escape(rule.megatron).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$"), rule)
    for rule in RULES
)


@dataclass(frozen=True)
class ResolvedWeight:
    """A Megatron tensor name resolved against the table, for one model."""

    megatron_name: str  # with the global layer index
    hf_names: tuple[str, ...]
    split: Split


def resolve(megatron_name: str, shape: ModelShape) -> ResolvedWeight:
    """Megatron name (global layer index, either layer spec) -> HF names. Unknown names are
    an error."""
    canonical = te_name(megatron_name)
    for pattern, rule in _RULE_PATTERNS:
        match = pattern.match(canonical)
        if match is None:
            continue
        layer = match.groupdict().get("layer")
        hf_names = tuple(name.format(layer=layer) for name in rule.hf)
        if rule.megatron == "output_layer.weight" and shape.tie_word_embeddings:
            # Tied embeddings: a separate output layer exists only on the last pipeline stage
            # (PP > 1), and it holds a copy of the input embedding.
            hf_names = ("model.embed_tokens.weight",)
        return ResolvedWeight(megatron_name, hf_names, rule.split)
    raise KeyError(f"no HF mapping for Megatron tensor {megatron_name!r}")


def _qkv_group_view(shape: ModelShape, tensor: Tensor) -> Tensor:
    """[(heads+2*groups)*d, ...] -> [groups, (q_per_group+2)*d, ...]."""
    return tensor.reshape(shape.num_query_groups, -1, *tensor.shape[1:])


def hf_to_megatron_shard(
    weight: ResolvedWeight,
    hf_tensors: list[Tensor],
    shape: ModelShape,
    tp_rank: int,
    tp_size: int,
    padded_vocab_size: int,
) -> Tensor:
    """The slice of the Megatron tensor that TP rank ``tp_rank`` holds."""
    split = weight.split
    if split is Split.REPLICATED:
        return hf_tensors[0]
    if split is Split.VOCAB:
        full = hf_tensors[0]
        padding = padded_vocab_size - full.shape[0]
        if padding < 0:
            raise ValueError(f"{weight.hf_names[0]} has {full.shape[0]} rows, more than the padded "
                             f"vocabulary {padded_vocab_size}")
        full = torch.cat([full, full.new_zeros(padding, *full.shape[1:])])
        return full.chunk(tp_size, dim=0)[tp_rank]
    if split is Split.COLUMN:
        return hf_tensors[0].chunk(tp_size, dim=0)[tp_rank]
    if split is Split.ROW:
        return hf_tensors[0].chunk(tp_size, dim=1)[tp_rank]
    if split is Split.QKV:
        q, k, v = hf_tensors
        groups = shape.num_query_groups
        fused = torch.cat(
            [q.reshape(groups, -1, *q.shape[1:]), k.reshape(groups, -1, *k.shape[1:]),
             v.reshape(groups, -1, *v.shape[1:])],
            dim=1,
        )
        mine = fused.chunk(tp_size, dim=0)[tp_rank]
        return mine.reshape(-1, *q.shape[1:])
    if split is Split.GATE_UP:
        gate, up = hf_tensors
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    raise AssertionError(split)


def megatron_shards_to_hf(
    weight: ResolvedWeight, shards: list[Tensor], shape: ModelShape
) -> dict[str, Tensor]:
    """All TP shards of one Megatron tensor (in TP rank order) -> HF tensors, padding removed."""
    split = weight.split
    names = weight.hf_names
    if split is Split.REPLICATED:
        return {names[0]: shards[0]}
    if len(shards) == 1 and split in (Split.VOCAB, Split.COLUMN, Split.ROW):
        # TP=1: the shard is the tensor; a cat would only copy it.
        return {names[0]: shards[0][: shape.vocab_size] if split is Split.VOCAB else shards[0]}
    if split is Split.VOCAB:
        return {names[0]: torch.cat(shards, dim=0)[: shape.vocab_size]}
    if split is Split.COLUMN:
        return {names[0]: torch.cat(shards, dim=0)}
    if split is Split.ROW:
        return {names[0]: torch.cat(shards, dim=1)}
    if split is Split.QKV:
        fused = _qkv_group_view(shape, torch.cat(shards, dim=0))
        d = shape.head_dim
        q_rows = shape.num_attention_heads // shape.num_query_groups * d
        q, k, v = fused.split([q_rows, d, d], dim=1)
        return {name: part.reshape(-1, *fused.shape[2:]) for name, part in zip(names, (q, k, v))}
    if split is Split.GATE_UP:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return {names[0]: gate, names[1]: up}
    raise AssertionError(split)


def named_megatron_parameters(gpt_model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """This pipeline stage's parameters, named with *global* layer indices.

    Megatron numbers layers locally on each stage (``decoder.layers.0`` is the stage's first);
    ``layer.layer_number`` (1-based) is the global position that the HF name needs.
    """
    layers = gpt_model.decoder.layers if hasattr(gpt_model, "decoder") else []
    for name, param in gpt_model.named_parameters():
        match = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
        if match:
            global_index = layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{global_index}.{match.group(2)}"
        yield name, param


HFTensorSource = Callable[[str], Tensor]


def load_hf_weights(model: "BuiltModel", hf_tensor: HFTensorSource | Mapping[str, Tensor],
                    only: set[int] | None = None) -> int:
    """Copies HF weights into this rank's part of ``model``; returns the count loaded.

    ``hf_tensor`` is a mapping or a callable (so a converter can stream from safetensors
    shards without holding the whole model in memory). ``only``: the ``id``s of the
    parameters to fill (a converter's current layer); default all.
    """
    from megatron_prime import distributed

    get = hf_tensor.__getitem__ if isinstance(hf_tensor, Mapping) else hf_tensor
    shape, padded_vocab_size = model.shape, model.padded_vocab_size
    tp_rank, tp_size = distributed.tp_rank(), model.config.tensor_model_parallel_size
    loaded = 0
    with torch.no_grad():
        for chunk in model.gpt_chunks():
            for name, param in named_megatron_parameters(chunk):
                if only is not None and id(param) not in only:
                    continue
                weight = resolve(name, shape)
                try:
                    sources = [get(hf_name) for hf_name in weight.hf_names]
                except KeyError as error:
                    raise KeyError(f"HF checkpoint lacks {error.args[0]!r}, needed for Megatron "
                                   f"tensor {name!r}") from None
                shard = hf_to_megatron_shard(weight, sources, shape, tp_rank, tp_size,
                                             padded_vocab_size)
                if shard.shape != param.shape:
                    raise ValueError(f"{name}: HF tensors {weight.hf_names} give shape "
                                     f"{tuple(shard.shape)} on TP rank {tp_rank}, Megatron "
                                     f"expects {tuple(param.shape)}")
                param.copy_(shard)
                loaded += 1
    return loaded


def expected_hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this model must hold, with its shape."""
    h, d = shape.hidden_size, shape.head_dim
    q_rows, kv_rows = shape.num_attention_heads * d, shape.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (shape.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not shape.tie_word_embeddings:
        shapes["lm_head.weight"] = (shape.vocab_size, h)
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "input_layernorm.weight": (h,),
            prefix + "post_attention_layernorm.weight": (h,),
            prefix + "self_attn.q_proj.weight": (q_rows, h),
            prefix + "self_attn.k_proj.weight": (kv_rows, h),
            prefix + "self_attn.v_proj.weight": (kv_rows, h),
            prefix + "self_attn.o_proj.weight": (h, q_rows),
            prefix + "mlp.gate_proj.weight": (shape.ffn_hidden_size, h),
            prefix + "mlp.up_proj.weight": (shape.ffn_hidden_size, h),
            prefix + "mlp.down_proj.weight": (h, shape.ffn_hidden_size),
        })
        if shape.add_qkv_bias:
            shapes.update({
                prefix + "self_attn.q_proj.bias": (q_rows,),
                prefix + "self_attn.k_proj.bias": (kv_rows,),
                prefix + "self_attn.v_proj.bias": (kv_rows,),
            })
    return shapes


def exported_parameters(gpt_chunks: list[torch.nn.Module], shape: ModelShape
                        ) -> Iterator[tuple[str, Tensor]]:
    """This stage's parameters that have an HF counterpart of their own (global names).

    With tied embeddings the last stage's copy of the embedding (PP > 1) is skipped: HF has
    one tied tensor, which stage 0 provides.
    """
    for chunk in gpt_chunks:
        for name, param in named_megatron_parameters(chunk):
            if name == "output_layer.weight" and shape.tie_word_embeddings:
                continue
            yield name, param


def hf_tensors_of(
    weight: ResolvedWeight, param: Tensor, shape: ModelShape,
    gather_tp: Callable[[Tensor], list[Tensor]],
) -> dict[str, Tensor]:
    """Full HF tensors of one local Megatron parameter (TP shards gathered unless replicated)."""
    local = param.detach()
    shards = [local] if weight.split is Split.REPLICATED else gather_tp(local)
    return megatron_shards_to_hf(weight, shards, shape)


def hf_plan(gpt_chunks: list[torch.nn.Module], shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of each tensor ``iter_hf_tensors`` yields for this stage, in its order,
    without computing any of them."""
    shapes = expected_hf_shapes(shape)
    return [(hf_name, shapes[hf_name]) for name, _ in exported_parameters(gpt_chunks, shape)
            for hf_name in resolve(name, shape).hf_names]


def iter_hf_tensors(
    gpt_chunks: list[torch.nn.Module],
    shape: ModelShape,
    gather_tp: Callable[[Tensor], list[Tensor]],
) -> Iterator[tuple[str, Tensor]]:
    """This pipeline stage's weights as full HF tensors, one Megatron tensor at a time.

    ``gather_tp`` returns the TP shards of a local tensor in TP-rank order (an all-gather in
    the TP group). Memory: one gathered tensor at a time.
    """
    for name, param in exported_parameters(gpt_chunks, shape):
        yield from hf_tensors_of(resolve(name, shape), param, shape, gather_tp).items()
