"""Credit a user can see: the implicit PRM's per-token rewards, summed into steps, the step
where it puts the first error, and a heatmap PNG of the tokens coloured by their reward.

The implicit PRM (PRIME.md) gives every response token the reward
``r_t = beta * (log pi_prm(y_t | y_<t) - log pi_ref(y_t | y_<t))``; the sum of r_t over a
prefix is the PRM's q-value of that prefix (the log-odds it assigns to the response ending
correct, relative to where it started). A step's reward is the sum over its tokens, so the
cumulative step rewards are the q-values at step boundaries.

    python -m megatron_prime.credit --prm RUN/checkpoints/step_00000030 --reference SFT_HF \\
        --data responses.jsonl --beta 0.05 --out credit.png

``--data`` rows are ``{"prompt": str, "response": str}`` (a bare question, rendered as the
trainer renders one; optional ``answer``) or Eurus-2-RL-Data rows (``prompt`` as chat
messages, ``ability``, ``reward_model``, ``data_source``) with a ``response`` added. An
optional ``title`` names the row in the picture; without one, a row with a math answer is
titled "correct" or "wrong" by the trainer's math verifier. ``--prm`` is an HF folder or a training run's ``step_*`` folder, whose
PRM is converted to a temporary HF folder in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LOCATE_RULES: tuple[str, ...] = ("min_cumulative", "threshold")
NO_ERROR = -1  # locate_first_error's answer when it finds no wrong step
NO_STEP = -1  # token_steps_from_spans' index of a token outside every span


# ---- per-token rewards (one code path, also behind evaluate.ImplicitPRM) ----

@torch.no_grad()
def token_log_probs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] log-prob of each token given the ones before it (0 at position 0)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def token_implicit_rewards(prm: Any, reference: Any, prompt_ids: Sequence[int],
                           responses: Sequence[Sequence[int]], beta: float,
                           batch_size: int = 8) -> list[torch.Tensor]:
    """Per response of one prompt, the 1-D tensor of its tokens' implicit rewards
    ``beta * (log pi_prm - log pi_ref)`` (length = the response's token count).

    ``prm`` and ``reference`` are transformers causal LMs sharing one vocabulary. Responses
    are right-padded in batches of ``batch_size`` after the shared prompt; the rewards come
    from ``algo.implicit_process_rewards``, the function the trainer uses, so what a user
    sees here is what the policy was trained on (without the trainer's batch normalisation,
    which rescales a whole batch and would make one response's picture depend on the others).
    """
    from megatron_prime.algo import implicit_process_rewards

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected >= 1")
    rewards_per_response: list[torch.Tensor] = []
    for start in range(0, len(responses), batch_size):
        chunk = responses[start:start + batch_size]
        length = len(prompt_ids) + max(len(r) for r in chunk)
        input_ids = torch.zeros(len(chunk), length, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), length, dtype=torch.long)
        response_mask = torch.zeros(len(chunk), length)
        for row, response in enumerate(chunk):
            ids = list(prompt_ids) + list(response)
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
            response_mask[row, len(prompt_ids):len(ids)] = 1.0
        rewards = implicit_process_rewards(token_log_probs(prm, input_ids, attention_mask),
                                           token_log_probs(reference, input_ids, attention_mask),
                                           response_mask, beta)
        for row, response in enumerate(chunk):
            rewards_per_response.append(rewards[row, len(prompt_ids):len(prompt_ids) + len(response)].clone())
    return rewards_per_response


# ---- tokens -> steps ----

def token_char_spans(tokenizer: Any, response_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(decoded response text, per token the [start, end) characters of that text it adds).

    Found by decoding every prefix: a token's end is the length of the longest common prefix
    of the decoded prefix and the whole text. A byte-level token holding only part of a
    multi-byte character decodes to a replacement character that is not in the whole text,
    so it adds nothing (start == end) and the token that completes the character carries it.
    Quadratic in the length, which is fine for the few responses a user looks at.
    """
    ids = list(response_ids)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    spans: list[tuple[int, int]] = []
    previous_end = 0
    for count in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:count], skip_special_tokens=False)
        end = _common_prefix_length(prefix, text)
        end = max(end, previous_end)  # never move back (a decoder that rewrites earlier text)
        spans.append((previous_end, end))
        previous_end = end
    return text, spans


