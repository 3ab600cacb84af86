"""A CPU simulation of the colocated GPU path: where each vLLM engine lands, and when the
trainer's and the engines' GPU memory come and go.

A CPU run cannot see a device, placement or GPU-memory bug, so this models the GPUs of a
node as files in a ledger folder and replaces the two things that touch a GPU:

- ``SimulatedCudaLLM`` stands in for ``vllm.LLM`` inside the real ``RolloutEngine`` (started
  with ``on_gpu=True``, so the engine's GPU code runs: sleep mode, staged wakes, levels). Like
  vLLM's executor, it places its TP workers on the first TP GPUs of the
  ``CUDA_VISIBLE_DEVICES`` it was started with, books its weights and KV cache on them, and
  raises on a wake that would not fit beside the trainers' reserved memory and on a
  ``generate`` while asleep.
- ``LedgerMemory`` is the trainer's ``DeviceMemory``: it books the trainer's resident state
  (weights always; gradients, optimizer state and reference unless models/offload.py moved
  them off for a rollout), and the caching allocator's blocks after each schedule pass
  (activations) and each tensor-parallel gather (weight sync), which only
  ``release_cached`` gives back. It raises on a schedule pass while the state is off the
  GPU, and on a restore while an engine on its GPU is awake.

``CollectiveRecorder`` wraps torch.distributed's collectives: during a rollout round (inside
``collect_batch`` or ``run_validation``) every collective must be over a host (gloo) group,
not a device group where a waiting rank would spin on the GPU that vLLM decodes on; and no
rank may use its GPU while an engine on it profiles memory at start-up.

Units are GiB of a made-up 80 GiB GPU, chosen so that each missing step of the hand-off
overflows: an activation cache left before the weights wake, a gather cache left before the
KV cache wakes, a trainer pass while the engine is awake, two engines on one GPU, and, at
``rollout.engine.gpu_memory_utilization`` 0.75, a trainer that keeps its gradients and
optimizer state through the rollout.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

CAPACITY = 80.0
TRAINER_WEIGHTS = 12.0  # the trained models' weights: stay through the rollout
TRAINER_STATE = 18.0  # gradients, optimizer state, reference: off the GPU during a rollout
ACTIVATION_CACHE = 50.0  # what a forward/backward pass leaves in the allocator's cache
GATHER_CACHE = 20.0  # what the weight sync's gathers and buckets leave there
ENGINE_WEIGHTS = 20.0
PROFILE_SECONDS = 0.5


def engine_kv_cache(gpu_memory_utilization: float) -> float:
    """As vLLM sizes it: the engine's share of the GPU less its weights."""
    return gpu_memory_utilization * CAPACITY - ENGINE_WEIGHTS


class SimulatedOutOfMemory(RuntimeError):
    pass


class PlacementViolation(RuntimeError):
    pass


def gpu_key(node: int, gpu: str) -> str:
    return f"n{node}g{gpu}"


class Ledger:
    """One folder shared by every process: ``<gpu>.trainer``, ``<gpu>.engine-<rank>`` and
    ``<gpu>.profiling`` files (JSON, replaced atomically)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def write(self, name: str, value: Any) -> None:
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.folder / name)

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def trainer(self, gpu: str) -> dict[str, float]:
        path = self.folder / f"{gpu}.trainer"
        return json.loads(path.read_text()) if path.exists() else {"resident": 0.0, "cached": 0.0}

    def engines(self, gpu: str) -> float:
        return sum(sum(json.loads(p.read_text()).values()) for p in self.folder.glob(f"{gpu}.engine-*"))

    def profiling(self, gpu: str) -> bool:
        return (self.folder / f"{gpu}.profiling").exists()

    def append_event(self, name: str, event: dict[str, Any]) -> None:
        with open(self.folder / name, "a") as out:
            out.write(json.dumps(event) + "\n")


def this_process_gpu() -> str:
    """The simulated physical GPU of this trainer rank (as distributed.physical_device_id
    computes it on CPU: the local rank through CUDA_VISIBLE_DEVICES)."""
    node = int(os.environ.get("GROUP_RANK", "0"))
    local_rank = int(os.environ["LOCAL_RANK"])
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    return gpu_key(node, visible[local_rank] if visible else str(local_rank))


class LedgerMemory:
    """The trainer's ``DeviceMemory`` on its simulated GPU."""

    def __init__(self, ledger: Ledger):
        self.ledger, self.gpu = ledger, this_process_gpu()
        self.cached = 0.0
        self.releases = 0
        self.state_on_device = True
        self.state_moves = 0
        self._book("model build", 0.0)

    @property
    def resident(self) -> float:
        return TRAINER_WEIGHTS + (TRAINER_STATE if self.state_on_device else 0.0)

    def _book(self, what: str, cached: float) -> None:
        if self.ledger.profiling(self.gpu):
            raise PlacementViolation(f"{what} on {self.gpu} while the engine there profiles its "
                                     f"memory (no barrier after engine start-up)")
        self.cached = max(self.cached, cached)  # the allocator reuses its cached blocks
        engines = self.ledger.engines(self.gpu)
        total = self.resident + self.cached + engines
        if total > CAPACITY:
            raise SimulatedOutOfMemory(
                f"{what} on {self.gpu}: trainer {self.resident} resident + {self.cached} cached "
                f"+ engines {engines} = {total} GiB > {CAPACITY} GiB")
        self.ledger.write(f"{self.gpu}.trainer", {"resident": self.resident, "cached": self.cached})

    def book_activations(self) -> None:
        if not self.state_on_device:
            raise PlacementViolation(f"a schedule pass on {self.gpu} while the trainer's "
                                     f"gradients and optimizer state are off the GPU")
        self._book("a schedule pass (activations)", ACTIVATION_CACHE)

    def trainer_state_moved(self, on_device: bool) -> None:
        if on_device and self.ledger.engines(self.gpu) > 0:
            raise PlacementViolation(f"the trainer's state came back to {self.gpu} while an "
                                     f"engine there is awake ({self.ledger.engines(self.gpu)} GiB)")
        self.state_on_device = on_device
        self.state_moves += 1
        self._book("the trainer's state " + ("restored" if on_device else "released"), self.cached)

    def book_gather(self) -> None:
        self._book("a tensor-parallel gather (weight sync)", GATHER_CACHE)

    def release_cached(self) -> None:
        self.cached = 0.0
        self.releases += 1
        self.ledger.write(f"{self.gpu}.trainer", {"resident": self.resident, "cached": 0.0})


