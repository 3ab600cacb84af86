"""Train-state checkpoints: everything needed to resume a PRIME run where it stopped.

One checkpoint is one folder ``<checkpoint.dir>/step_<step:08d>``:
  policy/, prm/        Megatron dist-checkpoint (torch_dist) of each trainable model's weights
                       and its optimizer state (Adam moments, step count, fp32 master params)
  schedulers.pt        state_dict() of each learning-rate scheduler (written by rank 0)
  rng/rank_NNNNN.pt    every rank's own RNG states (python, numpy, torch, CUDA, Megatron's
                       tensor-parallel tracker)
  hf/                  the model's config.json, tokenizer and generation files, so a step
                       folder converts to HF on its own (megatron-prime-megatron-to-hf --role)
  hf_prm/              the same for a PRM that started from its own checkpoint (model.prm_path,
                       maybe another size); the marker's ``hf_folders`` says which is whose
  train_state.json     the marker: step, the caller's ``extra``, the layout it was saved at

The frozen reference model is not saved: it is the SFT model the run started from.

Why it is crash-safe: everything is written into ``.step_<step>.partial`` and the marker is
written last; rank 0 then renames the folder. A checkpoint counts only if its final name
exists *and* it holds the marker, so a job killed mid-save leaves the previous checkpoint as
the newest complete one (``resume: auto`` picks it) and the stale ``.partial`` is removed by
the next successful save.

Optimizer layout: with the distributed optimizer the state is saved in Megatron's
``dp_reshardable`` format (Megatron-LM's default: every rank writes its own shard, no
gather). It resumes at any data-parallel size but needs the same TP/PP/CP/VPP; the plain
optimizer's state, like the weights, reshards to any layout.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.optimizer import MegatronOptimizer, distrib_optimizer

from megatron_prime import distributed
from megatron_prime.checkpoint.model_checkpoint import (
    _barrier,
    _is_rank0,
    _sharded_state_dict,
    atomic_output_dir,
    load_model_chunks,
)
from megatron_prime.checkpoint.spec_names import (
    KEY_NAMING,
    DamagedCheckpoint,
    one_line_error,
    check_key_naming,
    load_sharded,
)
from megatron_prime.config import require, require_positive_int
from megatron_prime.models.builder import BuiltModel

MARKER = "train_state.json"
FORMAT_VERSION = 1
SCHEDULERS_FILE = "schedulers.pt"
RNG_FOLDER = "rng"
HF_FOLDER = "hf"
# Test hook: tests/test_train_state.py sets this to a step number to SIGKILL the process while
# that step's checkpoint is written (all state on disk, marker and rename not yet done).
CRASH_ENV = "MEGATRON_PRIME_TEST_CRASH_DURING_CHECKPOINT"
_STEP_FOLDER = re.compile(r"step_(\d+)")
# Megatron-LM's default format for the distributed optimizer; see the module docstring.
DISTRIB_OPTIM_SHARDING = "dp_reshardable"
# Layout dimensions that must match to load a dp_reshardable optimizer state.
_DP_RESHARDABLE_FIXED = ("tensor_parallel_size", "pipeline_parallel_size",
                         "context_parallel_size", "virtual_pipeline_parallel_size")


@dataclass
class CheckpointConfig:
    """Where train-state checkpoints go, how often, how many are kept, what to resume from."""

    # Root folder of train-state checkpoints (relative paths are resolved by the caller).
    dir: str = "checkpoints"
    # Save every k steps; 0 = only at the end and on SIGTERM/SIGUSR1.
    save_every: int = 0
    # Complete checkpoints kept; older ones are deleted once a new one is complete.
    keep_last: int = 2
    # "auto": newest complete checkpoint under dir, if any; "none": start fresh;
    # anything else is the path of one checkpoint folder (step_XXXXXXXX).
    resume: str = "auto"

    def validate(self) -> None:
        require(isinstance(self.dir, str) and self.dir.strip() != "", "checkpoint.dir",
                self.dir, "a non-empty folder path")
        require(isinstance(self.save_every, int) and not isinstance(self.save_every, bool)
                and self.save_every >= 0, "checkpoint.save_every", self.save_every,
                "an integer >= 0 (0 = only at the end and on SIGTERM/SIGUSR1)")
        require_positive_int("checkpoint.keep_last", self.keep_last)
        require(isinstance(self.resume, str) and self.resume.strip() != "", "checkpoint.resume",
                self.resume, "'auto', 'none' or the path of one checkpoint folder")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_FOLDER.fullmatch(child.name)
        if match and child.is_dir() and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``; None if there is none.

    Interrupted saves (``.step_*.partial``) and step folders without the marker are ignored.
    """
    complete = _complete_checkpoints(Path(root))
    return complete[-1][1] if complete else None


