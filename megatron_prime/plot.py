"""Training curves from a run's metrics.jsonl, as a PNG.

Draws with matplotlib's Agg canvas directly (no pyplot), so it needs no display, never
switches a global backend and works on a headless cluster node or inside the trainer.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_prime.config import require, require_positive_int
from megatron_prime.monitor import read_metrics

DEFAULT_KEYS = ("reward/outcome_mean", "reward/accuracy", "reward/process_mean", "prm/accuracy")

# The PNG is FIGURE_WIDTH_IN * DPI pixels wide and PANEL_HEIGHT_IN * DPI per plotted key high.
FIGURE_WIDTH_IN = 8.0
PANEL_HEIGHT_IN = 2.5
DPI = 100


def plot_curves(metrics_file: str | Path, png: str | Path,
                keys: Sequence[str] = DEFAULT_KEYS, smooth: int = 1) -> Path:
    """One subplot per key found in ``metrics_file``, x = step; returns the PNG path.

    Keys missing from every line are skipped (a run without a PRM has no ``prm/*``); if none
    is present that is a ``ValueError`` naming the keys and the file. ``smooth`` > 1 draws a
    trailing moving average over that many points on top of the faint raw curve.
    Non-finite values are left out of a curve: a NaN would blank every window it falls in.
    """
    metrics_file = Path(metrics_file)
    png = Path(png)
    require_positive_int("smooth", smooth)
    keys = list(keys)
    require(len(keys) > 0, "keys", keys, "at least one metric key")

    records = read_metrics(metrics_file)
    curves = {}
    for key in keys:
        points = _points(records, key)
        if points:
            curves[key] = points
    if not curves:
        raise ValueError(f"none of the keys {keys} has a finite value in {metrics_file}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(FIGURE_WIDTH_IN, PANEL_HEIGHT_IN * len(curves)), dpi=DPI,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(curves), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, points) in zip(axes, curves.items()):
        steps = [step for step, _ in points]
        values = [value for _, value in points]
        if smooth > 1:
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1)
            ax.plot(steps, moving_average(values, smooth), color="tab:blue", linewidth=1.5,
                    label=f"mean of {smooth}")
            ax.legend(loc="best", fontsize="small")
        else:
            ax.plot(steps, values, color="tab:blue", linewidth=1.5, marker="." if
                    len(steps) < 50 else None)
        ax.set_title(key, fontsize="medium")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")

    return save_png(figure, png, DPI)


def save_png(figure: Any, png: Path, dpi: int) -> Path:
    """Writes ``figure`` to ``png`` (parents made) through a temporary file and a rename: a
    viewer refreshing curves.png during a run never sees half a file."""
    png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".tmp")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return png


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points; the first points average what exists,
    so the smoothed curve starts at step one instead of ``window`` steps late."""
    averages = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averages.append(total / min(i + 1, window))
    return averages


def _points(records: list[dict], key: str) -> list[tuple[int, float]]:
    """Sorted (step, value) pairs; if a step appears twice the later line wins."""
    by_step = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            by_step[record["step"]] = float(value)
    return sorted(by_step.items())


def main(argv: Sequence[str] | None = None) -> None:
    """``megatron-prime-plot METRICS_JSONL [--out PNG] [--keys k1,k2] [--smooth N]``."""
    parser = argparse.ArgumentParser(
        prog="megatron-prime-plot",
        description="Plot training curves from a megatron_prime metrics.jsonl into a PNG.")
    parser.add_argument("metrics_file", metavar="METRICS_JSONL", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: curves.png next to METRICS_JSONL)")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS),
                        help="comma-separated metric keys, one subplot each "
                             "(default: %(default)s)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving-average window in steps (default: 1 = raw)")
    args = parser.parse_args(argv)

    if not args.metrics_file.is_file():
        parser.error(f"metrics file not found: {args.metrics_file}")
    out = args.out if args.out is not None else args.metrics_file.parent / "curves.png"
    keys = [key.strip() for key in args.keys.split(",") if key.strip()]
    try:
        written = plot_curves(args.metrics_file, out, keys=keys, smooth=args.smooth)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
