"""Verifier throughput and latency on this machine, optionally beside another checkout's.

    python benchmarks/bench_verifiers.py [--baseline /work/main] [--batches 6] [--workers 4]

Math, honest: PRIME-style responses (a few hundred words of reasoning ending in \\boxed{}),
half right, checked by math-verify in worker processes; responses per second.

Math, hostile: batches of ``--batch-size`` responses as the trainer scores them
(``RewardRegistry.score_batch``), 10% of them pathological: half a 5 MB ``\\boxed{\\{\\{...``
that never closes, half ``10^{10^{10^{10}}}`` (sympy sits in C code on it until killed).
Reported: responses per second over all batches, the median and p99 latency of one batch
(the time the trainer waits; with fewer than 100 batches p99 interpolates between the two
slowest) and how many of the honest right answers scored 1.0.

Code: stdin/stdout problems with 4 test cases each, every test case a fresh sandbox (where
the sandbox can run). Numbers depend on the core count and on what else the machine runs.

``--baseline PATH`` runs the same measurements with ``PYTHONPATH=PATH`` (e.g. the main
branch's checkout) in a child process, right before this checkout's, and prints both with
their ratio. Only API common to both is used: ``MathVerifier(MathVerifierConfig(...))``,
``RewardRegistry(math=...).score_batch``, ``CodeVerifier``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_prime.rewards import CodeVerifier, CodeVerifierConfig, MathVerifier, MathVerifierConfig, RewardRegistry

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
PATHOLOGICAL = [
    "[OUTPUT] \\boxed{" + "\\{" * 2_500_000,  # 5 MB, never closes
    "[OUTPUT] $\\boxed{10^{10^{10^{10}}}}$",  # stuck in C code until killed
]

CODE_TESTS = json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0\n", "5 5\n"], "outputs": ["3\n", "7\n", "0\n", "10\n"]})
CODE_SOLUTIONS = [
    "a, b = map(int, input().split())\nprint(a + b)",
    "a, b = map(int, input().split())\nprint(a + b if a else 1)",
    "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
    "a, b = map(int, input().split())\nprint(a - b)",
]


def start_workers(verifier: MathVerifier, num_workers: int) -> None:
    """Score right answers until all come back right: every worker is then up. (A worker
    still importing sympy when its first answer's limit ran out scored it 0 and was
    replaced, on the old code, by another one starting from scratch.)"""
    responses = [f"\\boxed{{{answer}}}" for answer, _ in MATH_ANSWERS][:num_workers] * 2
    truths = [truth for _, truth in MATH_ANSWERS][:num_workers] * 2
    for _ in range(20):
        if verifier.score_batch(responses, truths) == [1.0] * len(responses):
            return
    raise RuntimeError(f"the math workers did not start answering right: {verifier.score_batch(responses, truths)}")


def bench_math(num_responses: int, num_workers: int) -> float:
    """Responses per second on honest answers, half of them right."""
    rng = random.Random(0)
    responses, truths = [], []
    for i in range(num_responses):
        answer, truth = MATH_ANSWERS[i % len(MATH_ANSWERS)]
        if rng.random() < 0.5:
            answer = f"{answer}+1"  # a wrong answer
        responses.append(f"{REASONING}[OUTPUT] The answer is $\\boxed{{{answer}}}$.")
        truths.append(truth)
    with MathVerifier(MathVerifierConfig(workers=num_workers)) as verifier:
        start_workers(verifier, num_workers)
        started = time.perf_counter()
        verifier.score_batch(responses, truths)
        return num_responses / (time.perf_counter() - started)


def bench_math_hostile(batch_size: int, batches: int, num_workers: int) -> dict[str, float]:
    """Batches with 10% pathological answers, scored as the trainer scores them."""
    num_pathological = max(1, batch_size // 10)
    responses, truths = [], []
    for i in range(batch_size):
        answer, truth = MATH_ANSWERS[i % len(MATH_ANSWERS)]
        responses.append(f"{REASONING}[OUTPUT] The answer is $\\boxed{{{answer}}}$.")
        truths.append(truth)
    # spread over the batch, as they would come from different prompts
    hostile_at = {round(k * batch_size / num_pathological) for k in range(num_pathological)}
    for k, index in enumerate(sorted(hostile_at)):
        responses[index] = PATHOLOGICAL[k % len(PATHOLOGICAL)]
    honest = [i for i in range(batch_size) if i not in hostile_at]
    columns = dict(ground_truths=truths, abilities=["math"] * batch_size, data_sources=[None] * batch_size)
    latencies, honest_right = [], 0
    with MathVerifier(MathVerifierConfig(workers=num_workers)) as verifier:
        registry = RewardRegistry(math=verifier)
        start_workers(verifier, num_workers)
        for _ in range(batches):
            started = time.perf_counter()
            scores = registry.score_batch(responses, **columns)
            latencies.append(time.perf_counter() - started)
            honest_right += sum(scores[i] == 1.0 for i in honest)
    return {
        "responses_per_s": batch_size * batches / sum(latencies),
        "batch_p50_s": statistics.median(latencies),
        "batch_p99_s": float(np.percentile(latencies, 99)),
        "honest_right_scored_1": honest_right,
        "honest_right": len(honest) * batches,
        "pathological_per_batch": len(hostile_at),
    }


def bench_code(num_responses: int, max_workers: int) -> float | None:
    """Responses per second (4 sandboxed runs each), or None where no sandbox can run."""
    try:
        verifier = CodeVerifier(CodeVerifierConfig(workers=max_workers))
    except RuntimeError as error:  # SandboxUnavailable
        print(f"code: skipped ({error})", file=sys.stderr)
        return None
    responses = [f"[OUTPUT]\n```python\n{CODE_SOLUTIONS[i % len(CODE_SOLUTIONS)]}\n```" for i in range(num_responses)]
    try:
        started = time.perf_counter()
        verifier.score_batch(responses, [CODE_TESTS] * num_responses)
        return num_responses / (time.perf_counter() - started)
    finally:
        verifier.close()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"math_honest_responses_per_s": bench_math(args.math_responses, args.workers)}
    results.update({f"math_hostile_{k}": v for k, v in
                    bench_math_hostile(args.batch_size, args.batches, args.workers).items()})
    if args.code_responses > 0:
        results["code_responses_per_s"] = bench_code(args.code_responses, args.workers)
    return results


def run_baseline(path: str, argv: list[str]) -> dict[str, Any]:
    """This script's measurements with another checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
    command = [sys.executable, __file__, *argv, "--json"]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


