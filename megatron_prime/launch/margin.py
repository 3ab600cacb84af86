"""How long before the time limit SLURM must warn the trainer (``#SBATCH --signal=USR1@N``).

After the warning the trainer finishes the step it is in, then saves (train.StopRequest), so
the margin must hold one whole step plus one checkpoint save; a shorter one gets the job
killed before the save, and the script then does not requeue (no progress). With
``slurm.signal_seconds: auto`` the margin is derived:

    margin = ceil((step seconds + save seconds) x slurm.signal_safety_factor)

- step seconds: measured, the largest ``time/step - time/checkpoint`` of the last
  ``RECENT_STEPS`` lines of the run's ``metrics.jsonl`` (train.py's PhaseTimer; a rollout's
  long tail or a validation pass makes some steps much longer than the median, and the signal
  may come in any of them); else ``slurm.seconds_per_step_estimate``.
- save seconds: measured, the largest ``time/checkpoint`` in ``metrics.jsonl``; else
  ``slurm.checkpoint_seconds_estimate``; else the checkpoint size (the trained models' weights
  and Adam state, from the run's model config.json) over ``slurm.checkpoint_write_gbps``.

Anchors: Megatron-LM takes fixed numbers (``--exit-duration-in-mins``, and
``--exit-signal-handler`` saving on SIGTERM); NeMo-RL's ``checkpointing.checkpoint_must_save_by``
is a fixed deadline the loop checks before each step; verl and slime leave the margin to the
user's SLURM script. None derives it from a measured step; like NeMo-RL, the save is counted
apart from the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_prime.monitor import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from megatron_prime.launch.sbatch import SlurmConfig
    from megatron_prime.train import PrimeConfig

# How many of the newest steps the measured step time is the maximum of: enough to see a
# validation step (validation.every is usually <= 20) and a rollout tail, recent enough to
# reflect the current sequence lengths (they grow during RL).
RECENT_STEPS = 20
# SLURM's --signal takes a 16-bit number of seconds.
MAX_SIGNAL_SECONDS = 65535


@dataclass(frozen=True)
class SignalMargin:
    """The USR1 margin and what it was made of (``step_source``/``save_source`` say where each
    number came from, for the submit output and the script's header)."""

    seconds: int
    step_seconds: float | None
    step_source: str
    save_seconds: float | None
    save_source: str
    safety_factor: float | None  # None: a fixed slurm.signal_seconds

    def describe(self) -> str:
        def part(name: str, value: float | None, source: str) -> str:
            return f"{name} {'unknown' if value is None else f'{value:.0f} s'} ({source})"

        parts = f"{part('step', self.step_seconds, self.step_source)} + " \
                f"{part('save', self.save_seconds, self.save_source)}"
        if self.safety_factor is None:
            return f"USR1 {self.seconds} s before the time limit (fixed slurm.signal_seconds); " \
                   f"needs {parts}"
        return f"USR1 {self.seconds} s before the time limit = ({parts}) x " \
               f"{self.safety_factor:g} (slurm.signal_safety_factor)"


def measured_times(metrics_path: Path) -> tuple[float | None, float | None]:
    """(largest step time without its save over the last RECENT_STEPS lines, largest save
    time in the file) from a metrics.jsonl; None for what it does not hold.

    ``time/step`` covers the whole step including its checkpoint (PhaseTimer.total), so the
    save is subtracted: it is counted once, as the save term."""
    if not metrics_path.is_file():
        return None, None
    records = [r for r in read_metrics(metrics_path) if _number(r.get("time/step"))]
    steps = [r["time/step"] - (r.get("time/checkpoint") or 0.0) for r in records[-RECENT_STEPS:]]
    saves = [r["time/checkpoint"] for r in records if _number(r.get("time/checkpoint"))]
    return (max(steps) if steps else None), (max(saves) if saves else None)


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def model_config_path(model_path: str) -> Path | None:
    """The config.json of ``model.path``: an HF folder holds it, a megatron_prime checkpoint
    keeps it in ``hf/``."""
    for candidate in (Path(model_path) / "config.json", Path(model_path) / "hf" / "config.json"):
        if candidate.is_file():
            return candidate
    return None


def checkpoint_bytes(prime: PrimeConfig, config_json: Path, on_gpu: bool = True) -> int:
    """Bytes one train-state checkpoint writes: each trained model's weights and its Adam
    state (fp32 moments, plus an fp32 master copy for 16-bit weights); the policy always,
    the PRM when it trains (``algo.prm_mode`` before or after). The frozen reference and a
    frozen PRM are not saved."""
    from megatron_prime.models.architectures import ModelShape
    from megatron_prime.plan import dtype_bytes, load_hf_config, train_state_bytes

    shape = ModelShape.from_hf(load_hf_config(str(config_json)))
    trained = [shape]
    if prime.algo.trains_prm:  # a PRM of its own size (model.prm_path) is saved at that size
        prm_json = model_config_path(prime.model.prm_path) if prime.model.prm_path else None
        trained.append(ModelShape.from_hf(load_hf_config(str(prm_json))) if prm_json else shape)
    return train_state_bytes(trained, dtype_bytes(prime.precision.dtype, on_gpu))


def save_estimate(slurm: SlurmConfig, prime: PrimeConfig) -> tuple[float | None, str]:
    if slurm.checkpoint_seconds_estimate is not None:
        return slurm.checkpoint_seconds_estimate, "slurm.checkpoint_seconds_estimate"
    config_json = model_config_path(prime.model.path)
    if config_json is None:
        return None, f"no config.json in model.path={prime.model.path!r} to size the checkpoint"
    # precision.dtype "auto" is float32 in a CPU job (gpus_per_node=0), bfloat16 on GPUs.
    nbytes = checkpoint_bytes(prime, config_json, on_gpu=slurm.gpus_per_node > 0)
    seconds = nbytes / (slurm.checkpoint_write_gbps * 1e9)
    return seconds, (f"{nbytes / 1e9:.3g} GB checkpoint of {config_json} at "
                     f"slurm.checkpoint_write_gbps={slurm.checkpoint_write_gbps:g} GB/s")


def signal_margin(slurm: SlurmConfig, prime: PrimeConfig) -> SignalMargin:
    """The margin the script asks for; raises ValueError naming the key when ``auto`` has no
    step or save time to go on, or when a fixed number is shorter than one step + one save."""
    metrics_path = Path(prime.logging.run_dir) / METRICS_FILE
    step, save = measured_times(metrics_path)
    step_source = save_source = f"measured in {metrics_path}"
    if step is not None:
        step_source = f"largest of the last {RECENT_STEPS} steps in {metrics_path}"
    elif slurm.seconds_per_step_estimate is not None:
        step, step_source = slurm.seconds_per_step_estimate, "slurm.seconds_per_step_estimate"
    else:
        step_source = f"no time/step in {metrics_path} and no slurm.seconds_per_step_estimate"
    if save is None:
        save, save_source = save_estimate(slurm, prime)

    if slurm.signal_seconds != "auto":
        fixed = slurm.signal_seconds
        needed = (step or 0.0) + (save or 0.0)
        if fixed < needed:
            raise ValueError(
                f"slurm.signal_seconds={fixed} is invalid: expected at least one step + one save "
                f"= {needed:.0f} s (step {step or 0:.0f} s: {step_source}; save {save or 0:.0f} s: "
                f"{save_source}); after the signal the trainer finishes its step, then saves. "
                "Use 'auto' or a larger number")
        return SignalMargin(fixed, step, step_source, save, save_source, None)

    if step is None:
        raise ValueError(
            f"slurm.signal_seconds='auto' needs a step time: {step_source}; set "
            "slurm.seconds_per_step_estimate (seconds) until a run has measured one, or a fixed "
            "slurm.signal_seconds")
    if save is None:
        raise ValueError(
            f"slurm.signal_seconds='auto' needs a checkpoint save time: {save_source}; set "
            "slurm.checkpoint_seconds_estimate (seconds) or a fixed slurm.signal_seconds")
    seconds = math.ceil((step + save) * slurm.signal_safety_factor)
    if seconds > MAX_SIGNAL_SECONDS:
        raise ValueError(
            f"slurm.signal_seconds='auto' is invalid here: the derived margin ({step:.0f} s step + "
            f"{save:.0f} s save) x {slurm.signal_safety_factor:g} = {seconds} s exceeds SLURM's "
            f"limit of {MAX_SIGNAL_SECONDS} s; shorten the step (rollout.batch.prompts_per_step)")
    return SignalMargin(seconds, step, step_source, save, save_source, slurm.signal_safety_factor)
