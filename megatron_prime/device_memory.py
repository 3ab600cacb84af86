"""The trainer's view of its device memory, for the hand-off to a colocated engine.

PyTorch's caching allocator keeps freed blocks (activations, gather buffers) reserved for
reuse; another process, such as the vLLM engine waking on the same GPU, cannot use them until
``torch.cuda.empty_cache()`` returns them to the driver. The trainer releases them on every
rank before the engine's weights wake, and again before its KV cache wakes (rollout/bridge.py).

The object is chosen once (distributed.init_distributed): ``CudaMemory`` on GPU, ``HostMemory``
on CPU, where nothing is cached for another process. The CPU simulation of the GPU path
(tests/gpu_simulation.py) passes a ledger with the same method.
"""

from __future__ import annotations

import gc
from typing import Protocol

import torch


class DeviceMemory(Protocol):
    def release_cached(self) -> None:
        """Returns what the allocator holds but no tensor uses to the driver."""

    def trainer_state_moved(self, on_device: bool) -> None:
        """The trainer's gradients, optimizer state and frozen models left the GPU for a
        rollout, or came back (models/offload.py). Nothing to do on a real device (the
        storages were freed or allocated by then); the CPU simulation books it."""


class CudaMemory:
    def release_cached(self) -> None:
        # Tensors kept alive only by reference cycles still pin their blocks: collect first.
        gc.collect()
        # Frees run in stream order: wait for the kernels that used the blocks.
        torch.cuda.synchronize()  # host sync
        torch.cuda.empty_cache()

    def trainer_state_moved(self, on_device: bool) -> None:
        pass


class HostMemory:
    def release_cached(self) -> None:
        pass

    def trainer_state_moved(self, on_device: bool) -> None:
        pass
