"""Running-sum chains: texts, generator, prompt parsing, and locating the first wrong step
in hand-written (and hostile) responses."""

import re
import time

import pytest

from megatron_prime.data import DataConfig, load_prompts, render_prompt
from megatron_prime.data.templates import MATH_SUFFIX
from megatron_prime.rewards import MathVerifier, MathVerifierConfig
from megatron_prime.toy import (
    Chain,
    build_toy_tokenizer,
    first_wrong_step,
    make_chains,
    make_running_sum_rl_rows,
    make_running_sum_sft_rows,
    parse_chain,
    step_line_spans,
    write_jsonl,
)
from megatron_prime.toy.arithmetic import Problem, needs_carry
from megatron_prime.toy.running_sum import MAX_STEPS, make_rl_rows, make_sft_rows

CHAIN = Chain(47, (8, -5, 13, -9, 6, 7))
RIGHT = "47 + 8 = 55\n55 - 5 = 50\n50 + 13 = 63\n63 - 9 = 54\n54 + 6 = 60\n60 + 7 = 67\n\\boxed{67}"


def test_chain_texts():
    assert CHAIN.values == (55, 50, 63, 54, 60, 67) and CHAIN.answer == 67
    assert CHAIN.prompt == "Start 47. Apply +8, -5, +13, -9, +6, +7." + MATH_SUFFIX
    assert CHAIN.solution == RIGHT
    assert Chain(3, (-5,)).solution == "3 - 5 = -2\n\\boxed{-2}"  # negative values are written plainly


def test_chain_refuses_bad_fields():
    with pytest.raises(ValueError, match=r"Chain.deltas=\(\) is invalid"):
        Chain(1, ())
    with pytest.raises(ValueError, match="Chain.deltas=\\[1\\] is invalid"):
        Chain(1, [1])
    with pytest.raises(ValueError, match="Chain.start='1' is invalid"):
        Chain("1", (1,))


def test_tokens_are_few(tmp_path):
    tokenizer = build_toy_tokenizer()
    ids = tokenizer(CHAIN.solution, add_special_tokens=False)["input_ids"]
    # "47", " + ", "8", " = ", "55", "\n" = 2+1+1+1+2+1 tokens, etc.; "\\boxed{" is one token.
    assert tokenizer.convert_ids_to_tokens(ids[:8]) == ["4", "7", " + ", "8", " = ", "5", "5", "\u010a"]
    assert tokenizer.decode(ids) == CHAIN.solution
    assert len(ids) == 8 + 8 + 9 + 8 + 8 + 8 + 4
    prompt = render_prompt(tokenizer, [{"role": "user", "content": CHAIN.prompt}])
    assert prompt.text == CHAIN.prompt and len(prompt.token_ids) == 1 + 16 + 24 + 1


def test_generator_ranges_and_determinism():
    chains = make_chains(2000, seed=5, num_steps=4)
    assert chains == make_chains(2000, seed=5, num_steps=4)
    assert chains != make_chains(2000, seed=6, num_steps=4)
    assert {c.num_steps for c in chains} == {4}
    values = [v for c in chains for v in (c.start, *c.values)]
    deltas = [d for c in chains for d in c.deltas]
    assert min(values) == 0 and max(values) == 99
    assert {abs(d) for d in deltas} == set(range(1, 20))
    # By default no step carries or borrows in a digit column.
    steps = [Problem(v, "+" if d > 0 else "-", abs(d)) for c in chains
             for v, d in zip((c.start, *c.values), c.deltas)]
    assert not any(map(needs_carry, steps))
    # Both signs are drawn about equally often.
    assert 0.4 < sum(d > 0 for d in deltas) / len(deltas) < 0.6
    mixed = make_chains(600, seed=0, num_steps=(1, 4, 8))
    assert {c.num_steps for c in mixed} == {1, 4, 8}
    small = make_chains(500, seed=1, num_steps=3, max_delta=2, max_value=5, carry=True)
    assert all(0 <= v <= 5 for c in small for v in (c.start, *c.values))
    with_carries = make_chains(500, seed=1, num_steps=4, max_delta=9, carry=True)
    steps = [Problem(v, "+" if d > 0 else "-", abs(d)) for c in with_carries
             for v, d in zip((c.start, *c.values), c.deltas)]
    assert 0.3 < sum(map(needs_carry, steps)) / len(steps) < 0.7  # about 0.45 for one digit
    nines = make_chains(300, seed=1, num_steps=8, max_delta=5, max_value=9)
    assert all(0 <= v <= 9 for c in nines for v in c.values)


