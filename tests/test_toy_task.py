"""The default job's toy task: tokenizer, arithmetic data and the tiny Qwen2 folder.

Qwen2 logits of Megatron vs transformers are covered by test_parallel_parity.py (same
architecture, same mapping); here the toy model's config is checked to be one that path
and vLLM's CPU attention accept.
"""

import json
import re

import pytest
import torch

from megatron_prime.data import DataConfig, load_prompts, render_prompt
from megatron_prime.data.templates import ACTIONS, MATH_SUFFIX
from megatron_prime.models.architectures import ModelShape
from megatron_prime.rewards import MathVerifier, MathVerifierConfig
from megatron_prime.toy import (
    Problem,
    build_toy_tokenizer,
    make_problems,
    make_rl_rows,
    make_sft_rows,
    sft_response,
    write_jsonl,
    write_toy_model,
)
from megatron_prime.toy.arithmetic import needs_carry

MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS = 32, 48
# Every kind of problem the generator makes: default (+, no carry), with carries, with "-".
VARIANTS = {"default": {}, "carry": {"carry": True}, "both_ops": {"operations": ("+", "-"), "carry": True}}
# Longest response (with EOS): 34 tokens for 2-digit operands and answer; a 3-digit answer
# (only with carries) is written twice, 36.
MAX_RESPONSE_LENGTH = {"default": 34, "carry": 36, "both_ops": 36}


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy") / "tokenizer"
    build_toy_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return write_toy_model(tmp_path_factory.mktemp("toy") / "model")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder)


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(MathVerifierConfig(timeout_s=5.0)) as math_verifier:
        yield math_verifier