def hf_folder_of(folder: str | Path, role: str) -> Path:
    """The folder with ``role``'s config.json and tokenizer in a train-state checkpoint
    (``hf/`` unless the role started from its own checkpoint; older checkpoints: ``hf/``)."""
    folder = Path(folder)
    return folder / read_marker(folder).get("hf_folders", {}).get(role, HF_FOLDER)


def read_marker(folder: str | Path) -> dict[str, Any]:
    """The marker of a complete checkpoint; errors say why ``folder`` is not one."""
    folder = Path(folder)
    path = folder / MARKER
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if not path.is_file():
        if folder.name.endswith(".partial"):
            why = "it is the staging folder of an interrupted save"
        elif any(_STEP_FOLDER.fullmatch(child.name) for child in folder.iterdir()):
            why = ("it looks like the checkpoint root (checkpoint.dir); pass one of its "
                   "step_* folders, or resume=auto")
        else:
            why = (f"{MARKER} is missing (written last by save_train_state: the save was "
                   "interrupted or this is not a train-state checkpoint)")
        raise ValueError(f"{folder} is not a complete train-state checkpoint: {why}")
    marker = json.loads(path.read_text())
    if marker.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={marker.get('format_version')!r} is not "
                         f"supported: expected {FORMAT_VERSION}")
    return marker


def resolve_resume(config: CheckpointConfig, root: Path) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh."""
    if config.resume == "none":
        return None
    if config.resume == "auto":
        return find_latest_checkpoint(root)
    folder = Path(config.resume).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"checkpoint.resume={config.resume!r}: {folder.absolute()} does not exist; expected "
            "'auto', 'none' or the path of one checkpoint folder (step_XXXXXXXX)")
    if not folder.is_dir():
        raise ValueError(f"checkpoint.resume={config.resume!r}: {folder} is a file; expected "
                         "the path of one checkpoint folder (step_XXXXXXXX)")
    read_marker(folder)
    return folder


def _current_layout() -> dict[str, int | None]:
    parallel = distributed.runtime().parallel
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tensor_parallel_size": distributed.tp_world_size(),
        "pipeline_parallel_size": distributed.pp_world_size(),
        "context_parallel_size": parallel.context_parallel_size,
        "virtual_pipeline_parallel_size": parallel.virtual_pipeline_parallel_size,
        "data_parallel_size": distributed.dp_world_size(),
    }


def _uses_distributed_optimizer(model: BuiltModel) -> bool:
    return bool(model.chunks[0].ddp_config.use_distributed_optimizer)


def _optimizer_metadata(model: BuiltModel) -> dict[str, Any]:
    """Megatron's sharded_state_dict options, saved in the marker and reused on load."""
    # No "chained_" prefix on keys: the saved state does not depend on how Megatron groups
    # parameters into sub-optimizers.
    metadata: dict[str, Any] = {"chained_optim_avoid_prefix": True}
    if _uses_distributed_optimizer(model):
        metadata["distrib_optim_sharding_type"] = DISTRIB_OPTIM_SHARDING
    return metadata


# Adam's step count (its bias correction) lives in different places per implementation, and
# Megatron picks the implementation at import: torch's Adam without Apex/Transformer Engine (our
# CPU runs) keeps one tensor per parameter in its state; the fused Adams (Transformer Engine's,
# else Apex's: the GPU path) keep one int per param group. Megatron-LM's own save and load
# (megatron-core's DistributedOptimizer.state_dict/load_state_dict) move the count between the
# two only for its distributed optimizer, and there with two gaps (below).
# Checked against megatron-core 0.16.1 and Transformer Engine 2.x's FusedAdam.

