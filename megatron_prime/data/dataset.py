"""Prompt datasets in the Eurus-2-RL-Data layout, read from jsonl or parquet.

One row::

    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
     "ability": "math",
     "reward_model": {"ground_truth": "42", "style": "rule"},
     "data_source": "numina_olympiads"}

``prompt`` may also be a plain string (a bare question: the Eurus-2 system prompt and the
suffix of its ability are added, see ``templates.py``). Other fields (``extra_info``, ...)
are ignored.

A row that cannot be read exactly as written (bad JSON, bytes that are not UTF-8, a missing
field, a wrong type, an unknown ability, code tests that do not parse) is never guessed at: it
is skipped with a warning naming ``file:line``, or it stops the load with a ``ValueError``
naming ``file:line``, as ``DataConfig.on_malformed`` says. For parquet the "line" is the 1-based row number; a
damaged parquet page stops the load with a ``ValueError`` naming the file, row group and column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_prime.config import require_choice, require_positive_int
from megatron_prime.data.render import render_prompt
from megatron_prime.data.templates import Ability, build_prompt_messages
from megatron_prime.rewards.code_verifier import CodeTestCases
from megatron_prime.rewards.registry import ABILITY_KINDS

logger = logging.getLogger(__name__)

OnMalformed = Literal["skip", "error"]
ON_MALFORMED: tuple[str, ...] = ("skip", "error")
SUFFIX_FORMATS: dict[str, str] = {".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where the prompts come from and how strictly they are read."""

    paths: list[str] = field(default_factory=list)  # .jsonl or .parquet files, read in order
    on_malformed: OnMalformed = "error"  # a bad row stops the run unless asked to skip it
    shuffle_seed: int = 1234  # order of prompts in every epoch (see PromptSampler)
    # Prompts longer than this (rendered, in tokens) are dropped: vLLM would refuse them, and
    # a few huge prompts would set the padded length of every batch. None: keep all.
    max_prompt_tokens: int | None = None
    # Render with the tokenizer's chat template when it has one (see render_prompt).
    use_chat_template: bool = True

    def validate(self) -> None:
        if not isinstance(self.paths, list) or not self.paths or not all(isinstance(p, str) for p in self.paths):
            raise ValueError(f"data.paths={self.paths!r} is invalid: expected a non-empty list of file paths")
        require_choice("data.on_malformed", self.on_malformed, ON_MALFORMED)
        if not isinstance(self.shuffle_seed, int) or isinstance(self.shuffle_seed, bool) or self.shuffle_seed < 0:
            raise ValueError(f"data.shuffle_seed={self.shuffle_seed!r} is invalid: expected an integer >= 0")
        if self.max_prompt_tokens is not None:
            require_positive_int("data.max_prompt_tokens", self.max_prompt_tokens)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, ready to render, with what its verifier needs and where it came from."""

    messages: list[dict[str, str]]  # chat messages, ending with the user turn
    ability: Ability  # picks the verifier
    ground_truth: str | dict[str, Any]  # math: the answer; code: test cases (dict or JSON string)
    data_source: str
    index: int  # position in the loaded dataset: 0..N-1 over all files, in load order
    source_file: str
    source_line: int  # 1-based line (jsonl) or row (parquet)


class MalformedRow(ValueError):
    """A row that cannot be read as written; the message says why (without file:line)."""


def parse_row(row: Any) -> tuple[list[dict[str, str]], Ability, str | dict[str, Any], str]:
    """(messages, ability, ground_truth, data_source) of one decoded row, or MalformedRow."""
    if not isinstance(row, dict):
        raise MalformedRow(f"row must be an object, got {type(row).__name__}")
    for key in ("prompt", "ability", "reward_model", "data_source"):
        if key not in row or row[key] is None:
            raise MalformedRow(f"missing field {key!r}")
    ability_value = row["ability"]
    if not isinstance(ability_value, str):
        raise MalformedRow(f"'ability' must be a string, got {type(ability_value).__name__}")
    ability = ABILITY_KINDS.get(ability_value.strip().lower())
    if ability is None:
        raise MalformedRow(f"unknown ability {ability_value!r}; allowed: {sorted(ABILITY_KINDS)}")
    data_source = row["data_source"]
    if not isinstance(data_source, str):
        raise MalformedRow(f"'data_source' must be a string, got {type(data_source).__name__}")
    reward_model = row["reward_model"]
    if not isinstance(reward_model, dict):
        raise MalformedRow(f"'reward_model' must be an object, got {type(reward_model).__name__}")
    if reward_model.get("ground_truth") is None:
        raise MalformedRow("missing field 'reward_model.ground_truth'")
    ground_truth = reward_model["ground_truth"]
    if ability == "math":
        # Numbers are refused rather than str()-ed: 0.1 or 1e3 would not come back as written.
        if not isinstance(ground_truth, str):
            raise MalformedRow(f"'reward_model.ground_truth' of a math row must be a string, "
                               f"got {type(ground_truth).__name__}")
    else:
        if not isinstance(ground_truth, (str, dict)):
            raise MalformedRow(f"'reward_model.ground_truth' of a code row must be a dict or JSON string "
                               f"of test cases, got {type(ground_truth).__name__}")
        try:  # parsed now so a broken test set fails at load, not mid-run in the verifier
            CodeTestCases.parse(ground_truth)
        except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
            raise MalformedRow(f"'reward_model.ground_truth' is not valid code tests: {error}") from None
    try:
        messages = build_prompt_messages(row["prompt"], ability)
    except ValueError as error:
        raise MalformedRow(str(error)) from None
    return messages, ability, ground_truth, data_source


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded row); bad JSON or bytes that are not UTF-8 come back as a
    MalformedRow in place of the row.

    Lines are read as bytes and decoded one at a time: a text-mode file raises a bare
    UnicodeDecodeError from inside the iteration, naming neither the file nor the line."""
    with path.open("rb") as file:
        for line_number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, say) are not rows
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_number, MalformedRow(
                    f"not UTF-8: byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the "
                    "line (expected UTF-8 text; re-encode the file)")
                continue
            try:
                yield line_number, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                yield line_number, MalformedRow(f"bad JSON: {error.msg} at column {error.pos + 1}")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row as Python objects), read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from error
    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends
        raise ValueError(f"{path}: not a readable parquet file: "
                         f"{' '.join(str(error).split())}") from error
    row_number = 0
    for row_group in range(parquet_file.num_row_groups):
        # One row group at a time, decoded before any of its rows is handed out: a damaged
        # data page (OSError, ArrowInvalid) is then reported with the rows it holds.
        try:
            batches = list(parquet_file.iter_batches(batch_size=1024, row_groups=[row_group]))
        except Exception as error:  # pyarrow's errors share no base class but Exception
            num_rows = parquet_file.metadata.row_group(row_group).num_rows
            rows = f"rows {row_number + 1}..{row_number + num_rows}"
            raise ValueError(f"{path}: damaged parquet data in row group {row_group} ({rows})"
                             f"{_damaged_column(parquet_file, row_group)}: "
                             f"{' '.join(str(error).split())}") from error  # one line
        for batch in batches:
            for row in batch.to_pylist():
                row_number += 1
                yield row_number, row


