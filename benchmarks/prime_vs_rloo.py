"""PRIME against outcome-only RLOO on running-sum chains, under a protocol fixed in advance.

Everything the comparison depends on (the task, the chain lengths K, the tuning grid, the
seeds, the measures and the target) is read from ``benchmarks/prime_vs_rloo_protocol.yaml``;
each run's result file carries that file's sha256, and results made under another protocol
are refused. Each run is the real trainer (``python -m megatron_prime.train``) in its own
process, from one SFT model shared by every run.

Phases, in order:
1. ``tune``: at the protocol's K, each method over the learning-rate grid x tuning seeds,
   scored on the validation split; the chosen rate per method goes to ``selection.json``.
2. ``main``: every K x method x seed with the chosen rate, scored on the held-out split; then
   the primary measure for each PRIME run: on a fixed set of wrong responses (the SFT model
   sampling held-out prompts), how often the step with the lowest cumulative implicit reward
   is the labelled first wrong line, against chance.

One result file per run under ``<results>/runs/``; a run whose file exists is not run
again, so the grid can be spread over several sittings (``--max-runs`` bounds a sitting).
Every sitting rewrites the report (text, JSON, one PNG of curves per K) from all result files
present, so a partial grid is reported as partial.

    python benchmarks/prime_vs_rloo.py --max-runs 4      # the next 4 runs, then the report
    python benchmarks/prime_vs_rloo.py --report-only     # the report from what exists
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "benchmarks" / "prime_vs_rloo_protocol.yaml"
RESULTS = REPO / "benchmarks" / "results" / "prime_vs_rloo"
# Per-step metrics kept in a run's result file (when the trainer logged them).
KEPT_METRICS = ("reward/accuracy", "time/step", "val/accuracy", "prm/loss_before_update",
                "prm/accuracy_before_update", "prm/group_ranking_accuracy", "prm/ranking_accuracy",
                "rollout/response_length", "rollout/truncated_fraction",
                "rollout/truncated_prompts_dropped")


@dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    phase: str  # "tune" or "main"
    chain_length: int
    method: str
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return (f"{self.phase}_K{self.chain_length}_{self.method}_lr{self.learning_rate:g}"
                f"_seed{self.seed}")


def load_protocol(path: Path) -> tuple[dict[str, Any], str]:
    text = path.read_bytes()
    return yaml.safe_load(text), hashlib.sha256(text).hexdigest()


def run_command(command: list[str], log: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    with log.open("w") as out:
        return subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


# ---- data and the shared SFT model ----

def split_file(work: Path, protocol: dict, split: str, chain_length: int) -> Path:
    """The split's prompts for chain length K, written once (deterministic by seed)."""
    from megatron_prime.toy import write_jsonl
    from megatron_prime.toy.running_sum import make_rl_rows

    task = protocol["task"]
    path = work / "data" / f"{split}_K{chain_length}.jsonl"
    if not path.exists():
        count = task[f"{split}_prompts" if split != "held_out" else "held_out_prompts"]
        write_jsonl(make_rl_rows(count, seed=task["seeds"][split] + chain_length,
                                 num_steps=chain_length), path)
    return path


def sft_model(work: Path, protocol: dict) -> Path:
    """The one SFT model every run starts from (the default job's model and SFT settings,
    on chains of every protocol length), made once."""
    from megatron_prime.config import config_to_dict
    from megatron_prime.demo import DemoConfig
    from megatron_prime.toy import write_jsonl

    output = work / "sft"
    if (output / "config.json").exists():
        return output
    task = protocol["task"]
    demo = DemoConfig(task=task["name"], seed=protocol["model"]["seed"],
                      sft_num_steps=list(task["sft_chain_lengths"]))
    base = work / "base"
    if not base.exists():
        demo.write_base_model(base)
    data = write_jsonl(demo.sft_rows(task["sft_examples"], seed=task["sft_seed"]), work / "sft.jsonl")
    sft = demo.sft
    sft.steps = task["sft_steps"]
    sft.model, sft.data, sft.output = str(base), [str(data)], str(output)
    (work / "sft.yaml").write_text(yaml.safe_dump(config_to_dict(sft)))
    if run_command([sys.executable, "-m", "megatron_prime.sft", str(work / "sft.yaml")],
                   work / "sft.log") != 0:
        raise SystemExit(f"the SFT run failed; last lines of {work / 'sft.log'}:\n{tail(work / 'sft.log')}")
    return output


