"""The trainer's state that a rollout does not need, off the GPU while the vLLM engine is awake.

While vLLM generates, the trainer needs only the policy's weights (the bridge pushed them
at the wake). Everything else it keeps resident between its updates is dead weight on the
GPU that the engine's KV cache could use:

- the gradient buffers of the trained models (Megatron DDP's ``grad_data``): released with
  Megatron's own ``offload_grad_buffers``, nothing copied (every update zeroes them first);
- the optimizer states (Adam's moments, the fp32 main weights of a bf16 model), copied to
  pinned host memory with asynchronous copies, their device storage freed;
- the frozen models (the reference; a frozen PRM), the same way.

Memory is freed by resizing each tensor storage to 0 bytes and restored by resizing it back
and copying the host bytes in, so every tensor, view and optimizer reference stays the same
Python object (Megatron's DDP does the same to its buffers); a run restored after a rollout
computes the same numbers as one that never offloaded. Host buffers are pinned once and
reused every step.

Anchors: verl's Megatron workers offload the same three things around each rollout
(``offload_megatron_model_to_cpu`` with its grad buffers, ``offload_megatron_optimizer``,
``load_*`` after; ``actor.megatron.{param,grad,optimizer}_offload``) and give vLLM
``gpu_memory_utilization`` 0.6 in the PRIME recipe; slime pauses the whole trainer through
torch_memory_saver (``offload_train``); NeMo-RL's Megatron policy worker moves its optimizer
and buffers to the CPU in ``offload_before_refit`` and back in ``prepare_for_training``.

On CPU (tests), the same code frees and restores the same storages, so a test sees the
bytes go to 0 and come back; only pinning and the stream sync are GPU-only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from megatron.core.optimizer import MegatronOptimizer

from megatron_prime import distributed
from megatron_prime.models.builder import BuiltModel


class OffloadOrderError(RuntimeError):
    """The trainer's state was used, or moved, in an order that would corrupt or crash it."""


@dataclass
class OffloadStats:
    """What one release moved, in bytes on this rank, and how long release and restore took."""

    grad_bytes: int = 0
    optimizer_bytes: int = 0
    frozen_bytes: int = 0
    release_seconds: float = 0.0
    restore_seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.grad_bytes + self.optimizer_bytes + self.frozen_bytes

    def metrics(self) -> dict[str, float]:
        gib = 2.0 ** 30
        return {"memory/released_grads_gib": self.grad_bytes / gib,
                "memory/offloaded_optimizer_gib": self.optimizer_bytes / gib,
                "memory/offloaded_frozen_gib": self.frozen_bytes / gib,
                "time/offload_release": self.release_seconds,
                "time/offload_restore": self.restore_seconds}


@dataclass
class _Stashed:
    tensor: torch.Tensor  # one tensor on the storage: the handle that resizes it
    nbytes: int
    host: torch.Tensor  # uint8, pinned on GPU runs


class HostStash:
    """Storages copied to host memory and freed on the device, then restored in place."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._host_buffers: list[torch.Tensor] = []  # reused across steps, by position
        self._stashed: list[_Stashed] = []

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._stashed)

    def offload(self, tensors: Iterable[torch.Tensor], keep: set[int], device: torch.device) -> int:
        """Copies each distinct storage on ``device`` under ``tensors`` (except those whose
        ``data_ptr`` is in ``keep``) to host memory, waits for the copies, then frees the
        device storages. Returns the bytes freed."""
        seen: set[int] = set()
        for tensor in tensors:
            if tensor.device.type != device.type:
                continue  # already in host memory (torch's Adam keeps its step count there)
            storage = tensor.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or pointer in seen or pointer in keep:
                continue
            if not storage.resizable():
                # Memory the process did not allocate (a host tensor over a file or a NumPy
                # buffer, as a loaded state can be on CPU): it stays where it is.
                continue
            seen.add(pointer)
            index = len(self._stashed)
            if index < len(self._host_buffers) and self._host_buffers[index].numel() == nbytes:
                host = self._host_buffers[index]
            else:
                host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
                if index < len(self._host_buffers):
                    self._host_buffers[index] = host
                else:
                    self._host_buffers.append(host)
            host.copy_(_bytes_of(tensor), non_blocking=self.pin)
            self._stashed.append(_Stashed(tensor, nbytes, host))
        if self.pin and self._stashed:
            # The asynchronous copies read the storages that are freed next.
            torch.cuda.current_stream().synchronize()  # host sync
        for entry in self._stashed:
            entry.tensor.untyped_storage().resize_(0)
        return self.nbytes

    def restore(self) -> None:
        """Reallocates every stashed storage and copies its bytes back (asynchronous on GPU:
        later kernels on the stream run after the copies; the pinned buffers stay alive)."""
        for entry in self._stashed:
            entry.tensor.untyped_storage().resize_(entry.nbytes)
            _bytes_of(entry.tensor).copy_(entry.host, non_blocking=self.pin)
        self._stashed = []


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``tensor`` as a flat uint8 tensor (a view, no copy)."""
    view = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    return view.set_(tensor.untyped_storage())


