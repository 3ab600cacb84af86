"""Checkpoint names across Megatron's two layer specs: local (CPU) and Transformer Engine (GPU).

The two specs build the same GPT with different modules, so their ``state_dict`` names differ:

| local spec (CPU)                          | Transformer Engine spec (GPU)                          |
|-------------------------------------------|--------------------------------------------------------|
| ``decoder.layers.N.input_layernorm.weight``   | ``decoder.layers.N.self_attention.linear_qkv.layer_norm_weight`` |
| ``decoder.layers.N.pre_mlp_layernorm.weight`` | ``decoder.layers.N.mlp.linear_fc1.layer_norm_weight``            |
| (``.bias`` likewise, for LayerNorm models)    | (``layer_norm_bias``)                                            |
| no attention module state                     | ``...self_attention.core_attention._extra_state``               |

TE fuses the pre-attention and pre-MLP norms into the next linear
(``TELayerNormColumnParallelLinear``; the layer's own norms are ``IdentityOp``), and TE modules
carry ``_extra_state`` (FP8 scaling metadata). Megatron's local linears carry an empty
``_extra_state`` too, for compatibility.

Canonical on-disk naming: Transformer Engine's. Why: it is what Megatron-core itself writes
for both specs (the local spec declares the renaming above in its
``sharded_state_dict_keys_map``, megatron/core/models/gpt/gpt_layer_specs.py), so
checkpoints of Megatron-LM, NeMo and Megatron-Bridge GPU runs read as they are, and the GPU
production path needs no translation. ``canonical_sharded_state_dict`` applies the table to
every save and load of this package anyway, so the format does not rest on a Megatron
default that a version could drop. With Megatron-core 0.16 both specs write the same keys
for our dense models (TEDotProductAttention leaves its ``_extra_state`` out of the
dist-checkpoint); what differs is the ``_extra_state`` payload, handled on load
(``load_sharded``): TE's FP8 metadata is ignored by a local model; a TE model that gets the
local spec's empty entries, or none at all (a weights-only writer), builds its FP8 metadata
afresh at the first forward.
Same anchor as Megatron-Bridge: its parameter mappings are TE-named and its
``MegatronMappingRegistry`` adds the local-spec names as aliases of them
(megatron/bridge/models/conversion/mapping_registry.py).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Recorded in manifests and train-state markers: the naming of the keys on disk.
KEY_NAMING = "transformer_engine"
EXTRA_STATE = "_extra_state"

# Inside a transformer layer: local-spec module prefix -> TE-spec prefix (the suffix,
# ``weight`` or ``bias``, is kept: ``input_layernorm.bias`` -> ``...layer_norm_bias``).
LOCAL_TO_TE: tuple[tuple[str, str], ...] = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
)
# Module state of TE layers that the local spec has no module for (TEDotProductAttention's
# FP8 metadata); Megatron does not put it into the dist-checkpoint.
TE_ONLY_LAYER_KEYS: tuple[str, ...] = ("self_attention.core_attention._extra_state",)

# ``decoder.layers.<i>.`` in module state dicts, ``decoder.layers.`` in dist-checkpoint keys
# (Megatron stacks the layers along a prepended axis there).
_LAYER_PREFIX = re.compile(r"^(?P<head>decoder\.layers\.(?:\d+\.)?)(?P<tail>.+)$")
# Top-level modules of a GPTModel: dist-checkpoint keys outside them (optimizer state...) are
# not weights and not this module's business.
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def _rename(name: str, table: Iterable[tuple[str, str]]) -> str:
    match = _LAYER_PREFIX.match(name)
    if match is None:
        return name
    tail = match.group("tail")
    for old, new in table:
        if tail.startswith(old):
            return match.group("head") + new + tail[len(old):]
    return name


def te_name(name: str) -> str:
    """A local-spec name (module state dict or dist-checkpoint key) in TE naming; names that
    are the same in both specs come back unchanged."""
    return _rename(name, LOCAL_TO_TE)


def local_name(name: str) -> str:
    """A TE-spec name in local naming; the inverse of ``te_name``."""
    return _rename(name, tuple((new, old) for old, new in LOCAL_TO_TE))


def te_state_dict_keys(local_keys: Iterable[str]) -> list[str]:
    """The module state-dict keys of the TE-spec GPTModel that has these local-spec keys.

    Norms move into the linear that follows them; each layer gains the attention kernel's
    ``_extra_state``. The linears keep their names (local ones already carry an
    ``_extra_state``), as do the embedding, final norm and output layer.
    """
    keys = set()
    for key in local_keys:
        keys.add(te_name(key))
        match = _LAYER_PREFIX.match(key)
        if match is not None:
            keys.update(match.group("head") + extra for extra in TE_ONLY_LAYER_KEYS)
    return sorted(keys)


def canonical_sharded_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Rewrites, in place, the checkpoint key of every sharded entry to the canonical (TE)
    naming and returns ``state``. Megatron-core 0.16's local spec already writes these keys,
    so this is a no-op there; it keeps the on-disk names fixed whatever the spec declares."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, (ShardedBase, ShardedTensorFactory)):
            value.key = te_name(value.key)

    visit(state)
    return state


def _is_model_key(key: str) -> bool:
    return key.startswith(_MODEL_KEY_PREFIXES)


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files cannot be read back (truncated copy, interrupted write, bad
    disk); the message names the folder and, when it can be told, the file."""


