"""Run logging for the trainer: a metrics file, a wandb run and a progress bar.

Everything a run reports goes through one ``RunLogger`` on the logging rank, so the trainer
makes one call per step and never asks "am I rank 0?" itself. What lands in ``run_dir``:

* ``metrics.jsonl``: one JSON object per step, ``{"step": s, "time": unix_time, **metrics}``.
  It is the source of truth (wandb is optional, and offline runs need a sync to be seen);
  ``megatron_prime.plot`` draws curves from it. Non-finite floats are written as the JSON
  strings ``"nan"``, ``"inf"`` and ``"-inf"`` (plain JSON has no NaN, and ``null`` would lose
  which of the three it was); ``read_metrics`` turns them back into floats.
  A kill at any moment loses no line and leaves none twice: each line is on disk (fsync)
  before the next step starts; a checkpoint carries its own step's line (``record``), written
  back on resume when the kill came between the checkpoint's rename and the line; and a
  resumed run drops the lines of the steps it redoes.
* ``config.yaml``: the resolved config of the run.
* ``wandb/``: wandb's own files (``offline-run-*`` folders when offline).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_prime.config import require, require_choice, require_positive_int

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

WANDB_MODES = ("auto", "online", "offline", "disabled")

# Metric key -> short name shown in the progress bar / one-line summary.
HEADLINE_METRICS = {"reward/outcome_mean": "reward", "reward/accuracy": "acc", "val/accuracy": "val"}

# Fields every metrics line carries; a metric may not reuse them.
RESERVED_KEYS = ("step", "time")

# How metrics.jsonl spells non-finite floats (strict JSON has no NaN/Infinity).
NON_FINITE_STRINGS = ("nan", "inf", "-inf")


@dataclass
class LoggingConfig:
    """Where and how a run reports progress."""

    # metrics.jsonl, config.yaml, curves.png and wandb files go here.
    run_dir: str = "runs/prime"
    # "auto": WANDB_MODE if it is set, else "online" when WANDB_API_KEY is set and "offline"
    # otherwise, so a run without credentials still keeps a wandb record to sync later.
    wandb_mode: str = "auto"
    wandb_project: str = "megatron_prime"
    wandb_run_name: str | None = None
    # tqdm on the logging rank; only when stderr is a terminal (a bar in a log file is noise).
    progress_bar: bool = True
    # Without a progress bar (disabled, or not a TTY): print a one-line summary every k steps.
    log_every: int = 1

    def validate(self) -> None:
        require(isinstance(self.run_dir, str) and self.run_dir != "", "logging.run_dir",
                self.run_dir, "a non-empty path")
        require_choice("logging.wandb_mode", self.wandb_mode, WANDB_MODES)
        require(isinstance(self.wandb_project, str) and self.wandb_project != "",
                "logging.wandb_project", self.wandb_project, "a non-empty string")
        require(self.wandb_run_name is None
                or (isinstance(self.wandb_run_name, str) and self.wandb_run_name != ""),
                "logging.wandb_run_name", self.wandb_run_name,
                "None (wandb picks a name) or a non-empty string")
        require(isinstance(self.progress_bar, bool), "logging.progress_bar", self.progress_bar,
                "true or false")
        require_positive_int("logging.log_every", self.log_every)


def resolve_wandb_mode(mode: str, environ: dict[str, str] | None = None) -> str:
    """``"auto"`` -> the mode to pass to ``wandb.init``; explicit modes pass through.

    An explicit ``WANDB_MODE`` wins in auto mode because ``wandb.init(mode=...)`` would
    otherwise override it, surprising anyone who set ``WANDB_MODE=disabled``.
    """
    require_choice("logging.wandb_mode", mode, WANDB_MODES)
    if mode != "auto":
        return mode
    environ = os.environ if environ is None else environ
    env_mode = environ.get("WANDB_MODE", "")
    if env_mode == "dryrun":  # wandb's old name for offline
        return "offline"
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    """Writes one step's metrics to metrics.jsonl, wandb and the console.

    Only the logging rank does anything; on other ranks every method is a no-op, so the
    trainer can call it unconditionally.
    """

    def __init__(self, config: LoggingConfig, total_steps: int, start_step: int,
                 resolved_config: dict, is_logging_rank: bool,
                 wandb_run_id: str | None = None, covered_record: dict | None = None) -> None:
        """``covered_record``: the line of step ``start_step`` kept in the checkpoint the run
        resumes from (``record``); appended when metrics.jsonl does not have that step."""
        config.validate()
        require_positive_int("total_steps", total_steps)
        require(isinstance(start_step, int) and 0 <= start_step <= total_steps, "start_step",
                start_step, f"an integer in [0, total_steps={total_steps}]")
        self.config = config
        self.total_steps = total_steps
        self.start_step = start_step
        self.is_logging_rank = is_logging_rank
        self._wandb_run_id = wandb_run_id
        self._wandb_run: Any = None
        self._bar: Any = None
        self._metrics_file: Any = None
        if not is_logging_rank:
            return

        run_dir = Path(config.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / METRICS_FILE
        # Steps after start_step are (re)done by this run; their old lines would duplicate
        # the new ones. With start_step=0 this empties a file left by an earlier run.
        _truncate_metrics(metrics_path, start_step)
        if covered_record is not None:
            _restore_line(metrics_path, start_step, covered_record)
        _write_config(run_dir / CONFIG_FILE, resolved_config)

        mode = resolve_wandb_mode(config.wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb_run = wandb.init(
                mode=mode, project=config.wandb_project, name=config.wandb_run_name,
                dir=str(run_dir), config=resolved_config, id=wandb_run_id,
                # Same id as the checkpointed run: continue it instead of starting a new one.
                # wandb drops steps <= the last step it recorded, so the redone steps
                # after start_step appear only in metrics.jsonl.
                resume="allow" if wandb_run_id is not None else None,
            )
            self._wandb_run_id = self._wandb_run.id

        # Opened after wandb.init so a failing init (e.g. online without network) leaks nothing.
        self._metrics_file = metrics_path.open("a", encoding="utf-8")
        # The summary line's s/step and ETA count training only, not wandb's start-up.
        self._started_at = time.monotonic()
        if config.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)

    @property
    def wandb_run_id(self) -> str | None:
        """Saved into the checkpoint so a resumed run continues the same wandb run."""
        return self._wandb_run_id

    @staticmethod
    def record(step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """The metrics.jsonl line of ``step`` as JSON data (every rank can build it): what a
        checkpoint keeps so that a resume can write its step's line if the run died first."""
        values = _as_numbers(metrics)
        return {"step": step, "time": time.time(),
                **{key: _json_number(value) for key, value in values.items()}}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Records the metrics of ``step`` (the number of finished steps, 1-based)."""
        if not self.is_logging_rank:
            return
        values = _as_numbers(metrics)
        record = self.record(step, values)
        # allow_nan=False: a non-finite value that slipped past _json_number is a bug here,
        # not a line that strict JSON readers would reject later.
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()
        # On disk before the next step, whose checkpoint would otherwise cover a lost line.
        os.fsync(self._metrics_file.fileno())
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

        headline = {short: values[key] for key, short in HEADLINE_METRICS.items()
                    if key in values}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in headline.items()}, refresh=False)
            self._bar.update(max(step - self._bar.n, 0))
        elif step % self.config.log_every == 0 or step == self.total_steps:
            print(self._summary_line(step, headline), flush=True)

    def message(self, text: str) -> None:
        """Prints a line on the logging rank without breaking the progress bar."""
        if not self.is_logging_rank:
            return
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Closes the bar, the metrics file and the wandb run; safe to call twice.

        Also shuts down wandb's service process (``wandb.teardown``): an offline
        ``finish()`` can return before the run's .wandb file is written, and the atexit hook
        that would flush it is unreliable under multiprocessing launchers. After ``close``
        the run's files are complete on disk.
        """
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.finish()
            wandb.teardown()
            self._wandb_run = None

    def _summary_line(self, step: int, headline: dict[str, float]) -> str:
        from tqdm import tqdm

        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{name} {value:.4g}" for name, value in headline.items()]
        done = step - self.start_step
        if done > 0:
            seconds_per_step = (time.monotonic() - self._started_at) / done
            remaining = max(self.total_steps - step, 0) * seconds_per_step
            parts += [f"{seconds_per_step:.2f}s/step", f"eta {tqdm.format_interval(remaining)}"]
        return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict]:
    """Parses a metrics.jsonl; ``"nan"``/``"inf"``/``"-inf"`` strings come back as floats.

    Blank lines are skipped; a line that is not a JSON object with an integer "step" raises
    ``ValueError`` naming the file and the line number.
    """
    path = Path(path)
    records = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            records.append(_parse_line(path, line_number, line))
    return records


