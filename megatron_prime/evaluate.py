"""Evaluate a policy (an HF folder) on math benchmarks: greedy pass@1, pass@k, majority vote,
and best-of-N with the implicit PRM (PRIME.md: "the implicit PRM also serves inference-time
scaling").

Benchmark files are .jsonl or .parquet; each row holds ``question`` (or ``problem``),
``answer`` and optionally ``source`` (the benchmark's name; default: the file's stem). A few
metadata columns common in published benchmark files (``id``, ``solution``, ``level``, ...)
are carried into the per-problem outputs; any other column is an error, so a typo such as
``anwser`` is not silently read as a row without an answer.

Prompts are rendered as the trainer renders a bare question (``data/templates.py``,
``data/render.py``): the Eurus-2 system prompt, then the question and the math suffix, through
the tokenizer's chat template when it has one. Sampling runs on the trainer's
``RolloutEngine``; answers are checked by the trainer's math verifier.

Weights: the trainer's engine starts with dummy weights and receives the policy through the
weight bridge. Here there is no trainer, so the engine is built with ``load_format="auto"``
(through ``RolloutConfig.extra_engine_args``): vLLM reads the folder's safetensors itself,
which is the same loader the bridge's in-place reload ends in, without a second copy of the
model through shared memory.

Outputs in ``--out-dir``: ``results.json`` and ``results.md`` (one row per benchmark plus the
unweighted average over benchmarks, as in PRIME.md's results table; percentages) and
``outputs.jsonl`` (per problem: prompt, responses, extracted answers, correct flags, and the
majority / best-of-N choices). Input errors exit with status 2 and a one-line message before
anything is written.

``--processbench FILE`` scores the implicit PRM itself (``--prm``, ``--reference``, no policy)
on step-labelled rows in ProcessBench's layout: ``id``, ``problem``, ``steps`` (a list of step
texts), ``label`` (0-based index of the first wrong step, -1 when all are right), optional
``final_answer_correct``. The response is the steps joined by a blank line ("\\n\\n"), the
prompt the problem rendered as a benchmark question is; the predicted first error is
``credit.locate_first_error`` of the step rewards under ``--locate``. Reported as ProcessBench
reports it: accuracy on the erroneous samples, on the correct ones, and their F1
(examples/eval/processbench_sample.jsonl is a small hand-written sample).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_prime.data.dataset import MalformedRow, read_rows
from megatron_prime.data.render import render_prompt
from megatron_prime.data.templates import MATH_SUFFIX, question_messages

QUESTION_COLUMNS: tuple[str, ...] = ("question", "problem")
# Metadata of published benchmark files (MATH-500, AIME, ...): kept, not used.
METADATA_COLUMNS: tuple[str, ...] = ("id", "unique_id", "solution", "level", "subject", "type", "year", "url")
KNOWN_COLUMNS: tuple[str, ...] = QUESTION_COLUMNS + ("answer", "source") + METADATA_COLUMNS
DEFAULT_BEST_OF: tuple[int, ...] = (1, 4, 16, 64)
PRM_AGGREGATES: tuple[str, ...] = ("sum", "min")


class EvalInputError(ValueError):
    """A user error in the inputs of an evaluation: reported in one line, exit status 2."""


# ---- benchmark files ----

@dataclass
class Problem:
    benchmark: str
    index: int  # 0-based position in its benchmark
    question: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_object_rows(path: Path, columns: Sequence[str], not_found: str,
                     empty: str) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, row) of every row of a jsonl/parquet file, each an object of known
    ``columns``; EvalInputError with ``not_found`` / ``empty`` or naming the bad row. Unknown
    columns are refused so that a typo is not read as a missing field."""
    if not path.is_file():
        raise EvalInputError(not_found)
    try:
        rows = list(read_rows(path))
    except (ValueError, ImportError) as error:
        raise EvalInputError(str(error)) from None
    if not rows:
        raise EvalInputError(empty)
    checked = []
    for line, row in rows:
        where = f"{path}:{line}"
        if isinstance(row, MalformedRow):
            raise EvalInputError(f"{where}: {row}")
        if not isinstance(row, dict):
            raise EvalInputError(f"{where}: a row must be an object, got {type(row).__name__}")
        unknown = sorted(set(row) - set(columns))
        if unknown:
            raise EvalInputError(f"{where}: unknown columns {unknown}; allowed: {list(columns)}")
        checked.append((where, row))
    return checked


