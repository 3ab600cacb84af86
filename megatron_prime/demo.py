"""The default job: SFT a tiny model on arithmetic, then PRIME with vLLM rollouts, on CPU.

``python -m megatron_prime.demo [CONFIG.yaml] [key=value ...]`` — with no arguments:

1. builds an in-repo tokenizer and a tiny random Qwen2 (no download);
2. writes generated arithmetic problems in the Eurus-2-RL-Data layout, and worked solutions
   in the Eurus-2 action format ([ASSESS] ... [OUTPUT] \\boxed{answer}) for SFT;
3. SFTs the model briefly (megatron_prime.sft): it learns the format and some arithmetic;
4. runs PRIME (megatron_prime.train) from the SFT model: vLLM samples, the math verifier
   scores, the implicit PRM learns, PPO updates the policy; the outcome accuracy rises;
5. prints the accuracy at the start and at the end, and draws the curves to a PNG.

Every output goes to a fresh folder under ``work_dir``; overrides reach the nested
configs, e.g. ``prime.trainer.steps=10 sft.steps=100`` (the shortened test does this).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_prime.config import (
    OptimizerConfig,
    load_config,
    require,
    require_positive_int,
)
from megatron_prime.sft import SFTConfig
from megatron_prime.train import PrimeConfig

# Paths the demo fills in once it has written the model and the data.
GENERATED = "<written by the demo>"


def _default_sft() -> SFTConfig:
    # ~150 steps reach about 40% greedy (20% sampled at temperature 1) on the toy task: the
    # format is learnt, the sums are not yet reliable, so RL has room to improve (measured:
    # 100 steps 20%, 150 steps 44%, 200 steps 86% greedy).
    return SFTConfig(model=GENERATED, data=[GENERATED], output=GENERATED, steps=150,
                     global_batch_size=32, micro_batch_size=32, log_every=20,
                     optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0))


def _default_prime() -> PrimeConfig:
    prime = PrimeConfig()
    prime.model.path, prime.data.paths = GENERATED, [GENERATED]
    prime.trainer.steps = 100
    prime.trainer.seed = 0
    batch = prime.rollout.batch
    batch.prompts_per_step, batch.oversample_factor, batch.max_rounds = 16, 2, 2
    prime.rollout.sampling.max_new_tokens = 48
    prime.rollout.engine.max_model_len = 128
    prime.algo.micro_batch_size = 16
    # Two PPO updates per step (the second one off-policy, so the clip is active).
    prime.algo.ppo_mini_batches = 2
    # A tiny model needs far larger steps than PRIME's 7B settings (5e-7 / 1e-6).
    prime.policy_optimizer.lr = 2e-4
    prime.prm_optimizer.lr = 2e-4
    prime.checkpoint.save_every = 0  # one checkpoint, at the end
    return prime


@dataclass
class DemoConfig:
    work_dir: str = "runs/demo"
    seed: int = 0
    # Generated data: SFT solutions, and RL prompts (disjoint seeds: RL problems are unseen).
    num_sft_examples: int = 2000
    num_rl_prompts: int = 2000
    max_operand: int = 99
    model_layers: int = 4
    sft: SFTConfig = field(default_factory=_default_sft)
    prime: PrimeConfig = field(default_factory=_default_prime)

    def validate(self) -> None:
        require(isinstance(self.work_dir, str) and bool(self.work_dir), "work_dir", self.work_dir,
                "a folder path")
        for key in ("num_sft_examples", "num_rl_prompts", "max_operand", "model_layers"):
            require_positive_int(key, getattr(self, key))


def run_demo(config: DemoConfig) -> dict[str, float]:
    """Runs the whole job in this process; returns the accuracy before and after PRIME."""
    from megatron_prime.plot import plot_curves
    from megatron_prime.sft import run_sft
    from megatron_prime.toy import (
        make_rl_rows,
        make_sft_rows,
        write_jsonl,
        write_toy_model,
    )
    from megatron_prime.train import train

    folder = Path(config.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    start = time.perf_counter()
    print(f"[demo] writing into {folder}", flush=True)
    base = write_toy_model(folder / "base", seed=config.seed, num_layers=config.model_layers)
    sft_data = write_jsonl(make_sft_rows(config.num_sft_examples, seed=config.seed + 1,
                                         max_operand=config.max_operand), folder / "sft.jsonl")
    rl_data = write_jsonl(make_rl_rows(config.num_rl_prompts, seed=config.seed + 2,
                                       max_operand=config.max_operand), folder / "rl.jsonl")

    config.sft.model, config.sft.data, config.sft.output = str(base), [str(sft_data)], str(folder / "sft")
    print(f"[demo] SFT: {config.sft.steps} steps on {config.num_sft_examples} worked solutions", flush=True)
    sft = run_sft(config.sft)
    print(f"[demo] SFT loss {sft['loss_first']:.3f} -> {sft['loss_last']:.3f} "
          f"({time.perf_counter() - start:.0f} s so far)", flush=True)

    prime = config.prime
    prime.model.path = config.sft.output
    prime.data.paths = [str(rl_data)]
    prime.logging.run_dir = str(folder / "prime")
    print(f"[demo] PRIME: {prime.trainer.steps} steps, {prime.rollout.batch.prompts_per_step} "
          f"prompts x {prime.algo.num_samples_per_prompt} samples per step", flush=True)
    result = train(prime)
    accuracy = [m["reward/accuracy"] for m in result.history]
    window = max(1, min(10, len(accuracy) // 3))
    first, last = sum(accuracy[:window]) / window, sum(accuracy[-window:]) / window
    png = plot_curves(Path(prime.logging.run_dir) / "metrics.jsonl", folder / "curves.png", smooth=3)
    print(f"[demo] outcome accuracy over the first {window} steps {first:.3f} -> last {window} "
          f"steps {last:.3f} ({time.perf_counter() - start:.0f} s in all)", flush=True)
    print(f"[demo] curves: {png}", flush=True)
    return {"accuracy_first": first, "accuracy_last": last, "seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    path = args.pop(0) if args and "=" not in args[0] else None
    try:
        config = load_config(DemoConfig, path, args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    from megatron_prime import distributed

    run_demo(config)
    if distributed.is_initialized():
        distributed.destroy_distributed()


if __name__ == "__main__":
    main()
