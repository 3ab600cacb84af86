"""Weight-sync throughput (GB/s) against a plain in-memory copy of the same bytes, and
rollout tokens/s, for a ~200M-parameter Qwen2 on this machine, in one run, for each
``rollout.weight_sync`` mode (reload: buckets through vLLM's update_weights; shared: in-place
writes into the engine's shared-memory parameters).

    python benchmarks/bench_bridge.py [--bucket-mb 256] [--syncs 3] [--modes reload,shared]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--modes", default="reload,shared")
    args = parser.parse_args()

    from hf_fixtures import save_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_prime import distributed
    from megatron_prime.checkpoint.hf_io import HFCheckpoint
    from megatron_prime.checkpoint.hf_mapping import load_hf_weights
    from megatron_prime.config import ParallelConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.rollout.bridge import BridgeConfig, WeightBridge
    from megatron_prime.rollout.engine import RolloutConfig, RolloutEngine, SamplingConfig

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        config = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                             num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                             max_position_embeddings=1024, tie_word_embeddings=False,
                             eos_token_id=0, architectures=["Qwen2ForCausalLM"])
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(folder)
        save_tokenizer(folder, vocab_size=290)

        parallel = ParallelConfig()
        distributed.init_distributed(parallel)
        hf = HFCheckpoint.open(folder)
        policy = build_model(hf.config, "policy", parallel)
        load_hf_weights(policy, hf.tensor)
        # The same bytes, copied tensor by tensor into preallocated (already touched) memory.
        bridge = WeightBridge(policy, None)
        tensors = [t for _, _, t in bridge.iter_full_tensors()]
        targets = [torch.empty_like(t) for t in tensors]
        copy_seconds = []
        for _ in range(3):
            start = time.perf_counter()
            for source, target in zip(tensors, targets):
                target.copy_(source)
            copy_seconds.append(time.perf_counter() - start)
        copy_gbps = sum(t.nbytes for t in tensors) / 1e9 / min(copy_seconds)
        del tensors, targets

        results = {}
        for mode in args.modes.split(","):
            engine = RolloutEngine(folder, RolloutConfig(max_model_len=512, weight_sync=mode), on_gpu=False)
            bridge = WeightBridge(policy, engine, BridgeConfig(bucket_bytes=args.bucket_mb * 1024**2))
            syncs = [bridge.sync() for _ in range(args.syncs)]
            best = max(syncs[1:] or syncs, key=lambda s: s.gb_per_s)  # the first sync warms up

            prompts = [[(7 * i + j) % 280 + 5 for j in range(32)] for i in range(16)]
            sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=64, seed=0)
            engine.generate(prompts[:2], SamplingConfig(n=1, max_new_tokens=8))  # warm-up
            start = time.perf_counter()
            rollouts = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - start
            tokens = sum(len(r.response_token_ids) for r in rollouts)
            engine.shutdown()
            results[mode] = (best, syncs, len(rollouts), tokens, seconds)
        distributed.destroy_distributed()

    for mode, (best, syncs, samples, tokens, seconds) in results.items():
        how = f"{best.num_buckets} buckets of {args.bucket_mb} MiB" if best.num_buckets else "in place"
        print(f"[weight_sync={mode}] model: {best.bytes / 1e6:.0f} MB float32 "
              f"({best.num_tensors} tensors), {how}, CPU")
        print(f"[weight_sync={mode}] weight sync:     {best.gb_per_s:.2f} GB/s ({best.seconds:.3f} s; "
              f"all syncs: {', '.join(f'{s.seconds:.3f}' for s in syncs)} s)")
        print(f"[weight_sync={mode}] in-memory copy:  {copy_gbps:.2f} GB/s")
        print(f"[weight_sync={mode}] ratio sync / copy: {best.gb_per_s / copy_gbps:.2f}")
        print(f"[weight_sync={mode}] rollout: {samples} samples x up to 64 tokens, {tokens} tokens "
              f"in {seconds:.2f} s, {tokens / seconds:.0f} tokens/s")


if __name__ == "__main__":
    main()
