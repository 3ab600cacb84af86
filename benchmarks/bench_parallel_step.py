"""One PRIME step of the same model at TP=1, TP=2 and PP=2, with where the time goes.

Each layout runs the real trainer (``python -m megatron_prime.train`` under torchrun: vLLM
rollouts, weight sync, log-prob passes, PRM and policy updates) for a few steps on the toy
arithmetic task. The means leave out the first step (start-up, first vLLM batch) and the
last (it saves the final checkpoint). All
layouts run in this one invocation, so the printed ratios compare like with like:

    python benchmarks/bench_parallel_step.py [--steps 5] [--layers 4] [--out results.txt]

On CPU (2 cores here) TP=2 and PP=2 run two processes on the cores that TP=1 leaves to one
process's threads, and gloo carries the collectives: the ratios show the cost of the
layouts' communication and bubbles on this machine, not a GPU cluster's speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("sync", "rollout", "logprobs", "prm_update", "policy_update", "step")
LAYOUTS = {"TP=1": (1, []), "TP=2": (2, ["parallel.tensor_parallel_size=2"]),
           "PP=2": (2, ["parallel.pipeline_parallel_size=2"])}


def run_layout(nproc: int, layout: list[str], model: Path, data: Path, run_dir: Path,
               args: argparse.Namespace) -> list[dict]:
    from megatron_prime.distributed import free_port
    from megatron_prime.monitor import read_metrics

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "megatron_prime.train",
               f"model.path={model}", f"data.paths=[{data}]", f"logging.run_dir={run_dir}",
               f"trainer.steps={args.steps}", "checkpoint.save_every=0", "trainer.device=cpu",
               f"rollout.batch.prompts_per_step={args.prompts}", "rollout.batch.oversample_factor=1",
               "rollout.batch.filter.low=0.0", "rollout.batch.filter.high=1.0",
               # A random model rarely stops before the limit: the truncation filter would
               # drop every prompt, and the timed step would train on nothing.
               "rollout.batch.filter_truncated=false",
               f"rollout.sampling.max_new_tokens={args.response}", "rollout.engine.max_model_len=160",
               "algo.micro_batch_size=8", "logging.wandb_mode=disabled", *layout]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(layout) or 'TP=1'} failed:\n{done.stderr[-4000:]}")
    return read_metrics(run_dir / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (x4 rollouts)")
    parser.add_argument("--response", type=int, default=48, help="max new tokens per rollout")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3: the first and last steps are left out")

    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    lines = [f"# benchmarks/bench_parallel_step.py on {datetime.date.today()}, "
             f"{platform.machine()} CPU x {os.cpu_count()}, no GPU; "
             f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}",
             f"# toy Qwen2 ({args.layers} layers), {args.prompts} prompts x 4 rollouts x up to "
             f"{args.response} tokens per step; seconds per step, mean of steps 2-{args.steps - 1}"]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = write_toy_model(root / "model", num_layers=args.layers)
        data = write_jsonl(make_rl_rows(128, seed=5), root / "rl.jsonl")
        means: dict[str, dict[str, float]] = {}
        for name, (nproc, layout) in LAYOUTS.items():
            metrics = run_layout(nproc, layout, model, data, root / name.replace("=", ""), args)[1:-1]
            means[name] = {phase: sum(m.get(f"time/{phase}", 0.0) for m in metrics) / len(metrics)
                           for phase in PHASES}
    header = f"{'layout':8s}" + "".join(f"{phase:>15s}" for phase in PHASES)
    lines.append(header)
    for name, phases in means.items():
        lines.append(f"{name:8s}" + "".join(f"{phases[p]:15.3f}" for p in PHASES))
    base = means["TP=1"]["step"]
    for name in ("TP=2", "PP=2"):
        lines.append(f"ratio step time {name} / TP=1: {means[name]['step'] / base:.2f}")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
