"""megatron_prime/credit.py: per-token implicit rewards against a hand computation, tokens
mapped to steps (multi-byte characters and hostile ids), step sums, the first-error rules on
hand numbers, the heatmap's pixels, and the command line's one-line errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_prime.credit import (
    NO_STEP,
    draw_credit_heatmap,
    layout_tokens,
    line_spans,
    locate_first_error,
    main,
    step_rewards,
    token_implicit_rewards,
    token_steps_from_spans,
)
from megatron_prime.toy.model import write_toy_model
from megatron_prime.toy.tokenizer import build_toy_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, num_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(PRM, reference): two random inits of one tiny Qwen2 with the toy byte-level tokenizer."""
    root = tmp_path_factory.mktemp("credit_models")
    return write_toy_model(root / "prm", seed=1, **TINY), write_toy_model(root / "ref", seed=0, **TINY)


def hand_token_rewards(prm, ref, prompt, response, beta):
    """beta * (log pi_prm - log pi_ref) of each response token, one unpadded sequence in float64."""
    ids = torch.tensor([prompt + response])
    per_model = []
    for model in (prm, ref):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].double(), -1)
        per_model.append([log_probs[len(prompt) + t - 1, token].item() for t, token in enumerate(response)])
    return [beta * (a - b) for a, b in zip(*per_model)]


def test_token_rewards_match_a_hand_computation(tiny_models):
    from transformers import AutoModelForCausalLM

    prm, ref = (AutoModelForCausalLM.from_pretrained(str(f), dtype=torch.float32).eval() for f in tiny_models)
    tokenizer = build_toy_tokenizer()
    prompt = tokenizer("What is 3 + 4?")["input_ids"]
    texts = ["3 + 4 = 7\n\\boxed{7}", "3 + 4 = 8", "é = 1"]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(r) for r in responses}) == 3  # padding is exercised
    beta = 0.5
    rewards = token_implicit_rewards(prm, ref, prompt, responses, beta, batch_size=2)
    assert [r.shape for r in rewards] == [torch.Size([len(r)]) for r in responses]
    for got, response in zip(rewards, responses):
        expected = hand_token_rewards(prm, ref, prompt, response, beta)
        assert got.tolist() == pytest.approx(expected, abs=1e-5)
        assert max(abs(v) for v in expected) > 1e-3  # two different models: not all zero
    assert token_implicit_rewards(ref, ref, prompt, responses[:1], beta)[0].abs().max().item() == 0.0


