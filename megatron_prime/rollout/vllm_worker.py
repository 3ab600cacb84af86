"""Runs inside vLLM's worker process (``worker_extension_cls``): receives the policy's weights.

Two ways in, chosen by ``rollout.weight_sync`` (rollout/engine.py):

``reload`` (any device, any vLLM TP): the trainer copies a bucket of (HF name, tensor) pairs
into a POSIX shared-memory block and sends only names, dtypes, shapes and offsets over
vLLM's RPC; here the tensors are viewed in place (no copy) and handed to vLLM's in-place
``reload_weights``, which copies them into the engine's parameters (cutting vLLM's own TP
shards) and re-runs vLLM's post-load processing (on CPU: re-packing every GEMM weight).

``shared`` (CPU engine, vLLM TP=1): once, the engine moves its own parameters into one
shared-memory file and tells the trainer where each one lies; from then on the trainer
writes the new weights straight into the engine's parameters, one copy per byte, with no RPC
per tensor and no re-processing. That needs GEMMs that read ``layer.weight`` itself rather
than a packed copy of it, which ``SharedWeightsConfig`` asks vLLM for.
"""

from __future__ import annotations

import mmap
import os
import secrets
from multiprocessing import shared_memory

import torch
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


class BridgeWorkerExtension:
    """Mixed into vLLM's worker class by vLLM itself."""

    def load_weights_from_shared_memory(self, block_name: str, entries: list[BucketEntry]) -> int:
        block = shared_memory.SharedMemory(name=block_name)
        try:
            weights = []
            for name, dtype_name, shape, offset in entries:
                dtype = getattr(torch, dtype_name)
                count = 1
                for dim in shape:
                    count *= dim
                view = torch.frombuffer(block.buf, dtype=dtype, count=count, offset=offset)
                weights.append((name, view.view(shape)))
            self.reload_weights(weights_iterator=iter(weights))
            loaded = len(weights)
            # The views point into the block: drop them before closing it.
            del weights, view
            return loaded
        finally:
            block.close()

    def share_weights(self) -> tuple[str, int, list[BucketEntry], dict[str, list[str]]]:
        """Moves every parameter into one shared-memory file (once) and describes it:
        (path, size, entries, vLLM's fused-module table). The trainer unlinks the path once
        it has mapped the file; the mapping here keeps the memory alive."""
        shared = getattr(self, "_megatron_prime_shared", None)
        if shared is None:
            shared = self._move_parameters_to_shared_memory()
            self._megatron_prime_shared = shared
        path, size, entries, _ = shared
        model = self.model_runner.get_model()
        packed = {key: list(value) for key, value in getattr(model, "packed_modules_mapping", {}).items()}
        return path, size, entries, packed

    def _move_parameters_to_shared_memory(self):
        model = self.model_runner.get_model()
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