def _damaged_column(parquet_file: Any, row_group: int) -> str:
    """", column 'name'" of the first column of ``row_group`` that cannot be read, or "".

    pyarrow's message ("Corrupt snappy compressed data.") names no column; reading the
    columns one at a time finds it, only on this error path."""
    for name in parquet_file.schema_arrow.names:
        try:
            parquet_file.read_row_group(row_group, columns=[name])
        except Exception:
            return f", column {name!r}"
    return ""


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, decoded row) of a .jsonl or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    file_format = SUFFIX_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise ValueError(f"data file {path} has suffix {path.suffix!r}: expected one of {list(SUFFIX_FORMATS)}")
    return _jsonl_rows(path) if file_format == "jsonl" else _parquet_rows(path)


def load_prompts(config: DataConfig, tokenizer: Any = None) -> list[PromptRecord]:
    """Every usable prompt of ``config.paths``, in file order, indexed 0..N-1.

    Missing files are found before any reading starts. ``tokenizer`` is needed only when
    ``config.max_prompt_tokens`` is set, to measure the rendered prompts.
    """
    config.validate()
    for path in config.paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    if config.max_prompt_tokens is not None and tokenizer is None:
        raise ValueError(f"data.max_prompt_tokens={config.max_prompt_tokens} needs a tokenizer to measure prompts")

    records: list[PromptRecord] = []
    num_skipped = num_too_long = 0
    for path in config.paths:
        for line, row in read_rows(path):
            try:
                if isinstance(row, MalformedRow):
                    raise row
                messages, ability, ground_truth, data_source = parse_row(row)
            except MalformedRow as error:
                if config.on_malformed == "error":
                    raise ValueError(f"{path}:{line}: malformed row: {error}") from None
                logger.warning("skipping malformed row at %s:%d: %s", path, line, error)
                num_skipped += 1
                continue
            if config.max_prompt_tokens is not None:
                rendered = render_prompt(tokenizer, messages, config.use_chat_template)
                if len(rendered.token_ids) > config.max_prompt_tokens:
                    num_too_long += 1
                    continue
            records.append(PromptRecord(messages, ability, ground_truth, data_source, len(records),
                                        str(path), line))
    if num_skipped:
        logger.warning("skipped %d malformed rows in %s", num_skipped, config.paths)
    if num_too_long:
        logger.warning("dropped %d prompts longer than data.max_prompt_tokens=%d",
                       num_too_long, config.max_prompt_tokens)
    if not records:
        raise ValueError(f"no usable prompts in {config.paths} "
                         f"({num_skipped} malformed, {num_too_long} over max_prompt_tokens)")
    return records
