"""Run logging: metrics.jsonl, resume truncation, wandb offline files, console output, plots."""

from __future__ import annotations

import io
import json
import math
import runpy
import struct
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from megatron_prime.monitor import (
    LoggingConfig,
    RunLogger,
    read_metrics,
    resolve_wandb_mode,
)
from megatron_prime.plot import (
    DPI,
    FIGURE_WIDTH_IN,
    PANEL_HEIGHT_IN,
    main,
    moving_average,
    plot_curves,
)

REPO = Path(__file__).resolve().parents[1]


def make_logger(run_dir: Path, total_steps: int = 10, start_step: int = 0, *,
                wandb_mode: str = "disabled", is_logging_rank: bool = True,
                wandb_run_id: str | None = None, covered_record: dict | None = None,
                **config) -> RunLogger:
    return RunLogger(LoggingConfig(run_dir=str(run_dir), wandb_mode=wandb_mode, **config),
                     total_steps=total_steps, start_step=start_step,
                     resolved_config={"trainer": {"steps": total_steps}, "algo": {"beta": 0.05}},
                     is_logging_rank=is_logging_rank, wandb_run_id=wandb_run_id,
                     covered_record=covered_record)


def steps_and(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records]


def test_metrics_round_trip_with_non_finite_values(tmp_path):
    logger = make_logger(tmp_path / "run")
    logger.log(1, {"reward/outcome_mean": 0.25, "loss": 1.5, "num_samples": 64})
    logger.log(2, {"reward/outcome_mean": 0.5, "loss": float("nan"), "num_samples": 64})
    logger.log(3, {"reward/outcome_mean": 0.75, "loss": float("inf"),
                   "grad_norm": float("-inf"), "num_samples": 32})
    logger.close()

    path = tmp_path / "run" / "metrics.jsonl"
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["reward/outcome_mean"] for r in records] == [0.25, 0.5, 0.75]
    assert [r["num_samples"] for r in records] == [64, 64, 32]
    assert isinstance(records[0]["num_samples"], int)  # counts stay ints
    assert records[0]["loss"] == 1.5
    assert math.isnan(records[1]["loss"])
    assert records[2]["loss"] == math.inf and records[2]["grad_norm"] == -math.inf
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in records)
    assert set(records[2]) == {"step", "time", "reward/outcome_mean", "loss", "grad_norm",
                               "num_samples"}

    # On disk the file is strict JSON: non-finite floats are the strings "nan"/"inf"/"-inf".
    def reject_constant(name):
        raise AssertionError(f"non-standard JSON constant {name} in metrics.jsonl")

    raw = [json.loads(line, parse_constant=reject_constant)
           for line in path.read_text().splitlines()]
    assert raw[1]["loss"] == "nan"
    assert (raw[2]["loss"], raw[2]["grad_norm"]) == ("inf", "-inf")

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == {
        "trainer": {"steps": 10}, "algo": {"beta": 0.05}}


def test_resume_drops_redone_steps_then_appends(tmp_path):
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir)
    for step in range(1, 5):
        logger.log(step, {"reward/accuracy": step / 10})
    logger.close()

    resumed = make_logger(run_dir, start_step=2)
    assert steps_and(read_metrics(run_dir / "metrics.jsonl"), "reward/accuracy") == [
        (1, 0.1), (2, 0.2)]
    resumed.log(3, {"reward/accuracy": 0.9})
    resumed.close()
    assert steps_and(read_metrics(run_dir / "metrics.jsonl"), "reward/accuracy") == [
        (1, 0.1), (2, 0.2), (3, 0.9)]
    assert not list(run_dir.glob(".metrics.jsonl.*"))  # no temp file left by the rewrite

    # A fresh run (start_step=0) in the same run_dir redoes every step: the old lines go.
    make_logger(run_dir, start_step=0).close()
    assert read_metrics(run_dir / "metrics.jsonl") == []


def test_resume_drops_a_line_torn_by_a_crash(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "time": 1.0, "x": 1}\n{"step": 2, "ti')
    logger = make_logger(run_dir, start_step=1)
    logger.log(2, {"x": 2})
    logger.close()
    assert steps_and(read_metrics(run_dir / "metrics.jsonl"), "x") == [(1, 1), (2, 2)]


def test_fresh_run_drops_an_earlier_step_zero_validation_line(tmp_path):
    """A run killed before its first checkpoint starts again at step 0 and validates again:
    the first start's step-0 line must not stay beside the second's."""
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir)
    logger.log(0, {"val/accuracy": 0.1})
    logger.log(1, {"reward/accuracy": 0.2})
    logger.close()
    again = make_logger(run_dir, start_step=0)
    again.log(0, {"val/accuracy": 0.1})
    again.close()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0]


