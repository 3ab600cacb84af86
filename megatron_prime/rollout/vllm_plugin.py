"""megatron_prime's vLLM plugin: how the policy's weights get into vLLM, through vLLM's own
weight-transfer API (``LLM.init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update(weight_version=...)``).

vLLM loads ``register`` in every process it starts (the ``vllm.general_plugins`` entry point
in setup.py): it adds the transfer backend ``megatron_prime`` to vLLM's
``WeightTransferEngineFactory`` and the ``megatron_prime_shared`` weight layout to its
quantization registry. No built-in backend runs on a CPU engine (nccl, nccl_m2n and ipc need
CUDA), and a CPU trainer and a GPU trainer should make the same calls, so this one backend
serves both; GPU engines on the trainer's own GPUs will take vLLM's ``ipc`` backend with the
same calls.

Two modes, chosen by ``rollout.engine.weight_sync`` (init info ``mode``):

``reload`` (any device, any vLLM TP): the trainer copies a bucket of (HF name, tensor) pairs
into a POSIX shared-memory block and sends only names, dtypes, shapes and offsets as the
update info; here each tensor is copied out of the block onto the engine's device and handed
to the model's ``load_weights`` (vLLM cuts its own TP shards and fuses q/k/v and gate/up),
inside vLLM's layerwise reload, started once per sync and finalized once at its end (vLLM's
post-load processing, e.g. re-packing a CPU GEMM weight, runs once per layer per sync).

``shared`` (CPU engine, vLLM TP=1): at init the engine moves its own parameters into one
shared-memory file and writes where each lies to the init info's ``layout_file``; from then
on the trainer writes the new weights straight into the engine's parameters, one copy per
byte, and a sync is an empty start/finish pair that sets the version. That needs GEMMs that
read ``layer.weight`` itself rather than a packed copy of it, which ``SharedWeightsConfig``
asks vLLM for.

Anchors: verl's hybrid engine hands the gathered tensors to the vLLM model's
``load_weights`` in-process; NeMo-RL sends CUDA IPC handles to its vLLM workers, which call
the same ``load_weights``; slime pushes into SGLang (``update_weights_from_tensor`` when
colocated, an NCCL broadcast otherwise). None of them runs a CPU engine.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)

from megatron_prime.host_memory import check_shared_memory_space, return_freed_memory

# (name, dtype name, shape, byte offset) for each tensor in a block.
BucketEntry = tuple[str, str, list[int], int]

SHARED_WEIGHTS_METHOD = "megatron_prime_shared"
SHARED_WEIGHTS_DIR = "/dev/shm"


class _InPlaceLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear with its CPU weight packing turned off, through vLLM's own
    per-layer switch: the matmul reads ``layer.weight``, so writing it updates the model."""

    def create_weights(self, layer: torch.nn.Module, *args, **kwargs) -> None:
        layer._cpu_skip_gemm_dispatch = True
        super().create_weights(layer, *args, **kwargs)


