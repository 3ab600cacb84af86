"""Best-of-N with the implicit PRM a PRIME run trained, against random choice among the N.

On the default job's arithmetic task: the SFT model (the default job's SFT), then one PRIME
run (the default job's settings, the real trainer); its last step folder's PRM and policy
are exported to HF folders (``megatron-prime-megatron-to-hf --role``), and the evaluator
(``megatron_prime.evaluate``, real vLLM) samples N answers per held-out problem from a
generator, scores each with the PRM (sum or min of beta*log(pi_prm/pi_ref) over the
response; the reference is the SFT model) and keeps the best.

Random choice among the N has expected accuracy c/n per problem, which is pass@1 from n
samples: the figure best-of-N must beat. Majority vote is printed beside it. Each generator
(the SFT model and the trained policy) is sampled with several seeds; the PRM is trained once.

    python benchmarks/prm_best_of_n.py [--steps 40] [--n 16] [--problems 100] [--seeds 0,1,2]

Results (text and JSON) go to --out-dir with the command, the commit and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
AGGREGATES = ("sum", "min")


def demo_config(seed: int = 0):
    """The arithmetic default job this benchmark's recorded results were made with (the
    0.86M-parameter model, 150 SFT steps on 2000 solutions); the default job has since moved
    to running sums."""
    from megatron_prime.demo import DemoConfig

    demo = DemoConfig(seed=seed, task="arithmetic", num_sft_examples=2000, model_hidden_size=128,
                      model_intermediate_size=384)
    demo.sft.steps = 150
    return demo


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed; last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))


def prepare(work: Path, seed: int) -> tuple[Path, Path, Path]:
    """The SFT model, training prompts and held-out prompts."""
    from megatron_prime.config import config_to_dict
    from megatron_prime.toy import write_jsonl

    demo = demo_config(seed)
    base = demo.write_base_model(work / "base")
    sft_data = write_jsonl(demo.sft_rows(demo.num_sft_examples, seed=seed + 1), work / "sft.jsonl")
    rl_data = write_jsonl(demo.rl_rows(demo.num_rl_prompts, seed=seed + 2), work / "rl.jsonl")
    held_out = write_jsonl(demo.rl_rows(200, seed=seed + 3), work / "held_out.jsonl")
    sft = demo.sft
    sft.model, sft.data, sft.output = str(base), [str(sft_data)], str(work / "sft")
    (work / "sft.yaml").write_text(yaml.safe_dump(config_to_dict(sft)))
    run([sys.executable, "-m", "megatron_prime.sft", str(work / "sft.yaml")], work / "sft.log")
    return Path(sft.output), rl_data, held_out


def train_run(work: Path, seed: int, steps: int, sft: Path, rl_data: Path, held_out: Path) -> list[dict]:
    """One PRIME run with the arithmetic default job's settings."""
    from megatron_prime.config import config_to_dict
    from megatron_prime.monitor import read_metrics

    prime = demo_config(seed).prime
    prime.model.path, prime.data.paths = str(sft), [str(rl_data)]
    prime.trainer.steps, prime.trainer.seed = steps, seed
    prime.data.shuffle_seed = seed
    prime.logging.run_dir = str(work / f"prime_seed{seed}")
    prime.logging.wandb_mode = "disabled"
    prime.validation.paths, prime.validation.before_train = [str(held_out)], True
    config = work / f"prime_seed{seed}.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(prime)))
    run([sys.executable, "-m", "megatron_prime.train", str(config)], config.with_suffix(".log"))
    return read_metrics(Path(prime.logging.run_dir) / "metrics.jsonl")


def benchmark_file(held_out: Path, path: Path, problems: int) -> Path:
    """The held-out prompts (RL-data layout) as an evaluation file: question, answer, source."""
    from megatron_prime.data.templates import MATH_SUFFIX

    rows = []
    for line in held_out.read_text().splitlines()[:problems]:
        row = json.loads(line)
        question = row["prompt"][-1]["content"].removesuffix(MATH_SUFFIX)
        rows.append({"question": question, "answer": row["reward_model"]["ground_truth"],
                     "source": "toy_arithmetic"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def export(step: Path, role: str, output: Path, log: Path) -> Path:
    run([sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"), "--checkpoint", str(step),
         "--role", role, "--output", str(output)], log)
    return output


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):5.1f} [{min(values):.1f}, {max(values):.1f}]"


