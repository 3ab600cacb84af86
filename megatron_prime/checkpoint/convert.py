"""HF <-> Megatron checkpoint conversion, at any TP/PP, through the one mapping table.

Run as one process (TP=PP=1) or under ``torchrun --nproc-per-node TP*PP`` to split the work
and the memory: each rank holds only its part of the Megatron model plus one HF tensor;
the HF model is never materialised. Outputs are written atomically (``atomic_output_dir``).

    megatron-prime-hf-to-megatron --hf-dir Eurus-2-7B-SFT --output ckpt/sft
    megatron-prime-megatron-to-hf --checkpoint ckpt/sft --output hf_out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_io import (
    HFCheckpoint,
    SafetensorsShardWriter,
    dtype_name,
    finalize_hf_folder,
)
from megatron_prime.checkpoint.hf_mapping import (
    hf_plan,
    iter_hf_tensors,
    load_hf_weights,
    named_megatron_parameters,
    resolve,
)
from megatron_prime.checkpoint.model_checkpoint import (
    _sharded_state_dict,
    atomic_output_dir,
    hf_config_of,
    load_model_checkpoint,
    load_model_chunks,
    read_manifest,
    refuse_existing_output,
    save_model_checkpoint_by_layer,
)
from megatron_prime.checkpoint.spec_names import check_key_naming, load_sharded
from megatron_prime.checkpoint.train_state import hf_folder_of
from megatron_prime.checkpoint.train_state import MARKER as TRAIN_STATE_MARKER
from megatron_prime.checkpoint.train_state import read_marker
from megatron_prime.config import ParallelConfig, PrecisionConfig
from megatron_prime.models.architectures import ModelShape
from megatron_prime.models.builder import ROLES, BuiltModel, build_model

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class Progress:
    """Prints tensors done / total and MB/s on global rank 0, at most every ``interval`` s."""

    def __init__(self, label: str, total: int, interval: float = 2.0):
        self.label, self.total, self.interval = label, total, interval
        self.done = self.bytes = 0
        self.start = self.last = time.perf_counter()
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0

    def update(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        if time.perf_counter() - self.last >= self.interval:
            self.report()

    def report(self) -> None:
        now = self.last = time.perf_counter()
        if self.enabled:
            total = f"/{self.total}" if self.total else ""
            print(f"{self.label}: {self.done}{total} tensors, {self.bytes / 1e6:.0f} MB, "
                  f"{self.bytes / 1e6 / max(now - self.start, 1e-9):.0f} MB/s", flush=True)


def _counting_source(hf: HFCheckpoint, progress: Progress) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        tensor = hf.tensor(name)
        progress.update(tensor.nbytes)
        return tensor

    return get


def _precision_for(dtype: torch.dtype) -> PrecisionConfig:
    return PrecisionConfig(dtype=dtype_name(dtype))


def convert_hf_to_megatron(
    hf_dir: str | Path,
    output: str | Path,
    parallel: ParallelConfig,
    role: str = "policy",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> None:
    """HF folder -> Megatron model checkpoint. Collective over the initialised world.

    The Megatron model is built on the meta device and written one layer at a time
    (``save_model_checkpoint_by_layer``): each rank holds one layer of its part plus the HF
    tensors that layer is made of, never the model.
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r} is invalid: expected one of {list(ROLES)}")
    hf = HFCheckpoint.open(hf_dir)  # validates everything before anything is written
    dtype = dtype or hf.dtype
    model = build_model(hf.config, "reference", parallel, _precision_for(dtype),
                        initialize_weights=False, device=torch.device("meta"))
    progress = Progress("hf->megatron read", total=0)
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        # Each rank reads only the HF tensors its parameters need.
        names = {n for chunk in model.gpt_chunks() for n in _hf_names_of(chunk, model.shape)}
        progress.total = len(names)
        source = _counting_source(hf, progress)
        save_model_checkpoint_by_layer(
            model, staging, hf.side_files() + [hf.path / "config.json"], {
                "hf_architecture": model.shape.architecture.hf_architecture,
                "role": role,
                "dtype": dtype_name(dtype),
                "saved_with": {"tensor_parallel_size": parallel.tensor_parallel_size,
                               "pipeline_parallel_size": parallel.pipeline_parallel_size},
                "source": str(Path(hf_dir).absolute()),
            }, fill=lambda ids: load_hf_weights(model, source, only=ids))
        progress.report()