# ---- the grid ----

def grid(protocol: dict, selection: dict[str, float] | None) -> list[Run]:
    """Every run of the protocol, tuning first; main runs need the tuning's selection."""
    tuning = protocol["tuning"]
    runs = [Run("tune", tuning["chain_length"], method, lr, seed)
            for method in tuning["methods"] for lr in tuning["learning_rates"] for seed in tuning["seeds"]]
    if selection is None:
        return runs
    main = protocol["main"]
    blocks = [(main["methods"], main["chain_lengths"], main["seeds"])]
    ablation = main.get("ablation")
    if ablation:
        blocks.append((ablation["methods"], ablation["chain_lengths"], ablation["seeds"]))
    for methods, lengths, seeds in blocks:
        for chain_length in lengths:
            for seed in seeds:
                for method in methods:
                    runs.append(Run("main", chain_length, method, selected_rate(selection, method), seed))
    return runs


def selected_rate(selection: dict[str, float], method: str) -> float:
    return selection[method] if method in selection else selection["PRIME"]


def choose_rates(protocol: dict, results: dict[str, dict]) -> dict[str, float] | None:
    """Per tuned method, the rate with the best mean final validation accuracy (ties: the
    smaller rate); None until every tuning run has a result."""
    tuning = protocol["tuning"]
    chosen: dict[str, float] = {}
    for method in tuning["methods"]:
        scores: list[tuple[float, float]] = []
        for lr in tuning["learning_rates"]:
            finals = []
            for seed in tuning["seeds"]:
                result = results.get(Run("tune", tuning["chain_length"], method, lr, seed).name)
                if result is None:
                    return None
                finals.append(result.get("val_final") if result["status"] == "ok" else 0.0)
            scores.append((statistics.fmean(f or 0.0 for f in finals), -lr))
        best = max(scores)
        chosen[method] = -best[1]
    return chosen


def max_new_tokens(protocol: dict, chain_length: int) -> int:
    from megatron_prime.demo import max_response_tokens

    return protocol["run"]["max_new_tokens_factor"] * max_response_tokens(chain_length)


def train(run: Run, protocol: dict, work: Path, sft: Path) -> dict[str, Any]:
    """One training run in its own process; its metrics, or the failure."""
    from megatron_prime.config import config_to_dict
    from megatron_prime.demo import DemoConfig
    from megatron_prime.monitor import read_metrics

    settings = protocol["run"]
    folder = work / "runs" / run.name
    folder.mkdir(parents=True, exist_ok=True)
    prime = DemoConfig(task=protocol["task"]["name"]).prime  # the default job's PRIME settings
    split = "validation" if run.phase == "tune" else "held_out"
    prime.model.path = str(sft)
    prime.data.paths = [str(split_file(work, protocol, "train", run.chain_length))]
    prime.data.shuffle_seed = run.seed
    prime.trainer.steps, prime.trainer.seed = settings["steps"], run.seed
    prime.rollout.batch.prompts_per_step = settings["prompts_per_step"]
    prime.algo.num_samples_per_prompt = prime.rollout.sampling.n = settings["samples_per_prompt"]
    prime.rollout.sampling.max_new_tokens = max_new_tokens(protocol, run.chain_length)
    prime.rollout.engine.max_model_len = settings["max_model_len"]
    prime.policy_optimizer.lr = prime.prm_optimizer.lr = run.learning_rate
    for key, value in protocol["methods"][run.method].items():
        section, name = key.split(".")
        setattr(getattr(prime, section), name, value)
    prime.logging.run_dir = str(folder / "run")
    prime.logging.wandb_mode = "disabled"
    prime.checkpoint.dir = str(folder / "checkpoints")
    prime.checkpoint.save_every = 0  # one checkpoint, at the end: the PRM the primary measure reads
    prime.validation.paths = [str(split_file(work, protocol, split, run.chain_length))]
    prime.validation.before_train = True
    prime.validation.every = settings["validation_every"]
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(prime)))
    started = time.perf_counter()
    code = run_command([sys.executable, "-m", "megatron_prime.train", str(config)], folder / "train.log")
    seconds = time.perf_counter() - started
    if code != 0:
        return {"status": "failed", "exit_code": code, "seconds": seconds, "log_tail": tail(folder / "train.log")}
    metrics = read_metrics(folder / "run" / "metrics.jsonl")
    steps = [{key: m[key] for key in ("step", *KEPT_METRICS) if key in m} for m in metrics]
    validation = [m["val/accuracy"] for m in metrics if "val/accuracy" in m]
    return {"status": "ok", "seconds": seconds, "steps": steps,
            "val_start": next((m["val/accuracy"] for m in metrics if m["step"] == 0 and "val/accuracy" in m), None),
            "val_final": validation[-1] if validation else None,
            "checkpoint": str(folder / "checkpoints")}