def test_resume_writes_the_checkpoints_line_when_the_kill_came_before_it(tmp_path):
    """Killed after step 3's checkpoint was renamed into place and before its line: the
    resume appends the line the checkpoint kept; where the line is there, nothing is added."""
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir)
    for step in (1, 2):
        logger.log(step, {"reward/accuracy": step / 10})
    covered = RunLogger.record(3, {"reward/accuracy": 0.3, "loss": float("nan")})
    logger.close()
    assert json.loads(json.dumps(covered)) == covered  # JSON data, as the checkpoint stores it

    resumed = make_logger(run_dir, start_step=3, covered_record=covered)
    resumed.log(4, {"reward/accuracy": 0.4})
    resumed.close()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert steps_and(records, "reward/accuracy") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert math.isnan(records[2]["loss"]) and records[2]["time"] == covered["time"]

    make_logger(run_dir, start_step=3, covered_record=covered).close()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(ValueError, match="checkpoint metrics record"):
        make_logger(run_dir, start_step=2, covered_record=covered)


def test_read_metrics_names_file_and_line_of_a_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n\n{"step": 2, "x": \n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"x": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: step=None is invalid"):
        read_metrics(path)
    # A bad line in the middle is not a torn write: resuming over it fails, naming it.
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        make_logger(tmp_path, start_step=1)


def _wandb_records(path: Path) -> list:
    """Records of a .wandb file: a 7-byte header, then LevelDB-log framed protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block_size, header_size = 32768, 7
    records, pending, pos = [], b"", header_size
    while pos + header_size <= len(data):
        left_in_block = block_size - pos % block_size
        if left_in_block < header_size:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, chunk_type = struct.unpack("<IHB", data[pos:pos + header_size])
        pending += data[pos + header_size:pos + header_size + length]
        pos += header_size + length
        if chunk_type in (1, 4):  # FULL or LAST chunk ends a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history_and_summary(path: Path) -> tuple[dict[int, dict], dict]:
    history, summary = {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {".".join(item.nested_key) or item.key: json.loads(item.value_json)
                   for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "summary":
            for item in record.summary.update:
                summary[".".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return history, summary


def test_wandb_auto_is_offline_without_api_key_and_resumes_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"

    logger = make_logger(run_dir, wandb_mode="auto", wandb_project="unit")
    run_id = logger.wandb_run_id
    assert isinstance(run_id, str) and run_id
    logger.log(1, {"reward/outcome_mean": 0.25, "loss": 2.0})
    logger.log(2, {"reward/outcome_mean": 0.5, "loss": 1.0})
    logger.close()

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}")
    history, summary = _history_and_summary(next(runs[0].glob("*.wandb")))
    assert {step: (row["reward/outcome_mean"], row["loss"]) for step, row in history.items()} \
        == {1: (0.25, 2.0), 2: (0.5, 1.0)}
    assert (summary["reward/outcome_mean"], summary["loss"], summary["_step"]) == (0.5, 1.0, 2)

    # A resumed trainer passes the checkpointed id and keeps logging into the same run.
    resumed = make_logger(run_dir, start_step=2, wandb_mode="auto", wandb_run_id=run_id)
    assert resumed.wandb_run_id == run_id
    resumed.log(3, {"reward/outcome_mean": 0.75})
    resumed.close()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # Both folders carry the id (wandb adds "-1" when two start within the same second).
    assert len(runs) == 2 and all(f"-{run_id}" in run.name for run in runs)
    _, summary = _history_and_summary(next(runs[1].glob("*.wandb")))
    assert (summary["reward/outcome_mean"], summary["_step"]) == (0.75, 3)


def test_resolve_wandb_mode():
    assert resolve_wandb_mode("auto", {}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) \
        == "disabled"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"


def test_non_logging_rank_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir, wandb_mode="offline", is_logging_rank=False,
                         wandb_run_id="abc123")
    logger.log(1, {"reward/outcome_mean": 1.0})
    logger.message("hello")
    logger.close()
    assert not run_dir.exists()
    assert logger.wandb_run_id == "abc123"  # passed through for the checkpoint
    assert capsys.readouterr() == ("", "")


def test_summary_line_every_log_every_steps_without_a_tty(tmp_path, capsys):
    logger = make_logger(tmp_path / "run", total_steps=5, log_every=2)
    for step in range(1, 6):
        logger.log(step, {"reward/outcome_mean": step / 4, "reward/accuracy": 0.5, "loss": 3.0})
    logger.message("saved checkpoint")
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    # Steps 2 and 4 (every 2nd) and the last step 5; then the message.
    assert [line.split(" | ")[:3] for line in lines[:3]] == [
        ["step 2/5", "reward 0.5", "acc 0.5"],
        ["step 4/5", "reward 1", "acc 0.5"],
        ["step 5/5", "reward 1.25", "acc 0.5"]]
    assert lines[0].split(" | ")[-1].startswith("eta ")
    assert lines[3:] == ["saved checkpoint"]


class _TerminalBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    terminal = _TerminalBuffer()
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = make_logger(tmp_path / "run", total_steps=8, start_step=2)
    logger.log(3, {"reward/outcome_mean": 0.125, "reward/accuracy": 0.75, "loss": 1.0})
    logger.message("between steps")
    logger.log(4, {"reward/outcome_mean": 0.25})
    logger.close()
    bar = terminal.getvalue()
    assert "4/8" in bar and "reward=0.25" in bar and "acc=0.75" in bar
    assert "loss" not in bar  # only the headline metrics
    assert "between steps" in capsys.readouterr().out


@pytest.mark.parametrize("field, value, allowed", [
    ("wandb_mode", "sometimes", "one of"),
    ("log_every", 0, "an integer >= 1"),
    ("run_dir", "", "a non-empty path"),
    ("wandb_run_name", "", "None"),
    ("progress_bar", "yes", "true or false"),
])
def test_bad_logging_config_names_key_and_value(field, value, allowed):
    with pytest.raises(ValueError, match=rf"logging\.{field}={value!r} is invalid: .*{allowed}"):
        LoggingConfig(**{field: value}).validate()


def _write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_plot_curves_draws_one_panel_per_present_key(tmp_path):
    metrics = _write_metrics(tmp_path / "run" / "metrics.jsonl", [
        {"step": step, "time": 0.0, "reward/outcome_mean": step / 10,
         "reward/accuracy": "nan" if step == 3 else step / 20}
        for step in range(1, 11)])
    png = plot_curves(metrics, tmp_path / "out" / "curves.png", smooth=3)
    assert png == tmp_path / "out" / "curves.png" and png.stat().st_size > 0
    with Image.open(png) as image:
        assert image.format == "PNG"
        # The two present default keys; reward/process_mean and prm/accuracy are skipped.
        assert image.size == (round(FIGURE_WIDTH_IN * DPI), round(2 * PANEL_HEIGHT_IN * DPI))
        assert image.size == (800, 500)


def test_plot_curves_without_any_key_names_keys_and_file(tmp_path):
    metrics = _write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    with pytest.raises(ValueError, match=r"\['reward/accuracy', 'kl'\].*metrics\.jsonl"):
        plot_curves(metrics, tmp_path / "curves.png", keys=("reward/accuracy", "kl"))
    with pytest.raises(ValueError, match=r"smooth=0 is invalid"):
        plot_curves(metrics, tmp_path / "curves.png", keys=("loss",), smooth=0)


def test_moving_average_is_trailing_and_starts_at_the_first_point():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([3.0, 6.0, 9.0], 5) == [3.0, 4.5, 6.0]


def test_cli_writes_curves_png_next_to_the_metrics_file(tmp_path, monkeypatch, capsys):
    metrics = _write_metrics(tmp_path / "run" / "metrics.jsonl",
                             [{"step": s, "loss": 1.0 / s, "kl": 0.1 * s} for s in (1, 2, 3)])
    main([str(metrics), "--keys", "loss,kl", "--smooth", "2"])
    png = tmp_path / "run" / "curves.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    with Image.open(png) as image:
        assert image.size == (800, 500)

    # tools/plot_metrics.py is the same CLI; --out picks the file, one key -> one panel.
    out = tmp_path / "loss.png"
    monkeypatch.setattr(sys, "argv", ["plot_metrics.py", str(metrics), "--keys", "loss",
                                      "--out", str(out)])
    runpy.run_path(str(REPO / "tools" / "plot_metrics.py"), run_name="__main__")
    with Image.open(out) as image:
        assert image.size == (800, 250)

    with pytest.raises(SystemExit) as exit_info:
        main([str(metrics), "--keys", "reward/accuracy"])
    assert exit_info.value.code == 2
    assert "reward/accuracy" in capsys.readouterr().err
