"""megatron-prime-eval --processbench: the implicit PRM's first-error predictions on
step-labelled rows, end to end with two tiny toy models against predictions computed by hand
from the same models' log-probs; ProcessBench's metrics on hand numbers; bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_prime.data.render import render_prompt
from megatron_prime.evaluate import load_processbench, main, problem_messages, processbench_metrics
from megatron_prime.toy.model import write_toy_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "eval" / "processbench_sample.jsonl"
TINY = dict(hidden_size=64, num_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("processbench_models")
    return write_toy_model(root / "prm", seed=3, **TINY), write_toy_model(root / "ref", seed=0, **TINY)


def test_metrics_on_hand_numbers():
    labels = [-1, -1, 1, 2, 0, 3]
    predicted = [-1, 2, 1, 0, -1, 5]
    metrics = processbench_metrics(labels, predicted)
    # Correct samples: 1 of 2 predicted -1. Erroneous: 1 of 4 exact (label 1).
    assert metrics["accuracy_correct"] == 50.0 and metrics["accuracy_erroneous"] == 25.0
    assert metrics["f1"] == pytest.approx(2 * 25 * 50 / 75)
    assert metrics["erroneous_predicted"] == {"exact": 25.0, "earlier": 25.0, "later": 25.0, "no_error": 25.0}
    assert (metrics["samples"], metrics["erroneous_samples"], metrics["correct_samples"]) == (6, 4, 2)
    only_errors = processbench_metrics([0, 1], [0, 0])
    assert only_errors["accuracy_correct"] is None and only_errors["f1"] is None
    assert processbench_metrics([-1, 0], [0, -1])["f1"] == 0.0


def test_step_spans_follow_a_tokenizer_that_normalises_text():
    from megatron_prime.evaluate import StepLabelledSample
    from megatron_prime.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()  # NFC: "e" + combining acute comes back as one "é"
    sample = StepLabelledSample("x", "p", ["cafe\u0301 = 1", "1 + 1 = 2"], -1)
    assert sample.response == "cafe\u0301 = 1\n\n1 + 1 = 2"
    decoded = tokenizer.decode(tokenizer(sample.response, add_special_tokens=False)["input_ids"])
    assert decoded == "caf\u00e9 = 1\n\n1 + 1 = 2"
    assert sample.step_spans(tokenizer, decoded) == [(0, 8), (10, 19)]
    plain = StepLabelledSample("y", "p", ["a", "b = 2"], 0)
    assert plain.step_spans(tokenizer, plain.response) == [(0, 1), (3, 8)]
    with pytest.raises(ValueError, match="step 1 is not in the tokenizer's decoding of the response"):
        plain.step_spans(tokenizer, "a\n\nb = 3")


def hand_predictions(prm_folder, ref_folder, beta):
    """Per sample row: (step rewards, predicted first error), computed one sequence at a time
    in float64, tokens assigned to steps from the tokenizer's own character offsets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ref_folder))
    models = [AutoModelForCausalLM.from_pretrained(str(f), dtype=torch.float32).eval() for f in (prm_folder, ref_folder)]
    out = []
    for line in SAMPLE.read_text().splitlines():
        row = json.loads(line)
        prompt = render_prompt(tokenizer, problem_messages(row["problem"], True)).token_ids
        response = "\n\n".join(row["steps"])
        encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([prompt + encoded["input_ids"]])
        log_probs = []
        for model in models:
            with torch.no_grad():
                table = torch.log_softmax(model(ids).logits[0].double(), -1)
            log_probs.append([table[len(prompt) + t - 1, token].item() for t, token in enumerate(encoded["input_ids"])])
        bounds, start = [], 0
        for step in row["steps"]:
            bounds.append((start, start + len(step)))
            start += len(step) + 2
        sums = [0.0] * len(row["steps"])
        for (a, b), prm_lp, ref_lp in zip(encoded["offset_mapping"], *log_probs):
            overlaps = [min(b, end) - max(a, begin) for begin, end in bounds]
            if max(overlaps) > 0:
                sums[overlaps.index(max(overlaps))] += beta * (prm_lp - ref_lp)
        cumulative = [sum(sums[:k + 1]) for k in range(len(sums))]
        lowest = min(cumulative)
        out.append((sums, cumulative.index(lowest) if lowest < 0 else -1))
    return out