def optimizer_state_tensors(optimizer: MegatronOptimizer | None) -> Iterator[torch.Tensor]:
    """Every tensor a Megatron optimizer keeps between steps: the state of the wrapped torch
    optimizer (Adam's moments) and its parameters (fp32 main weights, or the model's own
    weights when it trains them in place; the caller keeps those)."""
    if optimizer is None:
        return
    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        for group in torch_optimizer.param_groups:
            yield from (p for p in group["params"] if isinstance(p, torch.Tensor))
        for state in torch_optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 0)


def _storage_pointers(model: BuiltModel) -> set[int]:
    return {p.untyped_storage().data_ptr() for chunk in model.chunks for p in chunk.parameters()}


@dataclass
class RolloutOffload:
    """Releases the trainer's state before the engine wakes and restores it after the engine
    sleeps (train.py calls both on every rank, around every rollout and validation).

    ``trained``: (model, optimizer) pairs whose grad buffers are released and whose optimizer
    state goes to the host. ``frozen``: models whose weights go to the host. ``enabled=False``
    makes both calls no-ops (trainer.offload_during_rollout=false)."""

    trained: list[tuple[BuiltModel, MegatronOptimizer | None]]
    frozen: list[BuiltModel] = field(default_factory=list)
    enabled: bool = True
    released: bool = False
    last: OffloadStats = field(default_factory=OffloadStats)

    def __post_init__(self) -> None:
        on_gpu = distributed.device().type == "cuda"
        self._on_gpu = on_gpu
        self._optimizers = HostStash(pin=on_gpu)
        self._frozen = HostStash(pin=on_gpu)

    def release(self) -> OffloadStats:
        if not self.enabled:
            return self.last
        if self.released:
            raise OffloadOrderError("the trainer's state is already off the GPU: restore() it "
                                    "after the engine sleeps before releasing it again")
        start = time.perf_counter()
        stats = OffloadStats()
        weights: set[int] = set()
        for model, _ in self.trained:
            weights |= _storage_pointers(model)
        for model, optimizer in self.trained:
            for chunk in model.chunks:
                stats.grad_bytes += sum(buffer.grad_data.numel() * buffer.grad_data.element_size()
                                        for buffer in _grad_buffers(chunk))
                if hasattr(chunk, "offload_grad_buffers"):
                    chunk.offload_grad_buffers(synchronize=self._on_gpu, empty_cache=False)
        device = distributed.device()
        stats.optimizer_bytes = self._optimizers.offload(
            (t for _, optimizer in self.trained for t in optimizer_state_tensors(optimizer)),
            weights, device)
        stats.frozen_bytes = self._frozen.offload(
            (t for model in self.frozen for chunk in model.chunks
             for t in (*chunk.parameters(), *(b for _, b in chunk.named_buffers()))), set(), device)
        # The freed blocks go back to the driver before the engine wakes (bridge.py releases
        # the allocator's cache first thing in wake_with_policy).
        distributed.runtime().memory.trainer_state_moved(on_device=False)
        stats.release_seconds = time.perf_counter() - start
        self.released = True
        self.last = stats
        return stats

    def restore(self) -> OffloadStats:
        if not self.enabled:
            return self.last
        if not self.released:
            raise OffloadOrderError("restore() without a release(): the trainer's state is on "
                                    "the GPU already")
        start = time.perf_counter()
        # Raises (in the CPU simulation) when an engine on this GPU is still awake.
        distributed.runtime().memory.trainer_state_moved(on_device=True)
        for model, _ in self.trained:
            for chunk in model.chunks:
                if hasattr(chunk, "restore_grad_buffers"):
                    chunk.restore_grad_buffers(synchronize=False)
        self._optimizers.restore()
        self._frozen.restore()
        self.released = False
        self.last.restore_seconds = time.perf_counter() - start
        return self.last

    def check_on_device(self, what: str) -> None:
        if self.released:
            raise OffloadOrderError(f"{what} while the trainer's gradients, optimizer state and "
                                    f"frozen models are off the GPU (the engine is awake): "
                                    f"restore() after the engine sleeps")


def _grad_buffers(chunk: torch.nn.Module) -> list:
    """Megatron DDP's param-and-grad buffers (DDP's ``buffers`` attribute is that list, which
    shadows ``nn.Module.buffers``; a chunk without DDP has none)."""
    found = []
    for name in ("buffers", "expert_parallel_buffers"):
        value = getattr(chunk, name, None)
        if isinstance(value, list):
            found += [buffer for buffer in value if getattr(buffer, "grad_data", None) is not None]
    return found
