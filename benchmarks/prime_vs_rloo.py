"""PRIME against outcome-only RLOO on the default job's arithmetic task, several seeds.

Both methods start from the same SFT model (trained once here, the default job's SFT), see
the same prompts, sample the same number of rollouts per prompt and take the same number of
steps with the same optimizer; the only difference is ``algo.prm_mode``: ``before`` (PRIME:
implicit PRM updated on the outcome labels, dense process rewards added to the RLOO
outcome returns) or ``none`` (RLOO on outcome rewards alone, PPO-clipped). Each run is the
real trainer (``python -m megatron_prime.train``) in its own process.

Reported per method, mean and spread (min-max) over seeds:
- steps to reach the target training accuracy (trailing mean over 5 steps of
  ``reward/accuracy``, the sampled rollouts' outcome accuracy);
- final training accuracy (mean of the last 10 steps);
- held-out greedy pass@1 (``val/accuracy``) of the SFT start and of the final policy, on
  prompts the run never trains on.

    python benchmarks/prime_vs_rloo.py                 # reduced: 3 seeds x 60 steps
    python benchmarks/prime_vs_rloo.py --full          # 5 seeds x 100 steps

Results (text, JSON, PNG of both methods' curves) go to --out-dir with the command, the
commit and the machine. Whatever comes out is reported as it is.
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
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METHODS = {"PRIME": "before", "RLOO": "outcome_only"}
TRAIL = 5  # steps in the trailing mean that decides "reached the target"


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed; last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))


def prepare(work: Path, seed: int) -> tuple[Path, Path, Path]:
    """The SFT model (the default job's SFT), training prompts and held-out prompts."""
    from megatron_prime.config import config_to_dict
    from megatron_prime.demo import DemoConfig
    from megatron_prime.toy import make_rl_rows, make_sft_rows, write_jsonl, write_toy_model

    demo = DemoConfig(seed=seed)
    base = write_toy_model(work / "base", seed=seed, num_layers=demo.model_layers)
    sft_data = write_jsonl(make_sft_rows(demo.num_sft_examples, seed=seed + 1,
                                         max_operand=demo.max_operand), work / "sft.jsonl")
    rl_data = write_jsonl(make_rl_rows(demo.num_rl_prompts, seed=seed + 2,
                                       max_operand=demo.max_operand), work / "rl.jsonl")
    held_out = write_jsonl(make_rl_rows(200, seed=seed + 3, max_operand=demo.max_operand),
                           work / "held_out.jsonl")
    sft = demo.sft
    sft.model, sft.data, sft.output = str(base), [str(sft_data)], str(work / "sft")
    (work / "sft.yaml").write_text(yaml.safe_dump(config_to_dict(sft)))
    run([sys.executable, "-m", "megatron_prime.sft", str(work / "sft.yaml")], work / "sft.log")
    return Path(sft.output), rl_data, held_out


def train_run(work: Path, method: str, seed: int, steps: int, sft: Path, rl_data: Path,
              held_out: Path) -> list[dict]:
    from megatron_prime.config import config_to_dict
    from megatron_prime.demo import DemoConfig
    from megatron_prime.monitor import read_metrics

    prime = DemoConfig().prime  # the default job's PRIME settings
    prime.model.path, prime.data.paths = str(sft), [str(rl_data)]
    prime.trainer.steps, prime.trainer.seed = steps, seed
    prime.data.shuffle_seed = seed  # the prompt order varies with the seed as well
    prime.algo.prm_mode = METHODS[method]
    prime.logging.run_dir = str(work / f"{method.lower()}_seed{seed}")
    prime.logging.wandb_mode = "disabled"
    prime.validation.paths, prime.validation.before_train = [str(held_out)], True
    config = work / f"{method.lower()}_seed{seed}.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(prime)))
    run([sys.executable, "-m", "megatron_prime.train", str(config)], config.with_suffix(".log"))
    return read_metrics(Path(prime.logging.run_dir) / "metrics.jsonl")


def steps_to(accuracy: list[float], target: float) -> int | None:
    for end in range(TRAIL, len(accuracy) + 1):
        if sum(accuracy[end - TRAIL:end]) / TRAIL >= target:
            return end
    return None


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def summarize(runs: dict[str, dict[int, list[dict]]], target: float) -> tuple[list[str], dict]:
    lines, summary = [], {}
    header = (f"{'method':7s} {'steps to train acc >= ' + format(target, '.2f'):>30s} "
              f"{'final train acc':>24s} {'held-out start':>16s} {'held-out final':>24s}")
    lines.append(header)
    for method, by_seed in runs.items():
        reach, final, start, end = [], [], [], []
        for metrics in by_seed.values():
            training = [m for m in metrics if m["step"] >= 1]
            accuracy = [m["reward/accuracy"] for m in training]
            reach.append(steps_to(accuracy, target))
            final.append(statistics.fmean(accuracy[-10:]))
            start.append(next(m["val/accuracy"] for m in metrics if m["step"] == 0))
            end.append(next(m["val/accuracy"] for m in reversed(metrics) if "val/accuracy" in m))
        reached = [r for r in reach if r is not None]
        reach_text = (f"{statistics.fmean(reached):.1f} [{min(reached)}, {max(reached)}]" if reached else "never")
        reach_text += f" ({len(reached)}/{len(reach)} seeds)"
        lines.append(f"{method:7s} {reach_text:>30s} {spread(final):>24s} {statistics.fmean(start):16.3f} "
                     f"{spread(end):>24s}")
        summary[method] = {"steps_to_target": reach, "final_train_accuracy": final,
                           "held_out_start": start, "held_out_final": end}
    return lines, summary


def plot(runs: dict[str, dict[int, list[dict]]], png: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for (method, by_seed), color in zip(runs.items(), ("tab:red", "tab:blue")):
        curves = []
        for metrics in by_seed.values():
            accuracy = [m["reward/accuracy"] for m in metrics if m["step"] >= 1]
            curves.append([sum(accuracy[max(0, i - TRAIL + 1):i + 1]) / len(accuracy[max(0, i - TRAIL + 1):i + 1])
                           for i in range(len(accuracy))])
        steps = range(1, min(len(c) for c in curves) + 1)
        columns = list(zip(*curves))
        axis.plot(steps, [statistics.fmean(c) for c in columns], color=color,
                  label=f"{method} (mean of {len(curves)} seeds)")
        axis.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.15)
    axis.axhline(target, color="gray", linestyle=":", linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel(f"training accuracy ({TRAIL}-step trailing mean)")
    axis.set_title("PRIME vs outcome-only RLOO, toy arithmetic (min-max over seeds shaded)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="5 seeds x 100 steps")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --full 0..4)")
    parser.add_argument("--steps", type=int, help="steps per run (default 60; --full 100)")
    parser.add_argument("--target", type=float, default=0.5, help="training accuracy to reach")
    parser.add_argument("--work-dir", default="runs/prime_vs_rloo")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    seeds = [int(s) for s in (args.seeds or ("0,1,2,3,4" if args.full else "0,1,2")).split(",")]
    steps = args.steps or (100 if args.full else 60)

    started = time.perf_counter()
    work = Path(args.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    print(f"[prime_vs_rloo] {len(seeds)} seeds x {steps} steps x {list(METHODS)} in {work}", flush=True)
    sft, rl_data, held_out = prepare(work, seed=0)
    print(f"[prime_vs_rloo] SFT done ({time.perf_counter() - started:.0f} s)", flush=True)
    runs: dict[str, dict[int, list[dict]]] = {method: {} for method in METHODS}
    for seed in seeds:
        for method in METHODS:
            runs[method][seed] = train_run(work, method, seed, steps, sft, rl_data, held_out)
            last = runs[method][seed][-1]
            print(f"[prime_vs_rloo] {method} seed {seed}: train acc {last['reward/accuracy']:.3f}, "
                  f"held-out {last.get('val/accuracy', float('nan')):.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    lines, summary = summarize(runs, args.target)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    minutes = (time.perf_counter() - started) / 60
    head = [f"# benchmarks/prime_vs_rloo.py, {datetime.date.today()}, commit {commit}, "
            f"{platform.machine()} CPU x {os.cpu_count()}, no GPU, {minutes:.1f} min",
            f"# command: python benchmarks/prime_vs_rloo.py {' '.join(sys.argv[1:])}".rstrip(),
            f"# toy arithmetic (default job): SFT 150 steps once, then {steps} steps per run, seeds "
            f"{seeds}; 16 prompts x 4 rollouts per step; held-out: 200 unseen prompts, greedy",
            "# mean [min, max] over seeds"]
    report = "\n".join(head + lines) + "\n"
    print(report, end="")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "prime_vs_rloo_full" if args.full else "prime_vs_rloo"
    (out_dir / f"{name}.txt").write_text(report)
    (out_dir / f"{name}.json").write_text(json.dumps(
        {"command": sys.argv, "commit": commit, "steps": steps, "seeds": seeds, "target": args.target,
         "summary": summary,
         "curves": {m: {str(s): [x.get("reward/accuracy") for x in metrics if x["step"] >= 1]
                        for s, metrics in by_seed.items()} for m, by_seed in runs.items()}}, indent=1))
    plot(runs, out_dir / f"{name}.png", args.target)


if __name__ == "__main__":
    main()
