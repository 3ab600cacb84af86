"""The Eurus-2 prompt text, exactly, and how a row's ``prompt`` becomes chat messages."""

import pytest

from megatron_prime.data import ACTIONS, CODE_SUFFIX, MATH_SUFFIX, SYSTEM_PROMPT, build_prompt_messages


def test_math_suffix_is_eurus_text():
    assert MATH_SUFFIX == "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
    assert len(MATH_SUFFIX) == 57
    assert MATH_SUFFIX.endswith("\\boxed{Your answer}")  # one literal backslash


def test_code_suffix_text():
    assert CODE_SUFFIX == ("\n\nWrite Python code that solves the problem. Present the code at the end, "
                           "in a block of this form:\n```python\nYour code\n```")


def test_system_prompt_names_seven_actions_and_the_step_format():
    assert ACTIONS == ("ASSESS", "ADVANCE", "VERIFY", "SIMPLIFY", "SYNTHESIZE", "PIVOT", "OUTPUT")
    lines = SYSTEM_PROMPT.splitlines()
    assert [line.split("]")[0] + "]" for line in lines[2:9]] == [f"[{a}]" for a in ACTIONS]
    assert SYSTEM_PROMPT.endswith("[ACTION NAME]\n\n# what you do in this step\n# ...\n\nNext action: [NEXT ACTION NAME]\n")
    assert SYSTEM_PROMPT == (
        "You solve hard reasoning problems one step at a time. Every step is one of seven actions; "
        "pick the one that moves the solution forward:\n\n"
        "[ASSESS] take stock of the problem: what is given, what is asked, what is still unknown.\n"
        "[ADVANCE] carry the solution one step further: compute, derive or draw a conclusion.\n"
        "[VERIFY] check the latest steps for mistakes and confirm what holds.\n"
        "[SIMPLIFY] split a hard step into smaller, easier parts.\n"
        "[SYNTHESIZE] combine the results found so far into a larger conclusion.\n"
        "[PIVOT] drop an approach that is not working and choose another.\n"
        "[OUTPUT] state the final answer, clearly and completely.\n\n"
        "Write every step in exactly this format:\n\n"
        "[ACTION NAME]\n\n# what you do in this step\n# ...\n\nNext action: [NEXT ACTION NAME]\n"
    )


def test_plain_string_prompt_gets_system_prompt_and_suffix():
    assert build_prompt_messages("What is 1+1?", "math") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is 1+1?\n\nPresent the answer in LaTex format: \\boxed{Your answer}"},
    ]
    code = build_prompt_messages("Print 3.", "code")
    assert code[1]["content"] == "Print 3." + CODE_SUFFIX


def test_chat_prompt_is_used_as_written():
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert build_prompt_messages(chat, "math") == chat
    assert build_prompt_messages([{"role": "user", "content": "Q", "extra": 1}], "code") == [
        {"role": "user", "content": "Q"}]


@pytest.mark.parametrize("prompt, problem", [
    ("", "'prompt' is an empty string"),
    (7, "'prompt' must be a string or a list of {role, content} messages, got int"),
    ([], "'prompt' is an empty message list"),
    (["hi"], "'prompt'[0] must be a {role, content} object, got str"),
    ([{"role": "bot", "content": "Q"}], "'prompt'[0].role='bot' is invalid: expected one of ['system', 'user', 'assistant']"),
    ([{"role": "user", "content": None}], "'prompt'[0].content must be a string, got NoneType"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
     "'prompt' must end with a user message, ends with role 'assistant'"),
])
def test_bad_prompts_say_what_is_wrong(prompt, problem):
    with pytest.raises(ValueError) as error:
        build_prompt_messages(prompt, "math")
    assert str(error.value) == problem


def test_unknown_ability_for_a_bare_question():
    with pytest.raises(ValueError, match=r"ability='poetry' is invalid: expected one of \['math', 'code'\]"):
        build_prompt_messages("Q", "poetry")