def _inner_adams(optimizer: MegatronOptimizer) -> list[torch.optim.Optimizer]:
    """The torch-level optimizers under a Megatron optimizer (one per chained part)."""
    return [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])
            if sub.optimizer is not None]


def _counts_per_parameter(adam: torch.optim.Optimizer) -> bool:
    """torch's Adam/AdamW (step in each parameter's state), not a fused one (step per group)."""
    return isinstance(adam, (torch.optim.Adam, torch.optim.AdamW))


def _torch_adams_in_distributed_optimizer(
    optimizer: MegatronOptimizer,
) -> list[torch.optim.Optimizer]:
    return [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(sub, distrib_optimizer.DistributedOptimizer)
            and _counts_per_parameter(sub.optimizer)]


def adam_step_count(adams: Sequence[torch.optim.Optimizer]) -> int | None:
    """Steps taken by these Adams (None before the first), read wherever each keeps it; saved
    in the checkpoint marker so that a load can put it where the loading job's Adam reads it.
    Host sync: per-parameter step tensors are read."""
    counts: set[int] = set()
    for adam in adams:
        if _counts_per_parameter(adam):
            # (A torch Adam's groups may hold a stale "step" left by a distributed load.)
            counts.update(int(state["step"]) for state in adam.state.values() if "step" in state)
        else:
            counts.update(int(group["step"]) for group in adam.param_groups
                          if group.get("step") is not None and group["params"])
    if len(counts) > 1:
        raise RuntimeError(f"Adam parts disagree on the step count {sorted(counts)}; expected one")
    return counts.pop() if counts else None


def _loaded_step_count(adams: Sequence[torch.optim.Optimizer]) -> int | None:
    """The count a checkpoint without "adam_steps" in its marker brought in: Megatron's
    distributed load leaves it in the param groups (for torch's Adam too, whose parameters
    then share a stale tensor), a non-distributed load in each parameter's state."""
    for adam in adams:
        for group in adam.param_groups:
            if group.get("step") is not None and group["params"]:
                return int(group["step"])
    return adam_step_count(adams)


def _allocate_distributed_adam_state(optimizer: MegatronOptimizer) -> None:
    """Gives a torch Adam that has not stepped yet a zero state at step 0, before a load.

    Reason: DistributedOptimizer.state_dict() reads Adam's step from the per-parameter state
    and asserts it holds exactly one value, which fails before the first step, i.e. on every
    resume into a freshly built optimizer. The zeros are overwritten by the load. (A fused
    Adam's count is per group; Megatron's ``init_state_fn`` allocates its moments.)
    """
    for adam in _torch_adams_in_distributed_optimizer(optimizer):
        if adam.state:
            continue
        for group in adam.param_groups:
            for param in group["params"]:
                adam.state[param] = {"step": torch.tensor(0.0),
                                     "exp_avg": torch.zeros_like(param),
                                     "exp_avg_sq": torch.zeros_like(param)}


def _restore_adam_steps(adams: Sequence[torch.optim.Optimizer], count: int | None) -> None:
    """Puts the saved step count where each loaded Adam reads it: a tensor of its own per
    parameter (torch) or an int per param group (fused).

    Reasons: (1) DistributedOptimizer.load_state_dict() puts one *shared* step tensor into
    every parameter's state of a torch Adam, and the dp_reshardable load then copies the
    pre-load step into it; torch's Adam increments each parameter's step in place, so a shared
    tensor would advance once per parameter and every step. (2) A checkpoint written by the
    other implementation (torch's Adam on CPU or without TE, a fused one on GPU) holds the count
    in the other place, or as a float where Transformer Engine's kernel takes an int: a fused
    Adam that finds no count in its groups silently restarts bias correction at step 1, and a
    torch Adam that finds none in a parameter's state fails at its next step.
    """
    if count is None:
        return
    for adam in adams:
        for group in adam.param_groups:
            if _counts_per_parameter(adam):
                for param in group["params"]:
                    if adam.state.get(param):
                        adam.state[param]["step"] = torch.tensor(float(count))
            else:
                group["step"] = int(count)  # every group, empty ones too (as Megatron aligns)
                for param in group["params"]:
                    adam.state.get(param, {}).pop("step", None)  # a torch Adam's leftover


