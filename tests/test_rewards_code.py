"""Code verifier scoring (stdin/stdout and call-based tests, fraction vs all-or-nothing) and
the ability/data_source registry."""

import json
import os

import pytest

from megatron_prime.rewards import (
    CodeVerifier,
    CodeVerifierConfig,
    MathVerifier,
    RewardRegistry,
    SandboxConfig,
    extract_last_python_block,
    reward_kind,
    stdout_matches,
)
from megatron_prime.rewards.code_verifier import CodeTestCases, call_result_matches

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root to build namespaces")
FAST = SandboxConfig(wall_timeout_s=2.0, cpu_time_s=2, memory_bytes=512 << 20, max_output_bytes=1 << 20)

SUM_TESTS = json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0\n", "5 5\n"], "outputs": ["3\n", "7\n", "0\n", "10\n"]})
ADD = "a, b = map(int, input().split())\nprint(a + b)"
ADD_WRONG_ON_ZERO = "a, b = map(int, input().split())\nprint(a + b if a else 1)"


def fenced(code: str, lang: str = "python") -> str:
    return f"[ASSESS] reasoning...\n```{lang}\n{code}\n```\n"


@pytest.fixture(scope="module")
def verifiers():
    fraction = CodeVerifier(CodeVerifierConfig(sandbox=FAST))
    all_or_nothing = CodeVerifier(CodeVerifierConfig(sandbox=FAST, reward_mode="all_or_nothing"))
    yield fraction, all_or_nothing
    fraction.close()
    all_or_nothing.close()


def test_extract_last_python_block():
    text = "```python\nprint(1)\n```\nthen fixed:\n```py\nprint(2)\n```\n```text\nnot code\n```"
    assert extract_last_python_block(text) == "print(2)\n"
    assert extract_last_python_block("```python3\nx = 1\n```") == "x = 1\n"
    assert extract_last_python_block("no code, or ```cpp\nint main(){}\n```") is None


def test_stdout_and_call_comparison():
    assert stdout_matches("3  \n\n", "3\n")
    assert stdout_matches("1 2\n3\n", ["1 2", "3"])  # expected as a list of lines
    assert stdout_matches("0.3333333333\n", "0.333333333")  # numeric tolerance 1e-6
    assert not stdout_matches("0.3334\n", "0.3333")
    assert not stdout_matches("3 4\n", "3\n")
    assert call_result_matches([1, 2], [1, 2]) and call_result_matches(5, [5])
    assert not call_result_matches(5, [6])


@needs_root
def test_fraction_and_all_or_nothing(verifiers):
    fraction, all_or_nothing = verifiers
    assert fraction.score(fenced(ADD), SUM_TESTS) == 1.0
    assert fraction.score(fenced(ADD_WRONG_ON_ZERO), SUM_TESTS) == 0.75  # fails "0 0" only
    assert all_or_nothing.score(fenced(ADD), SUM_TESTS) == 1.0
    assert all_or_nothing.score(fenced(ADD_WRONG_ON_ZERO), SUM_TESTS) == 0.0
    assert fraction.score("I think the answer is a + b.", SUM_TESTS) == 0.0  # no code block
    assert fraction.score(fenced("print(int(input()) +"), SUM_TESTS) == 0.0  # syntax error


