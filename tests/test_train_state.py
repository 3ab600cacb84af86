"""Train-state checkpoints: a resumed run continues bit-exactly (DP2 with the distributed
optimizer, TP2), a save killed midway leaves the previous checkpoint in charge, keep_last
prunes, and resume/config mistakes fail with messages that name the problem.

Multi-process parts run tests/workers/train_state_worker.py as real gloo processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, free_port, run_json_worker
from workers.train_state_worker import EXTRA

from megatron_prime.checkpoint.train_state import (
    CRASH_ENV,
    FORMAT_VERSION,
    MARKER,
    CheckpointConfig,
    _prune,
    find_latest_checkpoint,
    resolve_resume,
    save_train_state,
)

WORKER = "tests/workers/train_state_worker.py"
LAYOUTS = {
    "dp2_distributed_optimizer": ["--distributed-optimizer"],
    "tp2": ["--tp", "2"],
}


def run_one_process(args: list[str], logs: Path, extra_env: dict[str, str] | None = None,
                    timeout: int = 300) -> tuple[int, str]:
    """The worker as a single process (world size 1), without torchrun, so that the test sees
    its own exit status (a SIGKILL included); returns (status, end of stderr).

    It runs in a session of its own, ended as a whole afterwards: Megatron's checkpoint writer
    spawns a multiprocessing manager that outlives a SIGKILLed parent.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), **(extra_env or {})}
    stderr_path = logs.with_suffix(".stderr")
    with open(logs.with_suffix(".stdout"), "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(REPO / WORKER), *args], env=env,
                                   stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return status, stderr_path.read_text()[-4000:]


def write_marker(folder: Path, step: int, format_version: int = FORMAT_VERSION) -> None:
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"format_version": format_version, "step": step}))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_continues_bit_exactly(layout, tmp_path):
    root = tmp_path / "checkpoints"
    result = run_json_worker(WORKER, 2, ["--mode", "roundtrip", *LAYOUTS[layout],
                                         "--root", str(root)], tmp_path / "result.json")
    assert result["step"] == 2
    assert result["extra"] == EXTRA
    # Steps 3 and 4 (policy and PRM loss each) after loading into new models and optimizers
    # equal the uninterrupted run's to the last bit.
    assert len(result["continued_losses"]) == 2
    assert all(math.isfinite(loss) and loss > 0 for step in result["continued_losses"]
               for loss in step)
    assert result["resumed_losses"] == result["continued_losses"]
    for rank, checks in enumerate(result["checks_per_rank"]):
        assert checks == {
            "fresh_weights_differed": True,  # the load, not the init, made them equal
            "weights_restored": True,
            "adam_restored": True,  # main params, both moments, step counts
            "lrs_restored": True,  # scheduler
            "rng_restored": True,  # python, numpy, torch, Megatron's TP tracker
            "final_weights_equal": True,
            "final_weights_moved": True,
        }, f"rank {rank}"

    folder = root / "step_00000002"
    assert result["folder"] == str(folder)
    files = set(result["files"])
    assert {MARKER, "schedulers.pt", "rng/rank_00000.pt", "rng/rank_00001.pt",
            "policy/metadata.json", "prm/metadata.json"} <= files
    marker = json.loads((folder / MARKER).read_text())
    assert marker["models"] == ["policy", "prm"]
    assert marker["schedulers"] == ["policy", "prm"]
    assert marker["key_naming"] == "transformer_engine"  # loads into either layer spec
    assert marker["layer_specs"] == {"policy": "local", "prm": "local"}
    # Adam's step count, whatever implementation kept it: two steps each by step_00000002.
    assert marker["adam_steps"] == {"policy": 2, "prm": 2}
    assert marker["layout"]["world_size"] == 2
    if layout == "tp2":
        assert marker["layout"]["tensor_parallel_size"] == 2
        assert "distrib_optim_sharding_type" not in marker["optimizers"]["policy"]
    else:
        assert marker["layout"]["data_parallel_size"] == 2
        assert marker["optimizers"]["policy"]["distrib_optim_sharding_type"] == "dp_reshardable"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