# ---- the primary measure: does the PRM find the first wrong line? ----

def wrong_responses(work: Path, protocol: dict, sft: Path, chain_length: int) -> list[dict[str, Any]]:
    """The SFT model's wrong responses to held-out prompts (temperature 1), with each one's
    labelled first wrong line: one fixed set per K, shared by every run's PRM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_prime.data.render import render_prompt
    from megatron_prime.toy.running_sum import first_wrong_step, parse_chain, step_line_spans

    path = work / "data" / f"wrong_responses_K{chain_length}.json"
    if path.exists():
        return json.loads(path.read_text())
    settings = protocol["measures"]["localization"]
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32).eval()
    torch.manual_seed(settings["sampling_seed"])
    rows = [json.loads(line) for line in split_file(work, protocol, "held_out", chain_length).open()]
    max_new = max_new_tokens(protocol, chain_length)
    found: list[dict[str, Any]] = []
    for row in rows:
        prompt = render_prompt(tokenizer, row["prompt"], use_chat_template=False)
        inputs = torch.tensor([prompt.token_ids] * settings["samples_per_prompt"])
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        chain = parse_chain(row["prompt"][-1]["content"])
        for sequence in out[:, inputs.shape[1]:].tolist():
            if tokenizer.eos_token_id in sequence:
                sequence = sequence[:sequence.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(sequence, skip_special_tokens=True)
            wrong = first_wrong_step(chain, text)
            spans = step_line_spans(text)
            if wrong is not None and wrong < len(spans):
                found.append({"prompt_ids": prompt.token_ids, "response_ids": sequence, "text": text,
                              "first_wrong": wrong, "spans": spans})
    path.write_text(json.dumps(found))
    return found


def localization(run_result: dict, responses: list[dict], sft: Path, beta: float, rule: str) -> dict[str, Any]:
    """How often the run's final PRM puts the lowest cumulative implicit reward on the labelled
    first wrong line; with chance (a uniformly drawn line) and the rate of always naming the
    first line. (The untrained PRM is the reference itself: every reward 0, the rule answers
    "no error" and locates nothing.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_prime.checkpoint.train_state import find_latest_checkpoint
    from megatron_prime.credit import (
        locate_first_error,
        prm_hf_folder,
        step_rewards,
        token_implicit_rewards,
        token_steps_from_spans,
    )

    if not responses:
        return {"responses": 0}
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    reference = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32).eval()
    step_folder = find_latest_checkpoint(run_result["checkpoint"])
    if step_folder is None:
        raise SystemExit(f"no checkpoint under {run_result['checkpoint']}: the PRM cannot be read")
    with prm_hf_folder(step_folder) as folder:
        prm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    hits = first_line_hits = 0
    chance = 0.0
    for item in responses:
        rewards = token_implicit_rewards(prm, reference, item["prompt_ids"], [item["response_ids"]], beta)[0]
        spans = [tuple(span) for span in item["spans"]]
        steps = token_steps_from_spans(tokenizer, item["response_ids"], spans)
        per_step = step_rewards(rewards, steps, num_steps=len(spans))
        # The rule answers -1 ("no error") when the sum never drops below 0; that is a miss.
        hits += locate_first_error(per_step, rule=rule) == item["first_wrong"]
        first_line_hits += item["first_wrong"] == 0
        chance += 1.0 / len(spans)
    count = len(responses)
    return {"responses": count, "rate": hits / count, "chance": chance / count,
            "first_line_rate": first_line_hits / count}