class SimulatedCudaLLM:
    """Stands in for ``vllm.LLM`` on a GPU node (see the module docstring)."""

    def __init__(self, ledger: Ledger, kwargs: dict[str, Any]):
        from transformers import AutoTokenizer

        self.ledger = ledger
        self.rank = int(os.environ.get("MEGATRON_PRIME_SIM_RANK", "0"))
        # (GROUP_RANK itself is hidden from the engine, as from vLLM's processes.)
        self.node = int(os.environ.get("MEGATRON_PRIME_SIM_NODE", "0"))
        tp = kwargs["tensor_parallel_size"]
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
        # vLLM's workers take cuda:0..TP-1 of what the engine process can see.
        physical = visible[:tp] if visible else [str(i) for i in range(tp)]
        self.gpus = [gpu_key(self.node, g) for g in physical]
        self.events_file = f"engine-{self.rank}.jsonl"
        self._event("start", visible=visible, gpus=self.gpus, tp=tp,
                    sleep_mode=kwargs.get("enable_sleep_mode", False))
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        for gpu in self.gpus:
            self.ledger.write(f"{gpu}.profiling", {})
        before = {gpu: self.ledger.trainer(gpu) for gpu in self.gpus}
        time.sleep(PROFILE_SECONDS)  # vLLM measures free memory and sizes its KV cache
        after = {gpu: self.ledger.trainer(gpu) for gpu in self.gpus}
        for gpu in self.gpus:
            self.ledger.remove(f"{gpu}.profiling")
        if before != after:
            raise PlacementViolation(f"the trainer's memory changed while the engine of rank "
                                     f"{self.rank} profiled: {before} -> {after}")
        self.booked = {"weights": 0.0, "kv_cache": 0.0}
        self.kv_cache = engine_kv_cache(kwargs["gpu_memory_utilization"])
        self._wake("weights", ENGINE_WEIGHTS, "start")
        self._wake("kv_cache", self.kv_cache, "start")
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _event(self, kind: str, **fields: Any) -> None:
        self.ledger.append_event(self.events_file, {"event": kind, "time": time.time(), **fields})

    def _write_booking(self) -> None:
        for gpu in self.gpus:
            self.ledger.write(f"{gpu}.engine-{self.rank}", self.booked)

    def _wake(self, tag: str, amount: float, why: str) -> None:
        trainers = {gpu: self.ledger.trainer(gpu) for gpu in self.gpus}
        for gpu, trainer in trainers.items():
            total = trainer["resident"] + trainer["cached"] + self.ledger.engines(gpu) + amount
            if total > CAPACITY:
                raise SimulatedOutOfMemory(
                    f"engine of rank {self.rank} waking {tag} ({why}) on {gpu}: trainer "
                    f"{trainer} + engines {self.ledger.engines(gpu)} + {amount} = {total} GiB "
                    f"> {CAPACITY} GiB")
        self.booked[tag] = amount
        self._write_booking()
        self._event("wake", tag=tag, why=why,
                    trainer_cached={gpu: t["cached"] for gpu, t in trainers.items()})

    # ---- the vLLM LLM methods RolloutEngine calls ----

    def get_tokenizer(self):
        return self.tokenizer

    def sleep(self, level: int = 1) -> None:
        self.booked = {"weights": 0.0, "kv_cache": 0.0}
        self._write_booking()
        self._event("sleep", level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        for tag in tags or ["weights", "kv_cache"]:
            self._wake(tag, ENGINE_WEIGHTS if tag == "weights" else self.kv_cache, "wake_up")

    def _transfer(self, method: str) -> None:
        """vLLM's weight-transfer calls: each reaches the workers, whose weights must be awake."""
        if self.booked["weights"] == 0:
            raise SimulatedOutOfMemory(f"{method} into weights that sleep (rank {self.rank})")
        self._event("rpc", method=method)

    def init_weight_transfer_engine(self, request: dict) -> None:
        self._transfer("init_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._transfer("start_weight_update")

    def update_weights(self, request: dict) -> None:
        self._transfer("update_weights")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._transfer("finish_weight_update")
        self.weight_version = weight_version

    def get_weight_version(self) -> str | None:
        return getattr(self, "weight_version", None)

    def reset_prefix_cache(self) -> None:
        pass

    def generate(self, prompts: list[dict], params: list, use_tqdm: bool = False) -> list:
        if self.booked["weights"] == 0 or self.booked["kv_cache"] == 0:
            raise PlacementViolation(f"generate on the sleeping engine of rank {self.rank}")
        self._event("generate", prompts=len(prompts), gpus=self.gpus)
        outputs = []
        for index, (prompt, param) in enumerate(zip(prompts, params)):
            samples = []
            for j in range(param.n):
                text = f"[OUTPUT] \\boxed{{{(index + j) % 10}}}"
                ids = self.tokenizer.encode(text, add_special_tokens=False)[:param.max_tokens]
                logprobs = [{token: SimpleNamespace(logprob=-1.0)} for token in ids]
                samples.append(SimpleNamespace(token_ids=ids, text=self.tokenizer.decode(ids),
                                       finish_reason="stop", logprobs=logprobs))
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=samples))
        return outputs

    def _shutdown(self) -> None:
        self.booked = {"weights": 0.0, "kv_cache": 0.0}
        self._write_booking()
        self._event("shutdown")


