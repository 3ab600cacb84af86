"""Runs inside vLLM's worker process (``worker_extension_cls``): receives weight buckets.

The trainer copies a bucket of (HF name, tensor) pairs into a POSIX shared-memory block and
sends only names, dtypes, shapes and offsets over vLLM's RPC; here the tensors are viewed
in place (no copy) and handed to vLLM's in-place ``reload_weights``, which copies them into
the engine's parameters (cutting vLLM's own TP shards).
"""

from __future__ import annotations

from multiprocessing import shared_memory

import torch

# (name, dtype name, shape, byte offset) for each tensor in the block.
BucketEntry = tuple[str, str, list[int], int]


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