ROWS = [
    ("math_honest_responses_per_s", "math, honest: responses/s", "{:.1f}"),
    ("math_hostile_responses_per_s", "math, 10% pathological: responses/s", "{:.2f}"),
    ("math_hostile_batch_p50_s", "math, 10% pathological: batch p50 (s)", "{:.2f}"),
    ("math_hostile_batch_p99_s", "math, 10% pathological: batch p99 (s)", "{:.2f}"),
    ("math_hostile_honest_right_scored_1", "math, 10% pathological: right answers scored 1", "{:.0f}"),
    ("code_responses_per_s", "code: responses/s (4 sandboxed runs each)", "{:.2f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--math-responses", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--workers", type=int, default=4, help="math checker processes and concurrent sandboxes")
    parser.add_argument("--code-responses", type=int, default=40, help="0 skips the code benchmark")
    parser.add_argument("--baseline", help="another checkout (e.g. /work/main) to measure first")
    parser.add_argument("--json", action="store_true", help="print one JSON line of numbers only")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args)))
        return
    import megatron_prime

    argv = [a for a in sys.argv[1:] if a != "--json"]
    if "--baseline" in argv:
        at = argv.index("--baseline")
        argv = argv[:at] + argv[at + 2:]
    print(f"machine: {os.cpu_count()} cores; command: python benchmarks/bench_verifiers.py {' '.join(sys.argv[1:])}")
    print(f"math: {args.workers} checker processes, default limits (timeout 5 s + 1 s grace); hostile batches: "
          f"{args.batches} x {args.batch_size} responses, {max(1, args.batch_size // 10)} pathological each")
    before = run_baseline(args.baseline, argv) if args.baseline else None
    after = measure(args)
    honest_total = after["math_hostile_honest_right"]
    header = f"{'':58s} {'before':>10s} {'after':>10s} {'after/before':>13s}" if before else f"{'':58s} {'value':>10s}"
    print(f"after: {Path(megatron_prime.__file__).parent.parent}"
          + (f"; before: {Path(args.baseline).resolve()}" if before else ""))
    print(header)
    for key, label, form in ROWS:
        if key not in after:
            continue
        if key == "math_hostile_honest_right_scored_1":
            label = f"{label} (of {honest_total})"
        cells = [after.get(key)] if before is None else [before.get(key), after.get(key)]
        text = [form.format(v) if v is not None else "n/a" for v in cells]
        line = f"{label:58s} " + " ".join(f"{t:>10s}" for t in text)
        if before is not None and before.get(key) and after.get(key) is not None:
            line += f" {after[key] / before[key]:>12.2f}x"
        print(line)


if __name__ == "__main__":
    main()