# ---- the report ----

def steps_to(accuracy: list[float], target: float, trail: int) -> int | None:
    for end in range(trail, len(accuracy) + 1):
        if sum(accuracy[end - trail:end]) / trail >= target:
            return end
    return None


def spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.fmean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def tuning_table(protocol: dict, results: dict[str, dict]) -> list[str]:
    """The tuning phase as it ran: final validation greedy pass@1 per method, rate and seed
    (what the selection read), so the chosen rate can be checked by eye."""
    tuning = protocol["tuning"]
    lines = [f"tuning at K = {tuning['chain_length']} (final validation greedy pass@1 per seed "
             f"{tuning['seeds']}; '-' = not run yet, 'failed' counts as 0):"]
    for method in tuning["methods"]:
        cells = []
        for lr in tuning["learning_rates"]:
            values = []
            for seed in tuning["seeds"]:
                result = results.get(Run("tune", tuning["chain_length"], method, lr, seed).name)
                if result is None:
                    values.append("-")
                elif result["status"] != "ok":
                    values.append("failed")
                else:
                    values.append(f"{result.get('val_final') or 0.0:.3f}")
            cells.append(f"lr {lr:g}: {'/'.join(values)}")
        lines.append(f"  {method:13s} " + "   ".join(cells))
    return lines