# ---- tokenizer ----

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompts_and_responses_round_trip_exactly_and_are_short(tokenizer, variant):
    rows = make_sft_rows(300, seed=3, **VARIANTS[variant])
    prompt_lengths, response_lengths = [], []
    for row in rows:
        user, answer = row["messages"]
        prompt = render_prompt(tokenizer, [user])
        assert prompt.text == user["content"]
        assert prompt.token_ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(prompt.token_ids, skip_special_tokens=True) == prompt.text
        response_ids = tokenizer(answer["content"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(response_ids) == answer["content"]
        prompt_lengths.append(len(prompt.token_ids))
        response_lengths.append(len(response_ids) + 1)  # + EOS
    # <bos>, "What is ", 2 digits, " + ", 2 digits, "?", the suffix
    assert max(prompt_lengths) == 9 < MAX_PROMPT_TOKENS
    assert max(response_lengths) == MAX_RESPONSE_LENGTH[variant] < MAX_RESPONSE_TOKENS


def test_known_token_ids(tokenizer):
    # The first 256 ids are the bytes: digits are single tokens (ids = their ASCII codes).
    assert [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"] == list(range(48, 58))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    assert tokenizer.eos_token == "<|endoftext|>"
    for action in ACTIONS:
        assert len(tokenizer(f"[{action}]", add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer("[ASSESS]", add_special_tokens=False)["input_ids"] == [260]  # 259: the suffix
    for phrase in ("Next action: ", "\\boxed{", "\n\n", MATH_SUFFIX):
        assert len(tokenizer(phrase, add_special_tokens=False)["input_ids"]) == 1, phrase
    ids = tokenizer("What is 23 + 34?" + MATH_SUFFIX)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|bos|>", "What is ", "2", "3", " + ", "3", "4", "?", MATH_SUFFIX]
    assert tokenizer.chat_template is None


def test_any_text_round_trips(tokenizer):
    text = "Ünïcödé, emoji 😀, tabs\tand CRLF\r\n, [ASSESS] inside words: x[OUTPUT]y \\boxed{-3.5}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_loads_the_same_alone_and_from_the_model_folder(tokenizer, model_folder):
    """transformers 5 loads a qwen2 folder's tokenizer with its Qwen2Tokenizer class, which
    rebuilds parts of it; the toy tokenizer is built so that this changes nothing."""
    from transformers import AutoTokenizer

    from_model = AutoTokenizer.from_pretrained(model_folder)
    config = json.loads((model_folder / "config.json").read_text())
    assert len(from_model) == len(tokenizer) == config["vocab_size"] == 278
    assert from_model.get_vocab() == tokenizer.get_vocab()
    text = sft_response(Problem(47, "+", 38))
    assert from_model(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (from_model.bos_token_id, from_model.eos_token_id, from_model.pad_token_id) == (256, 257, 258)
    saved = json.loads((model_folder / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((model_folder / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"


# ---- arithmetic data ----

def test_sft_response_text():
    assert sft_response(Problem(23, "+", 34)) == (
        "[ASSESS]\n\nWe add 23 and 34.\n\nNext action: [ADVANCE]\n\n[ADVANCE]\n\n23 + 34 = 57"
        "\n\nNext action: [OUTPUT]\n\n[OUTPUT]\n\n\\boxed{57}")
    assert sft_response(Problem(52, "-", 17)) == (
        "[ASSESS]\n\nWe subtract 17 from 52.\n\nNext action: [ADVANCE]\n\n[ADVANCE]\n\n52 - 17 = 35"
        "\n\nNext action: [OUTPUT]\n\n[OUTPUT]\n\n\\boxed{35}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ground_truths_are_correct(variant):
    rows = make_rl_rows(500, seed=11, **VARIANTS[variant])
    operations = set()
    for row in rows:
        assert row["ability"] == "math" and row["data_source"] == "toy_arithmetic"
        assert row["reward_model"]["style"] == "rule"
        [message] = row["prompt"]
        assert message["role"] == "user" and message["content"].endswith(MATH_SUFFIX)
        left, operation, right = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?",
                                              message["content"][:-len(MATH_SUFFIX)]).groups()
        left, right = int(left), int(right)
        assert 0 <= left <= 99 and 0 <= right <= 99
        expected = left + right if operation == "+" else left - right
        assert row["reward_model"]["ground_truth"] == str(expected) and expected >= 0
        if not VARIANTS[variant].get("carry"):  # no digit column reaches 10
            assert left % 10 + right % 10 <= 9 and left // 10 + right // 10 <= 9
        operations.add(operation)
    assert operations == set(VARIANTS[variant].get("operations", ("+",)))


def test_carry_detection():
    assert not needs_carry(Problem(23, "+", 34))
    assert needs_carry(Problem(27, "+", 34))  # 7 + 4
    assert needs_carry(Problem(72, "+", 34))  # 7 + 3 in the tens
    assert not needs_carry(Problem(57, "-", 34))
    assert needs_carry(Problem(52, "-", 17))  # borrow: 2 < 7
    with_carries = make_problems(1000, seed=0, carry=True)
    assert 0.4 < sum(map(needs_carry, with_carries)) / 1000 < 0.8  # about 1 - 0.55^2 = 0.70


def test_seeds_are_deterministic():
    assert make_rl_rows(50, seed=7) == make_rl_rows(50, seed=7)
    assert make_sft_rows(50, seed=7) == make_sft_rows(50, seed=7)
    assert make_rl_rows(50, seed=7) != make_rl_rows(50, seed=8)
    assert make_problems(3, seed=0) == make_problems(3, seed=0)
    # SFT and RL rows of one seed hold the same problems.
    assert [r["messages"][0] for r in make_sft_rows(20, 5)] == [r["prompt"][0] for r in make_rl_rows(20, 5)]


def test_bad_generator_arguments_are_refused():
    with pytest.raises(ValueError, match=r"operations=\('\*',\) is invalid"):
        make_problems(5, seed=0, operations=("*",))
    with pytest.raises(ValueError, match="num=0 is invalid"):
        make_rl_rows(0, seed=0)


def test_verifier_scores_the_sft_response(verifier):
    problems = make_problems(20, seed=2, operations=("+", "-"), carry=True)
    truths = [str(p.answer) for p in problems]
    right = [sft_response(p) for p in problems]
    wrong = [sft_response(Problem(p.left, p.operation, p.right + 1)) for p in problems]
    assert verifier.score_batch(right, truths) == [1.0] * 20
    assert verifier.score_batch(wrong, truths) == [0.0] * 20


def test_rows_load_through_load_prompts(tmp_path):
    rows = make_rl_rows(40, seed=4)
    path = write_jsonl(rows, tmp_path / "nested" / "rl.jsonl")
    assert len(path.read_text().splitlines()) == 40
    records = load_prompts(DataConfig(paths=[str(path)]))
    assert len(records) == 40
    for index, (record, row) in enumerate(zip(records, rows)):
        assert record.messages == row["prompt"]  # no system prompt is added to a chat list
        assert record.ability == "math" and record.data_source == "toy_arithmetic"
        assert record.ground_truth == row["reward_model"]["ground_truth"]
        assert (record.index, record.source_line) == (index, index + 1)


# ---- model folder ----

def test_model_folder(model_folder, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    names = sorted(p.name for p in model_folder.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((model_folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)
    shape = ModelShape.from_hf(config)
    # 32 is one of vLLM's CPU attention head sizes (rollout/engine.py checks at start-up).
    assert (shape.hidden_size, shape.num_layers, shape.head_dim, shape.num_query_groups) == (128, 4, 32, 2)
    assert shape.vocab_size == 278 and shape.max_position_embeddings == 256
    assert GenerationConfig.from_pretrained(model_folder).eos_token_id == 257

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 859_776
    # Same seed, same weights; another seed, other weights.
    again = AutoModelForCausalLM.from_pretrained(write_toy_model(tmp_path / "again"), dtype=torch.float32)
    other = AutoModelForCausalLM.from_pretrained(write_toy_model(tmp_path / "other", seed=1),
                                                 dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[name], again.state_dict()[name])
    assert not torch.equal(model.state_dict()[name], other.state_dict()[name])


def test_existing_model_folder_is_refused(model_folder):
    before = (model_folder / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        write_toy_model(model_folder, seed=5)
    assert (model_folder / "model.safetensors").read_bytes() == before


def test_head_size_must_divide(tmp_path):
    with pytest.raises(ValueError, match="hidden_size=100 is invalid"):
        write_toy_model(tmp_path / "bad", hidden_size=100, num_attention_heads=3)
    assert not (tmp_path / "bad").exists()
