"""Running-sum chains: a multi-step toy task whose first wrong step is known.

A chain is a start value and K signed deltas; the prompt asks for the final value, and the
SFT response works it out one line per step, then boxes the answer::

    Start 47. Apply +8, -5, +3, -9.   (+ Eurus-2's math suffix)

    47 + 8 = 55
    55 - 5 = 50
    50 + 3 = 53
    53 - 9 = 44
    \\boxed{44}

The outcome reward (the math verifier on the last ``\\boxed{}``) sees only the final
answer, but because every line's right text follows from the prompt, the first wrong line
of any sampled response can be found (``first_wrong_step``): that is what a process reward
model should put its blame on, and what ``step_line_spans`` lets a caller map tokens to.
K=1 is a one-step problem like the arithmetic toy's; larger K gives outcome-only credit
more to be unsure about.

Why the response is this compact (no ``[ASSESS]``/``[ADVANCE]`` blocks as in
``toy/arithmetic.py``): every extra token costs rollout and training time on two CPU cores,
and the toy tokenizer already holds " + ", " - ", " = " and "\\boxed{" as single tokens, so
a step line costs 7-9 tokens (digits are single tokens). The prompt's words ("Start",
"Apply") are spelt byte by byte: the tokenizer's vocabulary is shared with other toy models
and is not extended for this task.

Values stay in ``[0, max_value]`` (default 0..99, two digits at most) and deltas are
``1..max_delta`` (default 19) in magnitude; by default no step needs a carry or borrow in
any digit column (``carry=False``), for the reason ``arithmetic.make_problems`` gives: a
model of the default job's size learns column-wise sums in a few hundred SFT steps, and
carries take many times more. Each step is then one of the arithmetic toy's problems, and a
chain of K of them is K chances to slip. Chains are drawn from ``random.Random(seed)``: SFT
and RL data made with the same seed hold the same chains, so use different seeds.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_prime.config import require, require_positive_int
from megatron_prime.data.templates import MATH_SUFFIX
from megatron_prime.toy.arithmetic import BOXED_OPEN, EQUALS, OPERATOR_PHRASES, Problem, needs_carry

DATA_SOURCE = "toy_running_sum"
LINE_SEPARATOR = "\n"
# A chain longer than this is refused, and no response is scanned for more step lines:
# it bounds the work spent on a hostile response.
MAX_STEPS = 64
# Numbers in a prompt longer than this are refused by ``parse_chain`` (no huge-int parsing).
MAX_DIGITS = 12

_PROMPT = re.compile(rf"Start (-?\d{{1,{MAX_DIGITS}}})\. Apply ([+-]\d{{1,{MAX_DIGITS}}}"
                     rf"(?:, [+-]\d{{1,{MAX_DIGITS}}}){{0,{MAX_STEPS - 1}}})\.")


@dataclass(frozen=True)
class Chain:
    """``start`` then ``deltas`` applied in order; ``values[k]`` is the value after step k."""

    start: int
    deltas: tuple[int, ...]

    def __post_init__(self) -> None:
        require(isinstance(self.start, int) and not isinstance(self.start, bool), "Chain.start",
                self.start, "an integer")
        require(isinstance(self.deltas, tuple) and 1 <= len(self.deltas) <= MAX_STEPS
                and all(isinstance(d, int) and not isinstance(d, bool) for d in self.deltas),
                "Chain.deltas", self.deltas, f"a tuple of 1..{MAX_STEPS} integers")

    @property
    def num_steps(self) -> int:
        return len(self.deltas)

    @property
    def values(self) -> tuple[int, ...]:
        """The running sums after each step (``values[-1]`` is the answer)."""
        values, value = [], self.start
        for delta in self.deltas:
            value += delta
            values.append(value)
        return tuple(values)

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def question(self) -> str:
        return f"Start {self.start}. Apply {', '.join(f'{d:+d}' for d in self.deltas)}."

    @property
    def prompt(self) -> str:
        """The user turn: the question and Eurus-2's math suffix (as the arithmetic toy's)."""
        return self.question + MATH_SUFFIX

    @property
    def step_lines(self) -> tuple[str, ...]:
        """The right text of each step line: ``left op |delta| = value``."""
        lines, left = [], self.start
        for delta, value in zip(self.deltas, self.values):
            lines.append(f"{left}{OPERATOR_PHRASES['+' if delta >= 0 else '-']}{abs(delta)}{EQUALS}{value}")
            left = value
        return tuple(lines)

    @property
    def solution(self) -> str:
        """The SFT response: one line per step, then the boxed answer."""
        return LINE_SEPARATOR.join((*self.step_lines, f"{BOXED_OPEN}{self.answer}}}"))


def _allowed(value: int, delta: int, max_value: int, carry: bool) -> bool:
    if not 0 <= value + delta <= max_value:
        return False
    return carry or not needs_carry(Problem(value, "+" if delta > 0 else "-", abs(delta)))


def _random_chain(rng: random.Random, num_steps: int, max_delta: int, max_value: int,
                  carry: bool) -> Chain:
    value = start = rng.randint(0, max_value)
    deltas = []
    while len(deltas) < num_steps:
        magnitude = rng.randint(1, max_delta)
        signs = [s for s in (1, -1) if _allowed(value, s * magnitude, max_value, carry)]
        # Redraw when neither sign is allowed; magnitude 1 always allows one (+1 or -1 needs
        # no carry unless the units are 9, resp. 0), so this ends.
        if signs:
            deltas.append(rng.choice(signs) * magnitude)
            value += deltas[-1]
    return Chain(start, tuple(deltas))


def make_chains(num: int, seed: int, num_steps: int | Sequence[int], max_delta: int = 19,
                max_value: int = 99, carry: bool = False) -> list[Chain]:
    """``num`` chains of ``num_steps`` steps (or, for a sequence, a length drawn uniformly
    from it per chain); start uniform in [0, max_value], |delta| uniform in [1, max_delta]
    among those with an allowed sign, the sign uniform among the allowed: those keeping the
    value in [0, max_value] and, unless ``carry``, needing no carry or borrow."""
    require_positive_int("num", num)
    lengths = (num_steps,) if isinstance(num_steps, int) else tuple(num_steps)
    require(bool(lengths) and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_STEPS
                                  for k in lengths),
            "num_steps", num_steps, f"an integer in 1..{MAX_STEPS}, or a non-empty sequence of them")
    require_positive_int("max_delta", max_delta)
    require_positive_int("max_value", max_value)
    # Without carries, a value of all nines can always step by -1; a bound like 10 could
    # leave no allowed step (10 + m is out, 10 - m borrows).
    require(carry or set(str(max_value)) == {"9"}, "max_value", max_value,
            "9, 99, 999, ... when carry=False")
    rng = random.Random(seed)
    return [_random_chain(rng, rng.choice(lengths), max_delta, max_value, carry) for _ in range(num)]


def rl_row(chain: Chain) -> dict[str, Any]:
    """One Eurus-2-RL-Data row; the ground truth is the final value."""
    return {
        "prompt": [{"role": "user", "content": chain.prompt}],
        "ability": "math",
        "reward_model": {"ground_truth": str(chain.answer), "style": "rule"},
        "data_source": DATA_SOURCE,
    }


def sft_row(chain: Chain) -> dict[str, Any]:
    """One SFT chat: the RL prompt's user turn, then the worked solution."""
    return {"messages": [{"role": "user", "content": chain.prompt},
                         {"role": "assistant", "content": chain.solution}]}


