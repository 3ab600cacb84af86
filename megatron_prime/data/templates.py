"""Eurus-2 style prompts: the action-format system prompt and the math/code suffixes.

PRIME starts from an SFT model that learned to reason in seven tagged actions; the RL prompts
must ask for the same format, and must ask for the answer in the form the verifiers read
(``\\boxed{}`` for math, the last ```python block for code). The wording of the system prompt
is our own; the math suffix is Eurus-2-RL-Data's exact text, because the answer extraction
and the SFT data both rely on it.
"""

from __future__ import annotations

from typing import Any, Literal

Ability = Literal["math", "code"]
ABILITIES: tuple[str, ...] = ("math", "code")
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")

ACTIONS: tuple[str, ...] = ("ASSESS", "ADVANCE", "VERIFY", "SIMPLIFY", "SYNTHESIZE", "PIVOT", "OUTPUT")

SYSTEM_PROMPT = """\
You solve hard reasoning problems one step at a time. Every step is one of seven actions; \
pick the one that moves the solution forward:

[ASSESS] take stock of the problem: what is given, what is asked, what is still unknown.
[ADVANCE] carry the solution one step further: compute, derive or draw a conclusion.
[VERIFY] check the latest steps for mistakes and confirm what holds.
[SIMPLIFY] split a hard step into smaller, easier parts.
[SYNTHESIZE] combine the results found so far into a larger conclusion.
[PIVOT] drop an approach that is not working and choose another.
[OUTPUT] state the final answer, clearly and completely.

Write every step in exactly this format:

[ACTION NAME]

# what you do in this step
# ...

Next action: [NEXT ACTION NAME]
"""

# Eurus-2-RL-Data's exact wording ("LaTex" included): the math verifier reads the last \boxed{}.
MATH_SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
# The code verifier runs the response's last ```python block.
CODE_SUFFIX = (
    "\n\nWrite Python code that solves the problem. Present the code at the end, "
    "in a block of this form:\n```python\nYour code\n```"
)
SUFFIXES: dict[str, str] = {"math": MATH_SUFFIX, "code": CODE_SUFFIX}


def question_messages(question: str, ability: Ability) -> list[dict[str, str]]:
    """[system, user] for a bare question: our system prompt, the question plus its suffix."""
    if ability not in SUFFIXES:
        raise ValueError(f"ability={ability!r} is invalid: expected one of {list(ABILITIES)}")
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question + SUFFIXES[ability]},
    ]


def build_prompt_messages(prompt: Any, ability: Ability) -> list[dict[str, str]]:
    """The chat messages of one dataset row's ``prompt`` field.

    A plain string is a bare question: it gets the system prompt and the suffix of its
    ability. A chat list is used as written, because Eurus-2-RL-Data rows already carry the
    system prompt and the suffix, and adding them again would change what the model sees
    from what the data's authors trained on. A chat list is checked (roles, string contents,
    ends with a user turn) so that a broken row fails here instead of rendering garbage.
    ValueError says what is wrong.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("'prompt' is an empty string")
        return question_messages(prompt, ability)
    if not isinstance(prompt, list):
        raise ValueError(f"'prompt' must be a string or a list of {{role, content}} messages, "
                         f"got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("'prompt' is an empty message list")
    messages = []
    for position, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise ValueError(f"'prompt'[{position}] must be a {{role, content}} object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"'prompt'[{position}].role={role!r} is invalid: expected one of {list(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"'prompt'[{position}].content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise ValueError(f"'prompt' must end with a user message, ends with role {messages[-1]['role']!r}")
    return messages