def report(protocol: dict, sha: str, results: dict[str, dict], selection: dict | None,
           out: Path) -> str:
    measures = protocol["measures"]
    trail, final_steps = measures["trailing_steps"], measures["final_steps"]
    lines = [f"# benchmarks/prime_vs_rloo.py report, {datetime.date.today()}, protocol sha256 {sha[:12]}",
             f"# {platform.machine()} CPU x {os.cpu_count()}, no GPU; {len(results)} run result files; "
             "mean [min, max] over seeds; every run present is counted"]
    # Every run of a protocol should come from the same training code (README of the results
    # folder: the grid runs from a worktree at one commit); more than one is shown, not hidden.
    commits = sorted({str(r.get("commit")) for r in results.values()})
    lines.append(f"# code: commit{'s' if len(commits) > 1 else ''} {', '.join(commits) or 'none yet'}")
    failed = [name for name, r in results.items() if r["status"] != "ok"]
    if failed:
        lines.append(f"# failed runs (counted as not reaching the target, accuracy 0): {failed}")
    lines.extend(tuning_table(protocol, results))
    lines.append(f"tuning selection: {selection if selection else 'incomplete'}")
    summary: dict[str, Any] = {"protocol_sha256": sha, "selection": selection, "per_k": {}}
    main = {name: r for name, r in results.items() if name.startswith("main_")}
    for chain_length in sorted({int(name.split("_")[1][1:]) for name in main}):
        at_k = {name: r for name, r in main.items() if f"_K{chain_length}_" in name}
        firsts = [s["reward/accuracy"] for r in at_k.values() if r["status"] == "ok"
                  for s in r["steps"] if s["step"] == 1 and "reward/accuracy" in s]
        a0 = statistics.fmean(firsts) if firsts else 0.0
        target = min(measures["target_cap"], a0 + measures["target_gain"])
        lines.append(f"\nK = {chain_length}: target training accuracy {target:.3f} (a0 {a0:.3f})")
        lines.append(f"{'method':13s} {'runs':>4s} {'steps to target':>24s} {'seconds to target':>24s} "
                     f"{'final train acc':>22s} {'held-out start':>14s} {'held-out final':>22s} "
                     f"{'PRM locates 1st error':>44s}")
        per_method: dict[str, Any] = {}
        for method in protocol["methods"]:
            runs = [r for name, r in at_k.items() if f"_{method}_lr" in name]
            if not runs:
                continue
            reach, seconds, final, start, end, located = [], [], [], [], [], []
            for r in runs:
                if r["status"] != "ok":
                    reach.append(None), seconds.append(None), final.append(0.0), end.append(0.0)
                    continue
                training = [s for s in r["steps"] if s["step"] >= 1 and "reward/accuracy" in s]
                accuracy = [s["reward/accuracy"] for s in training]
                hit = steps_to(accuracy, target, trail)
                reach.append(hit)
                seconds.append(sum(s.get("time/step", 0.0) for s in training[:hit]) if hit else None)
                final.append(statistics.fmean(accuracy[-final_steps:]))
                start.append(r.get("val_start"))
                end.append(r.get("val_final"))
                if "localization" in r:
                    located.append(r["localization"])
            reached = [x for x in reach if x is not None]
            reach_text = (f"{statistics.fmean(reached):.1f} [{min(reached)}, {max(reached)}]" if reached
                          else "never") + f" {len(reached)}/{len(reach)}"
            second_text = spread([s for s in seconds if s is not None], 0) + f" {len(reached)}/{len(reach)}"
            if located:
                rate = spread([x["rate"] for x in located], 2)
                where = (f"{rate} chance {statistics.fmean(x['chance'] for x in located):.2f} "
                         f"line-1 {statistics.fmean(x['first_line_rate'] for x in located):.2f}")
            else:
                where = "n/a"
            lines.append(f"{method:13s} {len(runs):4d} {reach_text:>24s} {second_text:>24s} "
                         f"{spread(final):>22s} {spread(start):>14s} {spread(end):>22s} {where:>44s}")
            per_method[method] = {"steps_to_target": reach, "seconds_to_target": seconds,
                                  "final_train_accuracy": final, "held_out_start": start,
                                  "held_out_final": end, "localization": located}
        summary["per_k"][chain_length] = {"target": target, "a0": a0, "methods": per_method}
        plot_curves(at_k, protocol, out / f"curves_K{chain_length}.png", chain_length, target)
    lines.append("\n" + paper_shape(summary, measures["paper_shape_ratio"]))
    text = "\n".join(lines) + "\n"
    (out / "report.txt").write_text(text)
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    return text


def paper_shape(summary: dict, ratio: float) -> str:
    """Whether the measured numbers have the paper's shape at K >= 4 (stated, not tuned)."""
    lines = ["paper's shape (PRIME steps-to-target <= "
             f"{ratio} x RLOO's and higher final training accuracy, at K >= 4):"]
    for chain_length, entry in sorted(summary["per_k"].items()):
        methods = entry["methods"]
        if chain_length < 4 or "PRIME" not in methods or "RLOO" not in methods:
            continue
        prime, rloo = methods["PRIME"], methods["RLOO"]
        # A run that never reached the target counts as the run's length (a lower bound).
        def mean_steps(values: list[int | None]) -> float:
            return statistics.fmean(v if v is not None else float("inf") for v in values)
        p, r = mean_steps(prime["steps_to_target"]), mean_steps(rloo["steps_to_target"])
        gap = statistics.fmean(prime["final_train_accuracy"]) - statistics.fmean(rloo["final_train_accuracy"])
        holds = p <= ratio * r and gap > 0
        lines.append(f"  K={chain_length}: PRIME {p:.1f} vs RLOO {r:.1f} steps, final accuracy gap "
                     f"{gap:+.3f}: {'holds' if holds else 'does not hold'}")
    return "\n".join(lines)