def make_rl_rows(num: int, seed: int, num_steps: int | Sequence[int], max_delta: int = 19,
                 max_value: int = 99, carry: bool = False) -> list[dict[str, Any]]:
    return [rl_row(c) for c in make_chains(num, seed, num_steps, max_delta, max_value, carry)]


def make_sft_rows(num: int, seed: int, num_steps: int | Sequence[int], max_delta: int = 19,
                  max_value: int = 99, carry: bool = False) -> list[dict[str, Any]]:
    return [sft_row(c) for c in make_chains(num, seed, num_steps, max_delta, max_value, carry)]


def parse_chain(prompt_text: str) -> Chain:
    """The chain of a prompt (``Chain.prompt``, or its question without the math suffix)."""
    if not isinstance(prompt_text, str):
        raise ValueError(f"parse_chain: expected a prompt string, got {type(prompt_text).__name__}")
    question = prompt_text.removesuffix(MATH_SUFFIX)
    match = _PROMPT.fullmatch(question) if len(question) <= 32 + MAX_STEPS * (MAX_DIGITS + 3) else None
    if match is None:
        raise ValueError(f"parse_chain: {prompt_text[:80]!r} is not a running-sum prompt "
                         f"('Start N. Apply +a, -b, ....' with 1..{MAX_STEPS} steps of at most "
                         f"{MAX_DIGITS} digits, optionally followed by the math suffix)")
    start, deltas = match.groups()
    return Chain(int(start), tuple(int(d) for d in deltas.split(", ")))


def _step_lines(response: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each non-blank line, whitespace trimmed, before the first line holding
    ``\\boxed``; at most MAX_STEPS of them. Never reads past the last line it yields."""
    position = 0
    for _ in range(MAX_STEPS):
        while True:  # skip blank lines
            end = response.find(LINE_SEPARATOR, position)
            end = len(response) if end < 0 else end
            line = response[position:end]  # trimmed with str methods: C speed on huge lines
            stripped = line.strip()
            start = position + len(line) - len(line.lstrip())
            stop = start + len(stripped)
            position = end + 1
            if start < stop or end == len(response):
                break
        if start == stop or "\\boxed" in response[start:stop]:
            return
        yield start, stop
        if end == len(response):
            return


def step_line_spans(response: str) -> list[tuple[int, int]]:
    """Character spans ``response[start:end]`` of the response's step lines, in order: the
    non-blank lines (surrounding whitespace excluded) before the first line that holds
    ``\\boxed``, at most MAX_STEPS. A token belongs to step k when it overlaps span k."""
    return list(_step_lines(response)) if isinstance(response, str) else []


def first_wrong_step(chain: Chain, response: str) -> int | None:
    """0-based index of the first of the chain's steps whose line is missing, malformed or
    wrong; None when all ``chain.num_steps`` step lines are right.

    Step line k (``step_line_spans(response)[k]``) is right when, with all whitespace removed,
    it equals the chain's right line with all whitespace removed: left operand, operator,
    delta and result as in ``chain.step_lines[k]`` (so a line that correctly continues from a
    wrong previous value is still wrong: the whole line must match the true chain). A line
    missing because the response stopped or boxed its answer early counts as wrong there.
    Lines after the last step and the boxed answer are not looked at: a response whose steps
    are right but whose box is wrong or absent gets None (its outcome reward is still 0).
    Any string is accepted; the work is bounded by MAX_STEPS lines (compared as text: no
    number is parsed).
    """
    if not isinstance(response, str):
        return 0
    lines = _step_lines(response)
    for k, expected in enumerate(chain.step_lines):
        span = next(lines, None)
        if span is None:
            return k
        start, stop = span
        # Compare only as many characters as could match, so a huge line costs no more.
        if stop - start > 4 * len(expected):
            return k
        if "".join(response[start:stop].split()) != "".join(expected.split()):
            return k
    return None
