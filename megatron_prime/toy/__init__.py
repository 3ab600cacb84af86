"""The toy tasks of the default job, an in-repo tokenizer and a tiny random Qwen2, all made
on the spot (no downloads): arithmetic in the Eurus-2 action format (``arithmetic``), and
running-sum chains whose first wrong step is known (``running_sum``; its row makers are
exported as ``make_running_sum_rl_rows``/``make_running_sum_sft_rows``)."""

from megatron_prime.toy.arithmetic import (
    Problem,
    make_problems,
    make_rl_rows,
    make_sft_rows,
    sft_response,
    write_jsonl,
)
from megatron_prime.toy.model import write_toy_model
from megatron_prime.toy.running_sum import (
    Chain,
    first_wrong_step,
    make_chains,
    parse_chain,
    step_line_spans,
)
from megatron_prime.toy.running_sum import make_rl_rows as make_running_sum_rl_rows
from megatron_prime.toy.running_sum import make_sft_rows as make_running_sum_sft_rows
from megatron_prime.toy.tokenizer import build_toy_tokenizer

__all__ = [
    "Chain",
    "Problem",
    "build_toy_tokenizer",
    "first_wrong_step",
    "make_chains",
    "make_problems",
    "make_rl_rows",
    "make_running_sum_rl_rows",
    "make_running_sum_sft_rows",
    "make_sft_rows",
    "parse_chain",
    "sft_response",
    "step_line_spans",
    "write_jsonl",
    "write_toy_model",
]