@pytest.mark.slow
def test_killed_save_leaves_previous_checkpoint_and_keep_last_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    snapshot = tmp_path / "step1_state.pt"
    status, stderr = run_one_process(["--mode", "crash", "--root", str(root), "--snapshot",
                                      str(snapshot)], tmp_path / "crash", {CRASH_ENV: "2"})
    assert status == -signal.SIGKILL, stderr

    partial = root / ".step_00000002.partial"
    assert (partial / "policy" / "metadata.json").is_file()  # step 2's state was written...
    assert not (partial / MARKER).exists()  # ...but never marked complete nor renamed
    assert not (root / "step_00000002").exists()
    assert find_latest_checkpoint(root) == root / "step_00000001"
    assert resolve_resume(CheckpointConfig(resume="auto"), root) == root / "step_00000001"
    # Left over by some earlier interrupted save: the next complete save removes it.
    (root / ".step_00000009.partial").mkdir()

    out = tmp_path / "resumed.json"
    status, stderr = run_one_process(["--mode", "resume", "--root", str(root), "--snapshot",
                                      str(snapshot), "--out", str(out)], tmp_path / "resume")
    assert status == 0, stderr
    result = json.loads(out.read_text())
    assert result["resumed_from"] == str(root / "step_00000001")
    assert result["step"] == 1
    assert result["extra"] == EXTRA
    assert result["weights_restored"] is True
    assert result["adam_restored"] is True
    errors = result["errors"]
    assert "step_00000001 holds no model ['value']: it has models ['policy', 'prm']" in (
        errors["missing_model"])
    assert ("optimizer state of 'policy' was saved with use_distributed_optimizer=False and "
            "this job has use_distributed_optimizer=True: expected the same value") in (
        errors["optimizer_kind"])
    # keep_last=2: saving step 2 keeps 1 and 2; saving step 3 deletes step 1.
    assert result["listings"] == [["step_00000001", "step_00000002"],
                                  ["step_00000002", "step_00000003"]]


def test_find_latest_ignores_partial_and_incomplete(tmp_path):
    assert find_latest_checkpoint(tmp_path / "absent") is None
    assert find_latest_checkpoint(tmp_path) is None
    write_marker(tmp_path / "step_00000003", 3)
    write_marker(tmp_path / "step_00000012", 12)
    (tmp_path / "step_00000040").mkdir()  # no marker: incomplete
    write_marker(tmp_path / ".step_00000050.partial", 50)  # marked but never renamed
    (tmp_path / "notes").mkdir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000012"
    assert resolve_resume(CheckpointConfig(resume="auto"), tmp_path) == tmp_path / "step_00000012"
    assert resolve_resume(CheckpointConfig(resume="none"), tmp_path) is None
    explicit = CheckpointConfig(resume=str(tmp_path / "step_00000003"))
    assert resolve_resume(explicit, tmp_path) == tmp_path / "step_00000003"


def test_prune_keeps_the_newest_and_the_one_just_saved(tmp_path):
    for step in (1, 2, 3):
        write_marker(tmp_path / f"step_{step:08d}", step)
    (tmp_path / ".step_00000009.partial").mkdir()
    (tmp_path / ".step_00000004.old").mkdir()
    (tmp_path / "step_00000005").mkdir()  # incomplete: not ours to judge, left alone
    _prune(tmp_path, keep_last=2, just_saved=tmp_path / "step_00000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000002", "step_00000003", "step_00000005"]
    # A run resumed from step 3 saves below an abandoned run's step 20: step 3 stays.
    write_marker(tmp_path / "step_00000020", 20)
    _prune(tmp_path, keep_last=1, just_saved=tmp_path / "step_00000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000003", "step_00000005", "step_00000020"]