def _hf_names_of(chunk: torch.nn.Module, shape) -> list[str]:
    return [n for name, _ in named_megatron_parameters(chunk) for n in resolve(name, shape).hf_names]


def convert_megatron_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    parallel: ParallelConfig,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    role: str | None = None,
) -> None:
    """Megatron checkpoint (saved at any layout) -> HF folder. Collective.

    ``checkpoint`` is a model checkpoint (``megatron_prime.json``) or a training run's
    ``step_*`` folder, whose ``role`` ("policy" by default, or "prm") is exported: how the
    trained policy and implicit PRM are published. Each pipeline stage's TP-rank-0 (of DP
    replica 0) writes the layers it holds into its own safetensors parts; global rank 0 then
    names them ``model-0000i-of-0000N`` and writes the index, config.json,
    generation_config.json and the tokenizer files.
    """
    checkpoint = Path(checkpoint)
    if (checkpoint / TRAIN_STATE_MARKER).is_file():
        model, hf_config, side_files, dtype = _load_trained_model(checkpoint, role or "policy",
                                                                   parallel, dtype)
    else:
        manifest = read_manifest(checkpoint)
        if role is not None and role != manifest["role"]:
            raise ValueError(f"--role={role} is for training checkpoints (step_* folders); "
                             f"{checkpoint} is a model checkpoint of role {manifest['role']!r}")
        hf_config = hf_config_of(checkpoint)
        dtype = dtype or getattr(torch, manifest["dtype"])
        model = build_model(hf_config, "reference", parallel, _precision_for(dtype),
                            initialize_weights=False)
        load_model_checkpoint(model, checkpoint)
        side_files = sorted((checkpoint / "hf").iterdir())
    export_hf_folder(model, output, hf_config, side_files, dtype, max_shard_bytes, overwrite)


def check_trained_model(checkpoint: Path, role: str) -> tuple[dict, torch.dtype]:
    """(HF config, saved dtype) of ``role`` in a training checkpoint; errors name what is missing."""
    marker = read_marker(checkpoint)
    if role not in marker["models"]:
        raise ValueError(f"--role={role}: {checkpoint} holds the trained models {marker['models']}")
    config_file = hf_folder_of(checkpoint, role) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; this training checkpoint does not carry "
                                "its model's config and tokenizer (saved by an older version)")
    saved_dtype = getattr(torch, marker.get("model_dtypes", {}).get(role, "float32"))
    return json.loads(config_file.read_text()), saved_dtype


def _load_trained_model(checkpoint: Path, role: str, parallel: ParallelConfig,
                        dtype: torch.dtype | None) -> tuple[BuiltModel, dict, list[Path], torch.dtype]:
    """The weights of one trained model of a train-state checkpoint; its optimizer state
    (in the same dist-checkpoint) is not read."""
    hf_config, saved_dtype = check_trained_model(checkpoint, role)
    model = build_model(hf_config, "reference", parallel, _precision_for(saved_dtype),
                        initialize_weights=False)
    check_key_naming(checkpoint, read_marker(checkpoint).get("key_naming"))
    state = load_sharded(_sharded_state_dict(model), checkpoint / role)
    load_model_chunks(model, state, checkpoint / role)
    side_files = sorted(hf_folder_of(checkpoint, role).iterdir())
    return model, hf_config, side_files, dtype or saved_dtype