def _role_sharded_state_dict(model: BuiltModel, optimizer: MegatronOptimizer | None,
                             metadata: dict[str, Any] | None, is_loading: bool) -> dict[str, Any]:
    state = _sharded_state_dict(model)
    if optimizer is not None:
        # The optimizer names its tensors after the model's sharded tensors, so its state
        # reshards along with the weights.
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                          metadata=metadata)
    return state


def _capture_rng() -> dict[str, Any]:
    """This rank's RNG states, as tensors and plain values (loadable with weights_only)."""
    np_algorithm, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"algorithm": np_algorithm, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if distributed.runtime().on_gpu else None,
        # Megatron forks these for dropout in TP regions (different per TP rank).
        "megatron_tracker": {name: state.clone() for name, state in
                             tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def _restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["algorithm"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and distributed.runtime().on_gpu:
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["megatron_tracker"])


def _check_roles(models: dict[str, BuiltModel], optimizers: dict[str, MegatronOptimizer]) -> None:
    for role, model in models.items():
        if not model.trainable:
            raise ValueError(f"model {role!r} is frozen (the reference is the SFT model) and is "
                             "not part of the train state: pass only trainable models")
    unmatched = sorted(set(optimizers) - set(models))
    if unmatched:
        raise ValueError(f"optimizers {unmatched} have no model of the same name: expected "
                         f"names among the models {sorted(models)}")


def _prune(root: Path, keep_last: int, just_saved: Path) -> None:
    """Deletes all but the newest ``keep_last`` complete checkpoints and stale staging folders.

    Newest means highest step. ``just_saved`` is never deleted, even when a run resumed from
    an older checkpoint saves below the step of one left by an abandoned later run.
    A checkpoint is renamed out of the ``step_*`` namespace before it is deleted, so a crash
    mid-delete never leaves a half-deleted folder that still looks complete.
    """
    for _, folder in _complete_checkpoints(root)[:-keep_last]:
        if folder == just_saved:
            continue
        doomed = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(doomed, ignore_errors=True)
        folder.rename(doomed)
    for stale in [*root.glob(".step_*.partial"), *root.glob(".step_*.old")]:
        shutil.rmtree(stale, ignore_errors=True)


def save_train_state(
    root: str | Path,
    step: int,
    models: dict[str, BuiltModel],
    optimizers: dict[str, MegatronOptimizer],
    schedulers: dict[str, Any],
    extra: dict[str, Any],
    keep_last: int,
    hf_files: Sequence[Path] = (),
    role_hf_files: dict[str, Sequence[Path]] | None = None,
) -> Path:
    """Writes ``<root>/step_<step:08d>`` atomically, then prunes old checkpoints (collective).

    ``hf_files`` (config.json, tokenizer and generation files of the models) are copied into
    its ``hf/`` folder: what an HF export of the trained policy or PRM needs besides weights.
    A role in ``role_hf_files`` (a PRM of its own architecture) gets its own ``hf_<role>/``.

    ``extra`` (data loader position, metrics...) must be JSON data; it comes back from
    ``load_train_state`` as JSON gives it (tuples as lists, keys as strings). The RNG states
    are those of the moment of the call. Returns the checkpoint folder.
    """
    require(isinstance(step, int) and step >= 0, "step", step, "an integer >= 0")
    require_positive_int("checkpoint.keep_last", keep_last)
    _check_roles(models, optimizers)
    role_hf_files = role_hf_files or {}
    unknown = sorted(set(role_hf_files) - set(models))
    require(not unknown, "role_hf_files", unknown, f"roles among the saved models {sorted(models)}")
    hf_folders = {role: (f"{HF_FOLDER}_{role}" if role in role_hf_files else HF_FOLDER)
                  for role in sorted(models)}
    try:
        extra_json = json.loads(json.dumps(extra))
    except (TypeError, ValueError) as error:
        raise ValueError(f"extra is not JSON data ({error}): pass numbers, strings, lists and "
                         "dicts") from None
    rng_states = _capture_rng()  # first: nothing below may move the caller's RNG first
    root = Path(root).absolute()
    rank = dist.get_rank() if dist.is_initialized() else 0
    marker = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "extra": extra_json,
        "models": sorted(models),
        "model_dtypes": {role: str(model.config.params_dtype).removeprefix("torch.")
                         for role, model in sorted(models.items())},
        # Weights load into either layer spec (checkpoint/spec_names.py).
        "key_naming": KEY_NAMING,
        "layer_specs": {role: model.layer_spec for role, model in sorted(models.items())},
        "hf_folders": hf_folders if hf_files else {},
        "optimizers": {role: _optimizer_metadata(models[role]) for role in sorted(optimizers)},
        # Where the saving job's Adam kept it is no concern of the loading job's.
        "adam_steps": {role: adam_step_count(_inner_adams(optimizers[role]))
                       for role in sorted(optimizers)},
        "schedulers": sorted(schedulers),
        "layout": _current_layout(),
    }

    with atomic_output_dir(root / checkpoint_name(step), overwrite=True) as staging:
        for role, model in models.items():
            if _is_rank0():
                (staging / role).mkdir()
            _barrier()
            state = _role_sharded_state_dict(model, optimizers.get(role),
                                             marker["optimizers"].get(role), is_loading=False)
            dist_checkpointing.save(state, str(staging / role))
        (staging / RNG_FOLDER).mkdir(exist_ok=True)
        if _is_rank0() and hf_files:
            for folder, files in ((HF_FOLDER, hf_files),
                                  *((hf_folders[role], role_hf_files[role])
                                    for role in sorted(role_hf_files))):
                (staging / folder).mkdir()
                for file in files:
                    shutil.copy2(file, staging / folder / Path(file).name)
        torch.save(rng_states, staging / RNG_FOLDER / f"rank_{rank:05d}.pt")
        if _is_rank0():
            torch.save({name: scheduler.state_dict() for name, scheduler in schedulers.items()},
                       staging / SCHEDULERS_FILE)
        _barrier()  # every rank's files are on disk before the marker says "complete"
        if os.environ.get(CRASH_ENV) == str(step):  # test hook, see CRASH_ENV
            os.kill(os.getpid(), signal.SIGKILL)
        if _is_rank0():
            marker_tmp = staging / f"{MARKER}.tmp"
            marker_tmp.write_text(json.dumps(marker, indent=2))
            marker_tmp.replace(staging / MARKER)
    # atomic_output_dir has renamed the staging folder on every rank's way out.
    final = root / checkpoint_name(step)
    if _is_rank0():
        _prune(root, keep_last, just_saved=final)
    _barrier()
    return final


