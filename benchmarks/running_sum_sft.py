"""How far SFT takes the tiny Qwen2 on running-sum chains: per-step and whole-chain accuracy
(sampled at temperature 1, and greedy) after every ``--segment`` SFT steps.

    python benchmarks/running_sum_sft.py --hidden 256 --layers 4 --segments 4 --segment 150

The SFT runs in segments, each continuing from the last one's HF folder (a new Adam state
per segment: the optimizer is Adam at a constant lr, so this differs from one long run only
in Adam's moment estimates restarting). Evaluation: transformers ``generate`` on held-out
chains (a seed the SFT data did not use). Per-step accuracy = steps right before the first
wrong one / (those + the first wrong one): the chance a step is right given that the steps
before it were, pooled over chains; whole-chain = the boxed answer equals the final value.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_prime.config import OptimizerConfig
from megatron_prime.rewards import extract_last_boxed
from megatron_prime.sft import SFTConfig, run_sft
from megatron_prime.toy import write_jsonl, write_toy_model
from megatron_prime.toy.running_sum import first_wrong_step, make_chains, make_sft_rows


def evaluate(folder: Path, num_steps: int, num: int, temperature: float, seed: int = 99) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chains = make_chains(num, seed=seed, num_steps=num_steps)
    prompts = [c.prompt for c in chains]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10 * num_steps + 8, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    right_steps = attempted = whole = 0
    for chain, text in zip(chains, texts):
        wrong = first_wrong_step(chain, text)
        right_steps += num_steps if wrong is None else wrong
        attempted += num_steps if wrong is None else wrong + 1
        whole += extract_last_boxed(text) == str(chain.answer)
    return {"per_step": right_steps / attempted, "whole": whole / num}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/running_sum_sft")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--segment", type=int, default=150)
    parser.add_argument("--sft-steps", default="1,2,3,4,5,6,7,8", help="chain lengths of the SFT data")
    parser.add_argument("--num-sft", type=int, default=4000)
    parser.add_argument("--eval-ks", default="1,4,8")
    parser.add_argument("--resume", default="", help="continue from this SFT output folder ...")
    parser.add_argument("--resume-steps", type=int, default=0, help="... which had this many SFT steps")
    parser.add_argument("--num-eval", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    base = write_toy_model(out / "base", hidden_size=args.hidden, num_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                           intermediate_size=args.intermediate)
    params = sum(t.numel() for t in load_file(base / "model.safetensors").values())
    lengths = [int(k) for k in args.sft_steps.split(",")]
    data = write_jsonl(make_sft_rows(args.num_sft, seed=1, num_steps=lengths), out / "sft.jsonl")
    model, seconds = (Path(args.resume) if args.resume else base), 0.0
    done = args.resume_steps // args.segment
    for segment in range(done + 1, done + args.segments + 1):
        config = SFTConfig(model=str(model), data=[str(data)], output=str(out / f"sft_{segment}"),
                           steps=args.segment, global_batch_size=args.batch, micro_batch_size=args.batch,
                           log_every=50, seed=segment, optimizer=OptimizerConfig(lr=args.lr, clip_grad=1.0))
        result = run_sft(config)
        seconds += result["train_seconds"]
        model = Path(config.output)
        row = {"params": params, "hidden": args.hidden, "layers": args.layers, "lr": args.lr,
               "sft_steps": segment * args.segment, "train_seconds": round(seconds),
               "resumed_from": args.resume_steps, "loss": result["loss_last"]}
        for k in (int(k) for k in args.eval_ks.split(",")):
            for name, temperature in (("t1", 1.0), ("greedy", 0.0)):
                for key, value in evaluate(model, k, args.num_eval, temperature).items():
                    row[f"K{k}_{name}_{key}"] = round(value, 3)
        print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
