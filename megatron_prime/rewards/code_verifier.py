"""Code outcome reward: run the response's last ```python block against the problem's tests
in the sandbox (``sandbox.py``) and score the fraction passed, or all-or-nothing.

Test format (APPS / TACO / Eurus-2-RL-Data): a dict, or its JSON string, with ``inputs`` and
``outputs`` lists. Without ``fn_name`` each pair is stdin text and expected stdout text (or
lists of lines). With ``fn_name`` each input is the argument list of a call to that function
(or to ``Solution().<fn_name>``) and each output its expected return value.

Every test case runs in its own fresh sandbox, and the comparison happens here, outside it:
the program never sees the expected outputs, so it cannot print its way to a reward.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_prime.rewards.math_verifier import default_reward_workers
from megatron_prime.rewards.sandbox import RunStatus, SandboxConfig, check_sandbox_available, run_python

RewardMode = Literal["fraction", "all_or_nothing"]
REWARD_MODES: tuple[str, ...] = ("fraction", "all_or_nothing")

_PYTHON_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
# Judges accept a float answer within this absolute or relative error (integers: none).
_FLOAT_TOLERANCE = 1e-6
_INTEGER = re.compile(r"[+-]?[0-9]+")
# A decimal number written as a float: a point or an exponent (ASCII digits only).
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class CodeVerifierConfig:
    """How code responses are run and scored."""

    reward_mode: RewardMode = "fraction"  # fraction of tests passed, or 1 only if all pass
    # Responses checked concurrently (each test run is one sandbox process). None: from this
    # process's cores (math_verifier.default_reward_workers).
    workers: int | None = None
    max_tests: int | None = None  # check only the first k test cases (None: all)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"CodeVerifierConfig.reward_mode={self.reward_mode!r} is not allowed; allowed: {REWARD_MODES}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"rewards.code.workers={self.workers} is not allowed; need null or a value >= 1")
        if self.max_tests is not None and self.max_tests < 1:
            raise ValueError(f"CodeVerifierConfig.max_tests={self.max_tests} is not allowed; need None or >= 1")

    @property
    def pool_size(self) -> int:
        return self.workers if self.workers is not None else default_reward_workers()


@dataclass(frozen=True)
class CodeTestCases:
    inputs: list[Any]
    outputs: list[Any]
    fn_name: str | None = None

    @classmethod
    def parse(cls, ground_truth: str | dict[str, Any]) -> CodeTestCases:
        """Accept the dataset's dict or JSON string; malformed tests are a data error."""
        data = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
        if not isinstance(data, dict) or "inputs" not in data or "outputs" not in data:
            raise ValueError(f"code ground truth must have 'inputs' and 'outputs', got {str(ground_truth)[:200]!r}")
        if len(data["inputs"]) != len(data["outputs"]):
            raise ValueError(
                f"code ground truth has {len(data['inputs'])} inputs but {len(data['outputs'])} outputs"
            )
        return cls(list(data["inputs"]), list(data["outputs"]), data.get("fn_name") or None)


def extract_last_python_block(text: str) -> str | None:
    """The code of the last ```python (or ```py / ```python3) fenced block, or None."""
    blocks = _PYTHON_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def stdout_matches(actual: str, expected: str | list[str]) -> bool:
    """Whether a program's stdout is the expected output, compared token by token.

    Both are split on whitespace (so line breaks, trailing spaces and blank lines do not
    matter) and each pair of tokens must match (``tokens_match``): integers exactly, floats
    within 1e-6 only where the expected token is written as a float, anything else as text.
    """
    if isinstance(expected, list):
        expected = "\n".join(str(line) for line in expected)
    actual_tokens, expected_tokens = actual.split(), str(expected).split()
    if len(actual_tokens) != len(expected_tokens):
        return False
    return all(tokens_match(a, e) for a, e in zip(actual_tokens, expected_tokens))