@needs_root
def test_call_based_tests(verifiers):
    fraction, _ = verifiers
    tests = {"fn_name": "two_sum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]], "outputs": [[[0, 1]], [1, 2]]}
    function = (
        "def two_sum(nums, target):\n"
        "    print('debug output must not matter')\n"
        "    seen = {}\n"
        "    for i, x in enumerate(nums):\n"
        "        if target - x in seen:\n"
        "            return (seen[target - x], i)\n"
        "        seen[x] = i\n"
    )
    assert fraction.score(fenced(function), tests) == 1.0
    leetcode = "class Solution:\n    def two_sum(self, nums, target):\n        return [0, 1]\n"
    assert fraction.score(fenced(leetcode), tests) == 0.5
    assert fraction.score(fenced("def other():\n    pass\n"), tests) == 0.0


@needs_root
def test_batch_runs_concurrently_and_keeps_order(verifiers):
    fraction, _ = verifiers
    # One test of the second response hangs until the wall-clock limit; the rest go on meanwhile.
    hangs_on_ten = "a, b = map(int, input().split())\nwhile a == 10:\n    pass\nprint(a + b)"
    responses = [fenced(ADD), fenced(hangs_on_ten), fenced("print(0)"), "no code", fenced(ADD)]
    assert fraction.score_batch(responses, [SUM_TESTS] * 5) == [1.0, 0.75, 0.25, 0.0, 1.0]


BIG = "1" + "0" * 400  # beyond float range and beyond int()'s 4,300-digit limit at 10x


@pytest.mark.parametrize(
    "actual,expected",
    [
        ("1234568", "1234567"),  # within rel 1e-6 of each other: the old float check passed these
        ("1000000008", "1000000007"),
        ("-1234568", "-1234567"),
        ("1e999", BIG),  # both inf as floats
        ("1e999", "1e308"),  # non-finite never equals
        ("nan", "0.5"),
        ("5.0", "5"),  # an integer answer must be printed as one
        ("1_0", "10.0"),  # Python's float() reads it, a judge does not
        ("٣", "3"),  # only ASCII digits are numbers in program output
        (BIG[:-1] + "1", BIG),
        ("1 2", "1 2 0"),
    ],
)
def test_wrong_outputs_fail(actual, expected):
    assert not stdout_matches(actual, expected)


@pytest.mark.parametrize(
    "actual,expected",
    [
        ("0.3333333", "0.33333333"),  # 3.3e-9 apart: a float token, within 1e-6
        ("5", "5.0"),  # the expected token is a float: the integer 5 is within tolerance
        ("2.0000004e3", "2000.0"),  # relative 2e-10
        (BIG, BIG),
        ("0" + BIG * 12, BIG * 12),  # 4,801 digits: equal as Python ints, no int() limit
        ("-0", "0"),
        ("+7\n", "7"),
        ("YES\n1 2\n", "YES 1 2"),
    ],
)
def test_right_outputs_pass(actual, expected):
    assert stdout_matches(actual, expected)


def test_malformed_tests_and_config_are_errors():
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        CodeTestCases.parse({"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(ValueError, match="'inputs' and 'outputs'"):
        CodeTestCases.parse('{"input": []}')
    with pytest.raises(ValueError, match="reward_mode='best'"):
        CodeVerifierConfig(reward_mode="best")
    with pytest.raises(ValueError, match="first_uid=0"):
        SandboxConfig(first_uid=0)


@pytest.mark.parametrize(
    "ability,data_source,kind",
    [
        ("math", "numina_olympiads", "math"),
        ("code", "taco", "code"),
        (None, "numina_cn_k12", "math"),
        (None, "codecontests", "code"),
        ("", "apps", "code"),
        ("Coding", None, "code"),
    ],
)
def test_registry_routing(ability, data_source, kind):
    assert reward_kind(ability, data_source) == kind


def test_registry_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ability 'chemistry'"):
        reward_kind("chemistry", "numina_olympiads")
    with pytest.raises(ValueError, match="unknown data_source 'gpqa'"):
        reward_kind(None, "gpqa")
    with pytest.raises(ValueError, match="neither"):
        reward_kind(None, None)


@needs_root
def test_registry_scores_a_mixed_batch(verifiers):
    fraction, _ = verifiers
    with MathVerifier() as math_verifier:
        registry = RewardRegistry(math=math_verifier, code=fraction)
        scores = registry.score_batch(
            responses=["\\boxed{\\frac12}", fenced(ADD), "\\boxed{3}", fenced(ADD_WRONG_ON_ZERO)],
            ground_truths=["0.5", SUM_TESTS, "4", SUM_TESTS],
            abilities=["math", "code", None, "code"],
            data_sources=["numina_amc_aime", "taco", "numina_synthetic_math", "apps"],
        )
        assert scores == [1.0, 1.0, 0.0, 0.75]
        with pytest.raises(ValueError, match="unknown ability 'poetry'"):
            registry.score_batch(["x"], ["y"], ["poetry"], ["z"])


# A call-mode program that returns a list nested 100,000 deep: the host's json.loads of its
# result raised RecursionError, which escaped score_batch into the trainer.
DEEP_RESULT = "def solve(x):\n    r = []\n    for _ in range(100000):\n        r = [r]\n    return r\n"
# Forges the result on fd 1 after the call marker instead, then exits before the harness does.
FORGED_RESULT = (
    "import os, sys\n"
    "def solve(x):\n"
    "    os.write(1, b'\\n__SANDBOX_CALL_RESULT__' + b'[' * 100000 + b']' * 100000)\n"
    "    os._exit(0)\n"
)


@needs_root
def test_a_response_whose_scoring_raises_scores_zero_and_spares_its_neighbours(verifiers):
    fraction, _ = verifiers
    call_tests = {"fn_name": "solve", "inputs": [[1], [2]], "outputs": [[1], [2]]}
    honest = "def solve(x):\n    return x\n"
    with MathVerifier() as math_verifier:
        registry = RewardRegistry(math=math_verifier, code=fraction)
        scores = registry.score_batch(
            responses=[fenced(honest), fenced(DEEP_RESULT), "\\boxed{\\frac12}", fenced(FORGED_RESULT),
                       fenced(ADD)],
            ground_truths=[call_tests, call_tests, "0.5", call_tests, SUM_TESTS],
            abilities=["code", "code", "math", "code", "code"],
            data_sources=["taco"] * 5,
        )
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    # Reward 0 either way; where the sandbox's parse still raises, the reason is recorded.
    failed = {failure.index: failure for failure in registry.last_failures}
    assert set(failed) <= {1, 3}
    for failure in failed.values():
        assert failure.kind == "code" and failure.reason.startswith("RecursionError")
        assert len(failure.reason) < 300
    assert sum(registry.failure_counts.values()) == len(failed)


@needs_root
def test_registry_turns_any_scoring_error_into_reward_zero(verifiers, caplog):
    """Malformed code tests make CodeTestCases.parse raise ValueError, and a ground truth
    nested 100,000 deep makes its json.loads raise RecursionError, both before any sandbox
    runs; each scores 0 with a logged reason, the rest 1.0."""
    fraction, _ = verifiers
    deep = '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + ', "outputs": []}'
    with MathVerifier() as math_verifier:
        registry = RewardRegistry(math=math_verifier, code=fraction)
        with caplog.at_level("WARNING", logger="megatron_prime.rewards.registry"):
            scores = registry.score_batch(
                ["\\boxed{2}", fenced(ADD), "\\boxed{3}", fenced(ADD)],
                ["2", deep, "3", {"inputs": ["1"], "outputs": []}],
                ["math", "code", "math", "code"],
                [None] * 4,
            )
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert [(f.index, f.kind, f.reason.split(":")[0]) for f in registry.last_failures] == [
        (1, "code", "RecursionError"), (3, "code", "ValueError")]
    assert registry.failure_counts == {"code/RecursionError": 1, "code/ValueError": 1}
    assert "reward 0 for response 1 (code): its scoring raised RecursionError" in caplog.text
