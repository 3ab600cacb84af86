"""Math outcome reward: the last ``\\boxed{...}`` of a response, checked for mathematical
equivalence with the ground truth by math-verify (sympy-backed), under a per-answer time limit.

The prompt asks the model to "present the answer in LaTeX format: \\boxed{Your answer}", so
the answer is what the *last* box holds; a response without a box scores 0. Equivalence is
delegated to math-verify, which knows fractions, decimals, intervals, sets, percentages,
units, ``x = 3`` vs ``3`` and LaTeX vs plain forms, instead of a home-made normaliser.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from math_verify import parse, verify

_BOX_COMMANDS = ("\\boxed", "\\fbox")


class AnswerTimeout(Exception):
    """Parsing or comparing one answer took longer than the configured limit."""


@dataclass(frozen=True)
class MathVerifierConfig:
    """Per-answer limits of the math verifier."""

    # Wall-clock limit for parsing + comparing one answer; sympy can take minutes on a
    # pathological expression, and one answer must not stall a whole rollout batch.
    timeout_s: float = 5.0
    # math-verify compares numbers after rounding to this many decimal places.
    float_rounding: int = 6
    num_workers: int = 1  # checker processes (each answer is checked in one of them)
    # A check stuck in C code ignores the in-worker alarm; the worker is killed after
    # timeout_s + kill_grace_s and replaced.
    kill_grace_s: float = 1.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"MathVerifierConfig.timeout_s={self.timeout_s} is not allowed; need a value > 0")
        if self.num_workers < 1:
            raise ValueError(f"MathVerifierConfig.num_workers={self.num_workers} is not allowed; need a value >= 1")
        if self.kill_grace_s < 0:
            raise ValueError(f"MathVerifierConfig.kill_grace_s={self.kill_grace_s} is not allowed; need a value >= 0")
        if self.float_rounding < 0:
            raise ValueError(
                f"MathVerifierConfig.float_rounding={self.float_rounding} is not allowed; need a value >= 0"
            )


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included.

    ``\\boxed 5`` (no braces, TeX's one-token argument) yields ``5``. Returns None when there is
    no box or its braces never close (a truncated response has no answer).
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest = text[start + len(command) :]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if rest[:1].isalpha():
            return None  # a longer command name such as \boxedsymbol, not a box
        # "\boxed 5": TeX takes the next token as the argument.
        token = re.split(r"[\s$]", stripped, maxsplit=1)[0]
        return token or None
    depth = 0
    for index, char in enumerate(stripped):
        if char == "{" and not _escaped(stripped, index):
            depth += 1
        elif char == "}" and not _escaped(stripped, index):
            depth -= 1
            if depth == 0:
                return stripped[1:index].strip()
    return None


def _escaped(text: str, index: int) -> bool:
    """True if the character at ``index`` is a literal brace (``\\{``, an odd run of backslashes)."""
    backslashes = 0
    while index - backslashes - 1 >= 0 and text[index - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``AnswerTimeout`` in the block after ``seconds`` of wall time (SIGALRM).

    Signals are delivered to the main thread only, so this must run there; a timer that was
    already armed (e.g. pytest-timeout) is restored afterwards with its remaining time.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "the math verifier's time limit uses SIGALRM and must run in the main thread; "
            "score from the main thread or from a worker process"
        )

    def on_alarm(signum: int, frame: Any) -> None:
        raise AnswerTimeout(f"answer check exceeded {seconds} s")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns when its own SIGALRM timeout is off; ours replaces it, so drop that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


@functools.lru_cache(maxsize=4096)
def _parse_latex(expression: str) -> tuple[Any, ...]:
    """Parse one answer as inline LaTeX. Cached: the n responses of a prompt share its gold.

    math-verify's own timeouts are disabled (they take whole seconds and raise in threads);
    the caller's ``time_limit`` bounds the work instead.
    """
    return tuple(parse(f"${expression}$", parsing_timeout=None))


def answers_equivalent(answer: str, ground_truth: str, timeout_s: float, float_rounding: int = 6) -> bool:
    """Whether two answers (LaTeX or plain) are equivalent, in this process, main thread only.

    The SIGALRM limit interrupts slow *Python* work in sympy; a hang inside C code (a huge
    integer power) ignores it, which is why ``MathVerifier`` calls this in a worker process
    that it can kill.
    """
    if "\\boxed" in ground_truth or "\\fbox" in ground_truth:
        ground_truth = extract_last_boxed(ground_truth) or ground_truth
    try:
        with time_limit(timeout_s):
            gold = _parse_latex(ground_truth)
            prediction = _parse_latex(answer)
            if not gold or not prediction:
                return False
            return bool(verify(list(gold), list(prediction), float_rounding=float_rounding, timeout_seconds=None))
    except AnswerTimeout:
        return False


class _Worker:
    """One checker process speaking line-delimited JSON over its stdin/stdout."""

    def __init__(self) -> None:
        # Here, not at the top: the worker runs this file standalone (below).
        from megatron_prime.job_signals import children_outlive_job_signals

        # -I: no PYTHONPATH, no script folder on sys.path; this file imports only the
        # standard library and math-verify, so it runs standalone. The worker starts with
        # SIGTERM/SIGUSR1 blocked: the trainer still needs it to finish the step after the
        # job's signal, and ends it itself (close: SIGKILL, or stdin closing).
        with children_outlive_job_signals():
            self.process = subprocess.Popen(
                [sys.executable, "-I", __file__, "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )

    def check(self, answer: str, ground_truth: str, float_rounding: int, timeout_s: float, deadline_s: float) -> bool | None:
        """The worker's verdict, or None if it missed ``deadline_s`` (it is then killed)."""
        request = {"answer": answer, "gold": ground_truth, "timeout_s": timeout_s, "float_rounding": float_rounding}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], deadline_s)
            line = self.process.stdout.readline() if ready else ""
        except (BrokenPipeError, ValueError):
            line = ""
        if not line:
            self.close()
            return None
        return bool(json.loads(line)["equal"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class MathVerifier:
    """Scores math responses 1.0 (equivalent to the ground truth) or 0.0.

    Checks run in ``config.num_workers`` long-lived worker processes: the limit is enforced
    from outside by killing a worker that overruns (and starting a fresh one), so no answer
    can stall training, and it works from any thread of the trainer.
    """

    def __init__(self, config: MathVerifierConfig = MathVerifierConfig()) -> None:
        self.config = config
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers_started = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _take_worker(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and self._workers_started < self.config.num_workers:
                self._workers_started += 1
                return _Worker()
        return self._idle.get()

    def is_equivalent(self, answer: str, ground_truth: str) -> bool:
        """Whether two answer strings are equivalent; False on timeout or unparsable input."""
        worker = self._take_worker()
        verdict = worker.check(
            answer,
            ground_truth,
            self.config.float_rounding,
            self.config.timeout_s,
            # the worker's own SIGALRM answers within timeout_s; the grace covers C-level hangs
            self.config.timeout_s + self.config.kill_grace_s,
        )
        self._idle.put(worker if verdict is not None else _Worker())
        return bool(verdict)

    def score(self, response: str, ground_truth: str) -> float:
        """1.0 if the response's last boxed answer equals the ground truth, else 0.0."""
        answer = extract_last_boxed(response)
        if not answer:
            return 0.0
        return 1.0 if self.is_equivalent(answer, ground_truth) else 0.0

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[float]:
        """Score responses on all workers at once, results in order."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.config.num_workers, thread_name_prefix="math-verifier")
        return list(self._executor.map(self.score, responses, ground_truths))

    def close(self) -> None:
        """Stop the worker processes (they also exit on their own when this process dies)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        while not self._idle.empty():
            self._idle.get().close()
        self._workers_started = 0

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_main() -> None:
    """Answer requests until stdin closes (the parent exited or closed us)."""
    # SLURM's pre-emption warning (--signal=USR1@N) and scancel's SIGTERM reach every process
    # of the job step; the trainer saves on them and still needs its checkers until the step
    # is done. Started with both blocked (job_signals.py); ignored too, should anything unblock.
    for job_signal in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(job_signal, signal.SIG_IGN)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = answers_equivalent(request["answer"], request["gold"], request["timeout_s"], request["float_rounding"])
        except Exception:  # an unparsable answer is simply not equivalent
            equal = False
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