def test_resolve_resume_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Not "auto" or "none": a path, and there is none.
    with pytest.raises(FileNotFoundError, match=r"checkpoint.resume='sometimes': .*sometimes "
                                                r"does not exist; expected 'auto', 'none'"):
        resolve_resume(CheckpointConfig(resume="sometimes"), tmp_path)

    (tmp_path / "step_00000005").mkdir()
    with pytest.raises(ValueError, match=r"step_00000005 is not a complete train-state "
                                         r"checkpoint: train_state.json is missing"):
        resolve_resume(CheckpointConfig(resume=str(tmp_path / "step_00000005")), tmp_path)

    (tmp_path / ".step_00000006.partial").mkdir()
    with pytest.raises(ValueError, match="staging folder of an interrupted save"):
        resolve_resume(CheckpointConfig(resume=str(tmp_path / ".step_00000006.partial")),
                       tmp_path)

    with pytest.raises(ValueError, match=r"looks like the checkpoint root \(checkpoint.dir\)"):
        resolve_resume(CheckpointConfig(resume=str(tmp_path)), tmp_path)

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file is a file"):
        resolve_resume(CheckpointConfig(resume="a_file"), tmp_path)

    write_marker(tmp_path / "step_00000007", 7, format_version=99)
    with pytest.raises(ValueError, match="format_version=99 is not supported: expected 1"):
        resolve_resume(CheckpointConfig(resume="step_00000007"), tmp_path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("keep_last", 0, "checkpoint.keep_last=0 is invalid: expected an integer >= 1"),
    ("keep_last", True, "checkpoint.keep_last=True is invalid"),
    ("save_every", -1, "checkpoint.save_every=-1 is invalid: expected an integer >= 0"),
    ("dir", "", "checkpoint.dir='' is invalid: expected a non-empty folder path"),
    ("resume", " ", "checkpoint.resume=' ' is invalid: expected 'auto', 'none' or the path"),
])
def test_config_errors_name_key_value_and_allowed(field, value, message):
    CheckpointConfig().validate()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CheckpointConfig(**{field: value}).validate()


def test_save_refuses_bad_arguments_before_writing(tmp_path):
    with pytest.raises(ValueError, match="extra is not JSON data"):
        save_train_state(tmp_path, 1, {}, {}, {}, {"sampler": object()}, keep_last=2)
    with pytest.raises(ValueError, match="checkpoint.keep_last=0 is invalid"):
        save_train_state(tmp_path, 1, {}, {}, {}, {}, keep_last=0)
    with pytest.raises(ValueError, match=r"optimizers \['prm'\] have no model"):
        save_train_state(tmp_path, 1, {}, {"prm": object()}, {}, {}, keep_last=2)
    assert list(tmp_path.iterdir()) == []


def test_distributed_optimizer_state_resumes_only_under_its_layer_spec(tmp_path):
    """Weights load into either spec; the dp_reshardable optimizer state is flat buffers in
    the model's parameter order, which the spec decides: another spec is refused by name."""
    from megatron_prime.checkpoint.train_state import _check_optimizer_format

    layout = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "context_parallel_size": 1,
              "virtual_pipeline_parallel_size": None, "data_parallel_size": 2}
    sharded = {"chained_optim_avoid_prefix": True, "distrib_optim_sharding_type": "dp_reshardable"}
    plain = {"chained_optim_avoid_prefix": True}
    # Same spec, an older checkpoint without the record, or the plain optimizer: accepted.
    _check_optimizer_format(tmp_path, "policy", sharded, sharded, layout, layout, "local", "local")
    _check_optimizer_format(tmp_path, "policy", sharded, sharded, layout, layout, None, "local")
    _check_optimizer_format(tmp_path, "policy", plain, plain, layout, layout,
                            "transformer_engine", "local")
    with pytest.raises(ValueError, match=r"the distributed optimizer state of 'policy' was saved "
                                         r"by a model of layer spec 'transformer_engine' and this "
                                         r"job builds 'local'"):
        _check_optimizer_format(tmp_path, "policy", sharded, sharded, layout, layout,
                                "transformer_engine", "local")


def test_truncated_checkpoint_file_names_the_folder_and_file(tmp_path):
    root = tmp_path / "checkpoints"
    out = tmp_path / "damaged.json"
    status, stderr = run_one_process(["--mode", "damaged", "--root", str(root), "--out", str(out)],
                                     tmp_path / "damaged")
    assert status == 0, stderr
    result = json.loads(out.read_text())
    hint = (f"resume from an older step with checkpoint.resume=<a step_* folder under {root}>, "
            "or start fresh with checkpoint.resume=none")
    kind, message = result["errors"]["distcp"]
    folder = root / "step_00000002" / "policy"
    assert kind == "DamagedCheckpoint"
    assert message.startswith(f"{folder}: the checkpoint is damaged: {result['distcp']} has "
                              f"{result['size'] // 2} of its {result['size']} bytes (")
    assert message.endswith(hint)
    assert "\n" not in message
    kind, message = result["errors"]["rng"]
    assert kind == "DamagedCheckpoint"
    assert message.startswith(f"{root / 'step_00000001'}: the checkpoint is damaged: "
                              "rng/rank_00000.pt cannot be read (")
    assert message.endswith(hint)
