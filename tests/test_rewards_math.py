"""Math verifier: last-\\boxed{} extraction, a table of answer pairs, and time limits."""

import signal
import threading
import time
from pathlib import Path

import pytest

from megatron_prime.rewards import MathVerifier, MathVerifierConfig, extract_last_boxed
from megatron_prime.rewards.math_verifier import AnswerTimeout, time_limit


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(MathVerifierConfig(timeout_s=2.0, workers=2)) as math_verifier:
        yield math_verifier


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is \\boxed{42}.", "42"),
        ("first \\boxed{1} then corrected: \\boxed{2}", "2"),  # the last box wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\left\\{ x \\mid x^{2} > 1 \\right\\}}", "\\left\\{ x \\mid x^{2} > 1 \\right\\}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("$\\boxed {7}$", "7"),
        ("so $\\boxed 5$.", "5"),  # TeX one-token argument
        ("\\fbox{x=3}", "x=3"),
        ("no box here: 42", None),
        ("truncated \\boxed{\\frac{1}{2", None),
        ("\\boxed{}", ""),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


# (boxed answer, ground truth, equivalent?) -- the ground truth is written as in the datasets.
ANSWER_TABLE = [
    # plain and LaTeX numbers
    ("42", "42", True),
    ("42.0", "42", True),
    ("-7", "-7", True),
    ("- 7", "-7", True),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("\\frac12", "0.5", True),
    ("\\frac{1}{2}", "\\frac12", True),
    ("1/2", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac{3}{4}", "\\frac{3}{4}", True),
    ("1\\frac{1}{2}", "\\frac{3}{2}", True),  # mixed number
    ("0.3333333", "\\frac{1}{3}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("2^{10}", "1024", True),
    ("\\pi", "\\pi", True),
    ("(x+1)^2", "x^2+2x+1", True),
    # equations vs values
    ("x=3", "3", True),
    ("3", "x = 3", True),
    ("y = 2x + 1", "2x+1", True),
    # intervals and sets
    ("(1, 2]", "(1,2]", True),
    ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("\\{1,2,3\\}", "1,2,3", True),
    ("\\{3, 2, 1\\}", "\\{1,2,3\\}", True),
    # units, degrees, percent, dollars, text
    ("5\\text{ cm}", "5", True),
    ("5 \\mathrm{cm}", "5", True),
    ("90^\\circ", "90", True),
    ("10\\%", "0.1", True),
    ("\\$5", "5", True),
    ("3\\text{ inches}", "3", True),
    ("\\text{(A)}", "A", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    # wrong answers that look close
    ("[1, 2)", "(1,2)", False),
    ("(1, 2)", "[1,2]", False),
    ("0.333", "\\frac{1}{3}", False),
    ("3.14", "\\pi", False),
    ("2.0001", "2", False),
    ("21", "12", False),
    ("-3", "3", False),
    ("\\frac{1}{3}", "\\frac{1}{2}", False),
    ("\\sqrt{3}", "3", False),
    ("x=4", "3", False),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("60^\\circ", "\\frac{\\pi}{3}", False),
    ("(x-1)^2", "x^2+2x+1", False),
    ("\\text{B}", "A", False),
    ("", "0", False),
]


def test_answer_table_is_large_enough():
    assert len(ANSWER_TABLE) >= 40
    assert sum(1 for *_, equal in ANSWER_TABLE if not equal) >= 12


@pytest.mark.parametrize("answer,ground_truth,equal", ANSWER_TABLE)
def test_answer_table(verifier, answer, ground_truth, equal):
    response = f"[OUTPUT] Therefore the final answer is $\\boxed{{{answer}}}$."
    assert verifier.score(response, ground_truth) == (1.0 if equal else 0.0)


def test_score_needs_a_box_and_uses_the_last_one(verifier):
    assert verifier.score("The answer is 0.5", "\\frac12") == 0.0
    assert verifier.score("\\boxed{0.5} wait, no: \\boxed{0.25}", "\\frac12") == 0.0
    assert verifier.score("\\boxed{0.25} wait, no: \\boxed{0.5}", "\\frac12") == 1.0
    assert verifier.score("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}") == 1.0  # boxed ground truth


def test_batch_matches_single_scores(verifier):
    responses = [f"\\boxed{{{answer}}}" for answer, _, _ in ANSWER_TABLE]
    truths = [truth for _, truth, _ in ANSWER_TABLE]
    expected = [1.0 if equal else 0.0 for *_, equal in ANSWER_TABLE]
    assert verifier.score_batch(responses, truths) == expected


def test_a_check_stuck_in_c_code_is_killed_and_the_verifier_recovers():
    """sympy evaluating 10^(10^(10^10)) sits in C code where SIGALRM cannot interrupt it;
    the worker process is killed at timeout + grace, the answer scores 0, work goes on."""
    with MathVerifier(MathVerifierConfig(timeout_s=0.5, kill_grace_s=0.5)) as slow:
        started = time.monotonic()
        assert slow.score("\\boxed{1}", "10^{10^{10^{10}}}") == 0.0
        assert time.monotonic() - started < 5.0
        assert slow.score("\\boxed{\\frac12}", "0.5") == 1.0


def test_scoring_works_from_a_thread(verifier):
    scores = []
    thread = threading.Thread(target=lambda: scores.append(verifier.score("\\boxed{2}", "2")))
    thread.start()
    thread.join()
    assert scores == [1.0]


def test_time_limit_interrupts_python_and_restores_an_outer_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with pytest.raises(AnswerTimeout):
            with time_limit(0.05):
                while True:
                    pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0  # the outer timer is re-armed with its remaining time
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="timeout_s=0"):
        MathVerifierConfig(timeout_s=0)
    with pytest.raises(ValueError, match="workers=0"):
        MathVerifierConfig(workers=0)


def test_checker_process_survives_slurm_preemption_signal():
    """The trainer saves on SIGUSR1 and still scores the step it is in; its checkers must
    outlive the signal SLURM sends to every process of the job step."""
    import signal
    import time

    from megatron_prime.rewards.math_verifier import _Worker

    worker = _Worker()
    try:
        request = {"gold": "4", "timeout_s": 5.0, "kill_grace_s": 1.0, "float_rounding": 6, "max_answer_chars": 64}
        assert worker.check({**request, "response": "\\boxed{4}"}, 60.0) is True  # up and answering
        worker.process.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        assert worker.process.poll() is None
        assert worker.check({**request, "response": "\\boxed{5}"}, 60.0) is False
    finally:
        worker.close()


EXAMPLE_CONFIG = str(Path(__file__).parents[1] / "examples" / "eurus2_7b_prime.yaml")
# The adversarial probe's answer: a 5 MB box that never closes. On the old code scanning it
# took 2.7 s in the caller's thread, outside any limit, and the whole check 11.9 s against
# a 5 + 1 s limit.
HUGE_BOX = "[OUTPUT] \\boxed{" + "\\{" * 2_500_000
# sympy evaluating it sits in C code, where only killing the check stops it.
TOWER = "\\boxed{10^{10^{10^{10}}}}"


def test_a_5mb_box_is_checked_within_the_time_limit():
    config = MathVerifierConfig(timeout_s=1.0, kill_grace_s=0.5, workers=1)
    with MathVerifier(config) as verifier:
        verifier.score("\\boxed{3}", "3")  # start the worker
        started = time.monotonic()
        assert verifier.score(HUGE_BOX, "3") == 0.0
        assert time.monotonic() - started < config.timeout_s + 2.0
        # a right answer after a huge box of text is still found and checked
        assert verifier.score("x" * 5_000_000 + "\\boxed{3}", "3") == 1.0


def test_an_answer_longer_than_the_cap_scores_zero_unparsed():
    sum_of_ten_ones = "\\boxed{" + "+".join(["1"] * 10) + "}"  # a 19-character answer equal to 10
    with MathVerifier(MathVerifierConfig(max_answer_chars=18, workers=1)) as capped:
        assert capped.score(sum_of_ten_ones, "10") == 0.0
        assert not capped.is_equivalent("+".join(["1"] * 10), "10")
    with MathVerifier(MathVerifierConfig(max_answer_chars=19, workers=1)) as roomy:
        assert roomy.score(sum_of_ten_ones, "10") == 1.0


def test_pathological_answers_run_side_by_side_and_spare_their_neighbours():
    """Four answers stuck in C code and four honest ones, on rewards.math.workers=4
    workers: the batch costs about one time limit, not four (old code, one worker: ~4 x 6 s),
    and the honest answers queued behind them score 1.0 (old code, 4 workers: they went to
    freshly started workers still importing sympy, missed their limit and scored 0)."""
    from megatron_prime.config import load_config
    from megatron_prime.rewards import RewardRegistry
    from megatron_prime.train import PrimeConfig

    overrides = ["rewards.math.workers=4", "rewards.math.timeout_s=1.5", "rewards.math.kill_grace_s=0.5"]
    rewards = load_config(PrimeConfig, EXAMPLE_CONFIG, overrides).rewards
    config = rewards.math
    registry = RewardRegistry(config=rewards)
    with registry.math:
        responses = [TOWER] * 4 + ["\\boxed{\\frac12}", "\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2/4}"]
        batch = dict(ground_truths=["0.5"] * 8, abilities=["math"] * 8, data_sources=[None] * 8)
        assert registry.score_batch(responses[4:], **{k: v[4:] for k, v in batch.items()}) == [1.0] * 4  # start
        started = time.monotonic()
        assert registry.score_batch(responses, **batch) == [0.0] * 4 + [1.0] * 4
        elapsed = time.monotonic() - started
    one_limit = config.timeout_s + config.kill_grace_s
    assert elapsed < one_limit + 2.5, f"{elapsed:.1f} s for a batch of 4 pathological answers"
    assert registry.last_failures == []


def test_rewards_math_config_sizes_the_pool_and_names_its_keys():
    from megatron_prime.config import load_config
    from megatron_prime.rewards import RewardRegistry
    from megatron_prime.train import PrimeConfig

    import os

    rewards = load_config(PrimeConfig, EXAMPLE_CONFIG, ["rewards.math.workers=3"]).rewards
    assert RewardRegistry(config=rewards).math.config.pool_size == 3
    with pytest.raises(ValueError, match=r"rewards\.math\.workers=0"):
        load_config(PrimeConfig, EXAMPLE_CONFIG, ["rewards.math.workers=0"])
    # Left open: half the cores this process may use, 1 to 16.
    default = load_config(PrimeConfig, EXAMPLE_CONFIG, []).rewards.math
    assert default.workers is None
    assert default.pool_size == max(1, min(16, len(os.sched_getaffinity(0)) // 2))
    # The old key is gone, named as unknown rather than ignored.
    with pytest.raises((ValueError, KeyError), match="num_workers"):
        load_config(PrimeConfig, EXAMPLE_CONFIG, ["rewards.math.num_workers=3"])


@pytest.mark.parametrize(
    "answer,ground_truth",
    [
        ("３", "3"),  # full-width
        ("٣", "3"),  # Arabic-Indic
        ("३", "3"),  # Devanagari
        ("𝟑", "3"),  # mathematical bold
        ("１２", "12"),
        ("3", "３"),  # a ground truth written in full-width digits
        ("\\frac{１}{２}", "0.5"),
        ("x²", "x^2"),  # NFKC alone would make this x2
        ("10⁻³", "0.001"),
        ("x\u00a0=\u30003", "3"),  # no-break and ideographic spaces
        ("\\frac{1}{2}\u2003", "0.5"),  # em space
    ],
)
def test_unicode_digits_and_spaces_are_normalised(verifier, answer, ground_truth):
    assert verifier.score(f"\\boxed{{{answer}}}", ground_truth) == 1.0


@pytest.mark.parametrize("answer,ground_truth", [("٤", "3"), ("x²", "x2"), ("x²", "2x"), ("３３", "3")])
def test_unicode_normalisation_keeps_wrong_answers_wrong(verifier, answer, ground_truth):
    assert verifier.score(f"\\boxed{{{answer}}}", ground_truth) == 0.0


def test_checks_run_in_a_child_the_kernel_kills_first_under_memory_pressure():
    import subprocess

    from megatron_prime.rewards.math_verifier import _Worker

    worker = _Worker()
    try:
        request = {"gold": "4", "timeout_s": 5.0, "kill_grace_s": 1.0, "float_rounding": 6, "max_answer_chars": 64}
        assert worker.check({**request, "response": "\\boxed{4}"}, 60.0) is True
        children = subprocess.run(["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True)
        (child,) = children.stdout.split()
        assert open(f"/proc/{child}/oom_score_adj").read().strip() == "1000"
    finally:
        worker.close()


def test_registry_scores_parts_submitted_apart_in_the_order_gathered():
    """The rollout submits each prompt's responses as vLLM finishes them and gathers all in
    prompt order (rollout/collect.py): parts submitted apart score as one batch would."""
    from megatron_prime.rewards import RewardRegistry

    with MathVerifier(MathVerifierConfig(workers=2)) as verifier:
        registry = RewardRegistry(math=verifier)
        first = registry.submit([r"\boxed{2}", r"\boxed{5}"], ["2", "2"], ["math"] * 2, [None] * 2)
        second = registry.submit([r"\boxed{3}"], ["3"], [None], ["numina_amc_aime"])
        assert registry.gather(second + first) == [1.0, 1.0, 0.0]
        assert registry.last_failures == []
        with pytest.raises(ValueError, match="unknown ability 'poetry'"):
            registry.submit(["x"], ["1"], ["poetry"], [None])
