"""megatron_prime/evaluate.py and tools/eval.py: benchmark loading, prompt rendering, the
metrics (pass@k, majority vote, best-of-N), the implicit-PRM scores, and end-to-end runs on
the toy model with the real vLLM CPU engine."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest
import torch

from megatron_prime.data.render import render_prompt
from megatron_prime.data.templates import MATH_SUFFIX, SYSTEM_PROMPT
from megatron_prime.evaluate import (
    ImplicitPRM,
    best_of_n,
    load_benchmark,
    main,
    majority_vote,
    pass_at_k,
    problem_messages,
)
from megatron_prime.rewards import MathVerifier, extract_last_boxed
from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
from megatron_prime.toy.model import write_toy_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "eval" / "math_sample.jsonl"

# For each row of math_sample.jsonl: an equivalent form of its answer, and a wrong one.
EQUIVALENT_AND_WRONG = [
    ("\\frac{10}{12}", "\\frac{2}{3}"),
    ("\\sqrt{18}", "3\\sqrt{3}"),
    ("x \\in [1, 3]", "(1,3)"),
    ("(2, +\\infty)", "[2,\\infty)"),
    ("3, -3", "3"),
    ("\\frac{1}{\\sqrt{2}}", "\\sqrt{2}"),
    ("\\frac{6}{36}", "\\frac{1}{12}"),
    ("\\sqrt{8}", "4\\sqrt{2}"),
]


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """(policy = reference, PRM) toy HF folders: two random inits of the same architecture."""
    root = tmp_path_factory.mktemp("toy_models")
    return write_toy_model(root / "policy", num_layers=2), write_toy_model(root / "prm", seed=1, num_layers=2)


@pytest.fixture(scope="module")
def toy_tokenizer(toy_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(toy_models[0]))


# ---- verifier and prompts on the sample benchmark ----

def test_sample_rows_score_with_the_verifier():
    problems = load_benchmark(SAMPLE)
    assert len(problems) == len(EQUIVALENT_AND_WRONG)
    assert {p.benchmark for p in problems} == {"math_sample"}
    responses, golds = [], []
    for problem, (right, wrong) in zip(problems, EQUIVALENT_AND_WRONG):
        responses += [f"[OUTPUT]\n\nSo the answer is \\boxed{{{right}}}.", f"[OUTPUT]\n\n\\boxed{{{wrong}}}"]
        golds += [problem.answer, problem.answer]
    with MathVerifier() as verifier:
        scores = verifier.score_batch(responses, golds)
    assert scores == [1.0, 0.0] * len(problems)


def test_rendered_prompt_is_the_trainers_eurus2_text(toy_tokenizer):
    problem = load_benchmark(SAMPLE)[0]
    user = ("Simplify $\\frac{12}{18} + \\frac{1}{6}$.\n\n"
            "Present the answer in LaTex format: \\boxed{Your answer}")
    # The toy tokenizer has no chat template: render_prompt joins the turns with a blank line.
    assert render_prompt(toy_tokenizer, problem_messages(problem.question, False)).text == user
    text = render_prompt(toy_tokenizer, problem_messages(problem.question, True)).text
    assert text.startswith("You solve hard reasoning problems one step at a time.")
    assert text == SYSTEM_PROMPT + "\n\n" + user


# ---- metrics ----

def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(float(1 - Fraction(comb(7, 5), comb(10, 5))))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_groups_equivalent_answers():
    def same_value(a, b):
        return Fraction(a) == Fraction(b)

    # 1/2 and 2/4 form the largest group; its first member (index 1) represents it.
    assert majority_vote(["3", "1/2", None, "2/4", "3/1", "1/2"], same_value) == 1
    # Tie 1:1 between "3" and "5": the group seen first wins.
    assert majority_vote(["5", "3"], same_value) == 0
    assert majority_vote([None, None], same_value) is None


def test_best_of_n_picks_the_highest_score_and_breaks_ties_by_order():
    assert best_of_n([0.1, 0.7, -2.0, 0.7]) == 1
    assert best_of_n([0.0, 0.0, 0.0]) == 0


# ---- implicit PRM ----

def _independent_scores(prm_folder, ref_folder, prompt, responses, beta):
    """sum_t and min_t of beta * (log pi_prm - log pi_ref) over each response, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(str(f), dtype=torch.float32).eval() for f in (prm_folder, ref_folder)]
    sums, mins = [], []
    for response in responses:
        ids = torch.tensor([prompt + response])
        per_model = []
        for model in models:
            with torch.no_grad():
                log_probs = torch.log_softmax(model(ids).logits[0].double(), -1)
            per_model.append(torch.stack([log_probs[len(prompt) + t - 1, token] for t, token in enumerate(response)]))
        rewards = beta * (per_model[0] - per_model[1])
        sums.append(rewards.sum().item())
        mins.append(rewards.min().item())
    return sums, mins


