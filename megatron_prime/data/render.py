"""Chat messages -> prompt text and token ids, through a ``transformers`` tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PLAIN_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    token_ids: list[int]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], use_chat_template: bool = True) -> RenderedPrompt:
    """The prompt as the policy sees it, ready for generation.

    With ``use_chat_template`` and a tokenizer that has a chat template, the template renders
    the messages with the generation prompt (the assistant header) appended; its text already
    holds whatever BOS token the template wants, so it is encoded without adding special
    tokens again. Otherwise (no template, as for a tokenizer trained in-repo) the contents are
    joined with a blank line -- "system\\n\\nuser" -- and encoded with the tokenizer's usual
    special tokens; a model SFT'd on the same plain format then sees the same layout.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = PLAIN_SEPARATOR.join(message["content"] for message in messages)
        token_ids = tokenizer(text)["input_ids"]
    return RenderedPrompt(text, list(token_ids))
