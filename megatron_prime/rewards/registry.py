"""Routes each sample to its verifier by the dataset's ``ability`` / ``data_source`` fields.

Eurus-2-RL-Data rows carry ``ability`` ("math" or "code") and ``data_source`` (e.g.
"numina_olympiads", "taco"). ``ability`` decides when present; otherwise the data source's
name does. A sample of an unknown kind is an error naming the value: scoring it 0 would
silently teach the policy that every such answer is wrong.

A response, by contrast, is written by the policy and may be hostile: whatever goes wrong
while scoring one (a result nested deeply enough to make ``json.loads`` recurse out, a
sandbox failure, a verifier bug) is that response's reward 0, counted and logged with its
reason, and never an exception into the trainer or a cost to its neighbours in the batch.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_prime.rewards.code_verifier import CodeVerifier, CodeVerifierConfig
from megatron_prime.rewards.math_verifier import MathVerifier, MathVerifierConfig

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class RewardsConfig:
    """The outcome verifiers of a run (``rewards.math.*``, ``rewards.code.*`` in the YAML)."""

    math: MathVerifierConfig = field(default_factory=MathVerifierConfig)
    code: CodeVerifierConfig = field(default_factory=CodeVerifierConfig)


@dataclass(frozen=True)
class ScoringFailure:
    """A response whose scoring raised: it was given reward 0 for this reason."""

    index: int  # position in the batch
    kind: RewardKind
    reason: str  # exception type and the start of its message


_REASON_CHARS = 200


class RewardRegistry:
    """Outcome rewards for a mixed batch: math and code checked on their verifiers' pools.

    ``failure_counts`` counts responses scored 0 because their scoring raised, by
    ``"<kind>/<exception type>"`` over the registry's life; ``last_failures`` lists those of
    the latest batch (the trainer logs their number as a metric).
    """

    def __init__(self, math: MathVerifier | None = None, code: CodeVerifier | None = None,
                 config: RewardsConfig | None = None) -> None:
        self.config = config if config is not None else RewardsConfig()
        self.math = math if math is not None else MathVerifier(self.config.math)
        self._code = code  # built on first use: it needs a sandbox, math does not
        self.failure_counts: collections.Counter[str] = collections.Counter()
        self.last_failures: list[ScoringFailure] = []

    @property
    def code(self) -> CodeVerifier:
        if self._code is None:
            self._code = CodeVerifier(self.config.code)
        return self._code

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[Any],
        abilities: Sequence[str | None],
        data_sources: Sequence[str | None],
    ) -> list[float]:
        """One outcome reward per response, in order.

        Every kind is resolved before any work starts, so a bad row (unknown kind, columns of
        different lengths) fails fast with a ValueError. Then every response is queued on its
        verifier's pool, code and math side by side; a response whose scoring raises anything
        (``Exception``: not KeyboardInterrupt or SystemExit) scores 0 and is recorded in
        ``last_failures``, and the others keep their scores.
        """
        return self.gather(self.submit(responses, ground_truths, abilities, data_sources))

    def submit(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[Any],
        abilities: Sequence[str | None],
        data_sources: Sequence[str | None],
    ) -> list[tuple[RewardKind, Future[float]]]:
        """Queues responses on their verifiers' pools and returns at once (``gather`` waits):
        the rollout submits each prompt's responses as vLLM finishes them, so scoring runs
        while the engine still generates. Kinds are resolved first, as in ``score_batch``."""
        columns = {"ground_truths": ground_truths, "abilities": abilities, "data_sources": data_sources}
        for name, column in columns.items():
            if len(column) != len(responses):
                raise ValueError(f"got {len(responses)} responses but {len(column)} {name}")
        kinds = [reward_kind(ability, source) for ability, source in zip(abilities, data_sources)]
        # Built here, outside the per-response guard: a sandbox that cannot start is the run's
        # error, not every code response's reward 0.
        verifiers = {kind: self.code if kind == "code" else self.math for kind in set(kinds)}
        return [(kind, _submit(verifiers[kind], response, truth))
                for kind, response, truth in zip(kinds, responses, ground_truths)]

    def gather(self, pending: Sequence[tuple[RewardKind, Future[float]]]) -> list[float]:
        """The scores of submitted responses, in the order given; a response whose scoring
        raised scores 0 and is recorded in ``last_failures`` (indices into ``pending``)."""
        self.last_failures = []
        scores = []
        for index, (kind, future) in enumerate(pending):
            try:
                scores.append(float(future.result()))
            except Exception as error:  # noqa: BLE001 - one response's failure is its own
                scores.append(0.0)
                self._record_failure(ScoringFailure(index, kind, _reason(error)), type(error).__name__)
        return scores

    def _record_failure(self, failure: ScoringFailure, error_type: str) -> None:
        self.failure_counts[f"{failure.kind}/{error_type}"] += 1
        self.last_failures.append(failure)
        logger.warning("reward 0 for response %d (%s): its scoring raised %s",
                       failure.index, failure.kind, failure.reason)


def _submit(verifier: MathVerifier | CodeVerifier, response: str, ground_truth: Any) -> Future[float]:
    """The verifier's future for one response; an error while queueing it is that future's."""
    try:
        return verifier.submit(response, ground_truth)
    except Exception as error:  # noqa: BLE001 - one response's failure is its own
        failed: Future[float] = Future()
        failed.set_exception(error)
        return failed


def _reason(error: BaseException) -> str:
    """``"RecursionError: maximum recursion depth exceeded..."``, cut to a log line's length
    (the message of an error about a hostile output may quote that output)."""
    message = str(error)
    if len(message) > _REASON_CHARS:
        message = message[:_REASON_CHARS] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