def _parse_line(path: Path, line_number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
    # ValueError, not TypeError: a wrong type here is bad file content, like bad JSON above.
    if not isinstance(record, dict):
        raise ValueError(  # noqa: TRY004
            f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(  # noqa: TRY004
            f"{path}:{line_number}: step={step!r} is invalid: expected an integer")
    return {key: float(value) if isinstance(value, str) and value in NON_FINITE_STRINGS
            else value for key, value in record.items()}


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Drops lines with step > start_step (every line when start_step is 0: a fresh run, whose
    step-0 validation line is written again), rewriting the file atomically when needed.

    A final line cut off without its newline is what a crash mid-write leaves behind, so it
    is dropped rather than failing the resume; any other malformed line is an error.
    """
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    kept = []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = _parse_line(path, line_number, line)
        except ValueError:
            if line_number == len(lines) and not text.endswith("\n"):
                continue
            raise
        if 0 < start_step and record["step"] <= start_step:
            kept.append(line)
    if len(kept) == len(lines) and (not text or text.endswith("\n")):
        return
    _atomic_write(path, "".join(line + "\n" for line in kept))


def _restore_line(path: Path, step: int, record: dict) -> None:
    """Appends the checkpoint's line of ``step`` when the file lacks it (a kill between the
    checkpoint's rename and the line); a line already there is the same step, kept."""
    require(isinstance(record, dict) and record.get("step") == step, "checkpoint metrics record",
            record, f"the metrics line of the resumed step {step}")
    if path.exists() and any(r["step"] == step for r in read_metrics(path)):
        return
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record, allow_nan=False) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _write_config(path: Path, resolved_config: dict) -> None:
    import yaml

    _atomic_write(path, yaml.safe_dump(resolved_config, sort_keys=False))


def _atomic_write(path: Path, text: str) -> None:
    """Write-then-rename, so a crash leaves either the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_numbers(metrics: dict[str, float]) -> dict[str, float]:
    """Plain Python numbers (counts stay ints); a 0-d tensor is read here, a host sync."""
    values: dict[str, float] = {}
    for key, value in metrics.items():
        require(key not in RESERVED_KEYS, "metric key", key,
                f"a name other than {list(RESERVED_KEYS)} (every line already has them)")
        if isinstance(value, int) and not isinstance(value, bool):
            values[key] = value
            continue
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key}={value!r} is invalid: expected a number") from None
    return values


def _json_number(value: float) -> float | str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