def load_benchmark(path: str | Path) -> list[Problem]:
    """The problems of one benchmark file; EvalInputError naming ``file:line`` for a bad row."""
    path = Path(path)
    problems = []
    for where, row in read_object_rows(path, KNOWN_COLUMNS, f"benchmark file not found: {path}",
                                       f"{path}: empty benchmark file (no rows)"):
        question = next((row[c] for c in QUESTION_COLUMNS if row.get(c) is not None), None)
        if not isinstance(question, str) or not question.strip():
            raise EvalInputError(f"{where}: row has no 'question' (or 'problem') text")
        answer = row.get("answer")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise EvalInputError(f"{where}: row has no 'answer'")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise EvalInputError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
        source = row.get("source") or path.stem
        metadata = {k: row[k] for k in METADATA_COLUMNS if k in row}
        problems.append(Problem(str(source), 0, question, str(answer), metadata))
    return problems


def group_by_benchmark(problems: Sequence[Problem]) -> dict[str, list[Problem]]:
    """Benchmarks in order of first appearance; each problem's index within its benchmark."""
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        group = groups.setdefault(problem.benchmark, [])
        problem.index = len(group)
        group.append(problem)
    return groups


def problem_messages(question: str, system_prompt: bool) -> list[dict[str, str]]:
    """The chat the trainer builds for a bare math question (``question_messages``); without
    the system prompt, the user turn alone (the toy task's layout, see toy/arithmetic.py)."""
    if system_prompt:
        return question_messages(question, "math")
    return [{"role": "user", "content": question + MATH_SUFFIX}]


# ---- metrics (pure functions) ----

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021: 1 - C(n-c, k) / C(n, k), from n samples with c correct.

    Computed as a running product, which stays exact in floats where the binomials overflow.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> int | None:
    """Index of a response holding the most common answer, or None if no response has one.

    Answers are grouped by ``equivalent`` against each group's first answer (identical strings
    without a call); responses without an answer do not vote. Ties go to the group whose first
    answer comes first, and the group is represented by that first response.
    """
    groups: list[list[int]] = []  # indices of responses, first one = representative
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            representative = answers[group[0]]
            if answer == representative or equivalent(answer, representative):
                group.append(index)
                break
        else:
            groups.append([index])
    if not groups:
        return None
    best = max(groups, key=len)  # max keeps the first of equal-sized groups
    return best[0]


