"""Supervised fine-tuning: the model PRIME starts from (policy, PRM and reference alike).

    python -m megatron_prime.sft CONFIG.yaml key=value ...     (or megatron-prime-sft)
    torchrun --nproc-per-node 4 -m megatron_prime.sft model=runs/toy/model data=[sft.jsonl] \\
        parallel.tensor_parallel_size=2

One example is a chat whose last turn is the assistant's answer. It is tokenised as the
prompt exactly as the RL rollouts will see it (``render_prompt`` of the turns before the
answer: the chat template when the tokenizer has one, else the turns joined by a blank
line) + the answer's tokens + EOS; the loss is the NLL of the answer tokens and the EOS,
so the model learns to stop where the RL verifier will read its answer. Each global batch
is drawn from a seeded per-epoch shuffle and split over the data-parallel ranks; the loss is
normalised once by the global count of answer tokens (models/schedule.py).

At the end the model is written as an HF folder (config.json, safetensors, the source's
tokenizer and generation files) through the same mapping as the checkpoint converter.
Every input is checked before anything starts: a missing model folder or data file, a
malformed row (``file:line``) or an existing output stops the run with nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_prime import distributed
from megatron_prime.checkpoint.convert import export_hf_folder
from megatron_prime.checkpoint.hf_io import HFCheckpoint
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.checkpoint.model_checkpoint import (
    MANIFEST,
    hf_config_of,
    load_model_checkpoint,
    read_manifest,
    refuse_existing_output,
)
from megatron_prime.config import (
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    load_config,
    require,
    require_choice,
    require_positive_int,
)
from megatron_prime.data.dataset import ON_MALFORMED, MalformedRow, read_rows
from megatron_prime.data.render import render_prompt
from megatron_prime.data.sampler import epoch_permutation
from megatron_prime.data.templates import build_prompt_messages
from megatron_prime.models.architectures import ModelShape, padded_sequence_length
from megatron_prime.models.builder import BuiltModel, build_model
from megatron_prime.models.optimizer import (
    build_optimizer,
    sequence_nll_loss,
    train_step,
)
from megatron_prime.models.schedule import TokenBatch

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    """One SFT run; keys are written ``sft.<key>`` in errors."""

    # HF model folder, or a megatron_prime model checkpoint folder (megatron_prime.json).
    model: str = ""
    # .jsonl / .parquet files of rows {"messages": [...chat..., {"role": "assistant", ...}]};
    # the loss is on the last (assistant) turn only.
    data: list[str] = field(default_factory=list)
    # HF folder written at the end; an existing one is refused unless ``overwrite``.
    output: str = "runs/sft/hf"
    overwrite: bool = False
    steps: int = 200  # optimizer steps
    global_batch_size: int = 32  # examples per step, over all data-parallel ranks
    micro_batch_size: int = 8  # examples per forward/backward on one rank
    seed: int = 0  # data order (and the RNG when this run initialises distributed)
    on_malformed: str = "error"  # "skip": a malformed row is reported with file:line, and skipped
    # Render prompts with the tokenizer's chat template when it has one (as the rollouts must).
    use_chat_template: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3))
    log_every: int = 10  # steps between log lines (the first and last step are always logged)

    def validate(self) -> None:
        require(isinstance(self.model, str) and bool(self.model), "sft.model", self.model,
                "the path of an HF model folder or a megatron_prime checkpoint")
        require(isinstance(self.data, list) and bool(self.data)
                and all(isinstance(p, str) and p for p in self.data),
                "sft.data", self.data, "a non-empty list of .jsonl/.parquet file paths")
        require(isinstance(self.output, str) and bool(self.output), "sft.output", self.output,
                "a folder path")
        for key in ("steps", "global_batch_size", "micro_batch_size", "log_every"):
            require_positive_int(f"sft.{key}", getattr(self, key))
        require(self.global_batch_size % self.micro_batch_size == 0, "sft.global_batch_size",
                self.global_batch_size,
                f"a multiple of sft.micro_batch_size={self.micro_batch_size}")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                "sft.seed", self.seed, "an integer >= 0")
        require_choice("sft.on_malformed", self.on_malformed, ON_MALFORMED)
        self.parallel.validate()
        self.precision.validate()
        self.optimizer.validate("sft.optimizer")


# ---- the model to start from ----

@dataclass
class ModelSource:
    """Where the starting weights, config and tokenizer come from."""

    path: Path
    hf_config: dict[str, Any]
    side_files: list[Path]  # tokenizer and generation files, carried into the output
    hf_checkpoint: HFCheckpoint | None  # None: a megatron_prime (Megatron) checkpoint

    @classmethod
    def open(cls, path: str | Path) -> ModelSource:
        """Checks the folder (config, weights present and well-formed) without loading it."""
        path = Path(path)
        if (path / MANIFEST).is_file():
            read_manifest(path)
            return cls(path, hf_config_of(path), sorted((path / "hf").iterdir()), None)
        if (path / "config.json").is_file():
            hf = HFCheckpoint.open(path)
            return cls(path, hf.config, hf.side_files(), hf)
        raise FileNotFoundError(f"sft.model={str(path)!r}: neither an HF model folder (no config.json) "
                                f"nor a megatron_prime checkpoint (no {MANIFEST})")

    @property
    def tokenizer_folder(self) -> Path:
        return self.path if self.hf_checkpoint is not None else self.path / "hf"

    def load_into(self, model: BuiltModel) -> None:
        if self.hf_checkpoint is not None:
            load_hf_weights(model, self.hf_checkpoint.tensor)
        else:
            load_model_checkpoint(model, self.path)


# ---- data ----

@dataclass(frozen=True)
class SFTExample:
    token_ids: list[int]  # prompt + answer + EOS
    num_prompt_tokens: int
    source: str  # file:line


def parse_sft_row(row: Any) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, answer) of one decoded row, or MalformedRow saying why."""
    if not isinstance(row, dict):
        raise MalformedRow(f"row must be an object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise MalformedRow("'messages' must be a list of at least two {role, content} messages: "
                           "the prompt, then the assistant's answer")
    answer = messages[-1]
    if not isinstance(answer, dict) or answer.get("role") != "assistant":
        role = answer.get("role") if isinstance(answer, dict) else None
        raise MalformedRow(f"the last message must be the assistant's answer, got role {role!r}")
    if not isinstance(answer.get("content"), str) or not answer["content"]:
        raise MalformedRow("the last message's content must be a non-empty string")
    try:
        # The same checks as an RL prompt (roles, string contents, ends with a user turn);
        # the ability argument only matters for plain-string prompts, never for a chat list.
        prompt = build_prompt_messages(messages[:-1], "math")
    except ValueError as error:
        raise MalformedRow(f"the turns before the answer are not a valid prompt: {error}") from None
    return prompt, answer["content"]