def test_prm_equal_to_reference_scores_zero_and_picks_the_first(toy_models, toy_tokenizer):
    policy, _ = toy_models
    prompt = toy_tokenizer("What is 12 + 34?" + MATH_SUFFIX)["input_ids"]
    responses = [toy_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("\\boxed{46}", "\\boxed{47} 1")]
    scores = ImplicitPRM(policy, policy, beta=0.05).score(prompt, responses)
    assert scores == [0.0, 0.0]
    assert best_of_n(scores) == 0


@pytest.mark.parametrize("aggregate", ["sum", "min"])
def test_prm_scores_match_an_independent_computation(toy_models, toy_tokenizer, aggregate):
    policy, prm_folder = toy_models
    prompt = toy_tokenizer("What is 12 + 34?" + MATH_SUFFIX)["input_ids"]
    texts = ["[OUTPUT]\n\n\\boxed{46}", "\\boxed{47}", "12 + 34 = 46"]
    responses = [toy_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(r) for r in responses}) > 1  # the batch is padded
    beta = 0.5
    prm = ImplicitPRM(prm_folder, policy, beta=beta, aggregate=aggregate, batch_size=2)
    scores = prm.score(prompt, responses)
    sums, mins = _independent_scores(prm_folder, policy, prompt, responses, beta)
    expected = sums if aggregate == "sum" else mins
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 4) for s in expected)) == len(expected)  # no tie: the PRM prefers one
    assert best_of_n(scores) == max(range(len(expected)), key=expected.__getitem__)


# ---- bad inputs ----

def _run_main(capsys, args):
    status = main(args)
    return status, capsys.readouterr().err


def test_bad_benchmark_files_exit_2_and_write_nothing(toy_models, tmp_path, capsys):
    policy, _ = toy_models
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    typo = tmp_path / "typo.jsonl"
    typo.write_text('{"question": "1+1?", "anwser": "2"}\n')
    cases = [
        (tmp_path / "missing.jsonl", "benchmark file not found: " + str(tmp_path / "missing.jsonl")),
        (empty, f"{empty}: empty benchmark file"),
        (no_answer, f"{no_answer}:2: row has no 'answer'"),
        (typo, f"{typo}:1: unknown columns ['anwser']"),
    ]
    for path, message in cases:
        status, err = _run_main(capsys, ["--model", str(policy), "--benchmarks", str(SAMPLE), str(path),
                                         "--out-dir", str(out)])
        assert status == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # The console script's exit status, through tools/eval.py.
    done = subprocess.run([sys.executable, "tools/eval.py", "--model", str(policy), "--benchmarks",
                           str(tmp_path / "missing.jsonl"), "--out-dir", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "benchmark file not found" in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--beta", "inf"], "--beta=inf is invalid: expected a finite number"),
    (["--beta", "nan"], "--beta=nan is invalid: expected a finite number"),
    (["--beta", "0"], "--beta=0.0 is invalid: expected > 0"),
    (["--temperature", "inf"], "--temperature=inf is invalid: expected a finite number"),
    (["--top-p", "1.5"], "--top-p=1.5 is invalid: expected 0 < top-p <= 1"),
])
def test_non_finite_or_out_of_range_flags_exit_2_and_write_nothing(toy_models, tmp_path, capsys,
                                                                   flags, message):
    policy, prm = toy_models
    out = tmp_path / "out"
    status, err = _run_main(capsys, ["--model", str(policy), "--benchmarks", str(SAMPLE),
                                     "--out-dir", str(out), "--n", "2", "--prm", str(prm),
                                     "--reference", str(policy), *flags])
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# ---- end to end on the toy model (real vLLM CPU engine) ----

