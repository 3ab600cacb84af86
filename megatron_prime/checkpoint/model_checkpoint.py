"""Megatron model checkpoints: Megatron's distributed checkpoint format, written atomically.

A model checkpoint folder holds:
  megatron_prime.json   manifest: architecture, role, dtype, the layout it was saved at
  hf/                   the source model's config.json, tokenizer and generation files
  model/                Megatron dist-checkpoint (torch_dist) of the weights

Megatron's dist-checkpointing reshards on load, so a checkpoint saved at TP=2/PP=2 loads at
any other layout (the padded vocabulary rows are matched by Megatron's
``allow_shape_mismatch`` on the embedding and output layer).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_prime import distributed
from megatron_prime.checkpoint.spec_names import (
    KEY_NAMING,
    canonical_sharded_state_dict,
    check_key_naming,
    load_sharded,
)
from megatron_prime.host_memory import return_freed_memory
from megatron_prime.models.builder import BuiltModel

MANIFEST = "megatron_prime.json"
FORMAT_VERSION = 1


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def refuse_existing_output(target: str | Path, overwrite: bool) -> None:
    if Path(target).exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to "
                              "replace it")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a staging folder that replaces ``target`` only once everything is written.

    Collective: every rank enters and leaves together. On failure the staging folder is
    removed and ``target`` (if it existed) is untouched.
    """
    refuse_existing_output(target, overwrite)
    target = Path(target).absolute()
    staging = target.with_name(f".{target.name}.partial")
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    try:
        yield staging
    except BaseException:
        if _is_rank0():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _barrier()
    if _is_rank0():
        backup = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(backup, ignore_errors=True)
            target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    _barrier()


def _sharded_state_dict(model: BuiltModel) -> dict[str, Any]:
    """The model's sharded state dict with checkpoint keys in the canonical (TE) naming: every
    save and load goes through here, so checkpoints move between layer specs."""
    chunks = model.gpt_chunks()
    if len(chunks) == 1:
        state = {"model": chunks[0].sharded_state_dict()}
    else:
        state = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    return canonical_sharded_state_dict(state)


def spec_record(model: BuiltModel) -> dict[str, str]:
    """Manifest fields: the naming of the keys on disk and the spec the model was built with."""
    return {"key_naming": KEY_NAMING, "layer_spec": model.layer_spec}


def save_model_checkpoint(
    model: BuiltModel, folder: Path, hf_files: list[Path], manifest: dict[str, Any]
) -> None:
    """Writes weights, HF side files and the manifest into ``folder`` (collective)."""
    _write_manifest_and_hf_files(folder, hf_files, {**manifest, **spec_record(model)})
    dist_checkpointing.save(_sharded_state_dict(model), str(folder / "model"))


def save_model_checkpoint_by_layer(
    model: BuiltModel, folder: Path, hf_files: list[Path], manifest: dict[str, Any],
    fill: Callable[[set[int]], None],
) -> None:
    """``save_model_checkpoint`` for a model built on the meta device, one layer at a time.

    For each unit (a transformer layer; the embedding; the final norm; the output layer), the
    unit's parameters are allocated, ``fill`` loads them (it gets their ``id``s), Megatron's
    dist-checkpointing saves just that unit's part of the sharded state dict into a folder of
    its own, and the memory is released. Rank 0 then merges the units' PyTorch DCP metadata
    (the stacked layer tensors gain one chunk per layer, as Megatron's own save records them)
    and moves their data files into ``model/``: the same checkpoint ``save_model_checkpoint``
    writes, loadable (and resharded) by Megatron as usual. Memory: one layer, not the model.
    """
    _write_manifest_and_hf_files(folder, hf_files, {**manifest, **spec_record(model)})
    units_root = folder / ".units"
    device = distributed.device()
    unit_dirs = []
    units = _checkpoint_units(model)
    for chunk_index, (chunk_key, chunk_state) in enumerate(_sharded_state_dict(model).items()):
        prefixes = tuple(prefix for index, prefix, _ in units if index == chunk_index)
        stray = sorted(key for key in chunk_state if not key.startswith(prefixes))
        if stray:  # would silently be missing from the checkpoint
            raise ValueError(f"{chunk_key}: state-dict entries {stray} belong to no checkpoint unit")
    for index, (chunk_index, prefix, params) in enumerate(units):
        with torch.no_grad():
            for param in params:
                _move_parameter(param, device)
            fill({id(param) for param in params})
        state = _sharded_state_dict(model)
        chunk_key = list(state)[chunk_index]
        subset = {chunk_key: {key: value for key, value in state[chunk_key].items()
                              if key.startswith(prefix)}}
        unit_dir = units_root / f"{index:05d}"
        if _is_rank0():
            unit_dir.mkdir(parents=True)
        _barrier()
        # Each unit holds part of the stacked layer tensors: the whole is checked on load.
        dist_checkpointing.save(_unstack_layers(subset), str(unit_dir), validate_access_integrity=False)
        unit_dirs.append(unit_dir)
        del state, subset
        for param in params:
            _move_parameter(param, torch.device("meta"))
        return_freed_memory()
    _barrier()
    if _is_rank0():
        _merge_dcp_checkpoints(unit_dirs, folder / "model", model.shape.num_layers)
        shutil.rmtree(units_root)
    _barrier()


