"""The default job: SFT a tiny model on running-sum chains, then PRIME with vLLM rollouts, on CPU.

``python -m megatron_prime.demo [CONFIG.yaml] [key=value ...]`` — with no arguments:

1. builds an in-repo tokenizer and a tiny random Qwen2 (no download);
2. writes generated running-sum chains (``Start 47. Apply +8, -5, +13, -9.``; K=4 steps,
   ``num_steps``) in the Eurus-2-RL-Data layout, and worked solutions (one line per step,
   ``47 + 8 = 55``, then ``\\boxed{answer}``) for SFT, on chains of 1..8 steps;
3. SFTs the model (megatron_prime.sft): it learns the format and most single steps, but a
   chain of four is right only about half of the time (one slip anywhere spoils it);
4. runs PRIME (megatron_prime.train) from the SFT model: vLLM samples, the math verifier
   scores the final answer only, the implicit PRM learns, PPO updates the policy; the
   outcome accuracy rises;
5. prints the accuracy at the start and at the end, and draws the curves to a PNG.

``task=arithmetic`` runs the earlier default job's one-step task instead ("What is 23 +
34?" answered in the Eurus-2 action format). Every output goes to a fresh folder under
``work_dir``; overrides reach the nested configs, e.g. ``prime.trainer.steps=10
sft.steps=100`` (the shortened test does this).

SFT settings (``_default_sft``), measured on 2 shared CPU cores: see
benchmarks/results/running_sum_sft_cpu.txt for steps -> per-step and whole-chain accuracy.
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
    require_choice,
    require_positive_int,
)
from megatron_prime.sft import SFTConfig
from megatron_prime.train import PrimeConfig

# Paths the demo fills in once it has written the model and the data.
GENERATED = "<written by the demo>"


def _default_sft() -> SFTConfig:
    # Running sums (K=4 RL chains, SFT on chains of 1..8 steps), the 2.0M-parameter model,
    # lr 1e-3, batch 32. Held-out accuracy of the SFT model, sampled at temperature 1 /
    # greedy, per step (right given the steps before were) and whole K=4 chain, measured
    # with benchmarks/running_sum_sft.py (benchmarks/results/running_sum_sft_cpu.txt):
    #   SFT steps 300: per step 0.39 / 0.58, whole chain 0.12 / 0.17
    #   SFT steps 400: per step 0.55 / 0.75, whole chain 0.23 / 0.35
    #   SFT steps 500: per step 0.79 / 0.86, whole chain 0.41 / 0.57   <- the default
    #   SFT steps 600: per step 0.75 / 0.90, whole chain 0.46 / 0.72
    # 500 is the fewest measured steps at which sampled K=4 chains are right 0.3-0.6 of the
    # time (room for RL to improve, yet enough right answers in most groups to learn from).
    return SFTConfig(model=GENERATED, data=[GENERATED], output=GENERATED, steps=500,
                     global_batch_size=32, micro_batch_size=32, log_every=50,
                     optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0))


def _default_prime() -> PrimeConfig:
    prime = PrimeConfig()
    prime.model.path, prime.data.paths = GENERATED, [GENERATED]
    prime.trainer.steps = 60  # K=4 accuracy 0.31 -> 0.52 in 6.3 min on 2 free cores (README)
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


TASKS: tuple[str, ...] = ("running_sum", "arithmetic")


@dataclass
class DemoConfig:
    work_dir: str = "runs/demo"
    seed: int = 0
    # "running_sum": chains of num_steps steps (toy/running_sum.py); "arithmetic": the
    # earlier default job's one-step sums in the Eurus-2 action format (toy/arithmetic.py).
    task: str = "running_sum"
    num_steps: int = 4  # K, the steps per RL chain (running_sum)
    # Chain lengths of the SFT solutions (running_sum): every length from 1 to 8, so one SFT
    # model serves K = 1, 4 and 8 and has seen chains longer than the RL ones.
    sft_num_steps: list[int] = field(default_factory=lambda: list(range(1, 9)))
    # Generated data: SFT solutions, and RL prompts (disjoint seeds: RL problems are unseen).
    num_sft_examples: int = 4000
    num_rl_prompts: int = 2000
    max_operand: int = 99  # arithmetic: operands in 0..max_operand
    # The tiny Qwen2: heads of 32 dimensions (a size vLLM's CPU attention supports), half as
    # many key/value heads. 4 x 192 (MLP 640) is 2.0M parameters.
    model_layers: int = 4
    model_hidden_size: int = 192
    model_intermediate_size: int = 640
    sft: SFTConfig = field(default_factory=_default_sft)
    prime: PrimeConfig = field(default_factory=_default_prime)

    def validate(self) -> None:
        from megatron_prime.toy.running_sum import MAX_STEPS

        require(isinstance(self.work_dir, str) and bool(self.work_dir), "work_dir", self.work_dir,
                "a folder path")
        require_choice("task", self.task, TASKS)
        for key in ("num_sft_examples", "num_rl_prompts", "max_operand", "model_layers",
                    "model_intermediate_size", "num_steps"):
            require_positive_int(key, getattr(self, key))
        require(isinstance(self.model_hidden_size, int) and self.model_hidden_size > 0
                and self.model_hidden_size % 64 == 0, "model_hidden_size", self.model_hidden_size,
                "a positive multiple of 64 (an even number of 32-dimensional heads)")
        require(self.num_steps <= MAX_STEPS, "num_steps", self.num_steps, f"an integer in 1..{MAX_STEPS}")
        require(isinstance(self.sft_num_steps, list) and bool(self.sft_num_steps)
                and all(isinstance(k, int) and 1 <= k <= MAX_STEPS for k in self.sft_num_steps),
                "sft_num_steps", self.sft_num_steps, f"a non-empty list of integers in 1..{MAX_STEPS}")
        if self.task == "running_sum":
            # A chain's solution is at most ~9 tokens a step + the box; a shorter limit cuts
            # every right answer off, and the whole run would learn from truncations.
            needed = max_response_tokens(self.num_steps)
            sampling = self.prime.rollout.sampling
            require(sampling.max_new_tokens >= needed, "prime.rollout.sampling.max_new_tokens",
                    sampling.max_new_tokens, f">= {needed} for num_steps={self.num_steps}")

    def write_base_model(self, folder: str | Path) -> Path:
        """The random-init tiny Qwen2 the SFT starts from."""
        from megatron_prime.toy import write_toy_model

        heads = self.model_hidden_size // 32
        return write_toy_model(folder, seed=self.seed, hidden_size=self.model_hidden_size,
                               num_layers=self.model_layers, num_attention_heads=heads,
                               num_key_value_heads=heads // 2,
                               intermediate_size=self.model_intermediate_size)

    def sft_rows(self, num: int, seed: int) -> list[dict]:
        """SFT chats of the task (chains of ``sft_num_steps`` steps for running_sum)."""
        from megatron_prime.toy import arithmetic, running_sum

        if self.task == "running_sum":
            return running_sum.make_sft_rows(num, seed, self.sft_num_steps)
        return arithmetic.make_sft_rows(num, seed, max_operand=self.max_operand)

    def rl_rows(self, num: int, seed: int) -> list[dict]:
        """Eurus-2-RL-Data rows of the task (chains of ``num_steps`` steps for running_sum)."""
        from megatron_prime.toy import arithmetic, running_sum

        if self.task == "running_sum":
            return running_sum.make_rl_rows(num, seed, self.num_steps)
        return arithmetic.make_rl_rows(num, seed, max_operand=self.max_operand)


def max_response_tokens(num_steps: int) -> int:
    """The toy tokenizer's longest running-sum solution of ``num_steps`` steps, with EOS:
    at most 9 tokens a line ("99 - 19 = 80" and the newline) and 4 for ``\\boxed{99}``."""
    return 9 * num_steps + 4 + 1


def draw_credit(config: DemoConfig, checkpoint: Path, png: Path, num_prompts: int = 32) -> Path:
    """The trained PRM's per-token implicit rewards beta * log(pi_psi / pi_ref) on the SFT
    model's samples of unseen problems: two right responses and two wrong ones, a wrong chain
    titled with its first wrong line, so a user sees whether the reward drops where the
    arithmetic goes wrong (megatron_prime/credit.py draws it; the reference is the SFT model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_prime.credit import (
        draw_credit_heatmap,
        heatmap_row,
        prm_hf_folder,
        token_implicit_rewards,
    )
    from megatron_prime.data.render import render_prompt
    from megatron_prime.rewards.math_verifier import extract_last_boxed
    from megatron_prime.toy.running_sum import first_wrong_step, parse_chain

    sft = config.sft.output
    tokenizer = AutoTokenizer.from_pretrained(sft)
    reference = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
    with prm_hf_folder(checkpoint) as folder:
        prm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    torch.manual_seed(config.seed)
    right: list[tuple] = []
    wrong: list[tuple] = []
    for row in config.rl_rows(num_prompts, seed=config.seed + 3):  # prompts PRIME never saw
        if len(right) >= 2 and len(wrong) >= 2:
            break
        prompt = render_prompt(tokenizer, row["prompt"], use_chat_template=False)
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt.token_ids]), do_sample=True, temperature=1.0,
                                     top_k=0, max_new_tokens=config.prime.rollout.sampling.max_new_tokens,
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
        response = [t for t in out[0, len(prompt.token_ids):].tolist() if t != tokenizer.pad_token_id]
        if tokenizer.eos_token_id in response:
            response = response[:response.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(response, skip_special_tokens=True)
        if config.task == "running_sum":
            first_wrong = first_wrong_step(parse_chain(row["prompt"][-1]["content"]), text)
            title = "right" if first_wrong is None else f"wrong: first wrong line {first_wrong + 1}"
            is_right = first_wrong is None
        else:  # one-step sums: the boxed integer against the answer
            is_right = extract_last_boxed(text) == row["reward_model"]["ground_truth"]
            title = "right" if is_right else "wrong"
        bucket = right if is_right else wrong
        if len(bucket) < 2:
            bucket.append((prompt.token_ids, response, title))
    rows = []
    for prompt_ids, response, title in right + wrong:
        rewards = token_implicit_rewards(prm, reference, prompt_ids, [response], config.prime.algo.beta)[0]
        rows.append(heatmap_row(tokenizer, response, rewards, f"{title} (sum {rewards.sum().item():+.3f})"))
    return draw_credit_heatmap(rows, png).path


def run_demo(config: DemoConfig) -> dict[str, float]:
    """Runs the whole job in this process; returns the accuracy before and after PRIME."""
    from megatron_prime.plot import plot_curves
    from megatron_prime.sft import run_sft
    from megatron_prime.toy import write_jsonl
    from megatron_prime.train import train

    folder = Path(config.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    start = time.perf_counter()
    print(f"[demo] writing into {folder}", flush=True)
    base = config.write_base_model(folder / "base")
    sft_data = write_jsonl(config.sft_rows(config.num_sft_examples, seed=config.seed + 1),
                           folder / "sft.jsonl")
    rl_data = write_jsonl(config.rl_rows(config.num_rl_prompts, seed=config.seed + 2),
                          folder / "rl.jsonl")

    config.sft.model, config.sft.data, config.sft.output = str(base), [str(sft_data)], str(folder / "sft")
    task = f"running sums of {config.num_steps} steps" if config.task == "running_sum" else "arithmetic"
    print(f"[demo] task: {task}; SFT: {config.sft.steps} steps on {config.num_sft_examples} worked "
          f"solutions", flush=True)
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
    heatmap = None
    if result.checkpoint is not None:
        heatmap = draw_credit(config, result.checkpoint, folder / "credit.png")
    print(f"[demo] outcome accuracy over the first {window} steps {first:.3f} -> last {window} "
          f"steps {last:.3f} ({time.perf_counter() - start:.0f} s in all)", flush=True)
    print(f"[demo] curves: {png}", flush=True)
    if heatmap is not None:
        print(f"[demo] implicit process rewards per token: {heatmap}", flush=True)
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