# What reading a damaged file raises: pickle/zip readers on a short or garbled file.
_DAMAGE_ERRORS = (EOFError, pickle.UnpicklingError)
_DAMAGE_WORDS = ("corrupt", "zip archive", "unexpected end", "truncated")


def _short_files(folder: Path) -> list[str]:
    """The ``.distcp`` files of a torch_dist checkpoint folder that are missing or shorter
    than its ``.metadata`` says (each tensor is stored at an offset and length there)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except BaseException:  # the metadata itself is unreadable: nothing to compare against
        return [".metadata cannot be read"] if (folder / ".metadata").exists() else []
    needed: dict[str, int] = {}
    for info in storage.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    short = []
    for name, size in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            short.append(f"{name} is missing")
        elif file.stat().st_size < size:
            short.append(f"{name} has {file.stat().st_size} of its {size} bytes")
    return short


def _error_chain(error: BaseException) -> list[BaseException]:
    """``error``, its causes and, for torch's CheckpointException, every rank's failure."""
    chain, todo = [], [error]
    while todo:
        current = todo.pop()
        if current is None or current in chain:
            continue
        chain.append(current)
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # CheckpointException: {rank: (error, tb)}
        if isinstance(failures, dict):
            todo += [value[0] if isinstance(value, tuple) else value for value in failures.values()]
    return [e for e in chain if isinstance(e, BaseException)]


def one_line_error(error: BaseException) -> str:
    """``Type: message`` on one line, at most 200 characters (``Type`` alone if no message)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:200] if text else type(error).__name__


def describe_damage(folder: Path, error: BaseException) -> str | None:
    """Why the files of ``folder`` look damaged, given the error a load raised; None when the
    error is not about damaged files (a layout or key mismatch keeps its own message)."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return None
    short = _short_files(folder)
    errors = _error_chain(error)
    reader_failed = any(isinstance(e, _DAMAGE_ERRORS)
                        or (isinstance(e, RuntimeError)
                            and any(word in str(e).lower() for word in _DAMAGE_WORDS))
                        for e in errors)
    if not short and not reader_failed:
        return None
    cause = next((e for e in errors if isinstance(e, _DAMAGE_ERRORS + (RuntimeError,))), error)
    reason = one_line_error(cause)
    return f"{'; '.join(short) if short else 'one of its files cannot be read'} ({reason})"


def load_sharded(sharded_state_dict: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` that accepts a checkpoint of either layer spec (collective).

    - A requested ``_extra_state`` the checkpoint lacks is left out (a TE model loading a
      checkpoint written on CPU, or by a converter that writes weights only): TE rebuilds it.
    - A checkpoint ``_extra_state`` nobody requests is skipped (TE's FP8 metadata, read by a
      local model).
    - Any other mismatch of model weights is an error naming the key: a requested weight the
      checkpoint lacks, or a checkpoint weight (e.g. ``layer_norm_bias`` of a LayerNorm
      model) that this model has no parameter for. Non-model entries of the checkpoint (the
      optimizer state when only weights are read) are not checked.
    - Files that cannot be read back (a truncated ``.distcp``: torch raises a bare EOFError)
      raise ``DamagedCheckpoint`` naming the folder and the short or missing file.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    folder = Path(folder)
    try:
        state, unread, absent = dist_checkpointing.load(sharded_state_dict, str(folder),
                                                        strict=StrictHandling.RETURN_ALL)
    except BaseException as error:  # torch's CheckpointException is a BaseException
        damage = describe_damage(folder, error)
        if damage is None:
            raise
        raise DamagedCheckpoint(f"{folder}: the checkpoint is damaged: {damage}") from error
    # Megatron's terms: "unexpected" = requested but not in the checkpoint (``absent``),
    # "missing" = in the checkpoint but not requested (``unread``).
    absent = sorted(key for key in absent if not key.endswith(EXTRA_STATE))
    if absent:
        raise ValueError(f"{folder}: the checkpoint lacks {absent[:5]} "
                         f"({len(absent)} in all) that this model needs")
    unread = sorted(key for key in unread if _is_model_key(key) and not key.endswith(EXTRA_STATE))
    if unread:
        raise ValueError(f"{folder}: checkpoint tensor(s) {unread[:5]} ({len(unread)} in all) "
                         "have no counterpart in this model (a different architecture or "
                         "normalization?): expected only names of this model's parameters "
                         "and _extra_state")
    return state


def check_key_naming(folder: str | Path, recorded: Any) -> None:
    """Refuses a checkpoint whose manifest records another naming than the one this version
    reads. Checkpoints saved before the field existed hold Megatron's (TE) names."""
    if recorded not in (None, KEY_NAMING):
        raise ValueError(f"{folder}: key_naming={recorded!r} is not supported: expected "
                         f"{KEY_NAMING!r}")