def test_processbench_end_to_end_matches_hand_predictions(tiny_models, tmp_path, capsys):
    prm, ref = tiny_models
    beta = 0.5
    out = tmp_path / "pb"
    assert main(["--processbench", str(SAMPLE), "--prm", str(prm), "--reference", str(ref),
                 "--beta", str(beta), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    expected = hand_predictions(prm, ref, beta)
    assert len(records) == len(expected) == 8
    for record, (sums, predicted) in zip(records, expected):
        assert record["step_rewards"] == pytest.approx(sums, abs=1e-4)
        assert record["predicted"] == predicted, record["id"]
    predictions = [p for _, p in expected]
    assert len(set(predictions)) > 1, predictions  # the models tell samples apart
    labels = [row.label for row in load_processbench(SAMPLE)]
    result = json.loads((out / "results.json").read_text())
    hand = processbench_metrics(labels, predictions)
    assert result["accuracy_erroneous"] == hand["accuracy_erroneous"]
    assert result["accuracy_correct"] == hand["accuracy_correct"] and result["f1"] == hand["f1"]
    assert "| processbench_sample | 8 |" in printed and printed == (out / "results.md").read_text()
    # The threshold rule reads the same step rewards: first step below 0.
    out2 = tmp_path / "pb_threshold"
    assert main(["--processbench", str(SAMPLE), "--prm", str(prm), "--reference", str(ref), "--beta", str(beta),
                 "--locate", "threshold", "--out-dir", str(out2)]) == 0
    records = [json.loads(line) for line in (out2 / "outputs.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in records] == [next((i for i, v in enumerate(s) if v < 0), -1) for s, _ in expected]


def test_prm_equal_to_reference_predicts_no_error_anywhere(tiny_models, tmp_path):
    _, ref = tiny_models
    out = tmp_path / "same"
    assert main(["--processbench", str(SAMPLE), "--prm", str(ref), "--reference", str(ref), "--out-dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    # 3 correct samples all right, 5 erroneous all missed ("no error").
    assert result["accuracy_correct"] == 100.0 and result["accuracy_erroneous"] == 0.0 and result["f1"] == 0.0
    assert result["erroneous_predicted"]["no_error"] == 100.0


GOOD = {"id": "a", "problem": "1 + 1?", "steps": ["1 + 1 = 2", "\\boxed{2}"], "label": -1}


@pytest.mark.parametrize("row, message", [
    ({"id": "b", "problem": "2 + 2?", "label": 0}, "'steps' must be a non-empty list of non-empty strings"),
    ({**GOOD, "steps": []}, "'steps' must be a non-empty list of non-empty strings"),
    ({**GOOD, "label": 2}, "'label'=2 is invalid: expected -1 (all steps right) or the index of the first "
                           "wrong step, 0..1"),
    ({**GOOD, "label": -2}, "'label'=-2 is invalid"),
    ({**GOOD, "label": True}, "'label'=True is invalid"),
    ({**GOOD, "problem": ""}, "row has no 'problem' text"),
    ({**GOOD, "lable": 0}, "unknown columns ['lable']"),
    ('{"id": "c", ', ""),
])
def test_malformed_rows_name_file_and_line_and_write_nothing(tiny_models, tmp_path, capsys, row, message):
    prm, ref = tiny_models
    data = tmp_path / "pb.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    out = tmp_path / "out"
    assert main(["--processbench", str(data), "--prm", str(prm), "--reference", str(ref), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"megatron-prime-eval: error: {data}:2: {message}" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--model", "x"], "--processbench scores a PRM, not a policy: leave out --model and --benchmarks"),
    (["--locate", "threshold", "--threshold", "nan"], "--threshold=nan is invalid: expected a finite number"),
])
def test_processbench_flag_errors(tiny_models, tmp_path, capsys, extra, message):
    prm, ref = tiny_models
    out = tmp_path / "out"
    assert main(["--processbench", str(SAMPLE), "--prm", str(prm), "--reference", str(ref), "--out-dir", str(out),
                 *extra]) == 2
    assert capsys.readouterr().err.strip() == f"megatron-prime-eval: error: {message}"
    assert not out.exists()
    assert main(["--processbench", str(SAMPLE), "--out-dir", str(out)]) == 2
    assert "--processbench needs --prm and --reference" in capsys.readouterr().err
    assert main(["--processbench", str(tmp_path / "no.jsonl"), "--prm", str(prm), "--reference", str(ref),
                 "--out-dir", str(out)]) == 2
    assert f"--processbench {tmp_path / 'no.jsonl'}: file not found" in capsys.readouterr().err
