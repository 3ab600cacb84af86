"""Routes each sample to its verifier by the dataset's ``ability`` / ``data_source`` fields.

Eurus-2-RL-Data rows carry ``ability`` ("math" or "code") and ``data_source`` (e.g.
"numina_olympiads", "taco"). ``ability`` decides when present; otherwise the data source's
name does. A sample of an unknown kind is an error naming the value: scoring it 0 would
silently teach the policy that every such answer is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from megatron_prime.rewards.code_verifier import CodeVerifier
from megatron_prime.rewards.math_verifier import MathVerifier

RewardKind = Literal["math", "code"]

ABILITY_KINDS: dict[str, RewardKind] = {"math": "math", "code": "code", "coding": "code"}
# Data-source names are matched by prefix (numina_olympiads, numina_cn_k12, ...).
DATA_SOURCE_PREFIX_KINDS: dict[str, RewardKind] = {
    "numina": "math",
    "math": "math",  # MATH, math500, math_dapo, ...
    "gsm8k": "math",
    "aime": "math",
    "amc": "math",
    "minerva": "math",
    "olympiad": "math",
    "apps": "code",
    "taco": "code",
    "codecontests": "code",
    "codeforces": "code",
    "leetcode": "code",
}


def reward_kind(ability: str | None, data_source: str | None) -> RewardKind:
    """Which verifier judges a sample; ValueError for anything not listed above."""
    if ability:
        kind = ABILITY_KINDS.get(ability.strip().lower())
        if kind is None:
            raise ValueError(f"unknown ability {ability!r}; allowed: {sorted(ABILITY_KINDS)}")
        return kind
    if data_source:
        name = data_source.strip().lower()
        for prefix, kind in DATA_SOURCE_PREFIX_KINDS.items():
            if name.startswith(prefix):
                return kind
        raise ValueError(
            f"unknown data_source {data_source!r} and no ability given; known data-source prefixes: "
            f"{sorted(DATA_SOURCE_PREFIX_KINDS)}"
        )
    raise ValueError("a sample needs an 'ability' or a 'data_source' to choose its verifier; got neither")


class RewardRegistry:
    """Outcome rewards for a mixed batch: math checked here, code on the verifier's pool."""

    def __init__(self, math: MathVerifier | None = None, code: CodeVerifier | None = None) -> None:
        self.math = math if math is not None else MathVerifier()
        self._code = code  # built on first use: it needs root and unshare, math does not

    @property
    def code(self) -> CodeVerifier:
        if self._code is None:
            self._code = CodeVerifier()
        return self._code

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[Any],
        abilities: Sequence[str | None],
        data_sources: Sequence[str | None],
    ) -> list[float]:
        """One outcome reward per response, in order.

        Every kind is resolved before any work starts, so a bad row fails fast. Code runs
        are queued first and run in the background while the math workers check the math.
        """
        columns = {"ground_truths": ground_truths, "abilities": abilities, "data_sources": data_sources}
        for name, column in columns.items():
            if len(column) != len(responses):
                raise ValueError(f"got {len(responses)} responses but {len(column)} {name}")
        kinds = [reward_kind(ability, source) for ability, source in zip(abilities, data_sources)]
        pending = {
            index: self.code.submit(responses[index], ground_truths[index])
            for index, kind in enumerate(kinds)
            if kind == "code"
        }
        scores = [0.0] * len(responses)
        math_indices = [index for index, kind in enumerate(kinds) if kind == "math"]
        math_scores = self.math.score_batch(
            [responses[index] for index in math_indices], [str(ground_truths[index]) for index in math_indices]
        )
        for index, score in zip(math_indices, math_scores):
            scores[index] = score
        for index, future in pending.items():
            scores[index] = future.result()
        return scores
