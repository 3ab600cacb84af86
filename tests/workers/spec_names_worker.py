"""Run by tests/test_checkpoint_spec_names.py as one process (torchrun, world size 1).

For a 2-layer Qwen2 (QKV bias, untied) and a 2-layer Llama (tied), built with the local layer
spec on CPU, it records the module state-dict keys, their TE-spec counterparts and the keys a
real save puts on disk, then loads checkpoints written in several ways into a fresh model and
records whether every tensor came back (or the error the load raised):
  plain        save_model_checkpoint as is
  te_extra     TE-like payloads in every linear's _extra_state, plus the attention kernel's
               _extra_state that only TE modules have
  no_extra     no _extra_state at all (a weights-only writer)
  unknown_key  an extra TE-named tensor (layer_norm_bias of a LayerNorm model)
  lacks_weight the final norm left out
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from torch.distributed.checkpoint import FileSystemReader

from megatron_prime import distributed
from megatron_prime.checkpoint.model_checkpoint import (
    _sharded_state_dict,
    _write_manifest_and_hf_files,
    load_model_checkpoint,
    save_model_checkpoint,
    spec_record,
)
from megatron_prime.checkpoint.spec_names import te_state_dict_keys
from megatron_prime.config import ParallelConfig
from megatron_prime.models.builder import BuiltModel, build_model
from workers.parity_worker import make_hf_model

EXTRA = "_extra_state"


def tiny_config(arch: str) -> dict[str, Any]:
    config, _ = make_hf_model(arch)
    config.num_hidden_layers = 2
    return config.to_dict()


def weights(model: BuiltModel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.gpt_chunks()[0].state_dict().items()
            if isinstance(tensor, torch.Tensor)}


def manifest(model: BuiltModel) -> dict[str, Any]:
    return {"hf_architecture": model.shape.architecture.hf_architecture, "role": "policy",
            "dtype": "float32"}


def save_edited(model: BuiltModel, folder: Path, edit: Callable[[dict], dict]) -> None:
    """Writes a model checkpoint whose model entries went through ``edit``."""
    _write_manifest_and_hf_files(folder, [], {**manifest(model), **spec_record(model)})
    state = _sharded_state_dict(model)
    state["model"] = edit(state["model"])
    dist_checkpointing.save(state, str(folder / "model"))


def te_extra(entries: dict) -> dict:
    out = {}
    for name, value in entries.items():
        if isinstance(value, ShardedObject) and name.endswith(EXTRA):
            # TE keeps FP8 scales and amax history as a serialised tensor.
            payload = torch.frombuffer(bytearray(pickle.dumps({"scale_fwd": [1.0, 2.0]})),
                                       dtype=torch.uint8)
            value = dataclasses.replace(value, data=payload)
            if name.endswith("linear_qkv._extra_state"):
                kernel = name.replace("linear_qkv._extra_state", "core_attention._extra_state")
                out[kernel] = dataclasses.replace(
                    value, key=value.key.replace("linear_qkv.", "core_attention."))
        out[name] = value
    return out


def no_extra(entries: dict) -> dict:
    return {name: value for name, value in entries.items() if not name.endswith(EXTRA)}


def unknown_key(entries: dict) -> dict:
    out = dict(entries)
    for name, value in entries.items():
        if name.endswith("input_layernorm.weight"):
            assert isinstance(value, ShardedTensor)
            out[name.replace("weight", "bias")] = dataclasses.replace(
                value, key=value.key.replace("layer_norm_weight", "layer_norm_bias"),
                data=torch.zeros_like(value.data))
    return out


def lacks_weight(entries: dict) -> dict:
    return {name: value for name, value in entries.items()
            if name != "decoder.final_layernorm.weight"}


CASES: dict[str, Callable[[dict], dict] | None] = {
    "plain": None, "te_extra": te_extra, "no_extra": no_extra, "unknown_key": unknown_key,
    "lacks_weight": lacks_weight}


def run_arch(arch: str, root: Path) -> dict[str, Any]:
    config = tiny_config(arch)
    source = build_model(config, "reference", ParallelConfig())
    with torch.no_grad():  # norms start at ones in every model: make a mix-up visible
        for param in source.gpt_chunks()[0].parameters():
            param.add_(torch.randn_like(param) * 0.1)
    expected = weights(source)
    result: dict[str, Any] = {
        "local_keys": sorted(source.gpt_chunks()[0].state_dict()),
        "te_keys": te_state_dict_keys(source.gpt_chunks()[0].state_dict()),
        "layer_spec": source.layer_spec,
        "loads": {},
    }
    for case, edit in CASES.items():
        folder = root / f"{arch}_{case}"
        if edit is None:
            save_model_checkpoint(source, folder, [], manifest(source))
        else:
            save_edited(source, folder, edit)
        if case == "plain":
            metadata = FileSystemReader(str(folder / "model")).read_metadata()
            result["disk_keys"] = sorted(metadata.state_dict_metadata)
            result["manifest"] = json.loads((folder / "megatron_prime.json").read_text())
        target = build_model(config, "reference", ParallelConfig())
        before = weights(target)
        outcome: dict[str, Any] = {
            "differed_before": sorted(n for n in expected if not torch.equal(before[n], expected[n]))}
        try:
            load_model_checkpoint(target, folder)
        except ValueError as error:
            outcome["error"] = str(error)
        else:
            after = weights(target)
            outcome["loaded"] = sorted(after)
            outcome["mismatched"] = sorted(n for n in expected if not torch.equal(after[n], expected[n]))
        result["loads"][case] = outcome
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed.init_distributed(ParallelConfig(), use_gpu=False)
    results = {arch: run_arch(arch, Path(args.root)) for arch in ("qwen2", "llama")}
    Path(args.out).write_text(json.dumps(results, indent=1))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