def export_hf_folder(
    model: BuiltModel,
    output: str | Path,
    hf_config: dict,
    side_files: list[Path],
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Writes a built model (any layout) as an HF folder, atomically. Collective.

    Each pipeline stage's TP-rank-0 (of DP replica 0) writes the layers it holds; global
    rank 0 names the parts, writes the index, ``hf_config`` as config.json (with ``dtype``)
    and copies ``side_files`` (tokenizer, generation config; a config.json among them is
    skipped). Used by the converter and by SFT's final export.
    """
    is_writer = distributed.tp_rank() == 0 and distributed.dp_rank() == 0
    progress = Progress("megatron->hf write", total=0)
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        writer = SafetensorsShardWriter(staging, distributed.pp_rank(), max_shard_bytes, dtype,
                                        hf_plan(model.gpt_chunks(), model.shape))
        for name, tensor in iter_hf_tensors(model.gpt_chunks(), model.shape,
                                                 distributed.gather_tp_shards):
            if is_writer:
                writer.add(name, tensor)
                progress.update(tensor.nbytes)
        writer.flush()
        progress.report()
        files_per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(files_per_rank, (distributed.pp_rank(), writer.files) if is_writer else None)
        if dist.get_rank() == 0:
            files = [f for entry in sorted(e for e in files_per_rank if e) for f in entry[1]]
            total = sum((staging / name).stat().st_size for name, _ in files)
            finalize_hf_folder(staging, files, total)
            _write_hf_side_files(side_files, staging, hf_config, dtype)


def _write_hf_side_files(side_files: list[Path], folder: Path, hf_config: dict,
                         dtype: torch.dtype) -> None:
    for file in side_files:
        if file.name != "config.json":
            (folder / file.name).write_bytes(file.read_bytes())
    config = dict(hf_config)
    # transformers >= 5 writes "dtype", older versions "torch_dtype"; keep whichever exists.
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if not (folder / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        generation = GenerationConfig.from_model_config(AutoConfig.for_model(**config))
        generation.save_pretrained(folder)


def _dtype_arg(value: str | None) -> torch.dtype | None:
    if value is None:
        return None
    if value not in ("float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"--dtype {value!r}: expected float32, bfloat16 or float16")
    return getattr(torch, value)


def _parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run")
    parser.add_argument("--dtype", type=_dtype_arg, default=None,
                        help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _run(main: Callable[[argparse.Namespace, ParallelConfig], None], args: argparse.Namespace,
         check_before_start: Callable[[ParallelConfig], None] | None = None) -> None:
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    try:
        parallel.validate()
        if check_before_start is not None:
            check_before_start(parallel)
        # Conversion needs no accelerator: always CPU + gloo.
        distributed.init_distributed(parallel, use_gpu=False)
        main(args, parallel)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:
        # Bad input: one line naming the problem, no traceback; nothing was written.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            distributed.destroy_distributed()


def hf_to_megatron_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an HF model folder to a Megatron checkpoint")
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--role", default="policy", choices=ROLES)
    _parallel_args(parser)
    args = parser.parse_args(argv)

    def check_before_start(parallel: ParallelConfig) -> None:
        # Refuse bad input before any process group starts.
        HFCheckpoint.open(args.hf_dir).shape.check_layout(parallel)
        refuse_existing_output(args.output, args.overwrite)

    _run(lambda a, p: convert_hf_to_megatron(a.hf_dir, a.output, p, a.role, a.dtype, a.overwrite),
         args, check_before_start)


def megatron_to_hf_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a Megatron checkpoint to an HF model folder")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="bytes per safetensors file")
    parser.add_argument("--role", default=None, choices=("policy", "prm"),
                        help="which trained model of a training checkpoint (step_* folder) to "
                             "export (default: policy)")
    _parallel_args(parser)
    args = parser.parse_args(argv)

    def check_before_start(parallel: ParallelConfig) -> None:
        checkpoint = Path(args.checkpoint)
        if (checkpoint / TRAIN_STATE_MARKER).is_file():
            hf_config, _ = check_trained_model(checkpoint, args.role or "policy")
        else:
            read_manifest(checkpoint)
            hf_config = hf_config_of(checkpoint)
        ModelShape.from_hf(hf_config).check_layout(parallel)
        refuse_existing_output(args.output, args.overwrite)

    _run(lambda a, p: convert_megatron_to_hf(a.checkpoint, a.output, p, a.dtype,
                                             a.max_shard_size, a.overwrite, a.role),
         args, check_before_start)