def _move_parameter(param: torch.nn.Parameter, device: torch.device) -> None:
    """Gives ``param`` fresh (uninitialised) storage on ``device``, keeping the object, so the
    module, Megatron's attributes on it and callers holding it all still see it."""
    fresh = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                               requires_grad=param.requires_grad)
    torch.utils.swap_tensors(param, fresh)


# Parameters outside the transformer layers, one unit each (the embedding and the output
# layer are the largest tensors of a model): the same list on every rank, since each save is
# collective; a stage without the module saves nothing in that round.
_OUTSIDE_LAYERS = ("embedding.", "decoder.final_layernorm.", "output_layer.")


def _checkpoint_units(model: BuiltModel) -> list[tuple[int, str, list[torch.nn.Parameter]]]:
    """(chunk index, state-dict key prefix, parameters): one unit per transformer layer, then
    one per module outside the layers; the same number of units on every rank (stages hold
    equal numbers of layers)."""
    units = []
    for chunk_index, chunk in enumerate(model.gpt_chunks()):
        named = dict(chunk.named_parameters())
        layers = chunk.decoder.layers if hasattr(chunk, "decoder") else []
        for layer_index in range(len(layers)):
            prefix = f"decoder.layers.{layer_index}."
            units.append((chunk_index, prefix, [p for n, p in named.items() if n.startswith(prefix)]))
        claimed = {n for n in named if n.startswith("decoder.layers.")}
        for prefix in _OUTSIDE_LAYERS:
            units.append((chunk_index, prefix, [p for n, p in named.items() if n.startswith(prefix)]))
            claimed.update(n for n in named if n.startswith(prefix))
        unclaimed = sorted(set(named) - claimed)
        if unclaimed:
            raise ValueError(f"parameters {unclaimed} belong to no checkpoint unit")
    return units


# Marks a layer's slice of a stacked tensor, saved as a tensor of its own (see _unstack_layers).
_LAYER_MARK = ".__layer_"


def _unstack_layers(state: dict[str, Any]) -> dict[str, Any]:
    """A unit's layer tensors as tensors of their own, keyed ``<key>.__layer_<i>``.

    Megatron stacks the layers of a stage into one tensor per parameter (a prepended axis,
    one fragment per layer), and its conversion to PyTorch's format expects a rank to hand
    over all of its fragments at once. A unit has one layer: each fragment goes out as its
    own ``[1, ...]`` tensor, and ``_merge_dcp_checkpoints`` files it back under the stacked
    key, at its layer's offset, so the result is exactly Megatron's layout.
    """
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(state)

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, list):
            return [convert(item) for item in value]
        if not isinstance(value, ShardedTensor) or value.prepend_axis_num == 0:
            return value
        if value.prepend_axis_num != 1 or value.flattened_range is not None:
            raise ValueError(f"{value.key}: unexpected layout for a layer-by-layer save")
        layer = value.global_offset[0]
        return dataclasses.replace(
            value, key=f"{value.key}{_LAYER_MARK}{layer}", data=value.data.view(1, *value.local_shape),
            local_shape=(1, *value.local_shape), global_shape=(1, *value.global_shape[1:]),
            global_offset=(0, *value.global_offset[1:]),
            axis_fragmentations=(1, *value.axis_fragmentations[1:]), prepend_axis_num=0)

    return convert(state)


