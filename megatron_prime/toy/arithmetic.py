"""Toy arithmetic problems ("What is 23 + 34?") as Eurus-2 style RL and SFT data.

RL rows follow the Eurus-2-RL-Data layout (``data/dataset.py``); SFT rows are chats whose
last turn is a worked solution in the Eurus-2 action format, ending in ``\\boxed{}`` so the
math verifier can score it::

    [ASSESS]

    We add 23 and 34.

    Next action: [ADVANCE]

    [ADVANCE]

    23 + 34 = 57

    Next action: [OUTPUT]

    [OUTPUT]

    \\boxed{57}

The prompt is the question plus Eurus-2's math suffix, *without* the Eurus-2 system prompt:
the system prompt is ~900 characters, which the toy tokenizer (whole tokens only for the
toy task's own phrases) would spell out in hundreds of tokens, longer than the tiny model's
context and many times the cost of the problem itself. The action format is learned from
the SFT responses instead, as Eurus-2-SFT learned it.

Problems are drawn from ``random.Random(seed)``: the same seed gives the same problems, so
SFT and RL data made with the same seed hold the same problems; use different seeds. By
default the problems are additions without carries (see ``make_problems``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_prime.config import require, require_positive_int
from megatron_prime.data.templates import MATH_SUFFIX

OPERATIONS: tuple[str, ...] = ("+", "-")  # what the generator knows
DEFAULT_OPERATIONS: tuple[str, ...] = ("+",)  # what the default job uses
DATA_SOURCE = "toy_arithmetic"

# The fixed phrases of questions and solutions; the toy tokenizer makes each one token.
QUESTION_PREFIX = "What is "
STEP_SEPARATOR = "\n\n"
NEXT_ACTION = "Next action: "
BOXED_OPEN = "\\boxed{"
ASSESS_PHRASES: dict[str, tuple[str, str]] = {"+": ("We add ", " and "), "-": ("We subtract ", " from ")}
OPERATOR_PHRASES: dict[str, str] = {"+": " + ", "-": " - "}
EQUALS = " = "


@dataclass(frozen=True)
class Problem:
    """``left op right``; subtraction problems have ``left >= right`` (no negative answers)."""

    left: int
    operation: str
    right: int

    @property
    def answer(self) -> int:
        return self.left + self.right if self.operation == "+" else self.left - self.right

    @property
    def question(self) -> str:
        return f"{QUESTION_PREFIX}{self.left}{OPERATOR_PHRASES[self.operation]}{self.right}?"

    @property
    def prompt(self) -> str:
        """The user turn: the question and Eurus-2's math suffix."""
        return self.question + MATH_SUFFIX


def needs_carry(problem: Problem) -> bool:
    """Whether some digit column carries (addition) or borrows (subtraction)."""
    left, right = problem.left, problem.right
    while left or right:
        units_left, units_right = left % 10, right % 10
        if units_left + units_right > 9 if problem.operation == "+" else units_left < units_right:
            return True
        left, right = left // 10, right // 10
    return False


def make_problems(num: int, seed: int, operations: Iterable[str] = DEFAULT_OPERATIONS, max_operand: int = 99,
                  carry: bool = False) -> list[Problem]:
    """``num`` problems, operands uniform in [0, max_operand], operation uniform in ``operations``.

    ``carry=False`` keeps only problems that need no carry or borrow (each digit of the answer
    depends on one column): a model of the default job's size learns those digit by digit,
    and generalises to unseen problems, in a few hundred SFT steps on two CPU cores; with
    carries it needs tens of times more examples (measured), too many for a demo.
    """
    require_positive_int("num", num)
    operations = tuple(operations)
    require(bool(operations) and set(operations) <= set(OPERATIONS), "operations", operations,
            f"a non-empty subset of {list(OPERATIONS)}")
    require_positive_int("max_operand", max_operand)
    rng = random.Random(seed)
    problems: list[Problem] = []
    while len(problems) < num:
        operation = rng.choice(operations)
        left, right = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if operation == "-" and left < right:
            left, right = right, left
        problem = Problem(left, operation, right)
        if carry or not needs_carry(problem):  # rejection keeps the draw uniform over the rest
            problems.append(problem)
    return problems


def sft_response(problem: Problem) -> str:
    """The worked solution: ASSESS (what is asked), ADVANCE (the sum), OUTPUT (the box)."""
    first, second = (problem.left, problem.right) if problem.operation == "+" else \
        (problem.right, problem.left)  # "We subtract 17 from 52."
    verb, joiner = ASSESS_PHRASES[problem.operation]
    steps = [
        ("ASSESS", f"{verb}{first}{joiner}{second}."),
        ("ADVANCE", (f"{problem.left}{OPERATOR_PHRASES[problem.operation]}{problem.right}"
                     f"{EQUALS}{problem.answer}")),
        ("OUTPUT", f"{BOXED_OPEN}{problem.answer}}}"),
    ]
    blocks = []
    for index, (action, body) in enumerate(steps):
        block = f"[{action}]{STEP_SEPARATOR}{body}"
        if index + 1 < len(steps):
            block += f"{STEP_SEPARATOR}{NEXT_ACTION}[{steps[index + 1][0]}]"
        blocks.append(block)
    return STEP_SEPARATOR.join(blocks)


def rl_row(problem: Problem) -> dict[str, Any]:
    """One Eurus-2-RL-Data row."""
    return {
        "prompt": [{"role": "user", "content": problem.prompt}],
        "ability": "math",
        "reward_model": {"ground_truth": str(problem.answer), "style": "rule"},
        "data_source": DATA_SOURCE,
    }


def sft_row(problem: Problem) -> dict[str, Any]:
    """One SFT chat: the RL prompt's user turn, then the worked solution."""
    return {"messages": [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "content": sft_response(problem)}]}


def make_rl_rows(num: int, seed: int, operations: Iterable[str] = DEFAULT_OPERATIONS,
                 max_operand: int = 99, carry: bool = False) -> list[dict[str, Any]]:
    return [rl_row(p) for p in make_problems(num, seed, operations, max_operand, carry)]


def make_sft_rows(num: int, seed: int, operations: Iterable[str] = DEFAULT_OPERATIONS,
                 max_operand: int = 99, carry: bool = False) -> list[dict[str, Any]]:
    return [sft_row(p) for p in make_problems(num, seed, operations, max_operand, carry)]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    return path