def _toy_benchmark(path: Path, num: int, seed: int) -> Path:
    rows = []
    for row in make_rl_rows(num, seed=seed):
        question = row["prompt"][-1]["content"].removesuffix(MATH_SUFFIX)
        rows.append({"question": question, "answer": row["reward_model"]["ground_truth"]})
    return write_jsonl(rows, path)


def _eval(*runs):
    """Runs tools/eval.py once per argument list, one after the other (each starts its own
    engine); the stdout of each."""
    outputs = []
    for args in runs:
        done = subprocess.run([sys.executable, "tools/eval.py", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    return outputs


def _outputs(out_dir: Path):
    return [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_greedy_eval_end_to_end_is_scored_and_reproducible(toy_models, tmp_path):
    policy, _ = toy_models
    first = _toy_benchmark(tmp_path / "toy_add.jsonl", 4, seed=1)
    second = _toy_benchmark(tmp_path / "toy_more.jsonl", 3, seed=2)
    common = ["--model", policy, "--benchmarks", first, second, "--no-system-prompt",
              "--max-new-tokens", 24, "--verifier-workers", 1]
    stdout, _ = _eval([*common, "--out-dir", tmp_path / "run1"], [*common, "--out-dir", tmp_path / "run2"])

    result = json.loads((tmp_path / "run1" / "results.json").read_text())
    records = _outputs(tmp_path / "run1")
    assert result["columns"] == ["pass@1"] and result["problems"] == {"toy_add": 4, "toy_more": 3}
    # Reference computation: re-score the saved responses with the verifier.
    with MathVerifier() as verifier:
        rescored = {name: [verifier.score(r["responses"][0], r["answer"]) for r in records
                           if r["benchmark"] == name] for name in ("toy_add", "toy_more")}
    for name, scores in rescored.items():
        assert result["benchmarks"][name]["pass@1"] == pytest.approx(100 * sum(scores) / len(scores))
    for record in records:
        assert len(record["responses"]) == 1
        assert record["extracted_answers"] == [extract_last_boxed(record["responses"][0]) or None]
        assert record["prompt"] == record["question"] + MATH_SUFFIX
    average = sum(result["benchmarks"][n]["pass@1"] for n in rescored) / 2
    assert result["average"]["pass@1"] == pytest.approx(average)
    table = (tmp_path / "run1" / "results.md").read_text()
    assert table.splitlines()[0] == "| benchmark | policy |" and "| average |" in table and table in stdout
    # Greedy decoding is reproducible across runs (fresh engines).
    assert [r["responses"] for r in records] == [r["responses"] for r in _outputs(tmp_path / "run2")]


@pytest.mark.slow
def test_sampled_eval_with_prm_best_of_n(toy_models, tmp_path):
    policy, prm_folder = toy_models
    bench = _toy_benchmark(tmp_path / "toy_add.jsonl", 2, seed=3)
    out = tmp_path / "bon"
    _eval(["--model", policy, "--benchmarks", bench, "--no-system-prompt", "--max-new-tokens", 12,
           "--ks", "1,2,4", "--temperature", 1.0, "--prm", prm_folder, "--reference", policy,
           "--beta", 0.5, "--verifier-workers", 1, "--out-dir", out])
    result = json.loads((out / "results.json").read_text())
    assert result["n"] == 4 and result["mode"] == "sampling"
    assert result["columns"] == ["pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4", "bon@1", "bon@2", "bon@4"]
    for record in _outputs(out):
        assert len(record["responses"]) == 4 and len(record["prm_scores"]) == 4
        for k in (1, 2, 4):
            assert record["choices"][f"bon@{k}"] == best_of_n(record["prm_scores"][:k])
        assert record["choices"]["bon@1"] == 0
    # Samples differ (temperature 1, a distinct seed per sample).
    assert any(len(set(r["responses"])) > 1 for r in _outputs(out))