def simulated_engine_class(ledger: Ledger):
    """RolloutEngine with vllm.LLM replaced by the stand-in, started as on a GPU."""
    from megatron_prime.rollout.engine import RolloutEngine

    class SimulatedCudaEngine(RolloutEngine):
        def __init__(self, hf_folder, config, on_gpu: bool, visible_devices=None):
            super().__init__(hf_folder, config, on_gpu=True, visible_devices=visible_devices)

        @staticmethod
        def _start_llm(kwargs: dict[str, Any]) -> Any:
            return SimulatedCudaLLM(ledger, kwargs)

    return SimulatedCudaEngine


_COLLECTIVES = ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object",
                "all_gather_into_tensor", "reduce_scatter_tensor", "barrier", "gather_object",
                "scatter_object_list")


class CollectiveRecorder:
    """Raises on a device-group collective during a rollout round, or on any collective on a
    device group while an engine on this rank's GPU profiles."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.gpu = this_process_gpu()
        self.in_rollout = 0
        self.rollout_collectives: list[str] = []
        # From the engine placement exchange until the next host barrier returns, the engines
        # start and profile free memory: no rank may touch its GPU in that window.
        self.engines_starting = False

    def install(self) -> None:
        import torch.distributed as dist

        for name in _COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, function):
        from megatron_prime import distributed

        @functools.wraps(function)
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            host = distributed.is_host_group(group)
            if self.in_rollout:
                self.rollout_collectives.append(f"{name}:{'host' if host else 'device'}")
                if not host:
                    raise PlacementViolation(f"{name} on a device group during a rollout round "
                                             f"(rank waits on the GPU the engine decodes on)")
            if not host and (self.engines_starting or self.ledger.profiling(self.gpu)):
                raise PlacementViolation(f"{name} on a device group while the engines start and "
                                         f"profile free memory (no barrier after engine start-up)")
            result = function(*args, **kwargs)
            if name == "barrier" and host:
                self.engines_starting = False
            return result

        return recorded

    def wrap_placement(self, function):
        """``distributed.engine_slot``: the engines start right after it."""
        @functools.wraps(function)
        def placed(*args, **kwargs):
            devices = function(*args, **kwargs)
            self.engines_starting = True
            return devices

        return placed

    @contextlib.contextmanager
    def rollout(self):
        self.in_rollout += 1
        try:
            yield
        finally:
            self.in_rollout -= 1

    def wrap_rollout(self, function):
        @functools.wraps(function)
        def inside(*args, **kwargs):
            with self.rollout():
                return function(*args, **kwargs)

        return inside