def best_of_n(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the earliest response (deterministic)."""
    if not scores:
        raise ValueError("best_of_n needs at least one score")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# ---- implicit PRM ----

class ImplicitPRM:
    """Response scores from the implicit PRM: r_t = beta * (log pi_prm(y_t|.) - log pi_ref(y_t|.))
    over the response tokens, aggregated by ``sum`` (the PRM's outcome logit, what its
    cross-entropy trains) or ``min`` (the weakest step). Runs the two models with transformers;
    the per-token rewards are ``credit.token_implicit_rewards``, what the credit heatmap shows."""

    def __init__(self, prm_folder: str | Path, reference_folder: str | Path, beta: float,
                 aggregate: str = "sum", batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        if aggregate not in PRM_AGGREGATES:
            raise EvalInputError(f"--prm-aggregate={aggregate!r} is invalid: expected one of {list(PRM_AGGREGATES)}")
        self.beta, self.aggregate, self.batch_size = beta, aggregate, batch_size
        self.prm = AutoModelForCausalLM.from_pretrained(str(prm_folder), dtype=torch.float32).eval()
        self.reference = AutoModelForCausalLM.from_pretrained(str(reference_folder), dtype=torch.float32).eval()

    def score(self, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> list[float]:
        """One score per response of one prompt (0.0 for an empty response)."""
        from megatron_prime.credit import token_implicit_rewards

        scores: list[float] = []
        for rewards in token_implicit_rewards(self.prm, self.reference, prompt_ids, responses, self.beta,
                                              self.batch_size):
            if rewards.numel() == 0:
                scores.append(0.0)
            else:
                scores.append((rewards.sum() if self.aggregate == "sum" else rewards.min()).item())
        return scores


# ---- ProcessBench: where the PRM puts the first error ----

PROCESSBENCH_COLUMNS: tuple[str, ...] = ("id", "generator", "problem", "steps", "label", "final_answer_correct")
# A ProcessBench response is its steps joined by a blank line, the paragraph break that
# separates the steps in the dataset's solutions (and the one the Eurus-2 format uses).
STEP_SEPARATOR = "\n\n"


@dataclass
class StepLabelledSample:
    """One ProcessBench row: ``label`` is the 0-based index of the first wrong step, -1 if none."""

    id: str
    problem: str
    steps: list[str]
    label: int
    final_answer_correct: bool | None = None
    where: str = ""  # file:line, for errors

    @property
    def response(self) -> str:
        return STEP_SEPARATOR.join(self.steps)

    def step_spans(self, tokenizer: Any, decoded: str) -> list[tuple[int, int]]:
        """Each step's [start, end) characters in ``decoded``, the tokenizer's decoding of
        ``response`` (the separators belong to no step).

        The decoding is usually the response itself; a tokenizer that normalises text (NFC in
        Qwen2's and the toy tokenizer) can change it, so each step is looked up, in order, as
        written or as the tokenizer gives it back. ValueError if a step is not found.
        """
        spans, cursor = [], 0
        for index, step in enumerate(self.steps):
            start = decoded.find(step, cursor)
            if start < 0:
                step = tokenizer.decode(tokenizer(step, add_special_tokens=False)["input_ids"])
                start = decoded.find(step, cursor)
            if start < 0:
                raise ValueError(f"step {index} is not in the tokenizer's decoding of the response")
            spans.append((start, start + len(step)))
            cursor = start + len(step)
        return spans


def load_processbench(path: str | Path) -> list[StepLabelledSample]:
    """Rows in ProcessBench's layout; EvalInputError naming ``file:line`` for a bad row."""
    path = Path(path)
    samples = []
    for where, row in read_object_rows(path, PROCESSBENCH_COLUMNS, f"--processbench {path}: file not found",
                                       f"{path}: empty file (no rows)"):
        problem, steps, label = row.get("problem"), row.get("steps"), row.get("label")
        if not isinstance(problem, str) or not problem.strip():
            raise EvalInputError(f"{where}: row has no 'problem' text")
        if (not isinstance(steps, list) or not steps
                or not all(isinstance(step, str) and step.strip() for step in steps)):
            raise EvalInputError(f"{where}: 'steps' must be a non-empty list of non-empty strings")
        if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
            raise EvalInputError(f"{where}: 'label'={label!r} is invalid: expected -1 (all steps right) or "
                                 f"the index of the first wrong step, 0..{len(steps) - 1}")
        final = row.get("final_answer_correct")
        if final is not None and not isinstance(final, bool):
            raise EvalInputError(f"{where}: 'final_answer_correct' must be true or false, got {final!r}")
        samples.append(StepLabelledSample(str(row.get("id", f"{path.stem}-{len(samples)}")), problem,
                                          list(steps), label, final, where))
    return samples


def processbench_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, Any]:
    """ProcessBench's report (percent): accuracy on the erroneous samples (predicted index ==
    label), on the correct ones (predicted -1), F1 = their harmonic mean; and, over the
    erroneous samples, how often the prediction is the labelled step, an earlier or a later
    one, or "no error". A measure without samples to count is None."""
    def percent(hits: int, total: int) -> float | None:
        return 100.0 * hits / total if total else None

    pairs = list(zip(labels, predictions))
    erroneous = [(label, predicted) for label, predicted in pairs if label >= 0]
    correct = [predicted for label, predicted in pairs if label < 0]
    accuracy_erroneous = percent(sum(p == label for label, p in erroneous), len(erroneous))
    accuracy_correct = percent(sum(p == -1 for p in correct), len(correct))
    if accuracy_erroneous is None or accuracy_correct is None:
        f1 = None
    elif accuracy_erroneous + accuracy_correct == 0:
        f1 = 0.0
    else:
        f1 = 2 * accuracy_erroneous * accuracy_correct / (accuracy_erroneous + accuracy_correct)
    placement = {
        "exact": percent(sum(p == label for label, p in erroneous), len(erroneous)),
        "earlier": percent(sum(0 <= p < label for label, p in erroneous), len(erroneous)),
        "later": percent(sum(p > label for label, p in erroneous), len(erroneous)),
        "no_error": percent(sum(p == -1 for _, p in erroneous), len(erroneous)),
    }
    return {"samples": len(pairs), "erroneous_samples": len(erroneous), "correct_samples": len(correct),
            "accuracy_erroneous": accuracy_erroneous, "accuracy_correct": accuracy_correct, "f1": f1,
            "erroneous_predicted": placement}


def processbench_markdown(name: str, metrics: dict[str, Any]) -> str:
    """ProcessBench's table (error / correct / F1), then where the predictions fell."""
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    placement = metrics["erroneous_predicted"]
    return "\n".join([
        "| data | samples | error acc | correct acc | F1 |", "|---|---|---|---|---|",
        f"| {name} | {metrics['samples']} | {cell(metrics['accuracy_erroneous'])} | "
        f"{cell(metrics['accuracy_correct'])} | {cell(metrics['f1'])} |", "",
        "On erroneous samples, the predicted first error was (percent):", "",
        "| labelled step | earlier | later | no error |", "|---|---|---|---|",
        f"| {cell(placement['exact'])} | {cell(placement['earlier'])} | {cell(placement['later'])} | "
        f"{cell(placement['no_error'])} |"]) + "\n"


@dataclass
class ProcessBenchConfig:
    data: str
    prm: str
    reference: str
    out_dir: str
    beta: float = 0.05
    locate: str = "min_cumulative"
    threshold: float = 0.0
    system_prompt: bool = True
    use_chat_template: bool = True
    batch_size: int = 8

    def validate(self) -> None:
        from megatron_prime.credit import LOCATE_RULES

        for name in ("beta", "threshold"):
            if not math.isfinite(getattr(self, name)):
                raise EvalInputError(f"--{name}={getattr(self, name)} is invalid: expected a finite number")
        if self.beta <= 0:
            raise EvalInputError(f"--beta={self.beta} is invalid: expected > 0")
        if self.locate not in LOCATE_RULES:
            raise EvalInputError(f"--locate={self.locate!r} is invalid: expected one of {list(LOCATE_RULES)}")
        if not (Path(self.reference) / "config.json").is_file():
            raise EvalInputError(f"--reference {self.reference}: not an HF folder (no config.json)")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise EvalInputError(f"--out-dir {self.out_dir} exists and is not a folder")


def evaluate_processbench(config: ProcessBenchConfig) -> dict[str, Any]:
    """Scores every sample's steps with the implicit PRM, locates the first error
    (``credit.locate_first_error``) and writes results.json, results.md and outputs.jsonl
    (per sample: label, prediction, step rewards) to ``out_dir``. The prompt is the problem
    rendered as a benchmark question is (``problem_messages``); the response is the steps
    joined by STEP_SEPARATOR, tokenized with the reference's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_prime.credit import (
        locate_first_error,
        prm_hf_folder,
        step_rewards,
        token_implicit_rewards,
        token_steps_from_spans,
    )

    config.validate()
    samples = load_processbench(config.data)
    tokenizer = AutoTokenizer.from_pretrained(config.reference)
    try:
        with prm_hf_folder(config.prm) as folder:
            prm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    except (ValueError, FileNotFoundError) as error:
        raise EvalInputError(str(error)) from None
    reference = AutoModelForCausalLM.from_pretrained(config.reference, dtype=torch.float32).eval()
    if prm.config.vocab_size != reference.config.vocab_size:
        raise EvalInputError(f"--prm and --reference must share a vocabulary; vocab sizes: "
                             f"{prm.config.vocab_size} and {reference.config.vocab_size}")
    records = []
    for sample in samples:
        prompt = render_prompt(tokenizer, problem_messages(sample.problem, config.system_prompt),
                               config.use_chat_template)
        response_ids = tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        rewards = token_implicit_rewards(prm, reference, prompt.token_ids, [response_ids], config.beta,
                                         config.batch_size)[0]
        try:
            spans = sample.step_spans(tokenizer, tokenizer.decode(response_ids, skip_special_tokens=False))
        except ValueError as error:
            raise EvalInputError(f"{sample.where}: {error}") from None
        steps = token_steps_from_spans(tokenizer, response_ids, spans)
        per_step = step_rewards(rewards, steps, num_steps=len(sample.steps))
        predicted = locate_first_error(per_step, config.locate, config.threshold)
        records.append({"id": sample.id, "label": sample.label, "predicted": predicted,
                        "step_rewards": per_step, "final_answer_correct": sample.final_answer_correct})
    metrics = processbench_metrics([r["label"] for r in records], [r["predicted"] for r in records])
    name = Path(config.data).stem
    result = {"data": str(config.data), "prm": str(config.prm), "reference": str(config.reference),
              "beta": config.beta, "locate": config.locate, "threshold": config.threshold,
              "step_separator": STEP_SEPARATOR, **metrics}
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "results.md").write_text(processbench_markdown(name, metrics))
    with (out_dir / "outputs.jsonl").open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    return result


# ---- the evaluation ----

@dataclass
class EvalConfig:
    model: str
    benchmarks: list[str]
    out_dir: str
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    ks: list[int] | None = None  # pass@k / maj@k / bon@k; None: 1, 4, 16, 64 up to n, and n
    system_prompt: bool = True
    use_chat_template: bool = True
    prm: str | None = None
    reference: str | None = None
    beta: float = 0.05
    prm_aggregate: str = "sum"
    verifier_workers: int = 2

    def validate(self) -> None:
        for name in ("n", "max_new_tokens", "verifier_workers"):
            if getattr(self, name) < 1:
                raise EvalInputError(f"--{name.replace('_', '-')}={getattr(self, name)} is invalid: expected >= 1")
        for name in ("temperature", "top_p", "beta"):  # argparse's float() reads inf and nan
            if not math.isfinite(getattr(self, name)):
                raise EvalInputError(f"--{name.replace('_', '-')}={getattr(self, name)} is invalid: "
                                     "expected a finite number")
        if self.temperature < 0:
            raise EvalInputError(f"--temperature={self.temperature} is invalid: expected >= 0")
        if not 0 < self.top_p <= 1:
            raise EvalInputError(f"--top-p={self.top_p} is invalid: expected 0 < top-p <= 1")
        if self.beta <= 0:
            raise EvalInputError(f"--beta={self.beta} is invalid: expected > 0 (the PRM's scores "
                                 "are beta times log-ratios; 0 ranks every sample alike)")
        if self.n > 1 and self.temperature == 0:
            raise EvalInputError(f"--n={self.n} needs --temperature > 0 (greedy samples are all the same)")
        for k in self.ks or ():
            if not 1 <= k <= self.n:
                raise EvalInputError(f"--ks value {k} is invalid: expected 1 <= k <= --n={self.n}")
        if (self.prm is None) != (self.reference is None):
            raise EvalInputError("--prm and --reference go together: give both or neither")
        if self.prm is not None and self.n == 1:
            raise EvalInputError("--prm (best-of-N) needs --n > 1 samples per problem")
        if self.prm_aggregate not in PRM_AGGREGATES:
            raise EvalInputError(f"--prm-aggregate={self.prm_aggregate!r} is invalid: expected one of {list(PRM_AGGREGATES)}")
        for flag, folder in (("model", self.model), ("prm", self.prm), ("reference", self.reference)):
            if folder is not None and not (Path(folder) / "config.json").is_file():
                raise EvalInputError(f"--{flag} {folder}: not an HF folder (no config.json)")

    @property
    def k_values(self) -> list[int]:
        if self.ks:
            return sorted(set(self.ks))
        return sorted({k for k in DEFAULT_BEST_OF if k <= self.n} | {self.n})


def _check_vocabularies(config: EvalConfig) -> None:
    """The PRM scores the policy's tokens: all three models must share one vocabulary."""
    if config.prm is None:
        return
    sizes = {flag: json.loads((Path(folder) / "config.json").read_text()).get("vocab_size")
             for flag, folder in (("model", config.model), ("prm", config.prm), ("reference", config.reference))}
    if len(set(sizes.values())) != 1:
        raise EvalInputError(f"--model, --prm and --reference must share a vocabulary; vocab sizes: {sizes}")


def _problem_record(problem: Problem, prompt_text: str, rollouts: Sequence[Any], answers: list[str | None],
                    correct: list[float], prm_scores: list[float] | None,
                    choices: dict[str, int | None]) -> dict[str, Any]:
    record = {"benchmark": problem.benchmark, "index": problem.index, "question": problem.question,
              "answer": problem.answer, "prompt": prompt_text,
              "responses": [r.text for r in rollouts], "extracted_answers": answers,
              "correct": [bool(c) for c in correct],
              "finish_reasons": [r.finish_reason for r in rollouts], "choices": choices,
              **({"metadata": problem.metadata} if problem.metadata else {})}
    if prm_scores is not None:
        record["prm_scores"] = prm_scores
    return record


def problem_metrics(correct: Sequence[float], answers: Sequence[str | None], ks: Sequence[int],
                    equivalent: Callable[[str, str], bool],
                    prm_scores: Sequence[float] | None) -> tuple[dict[str, float], dict[str, int | None]]:
    """Per-problem metric values (0..1) and the index each selection rule picked.

    maj@k and bon@k use the first k samples (in sampling order); pass@k uses all n.
    """
    n, c = len(correct), int(sum(correct))
    values: dict[str, float] = {}
    choices: dict[str, int | None] = {}
    for k in ks:
        values[f"pass@{k}"] = pass_at_k(n, c, k)
    if n > 1:
        for k in ks:
            chosen = majority_vote(answers[:k], equivalent)
            choices[f"maj@{k}"] = chosen
            values[f"maj@{k}"] = float(chosen is not None and correct[chosen] > 0)
        if prm_scores is not None:
            for k in ks:
                chosen = best_of_n(prm_scores[:k])
                choices[f"bon@{k}"] = chosen
                values[f"bon@{k}"] = float(correct[chosen] > 0)
    return values, choices


def summarize(per_benchmark: dict[str, list[dict[str, float]]], columns: Sequence[str]) -> dict[str, Any]:
    """Mean of each metric per benchmark (percent) and their unweighted mean over benchmarks."""
    table = {name: {column: 100.0 * sum(v[column] for v in values) / len(values) for column in columns}
             for name, values in per_benchmark.items()}
    average = {column: sum(row[column] for row in table.values()) / len(table) for column in columns}
    return {"benchmarks": table, "average": average,
            "problems": {name: len(values) for name, values in per_benchmark.items()}}


def markdown_table(summary: dict[str, Any], columns: Sequence[str], headers: Sequence[str]) -> str:
    """PRIME.md's layout: ``| benchmark | ... |``, one row per benchmark, then ``average``."""
    lines = ["| benchmark | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    rows = list(summary["benchmarks"].items()) + [("average", summary["average"])]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Runs the evaluation and writes the outputs; EvalInputError before any work for bad inputs."""
    from transformers import AutoTokenizer

    from megatron_prime.rewards import MathVerifier, MathVerifierConfig, RewardRegistry, extract_last_boxed
    from megatron_prime.rollout.engine import RolloutConfig, RolloutEngine, SamplingConfig
    from megatron_prime.rollout.validation import greedy

    config.validate()
    _check_vocabularies(config)
    problems = [p for path in config.benchmarks for p in load_benchmark(path)]
    benchmarks = group_by_benchmark(problems)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalInputError(f"--out-dir {out_dir} exists and is not a folder")

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    rendered = [render_prompt(tokenizer, problem_messages(p.question, config.system_prompt), config.use_chat_template)
                for p in problems]
    hf_config = json.loads((Path(config.model) / "config.json").read_text())
    max_model_len = config.max_model_len or int(hf_config.get("max_position_embeddings", 4096))
    for problem, prompt in zip(problems, rendered):
        if len(prompt.token_ids) + config.max_new_tokens > max_model_len:
            raise EvalInputError(
                f"{problem.benchmark} problem {problem.index}: prompt of {len(prompt.token_ids)} tokens + "
                f"--max-new-tokens {config.max_new_tokens} exceeds the model length {max_model_len}")

    base = SamplingConfig(n=config.n, temperature=config.temperature, top_p=config.top_p,
                          max_new_tokens=config.max_new_tokens, seed=config.seed)
    sampling = greedy(base, None) if config.n == 1 and config.temperature == 0 else base
    engine = RolloutEngine(config.model, RolloutConfig(max_model_len=max_model_len, enforce_eager=True,
                                                       seed=config.seed,
                                                       extra_engine_args={"load_format": "auto"}),
                           on_gpu=torch.cuda.is_available())
    try:
        rollouts = engine.generate([p.token_ids for p in rendered], sampling)
    finally:
        engine.shutdown()

    n = config.n
    registry = RewardRegistry(MathVerifier(MathVerifierConfig(workers=config.verifier_workers)))
    try:
        scores = registry.score_batch([r.text for r in rollouts], [problems[r.prompt_index].answer for r in rollouts],
                                      ["math"] * len(rollouts),
                                      [problems[r.prompt_index].benchmark for r in rollouts])
        prm = (ImplicitPRM(config.prm, config.reference, config.beta, config.prm_aggregate)
               if config.prm is not None else None)
        ks = config.k_values
        per_benchmark: dict[str, list[dict[str, float]]] = {name: [] for name in benchmarks}
        records = []
        for index, problem in enumerate(problems):
            group = rollouts[index * n:(index + 1) * n]
            correct = scores[index * n:(index + 1) * n]
            answers = [extract_last_boxed(r.text) or None for r in group]
            prm_scores = (prm.score(rendered[index].token_ids, [r.response_token_ids for r in group])
                          if prm is not None else None)
            values, choices = problem_metrics(correct, answers, ks, registry.math.is_equivalent, prm_scores)
            per_benchmark[problem.benchmark].append(values)
            records.append(_problem_record(problem, rendered[index].text, group, answers, correct,
                                           prm_scores, choices))
    finally:
        registry.math.close()

    columns = list(per_benchmark[problems[0].benchmark][0])
    summary = summarize(per_benchmark, columns)
    model_name = Path(config.model).resolve().name
    # Greedy pass@1 is PRIME.md's table exactly: one column headed by the model.
    headers = [model_name] if columns == ["pass@1"] and n == 1 else columns
    result = {"model": str(config.model), "mode": "greedy" if sampling.temperature == 0 else "sampling",
              "n": n, "temperature": sampling.temperature, "max_new_tokens": config.max_new_tokens,
              "seed": config.seed, "columns": columns, **summary}
    if prm is not None:
        result["prm"] = {"prm": config.prm, "reference": config.reference, "beta": config.beta,
                         "aggregate": config.prm_aggregate}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(summary, columns, headers))
    with (out_dir / "outputs.jsonl").open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    return result


# ---- command line ----

def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-prime-eval",
        description="Evaluate an HF policy on math benchmarks (greedy pass@1; pass@k, majority vote "
                    "and implicit-PRM best-of-N with --n/--temperature).")
    parser.add_argument("--model", default=None, help="HF folder of the policy (required unless --processbench)")
    parser.add_argument("--benchmarks", default=None, nargs="+",
                        help=".jsonl/.parquet files with question (or problem), answer, optional source "
                             "(required unless --processbench)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--n", type=int, default=None,
                        help="samples per problem (default 1 = greedy; with --prm: the largest --ks)")
    parser.add_argument("--temperature", type=float, default=None, help="default 0 for n=1, else 1.0")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--ks", type=_int_list, default=None,
                        help="k of pass@k, maj@k and bon@k, e.g. 1,4,16,64 (default: those up to n, and n)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-system-prompt", action="store_true",
                        help="user turn only (question + math suffix), as the toy task's prompts")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--prm", default=None, help="HF folder of the implicit PRM (best-of-N)")
    parser.add_argument("--reference", default=None, help="HF folder of the PRM's reference model")
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--prm-aggregate", default="sum", choices=PRM_AGGREGATES)
    parser.add_argument("--verifier-workers", type=int, default=2)
    parser.add_argument("--processbench", default=None, metavar="FILE",
                        help="score --prm on step-labelled rows in ProcessBench's layout (id, problem, "
                             "steps, label) instead of sampling a policy; needs --prm and --reference")
    parser.add_argument("--locate", default="min_cumulative", choices=("min_cumulative", "threshold"),
                        help="with --processbench: how the first error is read from the step rewards")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="with --processbench: see credit.locate_first_error")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    n = args.n
    if n is None:
        n = max(args.ks or DEFAULT_BEST_OF) if args.prm else 1
    temperature = args.temperature if args.temperature is not None else (0.0 if n == 1 else 1.0)
    return EvalConfig(model=args.model, benchmarks=args.benchmarks, out_dir=args.out_dir, n=n,
                      temperature=temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                      max_model_len=args.max_model_len, seed=args.seed, ks=args.ks,
                      system_prompt=not args.no_system_prompt, use_chat_template=not args.no_chat_template,
                      prm=args.prm, reference=args.reference, beta=args.beta,
                      prm_aggregate=args.prm_aggregate, verifier_workers=args.verifier_workers)


def processbench_config_from_args(args: argparse.Namespace) -> ProcessBenchConfig:
    if args.model is not None or args.benchmarks is not None:
        raise EvalInputError("--processbench scores a PRM, not a policy: leave out --model and --benchmarks")
    if args.prm is None or args.reference is None:
        raise EvalInputError("--processbench needs --prm and --reference")
    return ProcessBenchConfig(data=args.processbench, prm=args.prm, reference=args.reference,
                              out_dir=args.out_dir, beta=args.beta, locate=args.locate,
                              threshold=args.threshold, system_prompt=not args.no_system_prompt,
                              use_chat_template=not args.no_chat_template)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.processbench is None and (args.model is None or args.benchmarks is None):
        parser.error("the following arguments are required: --model, --benchmarks (or --processbench)")
    try:
        if args.processbench is not None:
            evaluate_processbench(processbench_config_from_args(args))
        else:
            evaluate(config_from_args(args))
    except EvalInputError as error:
        print(f"megatron-prime-eval: error: {error}", file=sys.stderr)
        return 2
    print((Path(args.out_dir) / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