class _InPlaceEmbeddingMethod(UnquantizedEmbeddingMethod):
    """Embedding and LM head: the head's logits GEMM reads ``layer.weight`` (vLLM's default
    on CPU keeps a packed copy of it for the GEMM)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.cpu_linear = torch.nn.functional.linear


@register_quantization_config(SHARED_WEIGHTS_METHOD)
class SharedWeightsConfig(QuantizationConfig):
    """Not a quantization: vLLM's hook for choosing each layer's weight handling, used to keep
    every weight in the plain layout the trainer writes (``rollout.weight_sync=shared``)."""

    def get_name(self) -> str:
        return SHARED_WEIGHTS_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> "SharedWeightsConfig":
        return cls()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, VocabParallelEmbedding):
            return _InPlaceEmbeddingMethod()
        if isinstance(layer, LinearBase):
            return _InPlaceLinearMethod()
        return None


BACKEND = "megatron_prime"
MODES = ("reload", "shared")


@dataclass
class BridgeInitInfo(WeightTransferInitInfo):
    mode: str = "reload"
    layout_file: str = ""  # shared: where the engine writes its parameters' layout (JSON)


@dataclass
class BridgeUpdateInfo(WeightTransferUpdateInfo):
    block_name: str = ""  # reload: the shared-memory block holding the bucket
    entries: list = field(default_factory=list)  # [BucketEntry, ...]


class BridgeTransferEngine(WeightTransferEngine[BridgeInitInfo, BridgeUpdateInfo]):
    """vLLM's weight-transfer contract, worker side, for megatron_prime's two modes."""

    init_info_cls = BridgeInitInfo
    update_info_cls = BridgeUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode: str | None = None
        self._shared_map: mmap.mmap | None = None

    def init_transfer_engine(self, init_info: BridgeInitInfo) -> None:
        if init_info.mode not in MODES:
            raise ValueError(f"weight transfer mode {init_info.mode!r}: expected one of {list(MODES)}")
        self.mode = init_info.mode
        if self.mode == "shared":
            if self.parallel_config.world_size != 1:
                raise ValueError("rollout.engine.weight_sync=shared needs one vLLM worker "
                                 f"(tensor_parallel_size=1), not {self.parallel_config.world_size}")
            if self._shared_map is None:
                path, size, entries, self._shared_map = _move_parameters_to_shared_memory(self.model)
                packed = {key: list(value)
                          for key, value in getattr(self.model, "packed_modules_mapping", {}).items()}
                layout = Path(init_info.layout_file)
                partial = layout.with_name(layout.name + ".partial")
                partial.write_text(json.dumps({"path": path, "size": size, "entries": entries,
                                               "packed": packed}))
                partial.replace(layout)  # the trainer never reads half a file

    def start_weight_update(self) -> None:
        self._require_mode()
        if self.mode == "reload":
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a CPU
        # engine (torch has no accelerator there); on a GPU it is kept.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: BridgeUpdateInfo) -> None:
        self._require_mode()
        if self.mode != "reload":
            raise RuntimeError("update_weights in weight_sync=shared: the trainer writes the "
                               "parameters itself; only start and finish frame a sync")
        block = shared_memory.SharedMemory(name=update_info.block_name)
        try:
            weights = []
            for name, dtype_name, shape, offset in update_info.entries:
                dtype = getattr(torch, dtype_name)
                view = torch.frombuffer(block.buf, dtype=dtype, count=math.prod(shape), offset=offset)
                # A copy, not a view: the layerwise reload holds a tensor until its layer is
                # complete (a padded vocabulary's until finish), and the trainer reuses the
                # block for the next bucket.
                weights.append((name, view.view(shape).to(self.device, copy=True)))
                del view
            self.model.load_weights(weights)
            del weights
        finally:
            block.close()

    def finish_weight_update(self) -> None:
        self._require_mode()
        if self.mode == "reload":
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        """The shared mapping stays: the engine's parameters live in it."""

    def _require_mode(self) -> None:
        if self.mode is None:
            raise RuntimeError("init_weight_transfer_engine was not called")


def _move_parameters_to_shared_memory(model: torch.nn.Module
                                      ) -> tuple[str, int, list[BucketEntry], mmap.mmap]:
    """Moves every parameter into one shared-memory file and describes it: (path, size,
    entries, the mapping that keeps the memory alive here). The trainer unlinks the path
    once it has mapped the file."""
    params = dict(model.named_parameters())  # tied weights appear once
    entries: list[BucketEntry] = []
    offset = 0
    for name, param in params.items():
        offset = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # page-aligned: see engine
        entries.append((name, str(param.dtype).removeprefix("torch."), list(param.shape), offset))
        offset += param.numel() * param.element_size()
    size = max(offset, 1)
    check_shared_memory_space(size, "rollout.weight_sync=shared (the engine's parameters; "
                                    "or use weight_sync=reload)")
    path = os.path.join(SHARED_WEIGHTS_DIR, f"megatron_prime_weights_{os.getpid()}_{secrets.token_hex(4)}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        block = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    with torch.no_grad():
        for (name, dtype_name, shape, start), param in zip(entries, params.values()):
            view = torch.frombuffer(block, dtype=param.dtype, count=param.numel(),
                                    offset=start).view(param.shape)
            view.copy_(param.data)
            param.data = view  # the old storage is freed here, one parameter at a time
            return_freed_memory(collect_garbage=False)  # else the RSS keeps a dead model
    return path, size, entries, block


def register() -> None:
    """vLLM's general-plugin hook (setup.py's ``vllm.general_plugins`` entry point): vLLM
    calls it once in each of its processes, before any engine is built. Importing this module
    registered ``SharedWeightsConfig``; the backend is registered here."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, BridgeTransferEngine)
    except ValueError:  # registered already in this process
        pass
