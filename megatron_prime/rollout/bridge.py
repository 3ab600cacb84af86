"""Streams the trained Megatron policy into the vLLM engine(s), without a second model copy.

Per Megatron tensor, in a fixed order every rank agrees on (the "plan"):
1. the pipeline stage that holds it all-gathers its TP shards (within the TP group);
2. the shared mapping (checkpoint/hf_mapping.py) undoes the fused layouts (QKV, gate/up),
   drops the vocabulary padding and renames to HF;
3. the owning stage broadcasts the HF tensors over the PP group, so every rank has them;
4. with ``rollout.weight_sync=reload``, tensors are packed into buckets of about
   ``bucket_bytes``; each full bucket is one ``update_weights`` of vLLM's weight-transfer API
   (rollout/vllm_plugin.py; ranks without an engine drop it). A bucket never splits a module
   (q/k/v weights and biases of one attention, gate/up of one MLP), so the engine can process
   a layer as soon as its bucket arrives. With ``weight_sync=shared`` (CPU engine) each tensor
   is instead written straight into the engine's parameter in shared memory: no buckets, one
   copy per byte. Either way one ``start_weight_update`` / ``finish_weight_update`` pair
   frames a sync, and the finish names the policy version the engine now holds.

The memory hand-off around a sync (``wake_with_policy``, every rank, in this order; verl's
``rollout_mode``/``trainer_mode`` and slime's ``onload``/``offload`` stage it the same way):
1. every rank releases its allocator's cached blocks (activations, Adam temporaries);
2. a host barrier: no engine wakes into memory a peer on its GPUs still holds;
3. the engine wakes its weights; the policy is pushed (gather buffers are cached again);
4. every rank releases again, a host barrier, then the engine wakes its KV cache.
After the rollout, ``release_engine`` puts the engine to sleep (level 2) and holds every rank
at a host barrier until it sleeps, so no trainer allocates into the engine's memory.

Who talks to which engine: every rank receives every full tensor (collectives need all of
them); each rank that hosts an engine (``distributed.engine_slot``) feeds it, the others
drop the tensors. vLLM cuts its own TP shards, so the trainer's TP/PP and
vLLM's TP are independent. Peak extra memory: one bucket plus the tensors being gathered (at
most the largest tensor) plus the engine's shared-memory block (one bucket), never a
second model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import (
    ResolvedWeight,
    expected_hf_shapes,
    exported_parameters,
    hf_tensors_of,
    resolve,
)
from megatron_prime.models.builder import BuiltModel
from megatron_prime.rollout.engine import RolloutEngine

logger = logging.getLogger(__name__)


@dataclass
class BridgeConfig:
    bucket_bytes: int = 512 * 1024**2

    def validate(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"bridge.bucket_bytes={self.bucket_bytes} is invalid: expected >= 1")


@dataclass
class SyncStats:
    bytes: int
    seconds: float
    num_tensors: int
    num_buckets: int
    # Time handing tensors to the engine: shared-memory copy + vLLM's update_weights, or the
    # in-place writes (weight_sync=shared).
    engine_seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)


class WeightBridge:
    """Built once per policy model; ``sync()`` after every policy update."""

    def __init__(self, model: BuiltModel, engine: RolloutEngine | None, config: BridgeConfig | None = None):
        self.model, self.engine = model, engine
        self.config = config or BridgeConfig()
        self.config.validate()
        self.plan = self._make_plan()
        self.version = -1  # the weight version of the last sync (none yet)

    def _make_plan(self) -> list[tuple[int, ResolvedWeight]]:
        """(owning PP stage, weight) for every tensor, identical on every rank.

        Resolving every name here makes an unmapped weight fail before any sampling.
        """
        shape = self.model.shape
        local = [name for name, _ in exported_parameters(self.model.gpt_chunks(), shape)]
        for name in local:
            resolve(name, shape)  # raises KeyError naming the tensor
        per_stage: list = [None] * distributed.pp_world_size()
        if distributed.pp_world_size() > 1:
            dist.all_gather_object(per_stage, local, group=distributed.pp_group())
        else:
            per_stage = [local]
        return [(stage, resolve(name, shape)) for stage, names in enumerate(per_stage) for name in names]

    def iter_full_tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(Megatron module, HF name, full tensor) for the whole policy, in plan order, on
        every rank."""
        params = dict(exported_parameters(self.model.gpt_chunks(), self.model.shape))
        my_stage = distributed.pp_rank()
        hf_shapes = expected_hf_shapes(self.model.shape)
        dtype = self.model.config.params_dtype
        device = distributed.device()
        for stage, weight in self.plan:
            if stage == my_stage:
                tensors = hf_tensors_of(weight, params[weight.megatron_name], self.model.shape,
                                        distributed.gather_tp_shards)
            else:
                tensors = {name: torch.empty(hf_shapes[name], dtype=dtype, device=device)
                           for name in weight.hf_names}
            if distributed.pp_world_size() > 1:
                source = dist.get_global_rank(distributed.pp_group(), stage)
                for tensor in tensors.values():
                    dist.broadcast(tensor, src=source, group=distributed.pp_group())
            module = weight.megatron_name.rsplit(".", 1)[0]
            for name, tensor in tensors.items():
                yield module, name, tensor

    def iter_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        current_module = None
        for module, name, tensor in self.iter_full_tensors():
            # Own the memory: a view into a gathered/fused tensor would keep it all alive.
            tensor = tensor.contiguous()
            full = bucket and size + tensor.nbytes > self.config.bucket_bytes
            if full and module != current_module:
                yield bucket
                bucket, size = [], 0
            current_module = module
            bucket.append((name, tensor))
            size += tensor.nbytes
        if bucket:
            yield bucket

    def wake_with_policy(self, version: int | None = None) -> SyncStats:
        """Wakes the engine with the current policy's weights, staging the GPU memory hand-off
        (module docstring; collective, every rank). ``version``: see ``sync``."""
        memory = distributed.runtime().memory
        memory.release_cached()
        distributed.host_barrier()
        if self.engine is not None:
            self.engine.wake_weights()
        stats = self.sync(version)
        memory.release_cached()  # the gather and bucket buffers of the sync
        distributed.host_barrier()
        if self.engine is not None:
            self.engine.wake_kv_cache()
        return stats

    def release_engine(self) -> None:
        """Puts the engine to sleep and holds every rank until it has (collective): after this
        the trainer may allocate the memory the engine used."""
        if self.engine is not None:
            self.engine.sleep()
        distributed.host_barrier()

    def sync(self, version: int | None = None) -> SyncStats:
        """Pushes the current policy weights into this rank's engine (collective); the engine's
        weights must be awake (``wake_with_policy`` stages it). ``version`` (the trainer
        passes the policy's optimizer steps; default: one more than the last sync's) is the
        weight version the engine holds afterwards (``RolloutEngine.weight_version``)."""
        self.version = self.version + 1 if version is None else version
        start = time.perf_counter()
        moved = tensors = buckets = 0
        engine_seconds = 0.0
        if self.engine is not None:
            self.engine.start_weight_update()
        if self.engine is not None and self.engine.config.weight_sync == "shared":
            # Ranks without an engine take the bucket path below: the same collectives.
            for _, name, tensor in self.iter_full_tensors():
                engine_start = time.perf_counter()
                self.engine.write_weight(name, tensor)
                engine_seconds += time.perf_counter() - engine_start
                moved += tensor.nbytes
                tensors += 1
        else:
            for bucket in self.iter_buckets():
                if self.engine is not None:
                    engine_start = time.perf_counter()
                    self.engine.load_weights(bucket)
                    engine_seconds += time.perf_counter() - engine_start
                moved += sum(t.nbytes for _, t in bucket)
                tensors += len(bucket)
                buckets += 1
                del bucket
        if self.engine is not None:
            self.engine.weights_written(self.version)
        stats = SyncStats(moved, time.perf_counter() - start, tensors, buckets, engine_seconds)
        # A debug message, not a print: on the console it pushed the progress line away every
        # step; the sync's time is in the step's metrics (the "sync" phase), and SyncStats goes
        # back to the caller.
        if dist.get_rank() == 0 and logger.isEnabledFor(logging.DEBUG):
            how = (f"{stats.num_buckets} buckets" if stats.num_buckets
                   else "written in place")
            logger.debug("weight sync: %.1f MB %s, %.2f s (%.2f s handing it to the engine), "
                         "%.2f GB/s", stats.bytes / 1e6, how, stats.seconds,
                         stats.engine_seconds, stats.gb_per_s)
        return stats
