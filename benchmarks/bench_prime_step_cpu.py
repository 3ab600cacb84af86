"""One PRIME update (steps 6-9: log-prob passes, PRM update, advantages, PPO update) on CPU,
before and after the step's cheaper forms, in one run, split by phase.

The forms, each a switch of the trainer:
- ``sdpa``: the local spec's core attention on torch's fused kernel instead of Megatron's
  unfused one (``precision.local_attention``);
- ``trim``: each micro-batch computed up to its own last scored token instead of the batch's
  longest row (``BuiltModel.trim_micro_batches``);
- ``skip``: no old-policy pass when the update is one on-policy pass
  (``algo.old_logprob_pass=auto``);
- ``tokens``: micro-batches cut by a token budget instead of 4 rows each
  (``algo.max_tokens_per_micro_batch``, the padded length of the batch's longest row: a
  micro-batch never holds more tokens than one longest row, but many short rows share one);
- ``small PRM``: the PRM and its reference from a smaller checkpoint of the same tokenizer
  (``model.prm_path`` of its own size: 2 layers of hidden 64 against the policy's 4 of 128).

"before" has none, "after" the first three; the rows between add one at a time; the
"+tokens" row adds the token budget, the last row the small PRM to "after". The batch is a
tiny Qwen2's (4 layers, 128 hidden) 8 prompts x 4 responses with a long-tailed response
length (lognormal, clipped to the 448-token limit, as RL responses are: most short, a few
long), so padding to the longest row costs what it costs in a real step. Every setting
runs the same batch from the same weights; the reported time is the median of the timed
repetitions after one warm-up, per phase (update.PhaseTimer) and in all.

    python benchmarks/bench_prime_step_cpu.py [--repeats 3] [--out benchmarks/results/prime_step_cpu.txt]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

SETTINGS = {  # name: (local_attention, trim_micro_batches, old_logprob_pass, token budget, small PRM)
    "before": ("unfused", False, "always", False, False),
    "+sdpa": ("sdpa", False, "always", False, False),
    "+sdpa+trim": ("sdpa", True, "always", False, False),
    "after (+skip)": ("sdpa", True, "auto", False, False),
    "+tokens": ("sdpa", True, "auto", True, False),
    "after+small PRM": ("sdpa", True, "auto", False, True),
}
PHASES = ("logprobs", "prm_update", "policy_update")


def make_batch(vocab: int, prompts: int, samples: int, prompt_tokens: int, max_response: int, seed: int):
    import torch

    from megatron_prime.models.schedule import TokenBatch

    generator = torch.Generator().manual_seed(seed)
    rows = prompts * samples
    # Long-tailed lengths: median ~60 tokens, a few at the limit.
    lengths = torch.exp(torch.randn(rows, generator=generator) * 0.9 + 4.1).clamp(8, max_response).long()
    seq = prompt_tokens + int(lengths.max())
    ids = torch.randint(3, vocab, (rows, seq), generator=generator)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        mask[row, prompt_tokens:prompt_tokens + length] = 1
        ids[row, prompt_tokens + length:] = 0
    outcomes = (torch.rand(rows, generator=generator) < 0.5).float()
    return TokenBatch(ids, mask), outcomes, lengths


def run(args: argparse.Namespace) -> dict:
    import torch

    from megatron_prime import distributed
    from megatron_prime.config import OptimizerConfig, ParallelConfig, PrecisionConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.models.optimizer import build_optimizer
    from megatron_prime.toy import write_toy_model
    from megatron_prime.update import AlgoConfig, PrimeModels, prime_update

    distributed.init_distributed(ParallelConfig(), use_gpu=False)
    root = Path(tempfile.mkdtemp())
    folder = write_toy_model(root / "model", num_layers=4, hidden_size=128)
    hf_config = json.loads((folder / "config.json").read_text())
    small_folder = write_toy_model(root / "small_prm", num_layers=2, hidden_size=64,
                                   intermediate_size=192)
    small_config = json.loads((small_folder / "config.json").read_text())
    batch, outcomes, lengths = make_batch(hf_config["vocab_size"], 8, 4, 64, 448, seed=0)
    results: dict = {"rows": batch.batch_size, "seq_length": batch.seq_length,
                     "response_lengths": sorted(lengths.tolist()), "settings": {}}
    for name, (attention, trim, old_pass, budget, small) in SETTINGS.items():
        precision = PrecisionConfig(local_attention=attention)
        torch.manual_seed(0)
        built = {role: build_model(small_config if small and role != "policy" else hf_config,
                                   role, ParallelConfig(), precision)
                 for role in ("policy", "prm", "reference")}
        for model in built.values():
            model.trim_micro_batches = trim
        optimizer = OptimizerConfig(lr=1e-6)
        models = PrimeModels(policy=built["policy"], reference=built["reference"], prm=built["prm"],
                             policy_optimizer=build_optimizer(built["policy"], optimizer),
                             prm_optimizer=build_optimizer(built["prm"], optimizer))
        config = AlgoConfig(micro_batch_size=4, old_logprob_pass=old_pass,
                            max_tokens_per_micro_batch=batch.seq_length if budget else None)
        timings: list[dict[str, float]] = []
        for repeat in range(args.repeats + 1):
            metrics = prime_update(models, batch, outcomes, config).metrics
            if repeat:  # the first is a warm-up
                timings.append({phase: metrics.get(f"time/{phase}", 0.0) for phase in PHASES})
        results["settings"][name] = {
            **{phase: statistics.median(t[phase] for t in timings) for phase in PHASES},
            "step": statistics.median(sum(t.values()) for t in timings),
            "policy_loss": metrics["policy/loss"], "prm_loss": metrics["prm/loss"]}
    distributed.destroy_distributed()
    return results


def report(results: dict, args: argparse.Namespace) -> str:
    lengths = results["response_lengths"]
    lines = [f"# benchmarks/bench_prime_step_cpu.py, {datetime.date.today()}, {platform.machine()} "
             f"CPU x {os.cpu_count()}, torch threads {args.threads}; median of {args.repeats} steps after a warm-up",
             f"# {results['rows']} responses, padded length {results['seq_length']} (64 prompt tokens); "
             f"response lengths min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}",
             f"{'setting':15s} " + " ".join(f"{p:>14s}" for p in (*PHASES, "step")) + "  step/before"]
    before = results["settings"]["before"]["step"]
    for name, row in results["settings"].items():
        lines.append(f"{name:15s} " + " ".join(f"{row[p]:13.3f}s" for p in (*PHASES, "step"))
                     + f"  {row['step'] / before:10.2f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    import torch

    torch.set_num_threads(args.threads)
    text = report(run(args), args)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
