"""Reading and writing Hugging Face model folders (config.json + safetensors shards).

Reading is lazy: tensors come one at a time from ``safe_open`` (memory-mapped), so a
converter never materialises the HF model. Everything that can be checked before the first
byte is written is checked up front (architecture, shard files present and not truncated,
every tensor present with the right shape), each error naming the file or tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_prime.checkpoint.hf_mapping import expected_hf_shapes
from megatron_prime.models.architectures import ModelShape

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
# Files that are weights (or their index) and never copied as "side files".
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_WEIGHT_INDEXES = (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking the file holds all its data."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = struct.unpack("<Q", prefix)[0]
        if 8 + header_len > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {header_len} bytes "
                             f"does not fit in {size} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: corrupt safetensors header ({error})") from None
    data_end = max((meta["data_offsets"][1] for key, meta in header.items()
                    if key != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise ValueError(f"{path}: truncated safetensors file: {size} bytes on disk, the header "
                         f"says {8 + header_len + data_end}")
    return header


@dataclass
class HFCheckpoint:
    """A Hugging Face model folder, validated; tensors are read lazily."""

    path: Path
    config: dict[str, Any]
    shape: ModelShape
    weight_map: dict[str, str]  # tensor name -> file name
    dtype: torch.dtype

    @classmethod
    def open(cls, path: str | os.PathLike) -> "HFCheckpoint":
        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.json in the HF model folder")
        config = json.loads(config_path.read_text())
        try:
            shape = ModelShape.from_hf(config)
        except ValueError as error:
            raise ValueError(f"{config_path}: {error}") from None

        if (path / SAFETENSORS_INDEX).is_file():
            weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        elif (path / SINGLE_SAFETENSORS).is_file():
            weight_map = {name: SINGLE_SAFETENSORS for name in
                          read_safetensors_header(path / SINGLE_SAFETENSORS) if name != "__metadata__"}
        else:
            raise FileNotFoundError(f"{path}: neither {SAFETENSORS_INDEX} nor {SINGLE_SAFETENSORS} "
                                    "found (only safetensors checkpoints are supported)")

        headers: dict[str, dict[str, Any]] = {}
        for file_name in sorted(set(weight_map.values())):
            file_path = path / file_name
            if not file_path.is_file():
                raise FileNotFoundError(f"{file_path}: shard named in {SAFETENSORS_INDEX} is missing")
            headers[file_name] = read_safetensors_header(file_path)

        dtypes = set()
        for name, expected in expected_hf_shapes(shape).items():
            if name not in weight_map:
                raise ValueError(f"{path}: tensor {name!r} is missing from the checkpoint")
            meta = headers[weight_map[name]].get(name)
            if meta is None:
                raise ValueError(f"{path / weight_map[name]}: tensor {name!r} is listed in the "
                                 "index but not in the file")
            if tuple(meta["shape"]) != expected:
                raise ValueError(f"{path / weight_map[name]}: tensor {name!r} has shape "
                                 f"{tuple(meta['shape'])}, config.json implies {expected}")
            dtypes.add(meta["dtype"])
        unsupported = dtypes - set(_SAFETENSORS_DTYPES)
        if unsupported:
            raise ValueError(f"{path}: tensor dtypes {sorted(unsupported)} are unsupported; "
                             f"expected {sorted(_SAFETENSORS_DTYPES)}")
        dtype = _SAFETENSORS_DTYPES[sorted(dtypes)[0]] if len(dtypes) == 1 else torch.float32
        return cls(path, config, shape, weight_map, dtype)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its shard.

        The shard is memory-mapped only for the duration of the read: a mapping kept open
        would leave every page read so far resident, so peak RSS would grow to the whole
        checkpoint's size on top of the Megatron model.
        """
        if name not in self.weight_map:
            raise KeyError(name)
        with safe_open(str(self.path / self.weight_map[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def side_files(self) -> list[Path]:
        """Tokenizer, generation config and other non-weight files to carry along."""
        return non_weight_files(self.path)


def non_weight_files(folder: str | Path) -> list[Path]:
    """config.json, tokenizer, generation config...: every file of an HF folder but weights."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file()
                  and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_INDEXES)


_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class SafetensorsShardWriter:
    """Streams tensors to safetensors files as they come, never holding a shard in memory.

    The tensors' names and shapes are known in advance (``plan``, in the order they will
    arrive), so each file's header is written first and every tensor's bytes go straight to
    its offset: memory is one tensor, not one shard. A new file starts whenever the next
    tensor would take the current one past ``max_shard_bytes`` (a larger tensor gets a file
    of its own). Files get provisional names ``part-{writer_id}-{k}.safetensors``;
    ``finalize_hf_folder`` renames them to HF's ``model-0000i-of-0000N.safetensors`` once all
    writers are done.
    """

    def __init__(self, folder: Path, writer_id: int, max_shard_bytes: int, dtype: torch.dtype,
                 plan: list[tuple[str, tuple[int, ...]]]):
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype {dtype} cannot be written: expected one of {list(_DTYPE_CODES)}")
        self.folder, self.writer_id, self.dtype = folder, writer_id, dtype
        itemsize = dtype.itemsize
        # Group the plan into files exactly as the buffering writer did.
        self._groups: list[list[tuple[str, tuple[int, ...], int]]] = []
        size = 0
        for name, shape in plan:
            nbytes = itemsize
            for dim in shape:
                nbytes *= dim
            if not self._groups or (self._groups[-1] and size + nbytes > max_shard_bytes):
                self._groups.append([])
                size = 0
            self._groups[-1].append((name, tuple(shape), nbytes))
            size += nbytes
        self._next = 0  # position in the plan
        self._file: Any = None
        self.files: list[tuple[str, list[str]]] = []  # (file name, tensor names), once complete

    def _position(self) -> tuple[int, int]:
        """(file index, index within the file) of the next tensor."""
        index = self._next
        for group_index, group in enumerate(self._groups):
            if index < len(group):
                return group_index, index
            index -= len(group)
        raise ValueError(f"more tensors than planned ({self._next})")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        group_index, index = self._position()
        expected, shape, nbytes = self._groups[group_index][index]
        if name != expected or tuple(tensor.shape) != shape:
            raise ValueError(f"writer {self.writer_id}: got {name!r} {tuple(tensor.shape)}, planned "
                             f"{expected!r} {shape}")
        if index == 0:
            self._open(group_index)
        data = tensor.detach().to("cpu", self.dtype).contiguous()
        # A byte view (no copy); bfloat16 has no numpy type, so the bytes go as uint8.
        self._file.write(data.view(-1).view(torch.uint8).numpy())
        del data
        self._next += 1
        if index == len(self._groups[group_index]) - 1:
            self._file.close()
            self._file = None
            self.files.append((self._file_name(group_index), [n for n, _, _ in self._groups[group_index]]))

    def _file_name(self, group_index: int) -> str:
        return f"part-{self.writer_id:05d}-{group_index:05d}.safetensors"

    def _open(self, group_index: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in self._groups[group_index]:
            header[name] = {"dtype": _DTYPE_CODES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
        path = self.folder / self._file_name(group_index)
        self._file = path.open("wb")
        os.chmod(path, 0o644)
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def flush(self) -> None:
        """Checks that every planned tensor arrived (a writer that got none has no files)."""
        planned = sum(len(group) for group in self._groups)
        if self._next not in (0, planned):
            raise ValueError(f"writer {self.writer_id}: {self._next} of {planned} planned tensors written")


def finalize_hf_folder(folder: Path, files: list[tuple[str, list[str]]], total_bytes: int) -> None:
    """Renames provisional parts to HF names and writes the index (or one model.safetensors)."""
    if len(files) == 1:
        os.replace(folder / files[0][0], folder / SINGLE_SAFETENSORS)
        return
    weight_map: dict[str, str] = {}
    for index, (part, names) in enumerate(files, start=1):
        final = f"model-{index:05d}-of-{len(files):05d}.safetensors"
        os.replace(folder / part, folder / final)
        weight_map.update({name: final for name in names})
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index_json, indent=2))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
