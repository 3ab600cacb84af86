"""Verifier throughput on this machine: responses per second for math and for code.

    python benchmarks/bench_verifiers.py [--math-responses 400] [--code-responses 40]

Math: PRIME-style responses (a few hundred words of reasoning ending in \\boxed{}), half right,
checked by math-verify in worker processes. Code: stdin/stdout problems with 4 test cases
each, every test case a fresh sandbox (needs root). Numbers depend on the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from megatron_prime.rewards import CodeVerifier, CodeVerifierConfig, MathVerifier, MathVerifierConfig

MATH_ANSWERS = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "\\frac34"),
    ("(1, 2]", "(1,2]"),
    ("x=3", "3"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("10\\%", "0.1"),
    ("\\{1,2,3\\}", "1,2,3"),
    ("(x+1)^2", "x^2+2x+1"),
    ("42", "42"),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{3}"),
]
REASONING = "[ASSESS] We need to find the value. [ADVANCE] Expanding and simplifying gives an expression. " * 20

CODE_TESTS = json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0\n", "5 5\n"], "outputs": ["3\n", "7\n", "0\n", "10\n"]})
CODE_SOLUTIONS = [
    "a, b = map(int, input().split())\nprint(a + b)",
    "a, b = map(int, input().split())\nprint(a + b if a else 1)",
    "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
    "a, b = map(int, input().split())\nprint(a - b)",
]


def bench_math(num_responses: int, num_workers: int) -> float:
    rng = random.Random(0)
    responses, truths = [], []
    for i in range(num_responses):
        answer, truth = MATH_ANSWERS[i % len(MATH_ANSWERS)]
        if rng.random() < 0.5:
            answer = f"{answer}+1"  # a wrong answer
        responses.append(f"{REASONING}[OUTPUT] The answer is $\\boxed{{{answer}}}$.")
        truths.append(truth)
    with MathVerifier(MathVerifierConfig(num_workers=num_workers)) as verifier:
        verifier.score_batch(responses[:num_workers * 2], truths[:num_workers * 2])  # start workers
        started = time.perf_counter()
        verifier.score_batch(responses, truths)
        return num_responses / (time.perf_counter() - started)


def bench_code(num_responses: int, max_workers: int) -> float:
    responses = [f"[OUTPUT]\n```python\n{CODE_SOLUTIONS[i % len(CODE_SOLUTIONS)]}\n```" for i in range(num_responses)]
    verifier = CodeVerifier(CodeVerifierConfig(max_workers=max_workers))
    try:
        started = time.perf_counter()
        verifier.score_batch(responses, [CODE_TESTS] * num_responses)
        return num_responses / (time.perf_counter() - started)
    finally:
        verifier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--math-responses", type=int, default=400)
    parser.add_argument("--code-responses", type=int, default=40)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores")
    for workers in sorted({1, cores}):
        rate = bench_math(args.math_responses, workers)
        print(f"math: {rate:8.1f} responses/s  ({args.math_responses} responses, {workers} worker process(es))")
    if os.geteuid() != 0:
        print("code: skipped (the sandbox needs root)")
        return
    for workers in sorted({1, cores}):
        rate = bench_code(args.code_responses, workers)
        print(
            f"code: {rate:8.1f} responses/s  ({args.code_responses} responses x 4 tests, "
            f"{rate * 4:.1f} sandboxed runs/s, {workers} concurrent)"
        )


if __name__ == "__main__":
    main()