def tokens_match(actual: str, expected: str) -> bool:
    """One output token against the expected one: identical text matches; otherwise the
    expected token decides the rule.

    - an integer (``-12``, ``007``): the actual token must be an integer of the same value,
      compared exactly at any size. No tolerance: ``1234568`` is not ``1234567``.
    - a float (has a ``.`` or an exponent: ``0.5``, ``1e-3``): the actual token must be a
      decimal number (``5`` for ``5.0`` is fine) within ``_FLOAT_TOLERANCE`` absolute or
      relative of it, the rule of judges that say "absolute or relative error at most 1e-6".
      A value that is not finite (``1e999`` overflows to inf) equals no number, so it cannot
      stand for a huge integer.
    - anything else (``YES``, ``inf``, ``abc``): only the same text.

    Only ASCII digits count; Python's ``float`` also reads ``1_0``, ``infinity`` and Unicode
    digits, none of which a judge would accept as a number.

    This is deliberately stricter than PRIME's own checker (``testing_util.py`` in
    PRIME-RL/PRIME, under ``training/verl/utils/reward_score/``). It compares stdout line by
    line and, unless every line of both sides is made of digits only, turns each line into a
    float and accepts ``np.allclose`` (relative 1e-5): an answer whose lines include a negative
    number or a decimal accepts ``1234568`` for ``1234567`` and ``1000000008`` for
    ``1000000007``, and a ``1e999`` line equals any integer beyond float range (inf == inf).
    Rewarding such off-by-one answers in RL teaches them.
    """
    if actual == expected:
        return True
    if _INTEGER.fullmatch(expected):
        return _INTEGER.fullmatch(actual) is not None and _canonical_integer(actual) == _canonical_integer(expected)
    if _FLOAT.fullmatch(expected) and (_FLOAT.fullmatch(actual) or _INTEGER.fullmatch(actual)):
        a, e = float(actual), float(expected)
        if not (math.isfinite(a) and math.isfinite(e)):
            return False
        return math.isclose(a, e, rel_tol=_FLOAT_TOLERANCE, abs_tol=_FLOAT_TOLERANCE)
    return False


def _canonical_integer(token: str) -> str:
    """Sign and digits without leading zeros: equal strings iff equal Python ints, with no
    ``int()`` call (which refuses more than 4,300 digits and is quadratic in the length)."""
    negative = token.startswith("-")
    digits = token.lstrip("+-").lstrip("0") or "0"
    return f"-{digits}" if negative and digits != "0" else digits


def call_result_matches(actual: Any, expected: Any) -> bool:
    """APPS call-based outputs are often the return value wrapped in a one-element list."""
    if actual == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and actual == expected[0]


class CodeVerifier:
    """Scores code responses by running their tests in sandboxes, ``pool_size`` at a time."""

    def __init__(self, config: CodeVerifierConfig = CodeVerifierConfig()) -> None:
        check_sandbox_available(config.sandbox)
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=config.pool_size, thread_name_prefix="code-verifier")

    def score(self, response: str, ground_truth: str | dict[str, Any]) -> float:
        """Fraction of test cases passed (or 1/0 in all_or_nothing mode); 0 without code."""
        tests = CodeTestCases.parse(ground_truth)
        code = extract_last_python_block(response)
        cases = list(zip(tests.inputs, tests.outputs))[: self.config.max_tests]
        if code is None or not cases:
            return 0.0
        passed = 0
        for test_input, expected in cases:
            if self._passes(code, tests.fn_name, test_input, expected):
                passed += 1
            elif self.config.reward_mode == "all_or_nothing":
                return 0.0  # one failure decides; skip the remaining runs
        return passed / len(cases)

    def _passes(self, code: str, fn_name: str | None, test_input: Any, expected: Any) -> bool:
        sandbox = self.config.sandbox
        if fn_name is None:
            stdin = "\n".join(map(str, test_input)) if isinstance(test_input, list) else str(test_input)
            result = run_python(code, stdin, sandbox)
            return result.status is RunStatus.OK and stdout_matches(result.stdout.decode(errors="replace"), expected)
        args = test_input if isinstance(test_input, list) else [test_input]
        result = run_python(code, "", sandbox, fn_name=fn_name, args=args)
        return result.status is RunStatus.OK and call_result_matches(result.call_result, expected)

    def submit(self, response: str, ground_truth: str | dict[str, Any]) -> Future[float]:
        """Schedule one response on the bounded pool; the caller can do other work meanwhile."""
        return self._executor.submit(self.score, response, ground_truth)

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str | dict[str, Any]]) -> list[float]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        futures = [self.submit(response, truth) for response, truth in zip(responses, ground_truths)]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
