"""Prompt rendering through a transformers tokenizer, with and without a chat template."""

import json

import pytest

from megatron_prime.data import DataConfig, load_prompts, render_prompt

VOCAB = {"<unk>": 0, "<s>": 1, "<|system|>": 2, "<|user|>": 3, "<|assistant|>": 4,
         "S": 5, "What": 6, "is": 7, "2": 8, "+": 9, "?": 10}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+2?"}]


def tiny_tokenizer(chat_template=None):
    """Word-level tokenizer with a known vocabulary, and a BOS added by its post-processor
    (as Llama's is), so a doubled BOS would show in the ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", unk_token="<unk>",
                                   additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    fast.chat_template = chat_template
    return fast


def test_chat_template_renders_with_generation_prompt_and_one_bos():
    rendered = render_prompt(tiny_tokenizer(TEMPLATE), MESSAGES, use_chat_template=True)
    assert rendered.text == "<s><|system|> S <|user|> What is 2+2? <|assistant|>"
    assert rendered.token_ids == [1, 2, 5, 3, 6, 7, 8, 9, 8, 10, 4]


def test_plain_concatenation_without_a_template():
    rendered = render_prompt(tiny_tokenizer(), MESSAGES, use_chat_template=True)
    assert rendered.text == "S\n\nWhat is 2+2?"
    assert rendered.token_ids == [1, 5, 6, 7, 8, 9, 8, 10]


def test_template_can_be_turned_off():
    rendered = render_prompt(tiny_tokenizer(TEMPLATE), MESSAGES, use_chat_template=False)
    assert rendered.text == "S\n\nWhat is 2+2?"
    assert rendered.token_ids == [1, 5, 6, 7, 8, 9, 8, 10]


def test_saved_and_reloaded_tokenizer_renders_the_same(tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer(TEMPLATE).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert render_prompt(reloaded, MESSAGES).token_ids == [1, 2, 5, 3, 6, 7, 8, 9, 8, 10, 4]


def row(question):
    return {"prompt": [{"role": "user", "content": question}], "ability": "math",
            "reward_model": {"ground_truth": "4", "style": "rule"}, "data_source": "math"}


def test_max_prompt_tokens_drops_long_prompts(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    # Plain rendering: BOS + words; "What is 2+2?" is 1 + 6 tokens, "What is 2+2? 2+2?" is 1 + 9.
    path.write_text("\n".join(json.dumps(row(q)) for q in ["What is 2+2?", "What is 2+2? 2+2?", "2"]) + "\n")
    config = DataConfig(paths=[str(path)], max_prompt_tokens=7, use_chat_template=False)
    records = load_prompts(config, tokenizer=tiny_tokenizer())
    assert [(r.index, r.source_line) for r in records] == [(0, 1), (1, 3)]
    assert caplog.messages == ["dropped 1 prompts longer than data.max_prompt_tokens=7"]
    with pytest.raises(ValueError) as error:
        load_prompts(config)
    assert str(error.value) == "data.max_prompt_tokens=7 needs a tokenizer to measure prompts"
