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
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

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
    chunks = model.gpt_chunks()
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_model_checkpoint(
    model: BuiltModel, folder: Path, hf_files: list[Path], manifest: dict[str, Any]
) -> None:
    """Writes weights, HF side files and the manifest into ``folder`` (collective)."""
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
    dist_checkpointing.save(_sharded_state_dict(model), str(weights))


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
    state = dist_checkpointing.load(_sharded_state_dict(model), str(folder / "model"))
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