def plot_curves(runs: dict[str, dict], protocol: dict, png: Path, chain_length: int, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trail = protocol["measures"]["trailing_steps"]
    figure, axis = plt.subplots(figsize=(7, 4))
    colors = {"PRIME": "tab:red", "RLOO": "tab:blue", "PRIME-frozen": "tab:gray"}
    for method, color in colors.items():
        curves = []
        for name, r in runs.items():
            if f"_{method}_lr" not in name or r["status"] != "ok":
                continue
            accuracy = [s["reward/accuracy"] for s in r["steps"] if s["step"] >= 1 and "reward/accuracy" in s]
            curves.append([statistics.fmean(accuracy[max(0, i - trail + 1):i + 1]) for i in range(len(accuracy))])
        if not curves:
            continue
        steps = range(1, min(len(c) for c in curves) + 1)
        columns = list(zip(*curves))
        axis.plot(steps, [statistics.fmean(c) for c in columns], color=color,
                  label=f"{method} (mean of {len(curves)} seeds)")
        axis.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.15)
    axis.axhline(target, color="gray", linestyle=":", linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel(f"training accuracy ({trail}-step trailing mean)")
    axis.set_title(f"running-sum chains, K = {chain_length} (min-max over seeds shaded)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


# ---- the driver ----

def read_results(folder: Path, sha: str) -> dict[str, dict]:
    results = {}
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("protocol_sha256") != sha:
            raise SystemExit(f"{path} was made under another protocol (sha256 "
                             f"{result.get('protocol_sha256', '?')[:12]}, now {sha[:12]}); move it "
                             "away with the protocol it belongs to, results are never mixed")
        results[path.stem] = result
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", type=Path, default=PROTOCOL)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/prime_vs_rloo"))
    parser.add_argument("--max-runs", type=int, default=None, help="runs in this sitting (default: all left)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)

    protocol, sha = load_protocol(args.protocol)
    # Absolute: the trainer resolves a relative checkpoint.dir under logging.run_dir, where
    # the localization measure would not find the run's PRM.
    work = (args.work_dir / sha[:12]).resolve()
    run_folder = args.results / "runs"
    run_folder.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = read_results(run_folder, sha)
    done = 0
    started = time.perf_counter()
    while not args.report_only and (args.max_runs is None or done < args.max_runs):
        selection = choose_rates(protocol, results)
        pending = [run for run in grid(protocol, selection) if run.name not in results]
        if not pending:
            break
        run = pending[0]
        sft = sft_model(work, protocol)
        print(f"[prime_vs_rloo] {run.name} ({len(pending)} left in this phase's view, "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
        result = train(run, protocol, work, sft)
        # A frozen PRM is the reference itself (every implicit reward 0): nothing to locate.
        if result["status"] == "ok" and run.phase == "main" and run.method == "PRIME":
            settings = protocol["measures"]["localization"]
            responses = wrong_responses(work, protocol, sft, run.chain_length)
            from megatron_prime.demo import DemoConfig
            beta = DemoConfig(task=protocol["task"]["name"]).prime.algo.beta
            result["localization"] = localization(result, responses, sft, beta, settings["rule"])
        result.update({"protocol_sha256": sha, "run": run.__dict__,
                       "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                capture_output=True, text=True).stdout.strip()})
        (run_folder / f"{run.name}.json").write_text(json.dumps(result, indent=1))
        results[run.name] = result
        done += 1
        print(f"[prime_vs_rloo] {run.name}: {result['status']}, {result['seconds']:.0f} s, "
              f"val final {result.get('val_final')}", flush=True)
    selection = choose_rates(protocol, results)
    if selection is not None:
        (args.results / "selection.json").write_text(json.dumps(selection, indent=1))
    print(report(protocol, sha, results, selection, args.results), end="")


if __name__ == "__main__":
    main()
