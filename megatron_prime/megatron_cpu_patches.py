"""The only place where Megatron-core is patched, and only on CPU.

Megatron-core assumes CUDA in a handful of spots that have nothing to do with the maths:
device strings, RNG state handling, a dtype assertion. On CPU (tests and the default demo)
we redirect exactly those spots so the *same* Megatron code path runs with gloo and float32.
Nothing here is applied when CUDA is in use.

Each patch carries a one-line reason. Checked against megatron-core 0.16.1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "cuda:N" to torch when it is passed as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Remaps device="cuda"/int device arguments to CPU and answers Tensor.type() as CUDA.

    Reason: Megatron's schedules, optimizer, grad clipping and buffers create tensors with
    device="cuda" or torch.cuda.current_device(), and clip_grads asserts
    ``grad.type() == "torch.cuda.FloatTensor"``.
    """

    _CPU_TO_CUDA_TYPE = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return self._CPU_TO_CUDA_TYPE.get(name, name)
        if func in (torch.Tensor.cuda,):
            # Reason: a few Megatron utilities call .cuda() on freshly built CPU tensors.
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_tracker_add(self, name: str, seed: int) -> None:
    """CudaRNGStatesTracker.add on the CPU generator (reason: it calls torch.cuda.get_rng_state)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    original_state = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(original_state)


def apply_cpu_patches() -> None:
    """Idempotently patch Megatron-core (and torch.cuda queries) for CPU-only runs."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_cpu_patches must not be applied when CUDA is available")

    from megatron.core.tensor_parallel import random as mcore_random

    # Reason: rotary embeddings, p2p buffers, grad buffers use current_device() as a device;
    # the mode below maps the int 0 to CPU.
    torch.cuda.current_device = lambda: 0
    # Reason: p2p and timers call synchronize / set_device, which have nothing to do on CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.set_device = lambda *args, **kwargs: None
    # Reason: the model-parallel RNG tracker forks the CUDA generator in every attention forward.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mcore_random.CudaRNGStatesTracker.add = _cpu_rng_tracker_add
    # Reason: model_parallel_cuda_manual_seed seeds the (absent) CUDA generator.
    torch.cuda.manual_seed = lambda seed: None

    # Reason: see _CudaToCpuMode. Entered for the life of the process, on this thread.
    _CudaToCpuMode().__enter__()
    _APPLIED = True