def test_generator_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_steps=0 is invalid"):
        make_chains(3, seed=0, num_steps=0)
    with pytest.raises(ValueError, match=rf"num_steps=\[4, {MAX_STEPS + 1}\] is invalid"):
        make_chains(3, seed=0, num_steps=[4, MAX_STEPS + 1])
    with pytest.raises(ValueError, match="max_value=0 is invalid: expected an integer >= 1"):
        make_chains(3, seed=0, num_steps=2, max_value=0, carry=True)
    with pytest.raises(ValueError,
                       match="max_value=50 is invalid: expected 9, 99, 999, ... when carry=False"):
        make_chains(3, seed=0, num_steps=2, max_value=50)
    with pytest.raises(ValueError, match="num=0 is invalid"):
        make_rl_rows(0, seed=0, num_steps=4)


def test_rows():
    rl = make_rl_rows(30, seed=7, num_steps=4)
    sft = make_sft_rows(30, seed=7, num_steps=4)
    for row, chain in zip(rl, make_chains(30, seed=7, num_steps=4)):
        assert row == {"prompt": [{"role": "user", "content": chain.prompt}], "ability": "math",
                       "reward_model": {"ground_truth": str(chain.answer), "style": "rule"},
                       "data_source": "toy_running_sum"}
    # The same seed holds the same chains; the SFT answer is the worked solution.
    assert [r["messages"][0] for r in sft] == [r["prompt"][0] for r in rl]
    for row in sft:
        chain = parse_chain(row["messages"][0]["content"])
        assert row["messages"][1] == {"role": "assistant", "content": chain.solution}
    mixed = make_sft_rows(200, seed=2, num_steps=[1, 8])
    lengths = {len(r["messages"][1]["content"].splitlines()) - 1 for r in mixed}
    assert lengths == {1, 8}
    # The package exports these under task-specific names next to the arithmetic toy's.
    assert make_running_sum_rl_rows is make_rl_rows and make_running_sum_sft_rows is make_sft_rows


def test_rows_load_through_load_prompts(tmp_path):
    path = write_jsonl(make_rl_rows(10, seed=4, num_steps=8), tmp_path / "rl.jsonl")
    records = load_prompts(DataConfig(paths=[str(path)]))
    assert [parse_chain(r.messages[-1]["content"]).answer for r in records] == \
        [int(r.ground_truth) for r in records]
    assert {r.data_source for r in records} == {"toy_running_sum"}


def test_parse_chain_round_trip_and_errors():
    for chain in make_chains(300, seed=9, num_steps=(1, 4, 8)) + [CHAIN, Chain(-3, (0, -12))]:
        assert parse_chain(chain.prompt) == chain
        assert parse_chain(chain.question) == chain  # without the suffix, too
    for bad in ("", "Start 47.", "Start 47. Apply .", "Start 47. Apply 8.", "Start 47. Apply +8",
                "start 47. Apply +8.", "Start 47. Apply +8, -5,." + MATH_SUFFIX, "What is 2 + 3?",
                "Start 47. Apply +8." + MATH_SUFFIX + MATH_SUFFIX, "Start 1" + "0" * 20 + ". Apply +1.",
                "Start 1. Apply " + ", ".join(["+1"] * (MAX_STEPS + 1)) + "."):
        with pytest.raises(ValueError, match="is not a running-sum prompt"):
            parse_chain(bad)
    with pytest.raises(ValueError, match="expected a prompt string, got NoneType"):
        parse_chain(None)


def wrong_line(k: int) -> str:
    """RIGHT with step k's result off by one."""
    lines = RIGHT.split("\n")
    left, result = lines[k].rsplit(" = ", 1)
    lines[k] = f"{left} = {int(result) + 1}"
    return "\n".join(lines)


