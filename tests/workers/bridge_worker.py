"""Run under torchrun by tests/test_rollout_bridge.py: Megatron policy -> vLLM, one layout.

Rank 0 (the replica's first rank) owns a real vLLM engine (CPU build) in its own process. After a weight sync, vLLM's sampler log-probs
for its own samples are compared with the Megatron policy's log-probs for the same tokens;
then one optimizer step, another sync, and the comparison again.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_io import HFCheckpoint
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.optimizer import build_optimizer, sequence_nll_loss, train_step
from megatron_prime.models.schedule import TokenBatch, forward_only
from megatron_prime.rollout.bridge import BridgeConfig, WeightBridge
from megatron_prime.rollout.engine import (
    RolloutConfig,
    RolloutEngine,
    SamplingConfig,
)

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42]]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tree_pss_bytes() -> int:
    """Physical memory of this process and its descendants (the vLLM engine core): PSS
    splits each shared page between the processes that map it, so pages shared by the
    trainer and the engine count once."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakRss:
    """Samples this process's RSS (or ``measure``) every few ms while active."""

    def __init__(self, measure=rss_bytes):
        self.measure = measure
        self.peak, self._stop = measure(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())


def megatron_logprobs(policy, rollouts) -> list[list[float]]:
    """The policy's log-probs of each rollout's response tokens (collective)."""
    sequences = [r.prompt_token_ids + r.response_token_ids for r in rollouts]
    seq = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), seq, dtype=torch.long)
    mask = torch.zeros(len(sequences), seq)
    for row, (r, s) in enumerate(zip(rollouts, sequences)):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, len(r.prompt_token_ids):len(s)] = 1
    out = forward_only(policy, TokenBatch(ids, mask), micro_batch_size=1)
    return [out.logprobs[row, len(r.prompt_token_ids):len(s)].tolist()
            for row, (r, s) in enumerate(zip(rollouts, sequences))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--bucket-bytes", type=int, default=1 << 20)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--weight-sync", default="reload")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    distributed.init_distributed(parallel)
    hf = HFCheckpoint.open(args.hf_dir)
    policy = build_model(hf.config, "policy", parallel)
    load_hf_weights(policy, hf.tensor)
    # A weight the mapping does not know is refused when the bridge is built, before sampling.
    chunk = policy.gpt_chunks()[0]
    chunk.register_parameter("adapter_scale", torch.nn.Parameter(torch.ones(1)))
    try:
        WeightBridge(policy, None)
        unknown_weight_error = ""
    except KeyError as error:
        unknown_weight_error = str(error.args[0])
    del chunk.adapter_scale
    is_host = distributed.engine_slot(1, 1).index is not None  # one engine per replica
    engine = RolloutEngine(args.hf_dir, RolloutConfig(max_model_len=128, enforce_eager=True,
                                                         weight_sync=args.weight_sync),
                           on_gpu=False) if is_host else None
    bridge = WeightBridge(policy, engine, BridgeConfig(bucket_bytes=args.bucket_bytes))
    result: dict = {"unknown_weight_error": unknown_weight_error}

    if args.memory_only:
        # This process's RSS, and the physical memory (PSS) of trainer + engine, over the
        # first sync (which also moves a shared-memory engine's parameters into its file)
        # and over two more.
        before, pss_before = rss_bytes(), tree_pss_bytes()
        with PeakRss() as peak, PeakRss(tree_pss_bytes) as pss_first:
            stats = bridge.sync()
        largest = max(t.nbytes for _, _, t in bridge.iter_full_tensors())
        pss_between = tree_pss_bytes()
        with PeakRss(tree_pss_bytes) as pss_next:
            bridge.sync()
            bridge.sync()
        result |= {"rss_before": before, "rss_peak": peak.peak, "sync_bytes": stats.bytes,
                   "largest_tensor_bytes": largest,
                   "bucket_bytes": args.bucket_bytes, "num_buckets": stats.num_buckets,
                   "pss_before": pss_before, "pss_first_peak": pss_first.peak,
                   "pss_between": pss_between, "pss_next_peak": pss_next.peak}
    else:
        bridge.sync()
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
        sampled = SamplingConfig(n=3, temperature=1.0, max_new_tokens=10, seed=7)
        phases = []
        optimizer = build_optimizer(policy, OptimizerConfig(lr=3e-2, clip_grad=0.0))
        for phase in range(2):
            box = [engine.generate(PROMPTS, greedy) if is_host else None]
            dist.broadcast_object_list(box, src=0)
            rollouts = box[0]
            ours = megatron_logprobs(policy, rollouts)
            phases.append({"responses": [r.response_token_ids for r in rollouts],
                           "vllm_logprobs": [r.logprobs for r in rollouts],
                           "megatron_logprobs": ours})
            if phase == 0:
                # One large step towards the greedy responses, then sync again.
                sequences = [r.prompt_token_ids + r.response_token_ids for r in rollouts]
                seq = max(len(s) for s in sequences)
                ids = torch.zeros(len(sequences), seq, dtype=torch.long)
                mask = torch.zeros(len(sequences), seq)
                for row, s in enumerate(sequences):
                    ids[row, :len(s)] = torch.tensor(s)
                    mask[row, len(rollouts[row].prompt_token_ids):len(s)] = 1
                train_step(policy, optimizer, TokenBatch(ids, mask), 1, sequence_nll_loss)
                stats = bridge.sync()
                result["sync"] = {"bytes": stats.bytes, "buckets": stats.num_buckets}
        result["phases"] = phases
        if is_host:
            first, second = engine.generate(PROMPTS, sampled), engine.generate(PROMPTS, sampled)
            other = engine.generate(PROMPTS, SamplingConfig(n=3, temperature=1.0,
                                                            max_new_tokens=10, seed=8))
            result["seeded"] = {
                "first": [r.response_token_ids for r in first],
                "second": [r.response_token_ids for r in second],
                "other_seed": [r.response_token_ids for r in other],
                "keys": [[r.prompt_index, r.sample_index] for r in first],
                # The same prompt twice in one seeded batch: its two groups must still differ
                # (one batch-wide seed would give sample j of every prompt the same stream).
                "same_prompt_twice": [r.response_token_ids for r in engine.generate(
                    [PROMPTS[0], PROMPTS[0]], sampled)],
            }
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    if engine is not None:
        engine.shutdown()
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