def utf8_byte_steps(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """The expected step of each byte token of the toy tokenizer: the step holding the
    character the byte belongs to (independent of decoding)."""
    steps = []
    for position, character in enumerate(text):
        step = next((i for i, (a, b) in enumerate(spans) if a <= position < b), NO_STEP)
        steps += [step] * len(character.encode("utf-8"))
    return steps


def test_token_steps_follow_the_characters_of_multibyte_tokens():
    tokenizer = build_toy_tokenizer()
    steps_text = ["7 é 8 € 9", "ok 😀", "x"]
    text = "\n\n".join(steps_text)
    # Only byte tokens: the toy tokenizer's phrase tokens (" + ", "\n\n") are avoided so that
    # token i is byte i of the text.
    ids = list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    spans, start = [], 0
    for step in steps_text:
        spans.append((start, start + len(step)))
        start += len(step) + 2
    got = token_steps_from_spans(tokenizer, ids, spans)
    assert got == utf8_byte_steps(text, spans)
    assert got.count(1) == len("ok 😀".encode("utf-8")) and got[len("7 é 8 € 9".encode()):][:2] == [NO_STEP] * 2


def test_token_steps_of_merged_tokens_go_to_the_step_they_overlap_most():
    tokenizer = build_toy_tokenizer()
    text = "1 + 2 = 3\n\n3 - 1 = 2"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Step 0 = "1 + 2" and step 1 = "= 3\n\n3": " = " (3 chars) overlaps step 0 by 0, step 1 by 1.
    tokens = [tokenizer.decode([i]) for i in ids]
    assert tokens[:6] == ["1", " + ", "2", " = ", "3", "\n\n"]
    got = token_steps_from_spans(tokenizer, ids, [(0, 5), (6, 12)])
    assert got[:7] == [0, 0, 0, 1, 1, 1, 1]
    assert set(got[7:]) == {NO_STEP}
    with pytest.raises(ValueError, match=r"spans\[1\]=\(3, 12\) is invalid: expected sorted, non-overlapping"):
        token_steps_from_spans(tokenizer, ids, [(0, 5), (3, 12)])
    with pytest.raises(ValueError, match=r"<= 20 \(the text's length\)"):
        token_steps_from_spans(tokenizer, ids, [(0, 99)])


def test_hostile_token_ids_do_not_crash():
    tokenizer = build_toy_tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        # Lone continuation bytes, cut multi-byte characters, special and phrase tokens.
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 40))]
        text = tokenizer.decode(ids)
        steps = token_steps_from_spans(tokenizer, ids, [(0, len(text) // 2), (len(text) // 2, len(text))])
        assert len(steps) == len(ids) and all(NO_STEP <= s <= 1 for s in steps)


def test_line_spans_are_the_non_blank_lines():
    text = "47 + 8 = 55\n55 - 5 = 50\n\n  \n\\boxed{50}"
    assert line_spans(text) == [(0, 11), (12, 23), (28, 38)]
    assert [text[a:b] for a, b in line_spans(text)] == ["47 + 8 = 55", "55 - 5 = 50", "\\boxed{50}"]
    assert line_spans("") == [] and line_spans("x\n") == [(0, 1)]


def test_step_rewards_sum_the_tokens_of_each_step():
    rewards = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.5, 1.0])
    assert step_rewards(rewards, [0, 0, -1, 1, 1, 2]) == [-0.5, 1.5, 1.0]
    assert step_rewards([1.0, 2.0], [-1, 0], num_steps=3) == [2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 token rewards but 3 token steps"):
        step_rewards([1.0, 2.0], [0, 0, 1])
    with pytest.raises(ValueError, match=r"token steps must lie in \[-1, 0\]"):
        step_rewards([1.0, 2.0], [0, 1], num_steps=1)


def test_locate_first_error_on_hand_numbers():
    # Prefix sums 0.5, 0.25, -0.5, -0.25, -0.75: lowest at step 4 (binary fractions: exact sums).
    steps = [0.5, -0.25, -0.75, 0.25, -0.5]
    assert locate_first_error(steps) == 4
    assert locate_first_error(steps, threshold=-0.5) == 4
    assert locate_first_error(steps, threshold=-0.75) == -1  # the minimum -0.75 is not below -0.75
    # Prefix sums 1.0, -1.0, 0.0, -1.0: a tie goes to the first step.
    assert locate_first_error([1.0, -2.0, 1.0, -1.0]) == 1
    # Never below the start: no error, though step 1 lost credit.
    assert locate_first_error([0.5, -0.2, 0.1]) == -1
    assert locate_first_error([]) == -1
    # "threshold": the first step whose own reward is below the threshold.
    assert locate_first_error(steps, "threshold") == 1
    assert locate_first_error(steps, "threshold", threshold=-0.5) == 2
    assert locate_first_error(steps, "threshold", threshold=-1.0) == -1
    with pytest.raises(ValueError, match=r"rule='mean' is invalid: expected one of \['min_cumulative', 'threshold'\]"):
        locate_first_error(steps, "mean")


def test_layout_wraps_and_shows_newlines():
    cells = layout_tokens(["a" * 70, "bcd", "x\n", "\ty", "z" * 100])
    assert [(c.line, c.column, c.width) for c in cells] == [(0, 0, 70), (1, 0, 3), (1, 3, 2), (2, 0, 2), (3, 0, 72)]
    assert cells[2].label == "x↵" and cells[3].label == "→y" and cells[4].label.endswith("…")


def mode_colour(image, box):
    """The most common RGB colour inside a cell (the text glyphs are a minority)."""
    from collections import Counter

    x0, y0, x1, y1 = box
    pixels = image[min(y0, y1) + 2:max(y0, y1) - 1, x0 + 2:x1 - 1, :3].reshape(-1, 3)
    return Counter(tuple(int(v) for v in p) for p in pixels).most_common(1)[0][0]


def test_heatmap_png_colours_the_most_negative_token_at_the_negative_end(tmp_path):
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    rows = [(["12", " + ", "8", " = ", "20", "\n", "\\boxed{20}"], [0.1, 0.05, 0.2, 0.0, 0.4, 0.0, 0.3], "correct"),
            (["12", " + ", "8", " = ", "21", "\n", "\\boxed{21}"], [0.1, 0.05, 0.2, 0.0, -0.8, 0.0, -0.1],
             "wrong, first wrong line 1")]
    heatmap = draw_credit_heatmap(rows, tmp_path / "sub" / "credit.png")
    assert heatmap.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(heatmap.path).convert("RGB"))
    assert 400 <= image.shape[1] <= 2000 and 150 <= image.shape[0] <= 2000
    assert heatmap.scale == 0.8
    red_end = tuple(round(255 * v) for v in colormaps["RdBu"](0.0)[:3])
    most_negative = mode_colour(image, heatmap.cell_boxes[1][4])
    assert max(abs(a - b) for a, b in zip(most_negative, red_end)) <= 3, (most_negative, red_end)
    most_positive = mode_colour(image, heatmap.cell_boxes[0][4])  # +0.4: halfway to the blue end
    expected = tuple(round(255 * v) for v in colormaps["RdBu"](0.75)[:3])
    assert max(abs(a - b) for a, b in zip(most_positive, expected)) <= 3, (most_positive, expected)
    assert most_positive[2] > most_positive[0]
    # "\n" ends its line: "\\boxed{..}" starts the next one, left-aligned.
    boxes = heatmap.cell_boxes[0]
    assert boxes[6][0] == boxes[0][0] and boxes[6][1] > boxes[0][1]


# ---- the command line ----

def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_draws_a_heatmap_of_the_data_rows(tiny_models, tmp_path, capsys):
    prm, ref = tiny_models
    data = write_rows(tmp_path / "rows.jsonl", [
        {"prompt": "What is 3 + 4?", "response": "3 + 4 = 7\n\\boxed{7}", "title": "correct"},
        {"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "ability": "math",
         "reward_model": {"ground_truth": "7", "style": "rule"}, "data_source": "toy",
         "response": "3 + 4 = 8 €\n\\boxed{8}"},
        {"prompt": "What is 3 + 4?", "answer": "7", "response": "\\boxed{7}"},
        {"prompt": "What is 3 + 4?", "response": "7"},
    ])
    out = tmp_path / "credit.png"
    assert main(["--prm", str(prm), "--reference", str(ref), "--data", str(data), "--out", str(out),
                 "--limit", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 3 and out.read_bytes()[:4] == b"\x89PNG"
    # Titles: the row's own; else the math verifier's verdict against the answer.
    assert [t.split("  (sum")[0] for t in printed["titles"]] == ["correct", "wrong (rows.jsonl:2)",
                                                                 "correct (rows.jsonl:3)"]


@pytest.mark.parametrize("case, message", [
    ("no_prm", "--prm {tmp}/missing: not an HF folder (no config.json) nor a training checkpoint step folder"),
    ("no_data", "--data {tmp}/none.jsonl: file not found"),
    ("no_response", "{tmp}/bad.jsonl:2: row needs a non-empty 'response' string"),
    ("bad_json", "{tmp}/bad.jsonl:2: "),
    ("bad_prompt", "{tmp}/bad.jsonl:2: 'prompt'[0].role='robot' is invalid"),
    ("beta", "--beta=nan is invalid: expected a finite number > 0"),
])
def test_cli_bad_inputs_are_one_line_and_write_nothing(tiny_models, tmp_path, capsys, case, message):
    prm, ref = tiny_models
    good = {"prompt": "1 + 1?", "response": "2"}
    bad_rows = {"no_response": {"prompt": "2 + 2?"}, "bad_json": '{"prompt": "2 + 2?",',
                "bad_prompt": {"prompt": [{"role": "robot", "content": "hi"}], "response": "4"}}
    data = write_rows(tmp_path / "bad.jsonl", [good, bad_rows.get(case, good)])
    args = {"--prm": str(prm), "--reference": str(ref), "--data": str(data), "--beta": "0.05",
            "--out": str(tmp_path / "out.png")}
    if case == "no_prm":
        args["--prm"] = str(tmp_path / "missing")
    if case == "no_data":
        args["--data"] = str(tmp_path / "none.jsonl")
    if case == "beta":
        args["--beta"] = "nan"
    assert main([v for pair in args.items() for v in pair]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.png").exists()


def test_module_entry_point_exits_2_on_a_missing_file(tiny_models, tmp_path):
    prm, ref = tiny_models
    done = subprocess.run([sys.executable, "-m", "megatron_prime.credit", "--prm", str(prm), "--reference",
                           str(ref), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.png")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"megatron-prime-credit: error: --data {tmp_path / 'none.jsonl'}: file not found")


@pytest.mark.slow
def test_cli_reads_the_prm_of_a_training_checkpoint(tiny_models, tmp_path, capsys):
    """A step folder's PRM (the HF PRM's weights saved through Megatron) gives the same
    rewards as the HF folder itself: the in-process conversion is the exporter's."""
    import os

    from megatron_prime.distributed import free_port

    prm, ref = tiny_models
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "tests/workers/credit_checkpoint_worker.py", "--hf", str(prm),
                           "--root", str(tmp_path / "ckpt")], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    step = Path(done.stdout.strip().splitlines()[-1])
    assert step.name == "step_00000003" and (step / "train_state.json").is_file()
    data = write_rows(tmp_path / "rows.jsonl", [{"prompt": "What is 3 + 4?", "response": "3 + 4 = 7 é"}])
    args = ["--reference", str(ref), "--data", str(data), "--beta", "0.5"]
    assert main(["--prm", str(prm), *args, "--out", str(tmp_path / "hf.png")]) == 0
    from_hf = json.loads(capsys.readouterr().out)
    env.pop("RANK"), env.pop("WORLD_SIZE")  # the CLI starts its own single-process group
    done = subprocess.run([sys.executable, "-m", "megatron_prime.credit", "--prm", str(step), *args,
                           "--out", str(tmp_path / "ckpt.png")], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from_checkpoint = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(from_hf["reward_sums"][0]) > 1e-3
    assert from_checkpoint["reward_sums"] == pytest.approx(from_hf["reward_sums"], abs=1e-4)
    assert (tmp_path / "ckpt.png").read_bytes()[:4] == b"\x89PNG"