@pytest.mark.parametrize(("response", "expected"), [
    (RIGHT, None),
    (wrong_line(0), 0),
    (wrong_line(2), 2),
    (wrong_line(5), 5),
    # Step 1 continues correctly from a wrong step 0 ("48 - 5 = 43" is not the chain's line).
    ("47 + 8 = 56\n56 - 5 = 51\n", 0),
    ("47 + 8 = 55\n48 - 5 = 43\n50 + 13 = 63", 1),  # wrong left operand
    ("47 + 8 = 55\n55 + 5 = 50\n50 + 13 = 63", 1),  # wrong operator
    ("47 + 8 = 55\n55 - 6 = 50\n50 + 13 = 63", 1),  # wrong delta
    ("47 + 8 = 55\n55 - 5 = 050", 1),  # a leading zero is another text
    ("47 + 8 = 55\n55 - 5 = 50\n", 2),  # stopped after two lines
    ("47 + 8 = 55\n55 - 5 = 50\n\\boxed{67}", 2),  # boxed early
    ("\\boxed{67}", 0),  # boxed, no lines
    ("", 0),
    ("47 + 8 = 55\n55 - 5 = 50\n50 + 13 = 63 \\boxed{63}", 2),  # the box ends the step lines
    ("47+8=55\n\n  55 -  5 = 50\n\n50 + 13 = 63\r\n63 - 9 = 54\n54 + 6 = 60\n60 + 7 = 67", None),
    (RIGHT.replace("\\boxed{67}", "\\boxed{68}"), None),  # steps right, answer wrong: reward says so
    (RIGHT + "\n70 + 1 = 71\n\\boxed{71}", None),  # lines after the last step are not steps
    ("47 + 8 = 55 55 - 5 = 50", 0),  # two steps on one line
    ("We add.\n47 + 8 = 55", 0),  # a line of prose is a (malformed) step line
    ("\x00\ufffd}{\\boxed\n\n\n", 0),
    ("47 + 8 = " + "5" * 100_000, 0),  # huge number: compared as text, never parsed
])
def test_first_wrong_step(response, expected):
    assert first_wrong_step(CHAIN, response) == expected


def test_first_wrong_step_takes_any_input_in_bounded_time():
    assert first_wrong_step(CHAIN, None) == 0
    assert first_wrong_step(Chain(1, (1,)), "1 + 1 = 2") is None
    assert first_wrong_step(Chain(1, (1,)), "1 + 1 = 2\n" * 1000) is None
    many = CHAIN.solution.replace("\\boxed{67}", "") * 200_000  # ~14 MB, 1.2M lines
    huge_line = "9" * 5_000_000
    start = time.perf_counter()
    assert first_wrong_step(CHAIN, many) is None  # the first six lines are the chain's
    assert first_wrong_step(CHAIN, huge_line) == 0
    assert len(step_line_spans(many)) == MAX_STEPS
    assert step_line_spans(huge_line) == [(0, 5_000_000)]
    assert time.perf_counter() - start < 2.0


def test_step_line_spans():
    spans = step_line_spans(RIGHT)
    assert [RIGHT[a:b] for a, b in spans] == RIGHT.split("\n")[:-1]
    assert spans[0] == (0, 11) and spans[1] == (12, 23)
    text = "\n  47 + 8 = 55  \n\n55 - 5 = 50\n\\boxed{50}\n60 + 7 = 67"
    assert [text[a:b] for a, b in step_line_spans(text)] == ["47 + 8 = 55", "55 - 5 = 50"]
    for no_steps in ("\\boxed{3}", "", "  \n ", None):
        assert step_line_spans(no_steps) == []
    # Spans follow the response's own characters (no normalisation shifts them).
    text = "é + 1 = x\n12 - 3 = 9"
    assert [text[a:b] for a, b in step_line_spans(text)] == ["é + 1 = x", "12 - 3 = 9"]


def test_verifier_scores_solutions():
    chains = make_chains(20, seed=2, num_steps=(1, 4, 8))
    truths = [str(c.answer) for c in chains]
    wrong = [re.sub(r"\\boxed\{(\d+)\}", lambda m: f"\\boxed{{{int(m.group(1)) + 1}}}", c.solution)
             for c in chains]
    with MathVerifier(MathVerifierConfig(timeout_s=5.0)) as verifier:
        assert verifier.score_batch([c.solution for c in chains], truths) == [1.0] * 20
        assert verifier.score_batch(wrong, truths) == [0.0] * 20