def _common_prefix_length(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def check_spans(spans: Sequence[tuple[int, int]], text_length: int) -> None:
    """Steps are sorted, non-overlapping [start, end) ranges inside the text; ValueError if not."""
    previous_end = 0
    for index, span in enumerate(spans):
        if (not isinstance(span, (tuple, list)) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise ValueError(f"spans[{index}]={span!r} is invalid: expected a (start, end) pair of ints")
        start, end = span
        if not previous_end <= start <= end <= text_length:
            raise ValueError(f"spans[{index}]=({start}, {end}) is invalid: expected sorted, non-overlapping "
                             f"ranges with {previous_end} <= start <= end <= {text_length} (the text's length)")
        previous_end = end


def steps_of_token_spans(token_spans: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Per token, the step whose character span it overlaps most (the earlier step on a tie),
    or NO_STEP when it overlaps none. A token that adds no character (part of a multi-byte
    character) belongs to the step holding the character it begins, so a step's reward
    includes every byte of its text."""
    steps = []
    for start, end in token_spans:
        if start == end:
            steps.append(next((i for i, (a, b) in enumerate(spans) if a <= start < b), NO_STEP))
            continue
        best, best_overlap = NO_STEP, 0
        for index, (a, b) in enumerate(spans):
            overlap = min(end, b) - max(start, a)
            if overlap > best_overlap:
                best, best_overlap = index, overlap
        steps.append(best)
    return steps


def token_steps_from_spans(tokenizer: Any, response_ids: Sequence[int],
                           spans: Sequence[tuple[int, int]]) -> list[int]:
    """Per response token, the index of the step it belongs to (NO_STEP = -1: none).

    ``spans`` are the steps' [start, end) character ranges in the decoded response text
    (``tokenizer.decode(response_ids)``); see ``token_char_spans`` for how tokens get their
    characters and ``steps_of_token_spans`` for how a token that straddles a boundary is
    assigned. ValueError for spans that are unsorted, overlapping or outside the text.
    """
    text, token_spans = token_char_spans(tokenizer, response_ids)
    check_spans(spans, len(text))
    return steps_of_token_spans(token_spans, spans)


def line_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each non-blank line of ``text``, newline excluded: the steps of a
    response written one step per line (the running-sum task's ``47 + 8 = 55`` lines)."""
    spans, start = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


def step_rewards(token_rewards: torch.Tensor | Sequence[float], token_step: Sequence[int],
                 num_steps: int | None = None) -> list[float]:
    """Sum of the token rewards of each step; tokens of step -1 count for none.

    ``num_steps`` (default: the largest step index + 1) keeps steps that got no token (a
    truncated response) as 0.0 rewards at the end, so indices line up with the labels.
    """
    values = token_rewards.tolist() if isinstance(token_rewards, torch.Tensor) else list(token_rewards)
    if len(values) != len(token_step):
        raise ValueError(f"{len(values)} token rewards but {len(token_step)} token steps")
    largest = max(token_step, default=NO_STEP)
    count = largest + 1 if num_steps is None else num_steps
    if largest >= count or any(step < NO_STEP for step in token_step):
        raise ValueError(f"token steps must lie in [-1, {count - 1}], got {min(token_step)}..{largest}")
    sums = [0.0] * count
    for value, step in zip(values, token_step):
        if step != NO_STEP:
            sums[step] += float(value)
    return sums


def locate_first_error(step_rewards: Sequence[float], rule: str = "min_cumulative",
                       threshold: float = 0.0) -> int:
    """The index of the step the PRM marks as the first wrong one, or NO_ERROR (-1).

    ``min_cumulative`` (the PRIME paper's reading: the prefix sums of the step rewards are
    the implicit PRM's q-values, which fall where the response goes wrong): the step where
    the cumulative reward is smallest, the first such step on a tie; -1 when that minimum is
    >= ``threshold``. With the default 0.0 this says "-1 when the q-value never drops below
    where it started": the PRM's belief that the response ends correct (sigmoid of the
    q-value, relative to the reference) never falls under one half of its start.
    ``threshold``: the first step whose own reward is < ``threshold``; -1 when none is.
    An empty step list is -1 under both rules.
    """
    if rule not in LOCATE_RULES:
        raise ValueError(f"rule={rule!r} is invalid: expected one of {list(LOCATE_RULES)}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold={threshold} is invalid: expected a finite number")
    if rule == "threshold":
        return next((i for i, value in enumerate(step_rewards) if value < threshold), NO_ERROR)
    best, lowest, total = NO_ERROR, math.inf, 0.0
    for index, value in enumerate(step_rewards):
        total += value
        if total < lowest:
            best, lowest = index, total
    return best if lowest < threshold else NO_ERROR


# ---- the heatmap ----

LINE_CHARS = 72  # characters of token text per drawn line
CHAR_WIDTH_IN = 0.12  # monospace cell width per character at FONT_SIZE
LINE_HEIGHT_IN = 0.28
FONT_SIZE = 9
DPI = 100
COLORMAP = "RdBu"  # red = negative reward, white = 0, blue = positive


@dataclass(frozen=True)
class Cell:
    """One token as drawn: the line it sits on, its first column and width in characters."""

    line: int
    column: int
    width: int
    label: str


def visible_token_text(text: str) -> str:
    """What a token shows: newlines as ↵, tabs as →, other control characters as \\xNN, so
    that whitespace credit is visible and no character can break the layout."""
    out = []
    for character in text:
        if character == "\n":
            out.append("↵")
        elif character == "\t":
            out.append("→")
        elif ord(character) < 32 or 0x7f <= ord(character) < 0xa0:
            out.append(f"\\x{ord(character):02x}")
        else:
            out.append(character)
    return "".join(out)


def layout_tokens(token_texts: Sequence[str], line_chars: int = LINE_CHARS) -> list[Cell]:
    """Cells wrapped at ``line_chars``; a token ending in a newline ends its line. A token
    wider than a line is cut with an ellipsis; an empty token keeps a one-character cell."""
    cells, line, column = [], 0, 0
    for text in token_texts:
        label = visible_token_text(text)
        width = max(1, min(len(label), line_chars))
        if len(label) > line_chars:
            label = label[:line_chars - 1] + "…"
        if column + width > line_chars and column > 0:
            line, column = line + 1, 0
        cells.append(Cell(line, column, width, label))
        column += width
        if text.endswith("\n"):
            line, column = line + 1, 0
    return cells


@dataclass
class CreditHeatmap:
    """The written PNG and, per row and token, the cell's pixel box (x0, y0, x1, y1; origin
    top left) in it: what a test or a report needs to point at a token."""

    path: Path
    cell_boxes: list[list[tuple[int, int, int, int]]]
    scale: float  # the colour scale runs from -scale to +scale


def draw_credit_heatmap(rows: Sequence[tuple[Sequence[str], Sequence[float], str]],
                        path: str | Path) -> CreditHeatmap:
    """Draws each row (token texts, their rewards, a title) as wrapped lines of coloured cells.

    One diverging colour scale, centred at 0 and symmetric (-m..m with m the largest |reward|
    over all rows), is shared by all rows and shown in a colour bar, so colours compare across
    responses. Draws on matplotlib's Agg canvas (no pyplot, no display, like plot.py) and
    writes the PNG atomically (``plot.save_png``).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from megatron_prime.plot import save_png

    if not rows:
        raise ValueError("draw_credit_heatmap needs at least one row")
    layouts = []
    for index, (texts, rewards, _title) in enumerate(rows):
        if len(texts) != len(rewards):
            raise ValueError(f"rows[{index}]: {len(texts)} token texts but {len(rewards)} rewards")
        if not all(math.isfinite(float(r)) for r in rewards):
            raise ValueError(f"rows[{index}]: rewards must be finite numbers")
        layouts.append(layout_tokens(texts))
    scale = max((abs(float(r)) for _, rewards, _ in rows for r in rewards), default=0.0) or 1.0
    norm, cmap = Normalize(-scale, scale), colormaps[COLORMAP]

    line_counts = [(cells[-1].line + 1 if cells else 1) for cells in layouts]
    total_lines = sum(count + 2 for count in line_counts)  # a title line and a gap per row
    width_in = LINE_CHARS * CHAR_WIDTH_IN + 1.6  # + the colour bar
    figure = Figure(figsize=(width_in, max(2.0, total_lines * LINE_HEIGHT_IN + 0.6)), dpi=DPI)
    FigureCanvasAgg(figure)
    text_width = LINE_CHARS * CHAR_WIDTH_IN / width_in
    ax = figure.add_axes((0.1 / width_in, 0.3 / figure.get_figheight(), text_width,
                          1 - 0.6 / figure.get_figheight()))
    ax.set_xlim(0, LINE_CHARS)
    ax.set_ylim(total_lines, 0)
    ax.axis("off")
    y = 0
    placed: list[list[tuple[float, float, float, float]]] = []
    for (texts, rewards, title), cells, count in zip(rows, layouts, line_counts):
        ax.text(0, y + 0.75, title, fontsize=FONT_SIZE + 1, fontweight="bold")
        y += 1
        boxes = []
        for cell, reward in zip(cells, rewards):
            x0, y0 = cell.column, y + cell.line
            shade = float(norm(float(reward)))
            ax.add_patch(Rectangle((x0, y0), cell.width, 1, facecolor=cmap(shade),
                                   edgecolor="white", linewidth=0.3))
            # White text on the dark ends of the scale, black elsewhere: readable either way.
            ax.text(x0 + 0.05, y0 + 0.72, cell.label, fontsize=FONT_SIZE, family="monospace",
                    color="white" if abs(shade - 0.5) > 0.35 else "black")
            boxes.append((x0, y0, x0 + cell.width, y0 + 1))
        placed.append(boxes)
        y += count + 1
    bar_ax = figure.add_axes((1 - 1.0 / width_in, 0.1, 0.15 / width_in, 0.8))
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar_ax,
                    label="implicit reward β·log(π_prm/π_ref)")

    path = save_png(figure, Path(path), DPI)
    # Data -> pixel boxes, with the layout as saved (same dpi, no tight bbox).
    height_px = figure.get_figheight() * DPI
    cell_boxes = []
    for boxes in placed:
        row_px = []
        for x0, y0, x1, y1 in boxes:
            (px0, py0), (px1, py1) = ax.transData.transform([(x0, y0), (x1, y1)])
            row_px.append((round(px0), round(height_px - py0), round(px1), round(height_px - py1)))
        cell_boxes.append(row_px)
    return CreditHeatmap(path, cell_boxes, scale)


# ---- a PRM from a training checkpoint ----

@contextlib.contextmanager
def prm_hf_folder(prm: str | Path) -> Iterator[Path]:
    """The PRM as an HF folder: ``prm`` itself, or, for a training run's ``step_*`` folder
    (it holds ``train_state.json``), its ``prm`` role converted into a temporary folder that
    is removed on exit. The conversion is the ``megatron-prime-megatron-to-hf --role prm``
    path, run here as a single CPU process (gloo), so it needs no launcher."""
    from megatron_prime.checkpoint.train_state import MARKER

    prm = Path(prm)
    if not (prm / MARKER).is_file():
        if not (prm / "config.json").is_file():
            raise ValueError(f"--prm {prm}: not an HF folder (no config.json) nor a training "
                             f"checkpoint step folder (no {MARKER})")
        yield prm
        return
    from megatron_prime import distributed
    from megatron_prime.checkpoint.convert import check_trained_model, convert_megatron_to_hf
    from megatron_prime.config import ParallelConfig

    check_trained_model(prm, "prm")  # a one-line error if it holds no PRM, before any group
    with tempfile.TemporaryDirectory(prefix="prm_hf_") as root:
        output = Path(root) / "prm"
        started = not distributed.is_initialized()
        if started:
            environ = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(distributed.free_port())}
            distributed.init_distributed(ParallelConfig(), use_gpu=False, environ=environ)
        try:
            convert_megatron_to_hf(prm, output, ParallelConfig(), dtype=torch.float32, role="prm")
        finally:
            if started:
                distributed.destroy_distributed()
        yield output


# ---- the command line ----

@dataclass
class CreditExample:
    """One response to draw: its prompt (rendered), its text, a title (None: named by its
    verdict and place) and the math answer it is checked against (None: not checked)."""

    prompt_ids: list[int]
    response: str
    title: str | None
    where: str
    ground_truth: str | None = None


def load_credit_rows(path: str | Path, tokenizer: Any, limit: int,
                     use_chat_template: bool = True) -> list[CreditExample]:
    """The first ``limit`` rows of ``path``; ValueError naming ``file:line`` for a bad row."""
    from megatron_prime.data.dataset import MalformedRow, parse_row, read_rows
    from megatron_prime.data.render import render_prompt
    from megatron_prime.data.templates import build_prompt_messages

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: file not found")
    examples: list[CreditExample] = []
    for line, row in read_rows(path):
        where = f"{path}:{line}"
        if isinstance(row, MalformedRow):
            raise ValueError(f"{where}: {row}")
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be an object, got {type(row).__name__}")
        response = row.get("response")
        if not isinstance(response, str) or not response:
            raise ValueError(f"{where}: row needs a non-empty 'response' string")
        try:
            if "reward_model" in row:  # a Eurus-2 row: checked as the trainer checks it
                messages, ability, ground_truth, _ = parse_row(row)
                ground_truth = ground_truth if ability == "math" else None
            else:
                messages = build_prompt_messages(row.get("prompt"), "math")
                ground_truth = row.get("answer")
        except (MalformedRow, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            raise ValueError(f"{where}: 'title' must be a string, got {type(title).__name__}")
        if ground_truth is not None and not isinstance(ground_truth, str):
            raise ValueError(f"{where}: 'answer' must be a string, got {type(ground_truth).__name__}")
        prompt_ids = render_prompt(tokenizer, messages, use_chat_template).token_ids
        examples.append(CreditExample(prompt_ids, response, title, f"{path.name}:{line}", ground_truth))
        if len(examples) == limit:
            break
    if not examples:
        raise ValueError(f"--data {path}: no rows")
    return examples


def example_titles(examples: Sequence[CreditExample]) -> list[str]:
    """Each row's title: its own, else "correct" / "wrong" by the trainer's math verifier
    when it has an answer to check, then where it comes from."""
    checked = [e for e in examples if e.title is None and e.ground_truth is not None]
    verdicts: dict[int, float] = {}
    if checked:
        from megatron_prime.rewards import MathVerifier, MathVerifierConfig

        with MathVerifier(MathVerifierConfig(workers=1)) as verifier:
            scores = verifier.score_batch([e.response for e in checked], [e.ground_truth for e in checked])
        verdicts = {id(e): score for e, score in zip(checked, scores)}
    titles = []
    for example in examples:
        if example.title is not None:
            titles.append(example.title)
        elif id(example) in verdicts:
            titles.append(f"{'correct' if verdicts[id(example)] > 0 else 'wrong'} ({example.where})")
        else:
            titles.append(example.where)
    return titles


def heatmap_row(tokenizer: Any, response_ids: Sequence[int], rewards: torch.Tensor,
                title: str) -> tuple[list[str], list[float], str]:
    """A heatmap row: each token's text is the characters it adds to the decoded response
    (empty for part of a multi-byte character), so the cells read as the response."""
    text, spans = token_char_spans(tokenizer, response_ids)
    return [text[a:b] for a, b in spans], rewards.tolist(), title


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-prime-credit",
        description="Draw the implicit PRM's per-token rewards of a few responses as a heatmap PNG.")
    parser.add_argument("--prm", required=True, help="HF folder of the PRM, or a training run's step_* folder")
    parser.add_argument("--reference", required=True, help="HF folder of the PRM's reference model")
    parser.add_argument("--data", required=True,
                        help='.jsonl/.parquet rows {"prompt": str, "response": str, optional "answer"} or '
                             "Eurus-2 rows with a 'response'; optional 'title' (default: correct/wrong "
                             "by the math verifier where there is an answer)")
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--limit", type=int, default=4, help="how many rows to draw (the first ones)")
    parser.add_argument("--no-chat-template", action="store_true")
    return parser


def run(args: argparse.Namespace) -> tuple[CreditHeatmap, list[float], list[str]]:
    """Draws the heatmap; returns it, each drawn response's summed implicit reward and title."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not math.isfinite(args.beta) or args.beta <= 0:
        raise ValueError(f"--beta={args.beta} is invalid: expected a finite number > 0")
    if args.limit < 1:
        raise ValueError(f"--limit={args.limit} is invalid: expected >= 1")
    reference = Path(args.reference)
    if not (reference / "config.json").is_file():
        raise ValueError(f"--reference {reference}: not an HF folder (no config.json)")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; expected a PNG file path")
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    examples = load_credit_rows(args.data, tokenizer, args.limit, not args.no_chat_template)
    with prm_hf_folder(args.prm) as prm_folder:
        prm = AutoModelForCausalLM.from_pretrained(str(prm_folder), dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32).eval()
    rows, sums = [], []
    for example, title in zip(examples, example_titles(examples)):
        response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        rewards = token_implicit_rewards(prm, ref, example.prompt_ids, [response_ids], args.beta)[0]
        sums.append(rewards.sum().item())
        rows.append(heatmap_row(tokenizer, response_ids, rewards, f"{title}  (sum {sums[-1]:+.3f})"))
    return draw_credit_heatmap(rows, out), sums, [title for _, _, title in rows]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        heatmap, sums, titles = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"megatron-prime-credit: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"png": str(heatmap.path), "rows": len(sums), "reward_sums": sums,
                      "titles": titles, "scale": heatmap.scale}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