def tokenize_example(tokenizer: Any, prompt: list[dict[str, str]], answer: str,
                     use_chat_template: bool) -> tuple[list[int], int]:
    """(prompt + answer + EOS token ids, number of prompt tokens)."""
    prompt_ids = render_prompt(tokenizer, prompt, use_chat_template).token_ids
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + list(answer_ids) + [tokenizer.eos_token_id], len(prompt_ids)


def load_sft_examples(paths: Sequence[str], tokenizer: Any, max_tokens: int, on_malformed: str,
                      use_chat_template: bool = True) -> list[SFTExample]:
    """Every usable example of ``paths``, in file order. A malformed row, or one longer than
    ``max_tokens`` (the model's context), stops the load or is skipped with a warning."""
    examples: list[SFTExample] = []
    num_skipped = 0
    for path in paths:
        for line, row in read_rows(path):
            try:
                if isinstance(row, MalformedRow):
                    raise row
                prompt, answer = parse_sft_row(row)
                token_ids, num_prompt_tokens = tokenize_example(tokenizer, prompt, answer,
                                                                use_chat_template)
                if len(token_ids) > max_tokens:
                    raise MalformedRow(f"{len(token_ids)} tokens, longer than the model's "
                                       f"max_position_embeddings={max_tokens}")
            except MalformedRow as error:
                if on_malformed == "error":
                    raise ValueError(f"{path}:{line}: malformed row: {error}") from None
                logger.warning("skipping malformed row at %s:%d: %s", path, line, error)
                num_skipped += 1
                continue
            examples.append(SFTExample(token_ids, num_prompt_tokens, f"{path}:{line}"))
    if num_skipped:
        logger.warning("skipped %d malformed rows in %s", num_skipped, list(paths))
    if not examples:
        raise ValueError(f"sft.data={list(paths)!r} holds no usable example ({num_skipped} malformed)")
    return examples


