"""Math outcome reward: the last ``\\boxed{...}`` of a response, checked for mathematical
equivalence with the ground truth by math-verify (sympy-backed), under a per-answer time limit.

The prompt asks the model to "present the answer in LaTeX format: \\boxed{Your answer}", so
the answer is what the *last* box holds; a response without a box scores 0. Equivalence is
delegated to math-verify, which knows fractions, decimals, intervals, sets, percentages,
units, ``x = 3`` vs ``3`` and LaTeX vs plain forms, instead of a home-made normaliser.

The response is the policy's and may be hostile (a 5 MB box of ``\\{`` that takes seconds
to scan and minutes to parse). Every stage of one answer's check (box extraction, Unicode
normalisation, parsing, comparison) runs in a worker process under one time limit, and the
worker is killed if it overruns; the caller only finds where the last box starts (``rfind``,
C speed) and sends at most ``max_answer_chars`` from there. ``workers`` processes check
answers side by side, so a few pathological answers cost a batch about one time limit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from math_verify import parse, verify

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A worker imports sympy and math-verify before it answers: seconds on a busy node. Its first
# answer's time limit starts once it says it is ready.
_WORKER_START_TIMEOUT_S = 120.0
_READY = "ready"
# A worker answers by timeout + kill grace (it kills a stuck check itself); one that has not
# answered this much later is presumed stuck itself and is replaced.
_WORKER_REPLY_GRACE_S = 2.0


class AnswerTimeout(Exception):
    """Parsing or comparing one answer took longer than the configured limit."""


def default_reward_workers() -> int:
    """Verifier pool size when the config leaves it open: half the cores this process may run
    on (scoring overlaps generation, and vLLM's engine process needs the rest), 1 to 16."""
    return max(1, min(16, len(os.sched_getaffinity(0)) // 2))


@dataclass(frozen=True)
class MathVerifierConfig:
    """Per-answer limits of the math verifier."""

    # Wall-clock limit for one answer's whole check (box extraction, normalisation, parsing,
    # comparison); sympy can take minutes on a pathological expression, and one answer must
    # not stall a whole rollout batch.
    timeout_s: float = 5.0
    # math-verify compares numbers after rounding to this many decimal places.
    float_rounding: int = 6
    # Checker processes, started as answers need them (~0.1 GB of memory each): this many
    # pathological answers can run out their time limits side by side while the batch's
    # other answers wait for a free worker, so a batch costs about one time limit, not one
    # per pathological answer. None: from this process's cores (default_reward_workers).
    workers: int | None = None
    # A check stuck in C code ignores the in-worker alarm; the worker's checking child is
    # killed after timeout_s + kill_grace_s and replaced by a fresh fork.
    kill_grace_s: float = 1.0
    # A boxed answer longer than this scores 0 unparsed: ground truths are short, and only
    # this many characters after the last box command are sent to a worker at all.
    max_answer_chars: int = 4096

    @property
    def pool_size(self) -> int:
        return self.workers if self.workers is not None else default_reward_workers()

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"rewards.math.timeout_s={self.timeout_s} is not allowed; need a value > 0")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"rewards.math.workers={self.workers} is not allowed; need null or a value >= 1")
        if self.kill_grace_s < 0:
            raise ValueError(f"rewards.math.kill_grace_s={self.kill_grace_s} is not allowed; need a value >= 0")
        if self.float_rounding < 0:
            raise ValueError(f"rewards.math.float_rounding={self.float_rounding} is not allowed; need a value >= 0")
        if self.max_answer_chars < 1:
            raise ValueError(
                f"rewards.math.max_answer_chars={self.max_answer_chars} is not allowed; need a value >= 1"
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


def last_box_tail(text: str, max_answer_chars: int) -> str | None:
    """The text from the last box command on, cut to what a box of at most
    ``max_answer_chars`` needs; None without a box.

    Only ``str.rfind`` runs over the whole response (a few ms for 5 MB), so the caller's
    share of a check stays small however long the response; the brace matching and all that
    follows happen in a worker under the time limit. A longer answer never closes inside the
    cut, so ``extract_last_boxed`` finds no answer there.
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    longest_command = max(map(len, _BOX_COMMANDS))
    # + room for the braces and for spaces before the opening one ("\\boxed {7}")
    return text[start : start + longest_command + max_answer_chars + 64]


_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻"
_SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉₊₋"
_SCRIPT_TO_ASCII = str.maketrans(_SUPERSCRIPTS + _SUBSCRIPTS, "0123456789+-" * 2)
_SUPERSCRIPT_RUN = re.compile(f"[{_SUPERSCRIPTS}]+")
_SUBSCRIPT_RUN = re.compile(f"[{_SUBSCRIPTS}]+")
_NON_ASCII_DIGIT = re.compile(r"(?![0-9])\d")  # \d is every Unicode decimal digit
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def normalize_unicode(text: str) -> str:
    """Unicode digits and spaces as the ASCII ones math-verify reads.

    NFKC folds compatibility forms (full-width ``３``, mathematical ``𝟑``, no-break and
    ideographic spaces); decimal digits of other scripts (Arabic-Indic ``٣``, Devanagari
    ``३``) are not compatibility forms, so they are mapped by their digit value. NFKC would
    also turn ``x²`` into ``x2``: superscript and subscript runs become ``^{2}`` / ``_{2}`` first.
    Other whitespace becomes a space and zero-width characters go.
    """
    if text.isascii():
        return text
    text = _SUPERSCRIPT_RUN.sub(lambda run: "^{" + run.group().translate(_SCRIPT_TO_ASCII) + "}", text)
    text = _SUBSCRIPT_RUN.sub(lambda run: "_{" + run.group().translate(_SCRIPT_TO_ASCII) + "}", text)
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    text = _NON_ASCII_DIGIT.sub(lambda digit: str(unicodedata.decimal(digit.group())), text)
    return "".join(" " if char.isspace() else char for char in text)


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


def check_answer(request: dict[str, Any]) -> bool:
    """One answer against its ground truth, in this process (main thread only), every stage
    under one ``time_limit(request["timeout_s"])``: False on timeout or unparsable input.

    ``request`` holds ``gold`` and either ``response`` (a text whose last box is the answer,
    as ``last_box_tail`` cut it) or ``answer`` (the bare answer), plus ``timeout_s``,
    ``float_rounding`` and ``max_answer_chars``.

    The SIGALRM limit interrupts slow *Python* work (box scanning, sympy); a hang inside C
    code (a huge integer power) ignores it, which is why ``MathVerifier`` calls this in a
    worker process that it can kill.
    """
    try:
        with time_limit(request["timeout_s"]):
            answer = extract_last_boxed(request["response"]) if "response" in request else request["answer"]
            if not answer or len(answer) > request["max_answer_chars"]:
                return False
            ground_truth = request["gold"]
            if "\\boxed" in ground_truth or "\\fbox" in ground_truth:
                ground_truth = extract_last_boxed(ground_truth) or ground_truth
            gold = _parse_latex(normalize_unicode(ground_truth))
            prediction = _parse_latex(normalize_unicode(answer))
            if not gold or not prediction:
                return False
            return bool(verify(list(gold), list(prediction), float_rounding=request["float_rounding"],
                               timeout_seconds=None))
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
        self.ready = False

    def _wait_ready(self) -> None:
        ready, _, _ = select.select([self.process.stdout], [], [], _WORKER_START_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if line.strip() != _READY:
            self.close()
            raise RuntimeError(
                f"a math checker process ({sys.executable} {__file__} --worker) did not start within "
                f"{_WORKER_START_TIMEOUT_S:.0f} s (exit status {self.process.returncode})"
            )
        self.ready = True

    def check(self, request: dict[str, Any], deadline_s: float) -> bool | None:
        """The worker's verdict on ``request`` (see ``check_answer``), or None if it missed
        ``deadline_s`` (it is then killed)."""
        if not self.ready:
            self._wait_ready()
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

    Checks run in up to ``config.pool_size`` long-lived worker processes, one answer at a
    time each, fed by as many threads: the limit is enforced from outside by killing a worker
    that overruns (and starting a fresh one), so no answer can stall training, and it works
    from any thread of the trainer.
    """

    def __init__(self, config: MathVerifierConfig = MathVerifierConfig()) -> None:
        self.config = config
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers_started = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _take_worker(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and self._workers_started < self.config.pool_size:
                self._workers_started += 1
                return _Worker()
        return self._idle.get()

    def _check(self, request: dict[str, Any]) -> bool:
        config = self.config
        request = {**request, "timeout_s": config.timeout_s, "float_rounding": config.float_rounding,
                   "max_answer_chars": config.max_answer_chars, "kill_grace_s": config.kill_grace_s}
        worker = self._take_worker()
        try:
            # The check's SIGALRM answers within timeout_s; the worker kills a check stuck in C
            # code after the grace; the caller kills a worker that misses even that.
            verdict = worker.check(request, config.timeout_s + config.kill_grace_s + _WORKER_REPLY_GRACE_S)
        except BaseException:
            worker.close()
            self._idle.put(_Worker())
            raise
        self._idle.put(worker if verdict is not None else _Worker())
        return bool(verdict)

    def is_equivalent(self, answer: str, ground_truth: str) -> bool:
        """Whether two bare answers are equivalent; False on timeout or unparsable input."""
        if len(answer) > self.config.max_answer_chars:
            return False
        return self._check({"answer": answer, "gold": ground_truth})

    def score(self, response: str, ground_truth: str) -> float:
        """1.0 if the response's last boxed answer equals the ground truth, else 0.0."""
        tail = last_box_tail(response, self.config.max_answer_chars)
        if tail is None:
            return 0.0
        return 1.0 if self._check({"response": tail, "gold": str(ground_truth)}) else 0.0

    def submit(self, response: str, ground_truth: Any) -> Future[float]:
        """Queue one response on the pool; its score (or its error) comes in the future."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.config.pool_size, thread_name_prefix="math-verifier")
        return self._executor.submit(self.score, response, str(ground_truth))

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[float]:
        """Score responses on all workers at once, results in order."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        futures = [self.submit(response, truth) for response, truth in zip(responses, ground_truths)]
        return [future.result() for future in futures]

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
    """Answer requests until stdin closes (the parent exited or closed us).

    The checks run in a child forked from this process once it has imported and warmed up
    sympy and math-verify; the child lives on from answer to answer (keeping the caches that
    make repeated ground truths cheap) until a check overruns timeout + grace, stuck in C
    code where its alarm cannot reach. This process then kills it and forks a fresh one, in
    milliseconds. Replacing the whole worker instead (seconds of imports on a busy node)
    made the answers queued behind a pathological one miss their own time limits.
    """
    # SLURM's pre-emption warning (--signal=USR1@N) and scancel's SIGTERM reach every process
    # of the job step; the trainer saves on them and still needs its checkers until the step
    # is done. Started with both blocked (job_signals.py); ignored too, should anything unblock
    # (the forked checker children inherit it).
    for job_signal in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(job_signal, signal.SIG_IGN)
    # math-verify builds its parsers on first use (~0.3 s): once here, not in every child.
    check_answer({"answer": "\\frac{1}{2}", "gold": "0.5", "timeout_s": 60.0, "float_rounding": 6,
                  "max_answer_chars": 64})
    sys.stdout.write(_READY + "\n")  # the imports are done: time limits may start
    sys.stdout.flush()
    child: _CheckerChild | None = None
    for line in sys.stdin:
        request = json.loads(line)
        if child is None:
            child = _CheckerChild()
        equal = child.check(line, request["timeout_s"] + request["kill_grace_s"])
        if equal is None:
            child.kill()
            child = None
        sys.stdout.write(json.dumps({"equal": bool(equal)}) + "\n")
        sys.stdout.flush()


class _CheckerChild:
    """A fork of the (warmed-up) worker that runs ``check_answer`` on each request line."""

    def __init__(self) -> None:
        request_read, self._request_write = os.pipe()
        self._verdict_read, verdict_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: serve until the worker closes the request pipe
            os.close(self._request_write)
            os.close(self._verdict_read)
            try:
                _die_with_parent()
                # Under memory pressure the kernel kills a checker (the answer scores 0), never
                # the trainer; raising one's own score needs no privilege.
                with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
                    adj.write("1000")
                with open(request_read) as requests:
                    for line in requests:
                        try:
                            equal = check_answer(json.loads(line))
                        except Exception:  # an unparsable answer is simply not equivalent
                            equal = False
                        os.write(verdict_write, b"1" if equal else b"0")
            finally:
                os._exit(0)
        os.close(request_read)
        os.close(verdict_write)
        self._requests = open(self._request_write, "w")  # noqa: SIM115 - closed in kill()

    def check(self, request_line: str, deadline_s: float) -> bool | None:
        """The child's verdict, or None if it missed ``deadline_s``."""
        try:
            self._requests.write(request_line)
            self._requests.flush()
        except BrokenPipeError:
            return None
        ready, _, _ = select.select([self._verdict_read], [], [], deadline_s)
        verdict = os.read(self._verdict_read, 1) if ready else b""
        return None if not verdict else verdict == b"1"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        with contextlib.suppress(OSError):
            self._requests.close()
        os.close(self._verdict_read)


def _die_with_parent() -> None:
    """SIGKILL this process when the worker that forked it dies (Linux prctl
    PR_SET_PDEATHSIG): a check stuck in C code must not outlive a worker the caller killed."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