def _require_saved(folder: Path, what: str, wanted: dict[str, Any], saved: list[str]) -> None:
    absent = sorted(set(wanted) - set(saved))
    if absent:
        raise ValueError(f"{folder} holds no {what} {absent}: it has {what}s {sorted(saved)}")


def _check_optimizer_format(folder: Path, role: str, saved: dict[str, Any],
                            current: dict[str, Any], saved_layout: dict[str, Any],
                            layout: dict[str, Any], saved_spec: str | None,
                            spec: str) -> None:
    """The optimizer state must be loadable as this job's optimizer would save it."""
    saved_sharding = saved.get("distrib_optim_sharding_type")
    current_sharding = current.get("distrib_optim_sharding_type")
    if saved_sharding != current_sharding:
        raise ValueError(
            f"{folder}: the optimizer state of {role!r} was saved with "
            f"use_distributed_optimizer={saved_sharding is not None} and this job has "
            f"use_distributed_optimizer={current_sharding is not None}: expected the same value")
    if saved_sharding != "dp_reshardable":
        return
    changed = [key for key in _DP_RESHARDABLE_FIXED if saved_layout[key] != layout[key]]
    if changed:
        was = {key: saved_layout[key] for key in changed}
        now = {key: layout[key] for key in changed}
        raise ValueError(
            f"{folder}: the distributed optimizer state of {role!r} was saved at {was} and this "
            f"job runs at {now}: expected the same {', '.join(_DP_RESHARDABLE_FIXED)} (only "
            "the data-parallel size may change)")
    if saved_spec is not None and saved_spec != spec:
        # The weights translate between specs (spec_names.py), but this format stores flat
        # buffers in the order of the model's parameters, which the layer spec decides.
        raise ValueError(
            f"{folder}: the distributed optimizer state of {role!r} was saved by a model of "
            f"layer spec {saved_spec!r} and this job builds {spec!r}: resume with the same "
            "precision.layer_spec on the same kind of device (the weights alone load "
            "anywhere, e.g. megatron-prime-megatron-to-hf)")