def global_batches(num_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Example indices of each global batch: epochs of a seeded shuffle, back to back."""
    pending: list[int] = []
    epoch = 0
    while True:
        while len(pending) < batch_size:
            pending += epoch_permutation(num_examples, seed, epoch)
            epoch += 1
        yield pending[:batch_size]
        pending = pending[batch_size:]


def sft_batch(examples: Sequence[SFTExample], pad_token_id: int, length_multiple: int = 1) -> TokenBatch:
    """Right-padded rows, ``length_multiple`` tokens at a time (the model's
    ``sequence_length_multiple``: FP8, sequence parallelism); the loss mask covers the answer
    and its EOS."""
    length = padded_sequence_length(max(len(e.token_ids) for e in examples), length_multiple)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(len(examples), length)
    for row, example in enumerate(examples):
        input_ids[row, :len(example.token_ids)] = torch.tensor(example.token_ids)
        response_mask[row, example.num_prompt_tokens:len(example.token_ids)] = 1
    return TokenBatch(input_ids, response_mask)


# ---- the run ----

def _prepare(config: SFTConfig) -> tuple[ModelSource, Any, list[SFTExample]]:
    """Everything that can be refused before a process group starts or a byte is written."""
    config.validate()
    source = ModelSource.open(config.model)
    shape = ModelShape.from_hf(source.hf_config)
    shape.check_layout(config.parallel)
    for path in config.data:
        if not Path(path).is_file():
            raise FileNotFoundError(f"sft.data: file not found: {path}")
    refuse_existing_output(config.output, config.overwrite)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_folder)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{source.tokenizer_folder}: the tokenizer has no EOS token; SFT teaches "
                         "the model to stop with it")
    examples = load_sft_examples(config.data, tokenizer, shape.max_position_embeddings,
                                 config.on_malformed, config.use_chat_template)
    return source, tokenizer, examples


def run_sft(config: SFTConfig) -> dict[str, float]:
    """Fine-tunes ``config.model`` on ``config.data`` and writes ``config.output``. Collective.

    Initialises distributed (``config.parallel``, ``config.seed``) unless the caller did, and
    leaves it initialised for a caller that continues (the default job runs PRIME next).
    Returns the global mean answer-token NLL of the first and the last step.
    """
    source, tokenizer, examples = _prepare(config)
    if not distributed.is_initialized():
        distributed.init_distributed(config.parallel, seed=config.seed)
    elif distributed.runtime().parallel != config.parallel:
        raise ValueError(f"sft.parallel={config.parallel} differs from the layout distributed was "
                         f"initialised with ({distributed.runtime().parallel})")
    dp_size, dp_rank = distributed.dp_world_size(), distributed.dp_rank()
    require(config.global_batch_size % (config.micro_batch_size * dp_size) == 0,
            "sft.global_batch_size", config.global_batch_size,
            f"a multiple of sft.micro_batch_size x data-parallel size = "
            f"{config.micro_batch_size} x {dp_size}")
    is_logger = dist.get_rank() == 0

    # Initialised (then overwritten by the load) although that costs time: Megatron marks
    # tensor-parallel weights (``tensor_model_parallel``) only while initialising them, and
    # without the mark the gradient norm counts only TP rank 0's shards, so clipping is wrong.
    model = build_model(source.hf_config, "policy", config.parallel, config.precision,
                        use_distributed_optimizer=config.optimizer.use_distributed_optimizer)
    source.load_into(model)
    optimizer = build_optimizer(model, config.optimizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if is_logger:
        print(f"sft: {len(examples)} examples from {config.data}, {config.steps} steps of "
              f"{config.global_batch_size} (DP={dp_size}), start {config.model}", flush=True)

    rows_per_rank = config.global_batch_size // dp_size
    batches = global_batches(len(examples), config.global_batch_size, config.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        indices = next(batches)[dp_rank * rows_per_rank:(dp_rank + 1) * rows_per_rank]
        batch = sft_batch([examples[i] for i in indices], pad_token_id, model.sequence_length_multiple)
        result = train_step(model, optimizer, batch, config.micro_batch_size, sequence_nll_loss)
        losses.append(result.metrics["loss"])
        if is_logger and (step % config.log_every == 0 or step in (1, config.steps)):
            skipped = "" if result.update_successful else f"  update skipped: {result.skip_reason}"
            print(f"sft step {step:5d}/{config.steps}  loss {result.metrics['loss']:.4f}  "
                  f"grad_norm {result.grad_norm:.3f}  answer tokens "
                  f"{int(result.metrics['num_units'])}  {time.perf_counter() - start:.1f}s{skipped}",
                  flush=True)
    train_seconds = time.perf_counter() - start

    export_hf_folder(model, config.output, source.hf_config, source.side_files,
                     model.config.params_dtype, overwrite=config.overwrite)
    if is_logger:
        print(f"sft: wrote {config.output}", flush=True)
    return {"loss_first": losses[0], "loss_last": losses[-1], "train_seconds": train_seconds}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Supervised fine-tuning into an HF folder "
                                                 "(the model PRIME starts from)")
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="an optional YAML config first, then dotted key=value overrides")
    args = parser.parse_args(argv).args
    config_path = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if config_path is not None else args
    try:
        config = load_config(SFTConfig, config_path, overrides)
        result = run_sft(config)
        if dist.get_rank() == 0:
            print(f"sft result: {json.dumps(result)}", flush=True)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:
        # Bad input: one line naming the problem, no traceback; nothing was written.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if distributed.is_initialized():
            distributed.destroy_distributed()


if __name__ == "__main__":
    main()
