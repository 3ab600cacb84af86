"""Bad inputs a first cluster submit can hold, each refused in one line that names the key or
file before anything is written (single process, no engine, no process group)."""

from __future__ import annotations

import pytest

from megatron_prime.config import require_output_folder


def run_main(tmp_path, *overrides: str) -> str:
    """The trainer's CLI in-process; the output checks run before the model is opened (the
    model path here does not exist) and before any process group starts."""
    from megatron_prime import distributed
    from megatron_prime.train import main

    with pytest.raises(SystemExit) as error:
        main([f"model.path={tmp_path / 'no_model'}", f"data.paths=[{tmp_path / 'no.jsonl'}]",
              *overrides])
    assert not distributed.is_initialized()
    return str(error.value)


def test_run_dir_that_is_a_file_is_named_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("a file")
    message = run_main(tmp_path, f"logging.run_dir={run_dir}")
    assert message == (f"error: logging.run_dir='{run_dir}' is invalid: {run_dir} is a file; "
                       "expected a folder path")
    assert run_dir.read_text() == "a file"


def test_checkpoint_dir_that_is_a_file_is_named_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = tmp_path / "ckpt"
    checkpoints.write_text("a file")
    message = run_main(tmp_path, f"logging.run_dir={run_dir}", f"checkpoint.dir={checkpoints}")
    assert message == (f"error: checkpoint.dir='{checkpoints}' is invalid: {checkpoints} is a "
                       "file; expected a folder path")
    assert not run_dir.exists()


def test_relative_checkpoint_dir_under_a_file_names_the_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "out").write_text("a file")
    message = run_main(tmp_path, f"logging.run_dir={run_dir}", "checkpoint.dir=out/ckpt")
    assert message == (f"error: checkpoint.dir='out/ckpt' is invalid: {run_dir / 'out' / 'ckpt'} "
                       f"has a file in its path ({run_dir / 'out'}); expected a folder path")
    assert sorted(p.name for p in run_dir.iterdir()) == ["out"]


def test_output_folder_that_does_not_exist_yet_is_accepted(tmp_path):
    require_output_folder("logging.run_dir", "a/b", tmp_path / "a" / "b")
    (tmp_path / "existing").mkdir()
    require_output_folder("logging.run_dir", "existing", tmp_path / "existing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_vllm_log_level_is_validated_naming_its_key():
    from megatron_prime.rollout.engine import RolloutConfig

    assert RolloutConfig().log_level == "WARNING"
    with pytest.raises(ValueError, match=r"^rollout.engine.log_level='LOUD' is invalid: expected one "
                                         r"of \['DEBUG', 'INFO', 'WARNING', 'ERROR'\]$"):
        RolloutConfig(log_level="LOUD").validate()


def test_vllm_log_level_is_set_for_the_engine_unless_the_user_set_it(monkeypatch):
    import logging
    import os

    from megatron_prime.rollout.engine import configure_vllm_logging

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "")  # recorded, so the end of the test restores it
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    vllm_logger = logging.getLogger("vllm")
    monkeypatch.setattr(vllm_logger, "level", vllm_logger.level)  # restored after the test
    assert configure_vllm_logging("WARNING") == "WARNING"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert vllm_logger.level == logging.WARNING
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's choice wins
    assert configure_vllm_logging("WARNING") == "DEBUG"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