def report(results: dict, prm_ranking: list[float], steps: int, n: int, problems: int,
           seeds: list[int], ks: list[int]) -> list[str]:
    lines = [f"PRM: trained by {steps} PRIME steps (the default job's settings) from the default "
             f"job's SFT model; its training-time ranking accuracy over the last 10 steps "
             f"{statistics.mean(prm_ranking[-10:]):.3f}",
             f"evaluation: {problems} held-out problems, N={n} samples each at temperature 1, "
             f"sampling seeds {seeds}; percent, mean [min, max] over seeds; random choice = pass@1",
             ""]
    lines.append(f"{'generator':<14} {'PRM score':<9} {'random choice':>20} " + " ".join(
        f"{f'maj@{k}':>20} {f'best-of-{k}':>20}" for k in ks if k > 1))
    wins = []
    for generator, by_aggregate in results.items():
        for aggregate, by_seed in by_aggregate.items():
            rows = list(by_seed.values())
            cells = [spread([r["pass@1"] for r in rows])]
            for k in ks:
                if k > 1:
                    cells += [spread([r[f"maj@{k}"] for r in rows]), spread([r[f"bon@{k}"] for r in rows])]
                    wins.append(f"best-of-{k} above random choice: "
                                f"{sum(r[f'bon@{k}'] > r['pass@1'] for r in rows)} of {len(rows)} seeds "
                                f"({generator} / {aggregate})")
            lines.append(f"{generator:<14} {aggregate:<9} " + " ".join(f"{c:>20}" for c in cells))
    return lines + [""] + wins


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="PRIME steps that train the PRM")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2", help="sampling seeds of the evaluation")
    parser.add_argument("--out-dir", default=str(BENCHMARKS / "results"))
    parser.add_argument("--work-dir", default=None, help="keep the models here (default: a temp dir)")
    parser.add_argument("--report", default=None, help="only print the table of a saved JSON result")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = sorted({1, 4, args.n})
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        results = {g: {a: {int(s): r for s, r in by_seed.items()} for a, by_seed in by_agg.items()}
                   for g, by_agg in saved["results"].items()}
        print("\n".join(report(results, saved["prm_ranking_accuracy"], saved["steps"], saved["n"],
                                saved["problems"], saved["seeds"], sorted({1, 4, saved["n"]}))))
        return

    from megatron_prime.evaluate import EvalConfig, evaluate

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sft, rl_data, held_out = prepare(work, seed=0)
        history = train_run(work, 0, args.steps, sft, rl_data, held_out)
        step = work / "prime_seed0" / "checkpoints" / f"step_{args.steps:08d}"
        prm = export(step, "prm", work / "prm_hf", work / "export_prm.log")
        policy = export(step, "policy", work / "policy_hf", work / "export_policy.log")
        bench = benchmark_file(held_out, work / "toy_arithmetic.jsonl", args.problems)
        beta = demo_config().prime.algo.beta
        max_new_tokens = demo_config().prime.rollout.sampling.max_new_tokens

        # results[generator][aggregate][seed] = the evaluator's average row
        results: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
        for generator, folder in (("SFT model", sft), ("PRIME policy", policy)):
            for aggregate in AGGREGATES:
                for seed in seeds:
                    out = work / "eval" / f"{generator.split()[0].lower()}_{aggregate}_seed{seed}"
                    result = evaluate(EvalConfig(
                        model=str(folder), benchmarks=[str(bench)], out_dir=str(out), n=args.n,
                        temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, ks=ks,
                        system_prompt=False, prm=str(prm), reference=str(sft), beta=beta,
                        prm_aggregate=aggregate, verifier_workers=1))
                    results.setdefault(generator, {}).setdefault(aggregate, {})[seed] = result["average"]
    minutes = (time.perf_counter() - start) / 60

    prm_ranking = [m["prm/ranking_accuracy"] for m in history if "prm/ranking_accuracy" in m]
    lines = report(results, prm_ranking, args.steps, args.n, args.problems, seeds, ks)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    head = (f"# benchmarks/prm_best_of_n.py {' '.join(sys.argv[1:])} at commit {commit} on "
            f"{datetime.date.today()}, {platform.machine()} CPU x{__import__('os').cpu_count()}, "
            f"{minutes:.1f} min")
    text = "\n".join([head, *lines]) + "\n"
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prm_best_of_n.txt").write_text(text)
    (out_dir / "prm_best_of_n.json").write_text(json.dumps(
        {"steps": args.steps, "n": args.n, "problems": args.problems, "seeds": seeds,
         "results": results, "prm_ranking_accuracy": prm_ranking}, indent=2) + "\n")


if __name__ == "__main__":
    main()