def _merge_dcp_checkpoints(unit_dirs: list[Path], target: Path, num_layers: int) -> None:
    """One PyTorch DCP checkpoint out of the units' checkpoints: layer slices go back under
    their stacked key (size ``num_layers`` on the first axis, one chunk per layer and TP
    shard), other tensors and objects are taken as they are; data files are renamed per unit."""
    import dataclasses
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    def restack(key: str, item: Any) -> tuple[str, Any, int | None]:
        if _LAYER_MARK not in key or not isinstance(item, TensorStorageMetadata):
            return key, item, None
        base, layer = key.rsplit(_LAYER_MARK, 1)
        chunks = [ChunkStorageMetadata(offsets=torch.Size((int(layer), *c.offsets[1:])), sizes=c.sizes)
                  for c in item.chunks]
        return base, TensorStorageMetadata(properties=item.properties,
                                           size=torch.Size((num_layers, *item.size[1:])),
                                           chunks=chunks), int(layer)

    target.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    first = None
    for index, unit in enumerate(unit_dirs):
        metadata = FileSystemReader(str(unit)).read_metadata()
        first = first or metadata
        layers_of: dict[str, tuple[str, int | None]] = {}
        for key, item in metadata.state_dict_metadata.items():
            original = key
            key, item, layer = restack(key, item)
            layers_of[original] = (key, layer)
            known = tensors.get(key)
            if known is None:
                tensors[key] = item
            elif isinstance(item, TensorStorageMetadata) and isinstance(known, TensorStorageMetadata):
                if known.size != item.size or known.properties.dtype != item.properties.dtype:
                    raise ValueError(f"{unit}: tensor {key!r} is {tuple(item.size)} "
                                     f"{item.properties.dtype}, other units hold {tuple(known.size)} "
                                     f"{known.properties.dtype}")
                known.chunks.extend(item.chunks)
            else:
                raise ValueError(f"{unit}: {key!r} appears in two units and is not a tensor")
        prefix = f"u{index:05d}"
        for item_index, info in metadata.storage_data.items():
            key, layer = layers_of.get(item_index.fqn, (item_index.fqn, None))
            if layer is not None:
                item_index = MetadataIndex(fqn=key, offset=torch.Size((layer, *item_index.offset[1:])))
            storage[item_index] = dataclasses.replace(info, relative_path=prefix + info.relative_path)
        for data_file in unit.glob("*.distcp"):
            data_file.rename(target / (prefix + data_file.name))
    assert first is not None
    merged = Metadata(state_dict_metadata=tensors, planner_data=first.planner_data,
                      storage_data=storage, storage_meta=first.storage_meta, version=first.version)
    with open(target / ".metadata", "wb") as handle:
        pickle.dump(merged, handle)
    for name in ("metadata.json", "common.pt"):  # Megatron's backend record and common state
        if (unit_dirs[0] / name).exists():
            shutil.copy2(unit_dirs[0] / name, target / name)


def _write_manifest_and_hf_files(folder: Path, hf_files: list[Path], manifest: dict[str, Any]) -> None:
    weights = folder / "model"
    if _is_rank0():
        weights.mkdir(parents=True, exist_ok=True)
        hf_folder = folder / "hf"
        hf_folder.mkdir(exist_ok=True)
        for file in hf_files:
            shutil.copy2(file, hf_folder / file.name)
        full_manifest = {"format_version": FORMAT_VERSION, **manifest}
        (folder / MANIFEST).write_text(json.dumps(full_manifest, indent=2))
    _barrier()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {folder} is not a megatron_prime model "
                                "checkpoint (convert an HF model with convert_hf_to_megatron)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={manifest.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    if not (folder / "model" / "metadata.json").is_file():
        raise FileNotFoundError(f"{folder / 'model'}: the weights of the checkpoint are missing")
    return manifest


def hf_config_of(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "hf" / "config.json").read_text())


def load_model_checkpoint(model: BuiltModel, folder: str | Path) -> dict[str, Any]:
    """Loads weights saved at any layout into ``model`` (collective); returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["hf_architecture"] != model.shape.architecture.hf_architecture:
        raise ValueError(f"{folder}: checkpoint holds {manifest['hf_architecture']}, the model "
                         f"is {model.shape.architecture.hf_architecture}")
    check_key_naming(folder, manifest.get("key_naming"))
    state = load_sharded(_sharded_state_dict(model), folder / "model")
    load_model_chunks(model, state, folder)
    return manifest


def load_model_chunks(model: BuiltModel, state: dict[str, Any], folder: Path) -> None:
    """Copies a loaded ``_sharded_state_dict`` layout into the model's chunks."""
    chunks = model.gpt_chunks()
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            chunk_state = state["model"] if len(chunks) == 1 else state[f"model{i}"]
            # _extra_state entries (TE's FP8 metadata) are absent on the local spec.
            result = chunk.load_state_dict(chunk_state, strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
            if missing:
                raise ValueError(f"{folder}: checkpoint lacks tensors {missing[:5]}")