_OLDER_STEP_HINT = ("resume from an older step with checkpoint.resume=<a step_* folder under "
                    "{root}>, or start fresh with checkpoint.resume=none")


def _load_small_file(folder: Path, name: str) -> Any:
    """``torch.load`` of the scheduler or RNG file ``name`` of checkpoint ``folder``: a
    truncated one is named, where torch would raise a bare EOFError."""
    try:
        return torch.load(folder / name, weights_only=True)
    except (EOFError, pickle.UnpicklingError, RuntimeError, OSError) as error:
        hint = _OLDER_STEP_HINT.format(root=folder.parent)
        raise DamagedCheckpoint(f"{folder}: the checkpoint is damaged: {name} cannot be read "
                                f"({one_line_error(error)}); {hint}") from error


def load_train_state(
    folder: str | Path,
    models: dict[str, BuiltModel],
    optimizers: dict[str, MegatronOptimizer],
    schedulers: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """Restores weights, optimizer and scheduler state and this rank's RNG (collective).

    Returns ``(step, extra)`` as saved. RNG states are restored only at the world size they
    were saved at (otherwise ranks do not correspond: a warning, and the RNG is left as is).
    """
    folder = Path(folder).absolute()
    marker = read_marker(folder)
    _check_roles(models, optimizers)
    _require_saved(folder, "model", models, marker["models"])
    _require_saved(folder, "optimizer", optimizers, list(marker["optimizers"]))
    _require_saved(folder, "scheduler", schedulers, marker["schedulers"])
    check_key_naming(folder, marker.get("key_naming"))
    layout = _current_layout()
    saved_layout = marker["layout"]
    for role in optimizers:
        _check_optimizer_format(folder, role, marker["optimizers"][role],
                                _optimizer_metadata(models[role]), saved_layout, layout,
                                marker.get("layer_specs", {}).get(role), models[role].layer_spec)

    for role, model in models.items():
        optimizer = optimizers.get(role)
        if optimizer is not None:
            _allocate_distributed_adam_state(optimizer)
        sharded = _role_sharded_state_dict(model, optimizer, marker["optimizers"].get(role),
                                           is_loading=True)
        try:
            state = load_sharded(sharded, folder / role)
        except DamagedCheckpoint as error:
            hint = _OLDER_STEP_HINT.format(root=folder.parent)
            raise DamagedCheckpoint(f"{error}; {hint}") from error
        load_model_chunks(model, state, folder / role)
        if optimizer is not None:
            # no_grad: the distributed optimizer copies into its main params in place, and
            # with fp32 weights those are views of the model's parameters (leaves needing grad).
            with torch.no_grad():
                optimizer.load_state_dict(state["optimizer"])
            adams = _inner_adams(optimizer)
            saved_count = marker.get("adam_steps", {}).get(role)
            # Older checkpoints have no count in the marker: the loaded groups (distributed
            # optimizer) or parameter states (non-distributed) hold it.
            _restore_adam_steps(adams, saved_count if saved_count is not None
                                else _loaded_step_count(adams))

    if schedulers:
        scheduler_states = _load_small_file(folder, SCHEDULERS_FILE)
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(scheduler_states[name])

    if saved_layout["world_size"] == layout["world_size"]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        _restore_rng(_load_small_file(folder, f"{RNG_FOLDER}/rank_{rank:05d}.pt"))
    else:
        warnings.warn(f"{folder} was saved by {saved_layout['world_size']} ranks and this job "
                      f"has {layout['world_size']}: RNG states are not restored", stacklevel=2)
    return marker["step"], marker["extra"]
