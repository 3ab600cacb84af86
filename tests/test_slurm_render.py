"""SLURM submission layer: rendered batch scripts (golden files), option errors, the submit
command, and the script's requeue logic run by bash against stand-in srun/scontrol.

No cluster is needed; ``sbatch --test-only`` runs only where sbatch exists.
Regenerate the golden files (and their copies in examples/slurm/) after an intended change
with ``MEGATRON_PRIME_UPDATE_GOLDEN=1 python -m pytest tests/test_slurm_render.py``.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_prime.launch.sbatch import (
    SlurmConfig,
    load_run_config,
    load_slurm_config,
    render_sbatch,
)
from megatron_prime.launch.submit import (
    NodeShape,
    Partitions,
    PreflightFailed,
    check_partition,
    gpus_in_gres,
    main,
    parse_sinfo,
    submit,
)

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIG = "examples/eurus2_7b_prime.yaml"  # relative: it is written into the scripts
EXAMPLES = REPO / "examples" / "slurm"
GOLDEN = REPO / "tests" / "golden" / "slurm"
LAYOUTS = ("1node", "2nodes", "4nodes")
DGX_H100 = NodeShape(cpus=112, gpus=8)


def cluster(default: str | None = None, **partitions: list[NodeShape]):
    """A stand-in for sinfo_partitions (the real one runs in test_slurm_cluster.py)."""
    return lambda: Partitions(nodes=dict(partitions), default=default)


@pytest.fixture(scope="module")
def prime():
    """The example run config as the job runs it (imports the trainer once per module)."""
    return load_run_config(str(REPO / RUN_CONFIG), [])


def example_slurm(layout: str, **changes) -> SlurmConfig:
    return load_slurm_config(EXAMPLES / f"h100_{layout}.yaml", changes)


def render_example(layout: str, prime, **changes) -> str:
    return render_sbatch(example_slurm(layout, **changes), RUN_CONFIG, [], prime)


# ---- golden files ----

@pytest.mark.parametrize("layout", LAYOUTS)
def test_example_scripts_match_golden_files(layout, prime, monkeypatch):
    monkeypatch.chdir(REPO)
    text = render_sbatch(example_slurm(layout), RUN_CONFIG, [])  # loads the run config itself
    golden = GOLDEN / f"eurus2_7b_prime_{layout}.sbatch"
    example = EXAMPLES / golden.name
    if os.environ.get("MEGATRON_PRIME_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
        example.write_text(text)
    assert text == golden.read_text()
    assert example.read_text() == golden.read_text(), f"{example} differs from {golden}"
    assert text == render_example(layout, prime)


# Larger models: (run config, cluster options, rendered script); layouts from examples/plans/.
BIG_MODELS = [("examples/qwen2.5_32b_prime.yaml", "h100_qwen2.5_32b_4nodes.yaml",
               "qwen2.5_32b_prime_4nodes.sbatch", "TP=8 x PP=2 x CP=1 per model replica, DP=2"),
              ("examples/qwen2.5_72b_prime.yaml", "h100_qwen2.5_72b_8nodes.yaml",
               "qwen2.5_72b_prime_8nodes.sbatch", "TP=8 x PP=4 x CP=1 per model replica, DP=2")]


@pytest.mark.parametrize("run_config, cluster_options, script, layout", BIG_MODELS)
def test_large_model_example_scripts_match_golden_files(run_config, cluster_options, script, layout,
                                                       monkeypatch):
    monkeypatch.chdir(REPO)
    text = render_sbatch(load_slurm_config(EXAMPLES / cluster_options), run_config, [])
    if os.environ.get("MEGATRON_PRIME_UPDATE_GOLDEN") == "1":
        (GOLDEN / script).write_text(text)
        (EXAMPLES / script).write_text(text)
    assert text == (GOLDEN / script).read_text() == (EXAMPLES / script).read_text()
    assert layout in text


@pytest.mark.parametrize("layout,nodes,dp", [("1node", 1, 2), ("2nodes", 2, 4), ("4nodes", 4, 8)])
def test_example_scripts_ask_for_one_task_per_gpu_and_resume(layout, nodes, dp, prime):
    text = render_example(layout, prime)
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=8",
                 # (900 s step + 107 s save, the YAML's estimates) x 1.5 = 1510.5 -> 1511
                 "#SBATCH --gpus-per-node=8", "#SBATCH --signal=USR1@1511", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"  --nodes={nodes} \\",
                 # each task sees its node's GPUs: the engines are placed per replica
                 "  --gpu-bind=none \\",
                 "  python -m megatron_prime.train examples/eurus2_7b_prime.yaml "
                 "checkpoint.resume=auto || status=$?",
                 "RUN_STEPS=600", "CHECKPOINT_ROOT=runs/eurus2-7b-prime/checkpoints",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in text.splitlines(), line
    assert f"trainer processes: TP=4 x PP=1 x CP=1 per model replica, DP={dp}." in text
    assert "B:USR1" not in text  # the trainers (job step tasks) must get the signal


def test_render_quotes_paths_and_overrides(prime):
    slurm = SlurmConfig(nodes=2, time="12:00:00", signal_seconds=600,
                        container_image="nvcr.io#nvidia/pytorch:25.01-py3",
                        container_mounts=["/data_sets:/data"],
                        venv="/opt/my venv", account="proj-1", qos="high", dependency=1234,
                        extra_sbatch_lines=["--exclusive", "--mem=0"])
    overrides = ["trainer.steps=20", "data.paths=[a b.parquet]"]
    text = render_sbatch(slurm, "configs/my run.yaml", overrides,
                         load_run_config(str(REPO / RUN_CONFIG), overrides))
    lines = text.splitlines()
    assert "#SBATCH --account=proj-1" in lines and "#SBATCH --qos=high" in lines
    assert "#SBATCH --dependency=afterany:1234" in lines
    assert "#SBATCH --exclusive" in lines and "#SBATCH --mem=0" in lines
    assert "  --container-image='nvcr.io#nvidia/pytorch:25.01-py3' \\" in lines
    assert "  --container-mounts=\"$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR\",/data_sets:/data \\" in lines
    assert ("  '/opt/my venv/bin/python' -m megatron_prime.train 'configs/my run.yaml' "
            "trainer.steps=20 'data.paths=[a b.parquet]' checkpoint.resume=auto || status=$?") in lines
    assert "source" not in text  # with a container, the venv's python runs inside it
    assert "RUN_STEPS=20" in lines


def test_rendering_is_deterministic(prime):
    assert render_example("2nodes", prime) == render_example("2nodes", prime)


# ---- bash accepts every script ----

def rendered_variants(prime) -> dict[str, str]:
    variants = {layout: render_example(layout, prime) for layout in LAYOUTS}
    variants["no-requeue"] = render_example("1node", prime, requeue=False)
    variants["container"] = render_example("2nodes", prime, container_image="image.sqsh",
                                           container_mounts=["/scratch:/scratch:ro"])
    variants["plain"] = render_sbatch(SlurmConfig(time="12:00:00", dependency="77_3", signal_seconds=600,
                                                  nccl_socket_ifname="^lo,docker",
                                                  gloo_socket_ifname="eth0,eth1",
                                                  node_local_dir="${SLURM_TMPDIR:-/scratch/$USER}"),
                                      RUN_CONFIG, ["algo.beta=0.1"], prime)
    return variants


def test_bash_accepts_every_rendered_script(prime, tmp_path):
    for name, text in rendered_variants(prime).items():
        path = tmp_path / f"{name}.sbatch"
        path.write_text(text)
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {done.stderr}"


# ---- option errors name the key, the value and what is allowed ----

@pytest.mark.parametrize("changes,expected", [
    ({"gpus_per_node": 16}, ["slurm.gpus_per_node=16", "[1, 8]", "more GPUs than a node has"]),
    ({"nodes": 0}, ["slurm.nodes=0", "integer >= 1"]),
    ({"time": "90 minutes"}, ["slurm.time='90 minutes'", '"HH:MM:SS" or "D-HH:MM:SS"']),
    ({"time": "1:75:00"}, ["slurm.time='1:75:00'", "minutes and seconds < 60"]),
    ({"time": 43200}, ["slurm.time=43200", "quote it in YAML"]),
    ({"time": "00:15:00", "signal_seconds": 300}, ["slurm.time='00:15:00'", "300 + 60 + 600 = 960 s",
                                                   "signalled before it could save"]),
    ({"signal_seconds": 0}, ["slurm.signal_seconds=0", "'auto' or an integer in [1, 65535]"]),
    ({"signal_seconds": "soon"}, ["slurm.signal_seconds='soon'", "'auto' or an integer"]),
    ({"signal_safety_factor": 0.9}, ["slurm.signal_safety_factor=0.9", ">= 1"]),
    ({"checkpoint_write_gbps": 0}, ["slurm.checkpoint_write_gbps=0", "a number > 0"]),
    ({"checkpoint_seconds_estimate": -5}, ["slurm.checkpoint_seconds_estimate=-5", "> 0 or None"]),
    ({"nccl_socket_ifname": "ib0,"}, ["slurm.nccl_socket_ifname='ib0,'", "interface names"]),
    ({"nccl_socket_ifname": "ib0, ib1"}, ["slurm.nccl_socket_ifname='ib0, ib1'", "without spaces"]),
    ({"nccl_socket_ifname": ""}, ["slurm.nccl_socket_ifname=''"]),
    ({"gloo_socket_ifname": "^lo"}, ["slurm.gloo_socket_ifname='^lo'", "interface names"]),
    ({"gloo_socket_ifname": "averyveryverylongname0"}, ["slurm.gloo_socket_ifname="]),
    ({"nccl_socket_ifname": "ib0", "nccl_env": {"NCCL_SOCKET_IFNAME": "eth0"}},
     ["slurm.nccl_env.NCCL_SOCKET_IFNAME='eth0'", "unset when slurm.nccl_socket_ifname is set"]),
    ({"node_local_dir": "$(hostname)/x"}, ["slurm.node_local_dir='$(hostname)/x'", "command substitution"]),
    ({"node_local_dir": "/my scratch"}, ["slurm.node_local_dir='/my scratch'", "without spaces"]),
    ({"extra_sbatch_lines": ["#SBATCH --exclusive"]}, ["slurm.extra_sbatch_lines[0]"]),
    ({"dependency": "afterok:12"}, ["slurm.dependency='afterok:12'", "job id"]),
    ({"nccl_env": {"NCCL_IB_DISABLE": True}}, ["slurm.nccl_env.NCCL_IB_DISABLE=True"]),
    ({"container_mounts": ["/a:/a"]}, ["slurm.container_mounts", "container_image"]),
    ({"gpus": 8}, ["slurm.gpus is not a known key", "slurm.gpus_per_node"]),
])
def test_bad_cluster_options_are_named(changes, expected):
    with pytest.raises(ValueError) as error:
        example_slurm("1node", **changes)
    for part in expected:
        assert part in str(error.value)


def test_unquoted_yaml_time_gets_a_quoting_hint(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes: 1\ntime: 12:00:00\n")  # YAML 1.1: the integer 43200
    with pytest.raises(ValueError, match=r"slurm.time=43200 .*quote it in YAML"):
        load_slurm_config(path)


def test_world_size_must_be_a_multiple_of_the_model_parallel_size(prime):
    slurm = example_slurm("1node", gpus_per_node=6, max_gpus_per_node=8)
    with pytest.raises(ValueError) as error:
        slurm.validate(load_run_config(str(REPO / RUN_CONFIG), ["parallel.pipeline_parallel_size=2"]))
    message = str(error.value)
    assert "slurm.nodes x slurm.gpus_per_node=6" in message
    assert "parallel.tensor_parallel_size x parallel.pipeline_parallel_size" in message
    assert "= 4 x 2 x 1 = 8" in message


def test_prompts_per_step_must_split_over_data_parallel_ranks(prime):
    with pytest.raises(ValueError, match=r"rollout.batch.prompts_per_step=256 .*data-parallel "
                                         r"size 6"):
        example_slurm("4nodes", nodes=3).validate(prime)  # 24 GPUs / TP 4 = DP 6


def test_time_shorter_than_one_checkpoint_interval(prime):
    # save_every=20 steps x 900 s = 18000 s > 4 h - 1200 - 60 - 600 = 12540 s for steps.
    slurm = example_slurm("2nodes", time="04:00:00", signal_seconds=1200,
                          seconds_per_step_estimate=900.0)
    with pytest.raises(ValueError) as error:
        slurm.validate(prime)
    message = str(error.value)
    assert "slurm.time='04:00:00'" in message and "one checkpoint interval" in message
    assert "checkpoint.save_every=20 steps x 900 s per step = 18000 s" in message
    assert "12540 s for steps" in message
    # A shorter interval fits; save_every=0 means the signal checkpoint is the only save.
    slurm.validate(load_run_config(str(REPO / RUN_CONFIG), ["checkpoint.save_every=10"]))
    slurm.validate(load_run_config(str(REPO / RUN_CONFIG), ["checkpoint.save_every=0"]))


def test_explicit_resume_other_than_auto_is_refused():
    with pytest.raises(ValueError, match=r"checkpoint.resume='none' is invalid for a SLURM job"):
        load_run_config(str(REPO / RUN_CONFIG), ["checkpoint.resume=none"])


# ---- partitions ----

def test_unknown_partition_names_the_existing_ones():
    with pytest.raises(ValueError) as error:
        check_partition(example_slurm("1node"), cluster(debug=[DGX_H100], a100=[DGX_H100]),
                        dry_run=False)
    assert "slurm.partition='gpu'" in str(error.value)
    assert "['a100', 'debug']" in str(error.value)
    assert check_partition(example_slurm("1node", partition="a100,debug"),
                           cluster(debug=[DGX_H100], a100=[DGX_H100]), dry_run=False) is None


def test_without_sinfo_the_partition_check_is_skipped_only_for_a_dry_run():
    slurm = example_slurm("1node")
    assert "not checked" in check_partition(slurm, lambda: None, dry_run=True)
    with pytest.raises(ValueError, match="sinfo not found"):
        check_partition(slurm, lambda: None, dry_run=False)
    assert check_partition(example_slurm("1node", partition=None), lambda: None, dry_run=False) is None


def test_sinfo_output_is_read_per_partition_and_node_kind():
    text = "debug*|2|(null)\ngpu|112|gpu:8\ngpu|64|gpu:h100:4(S:0-1)\nmixed|2+|gpu:a100:2,shard:4\n"
    partitions = parse_sinfo(text)
    assert partitions.default == "debug"
    assert partitions.nodes == {"debug": [NodeShape(2, 0)], "gpu": [DGX_H100, NodeShape(64, 4)],
                                "mixed": [NodeShape(2, 2)]}
    assert gpus_in_gres("gpu:h100:8(S:0-1)") == 8 and gpus_in_gres("(null)") == 0


def test_a_job_node_must_fit_on_a_node_of_the_partition():
    small = cluster(gpu=[NodeShape(64, 4), NodeShape(32, 8)])
    with pytest.raises(ValueError) as error:
        check_partition(example_slurm("1node", max_gpus_per_node=16, gpus_per_node=12), small,
                        dry_run=False)
    assert "slurm.gpus_per_node=12 is invalid: expected at most 8" in str(error.value)
    with pytest.raises(ValueError) as error:  # 8 tasks x 12 CPUs, and 8-GPU nodes have 32
        check_partition(example_slurm("1node"), small, dry_run=False)
    assert ("slurm.cpus_per_task=12 is invalid: expected at most 4: 8 tasks per node x 12 CPUs "
            "= 96, but the nodes of partition 'gpu' with 8 GPUs have at most 32 CPUs") in str(error.value)
    assert check_partition(example_slurm("1node", cpus_per_task=4), small, dry_run=False) is None
    # Without slurm.partition the default partition is checked.
    with pytest.raises(ValueError, match="partition 'debug' \\(the default\\) have at most 0"):
        check_partition(example_slurm("1node", partition=None),
                        cluster("debug", debug=[NodeShape(2, 0)], gpu=[DGX_H100]), dry_run=False)


def test_cpu_jobs_name_their_tasks_and_run_the_trainer_on_cpu(prime):
    slurm = load_slurm_config(None, {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2,
                                     "cpus_per_task": 1, "time": "00:30:00",
                                     "startup_seconds": 60, "signal_seconds": 60})
    cpu_run = load_run_config(str(REPO / RUN_CONFIG), ["trainer.device=cpu", "parallel.tensor_parallel_size=2",
                                                       "rollout.batch.prompts_per_step=2"])
    text = render_sbatch(slurm, RUN_CONFIG, ["trainer.device=cpu", "parallel.tensor_parallel_size=2"], cpu_run)
    assert "#SBATCH --ntasks-per-node=2\n" in text and "--gpus-per-node" not in text
    assert "1 node(s) x 2 CPU task(s) = 2 trainer processes: TP=2" in text
    with pytest.raises(ValueError, match="trainer.device='auto' is invalid: expected 'cpu' for a CPU job"):
        slurm.validate(prime)
    with pytest.raises(ValueError, match="slurm.tasks_per_node=None is invalid: expected a positive"):
        load_slurm_config(None, {"gpus_per_node": 0})
    with pytest.raises(ValueError, match="slurm.tasks_per_node=4 is invalid: expected None or 8"):
        load_slurm_config(None, {"tasks_per_node": 4})
    with pytest.raises(ValueError, match="trainer.device='cpu' is invalid"):
        example_slurm("1node").validate(cpu_run)


# ---- the submit command ----

def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    status = main([str(REPO / RUN_CONFIG), "--slurm", str(EXAMPLES / "h100_2nodes.yaml"),
                   "trainer.steps=300", "--nodes", "4", "--time", "12:00:00", "--dry-run"],
                  list_partitions=cluster(gpu=[DGX_H100]), stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    expected = render_sbatch(example_slurm("2nodes", nodes=4, time="12:00:00"), str(REPO / RUN_CONFIG),
                             ["trainer.steps=300"])
    assert out.getvalue() == expected
    assert "#SBATCH --nodes=4" in expected and "RUN_STEPS=300" in expected
    assert list(tmp_path.iterdir()) == []


def test_submit_writes_the_script_then_calls_sbatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    submitted = []

    def fake_sbatch(path: Path) -> str:
        submitted.append(path.read_text())
        return "4242"

    slurm = example_slurm("1node")
    result = submit(str(REPO / RUN_CONFIG), slurm, list_partitions=cluster(gpu=[DGX_H100]),
                    sbatch=fake_sbatch, preflight=None)
    assert result.job_id == "4242"
    assert result.script_path == Path("slurm-logs/eurus2-7b-prime-1node.sbatch")
    assert result.log_path == "slurm-logs/eurus2-7b-prime-1node-4242.out"
    assert submitted == [result.script] == [(tmp_path / result.script_path).read_text()]


def test_errors_are_one_line_with_status_2_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--gpus-per-node", "16"], "slurm.gpus_per_node=16"),
        (["--partition", "h200"], "slurm.partition='h200'"),
        (["algo.beta=-1"], "algo.beta=-1.0 is invalid"),
        (["trainer.steps"], "expected key=value"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]
    for extra, expected in cases:
        out, err = io.StringIO(), io.StringIO()
        status = main([str(REPO / RUN_CONFIG), "--slurm", str(EXAMPLES / "h100_1node.yaml"), *extra],
                      list_partitions=cluster(gpu=[DGX_H100], debug=[NodeShape(2, 0)]),
                      stdout=out, stderr=err)
        lines = err.getvalue().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (extra, lines)
        assert expected in lines[0], (extra, lines)
        assert out.getvalue() == ""
    assert list(tmp_path.iterdir()) == []


def test_submit_refuses_when_the_doctor_fails_and_skip_doctor_goes_on(tmp_path, monkeypatch):
    """The example's model folder is not here: the doctor's disk check fails on it, before
    anything is written; --skip-doctor goes on to sbatch (a stand-in here)."""
    monkeypatch.chdir(tmp_path)
    args = [str(REPO / RUN_CONFIG), "--slurm", str(EXAMPLES / "h100_1node.yaml")]
    out, err = io.StringIO(), io.StringIO()
    status = main(args, list_partitions=cluster(gpu=[DGX_H100]), stdout=out, stderr=err)
    lines = err.getvalue().splitlines()
    assert status == 1, lines
    # The signal margin is sized from the cluster YAML's step and save estimates.
    assert [line.split(":")[0] for line in lines[:-1]][-3:] == ["PASS folders", "FAIL disk",
                                                                "PASS signal"], lines
    assert "model.path='ckpt/eurus2-7b-sft'" in lines[-3]  # the disk check sizes the model
    assert lines[-1].startswith("error: megatron-prime-doctor: ") and "--skip-doctor" in lines[-1]
    assert list(tmp_path.iterdir()) == [] and out.getvalue() == ""

    submitted = []
    with pytest.raises(PreflightFailed) as refused:
        submit(str(REPO / RUN_CONFIG), example_slurm("1node"),
               list_partitions=cluster(gpu=[DGX_H100]), sbatch=submitted.append)
    assert submitted == [] and list(tmp_path.iterdir()) == []
    assert [check.name for check in refused.value.checks][-3:] == ["folders", "disk", "signal"]

    out, err = io.StringIO(), io.StringIO()
    status = main([*args, "--skip-doctor"], list_partitions=cluster(gpu=[DGX_H100]),
                  stdout=out, stderr=err, sbatch=lambda path: "4243")
    assert status == 0 and err.getvalue() == "", err.getvalue()
    assert out.getvalue().startswith("submitted job 4243\n")


def test_script_runs_the_doctor_on_every_node_before_the_trainer(prime):
    lines = render_example("2nodes", prime).splitlines()
    start = lines.index("doctor_status=0")
    assert lines[start + 1:start + 8] == [
        "srun \\", "  --nodes=2 \\", "  --ntasks-per-node=1 \\", "  --cpus-per-task=12 \\",
        "  --kill-on-bad-exit=1 \\", "  --gpu-bind=none \\",
        "  python -m megatron_prime.doctor examples/eurus2_7b_prime.yaml checkpoint.resume=auto "
        "--only versions,gpus,shm,sandbox,interfaces --nodes 2 --gpus-per-node 8 "
        "|| doctor_status=$?"]
    assert start < lines.index("status=0")  # before the trainer's srun


# ---- the script's requeue logic, run by bash with stand-ins for srun and scontrol ----

FAKE_SRUN = """#!/bin/bash
if [[ " $* " == *" megatron_prime.doctor "* ]]; then
  printf '%s\\n' "$@" > "$FAKE_DIR/doctor_args"
  exit "${FAKE_DOCTOR_STATUS:-0}"
fi
printf '%s\\n' "$@" > "$FAKE_DIR/srun_args"
echo "$MASTER_ADDR:$MASTER_PORT" > "$FAKE_DIR/srun_master"
env > "$FAKE_DIR/srun_env"
if [[ -n "${FAKE_NEW_STEP:-}" ]]; then
  folder="$FAKE_CHECKPOINTS/$(printf 'step_%08d' "$FAKE_NEW_STEP")"
  mkdir -p "$folder" && echo '{}' > "$folder/train_state.json"
fi
exit "${FAKE_SRUN_STATUS:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) printf 'node001\\nnode002\\n' ;;
  requeue) echo "requeue $2" >> "$FAKE_DIR/scontrol_calls" ;;
  *) exit 1 ;;
esac
"""


def run_script(tmp_path: Path, prime_overrides: list[str], slurm: SlurmConfig, existing_steps=(),
               **fake_env) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    for step in existing_steps:
        (checkpoints / f"step_{step:08d}").mkdir(parents=True, exist_ok=True)
        (checkpoints / f"step_{step:08d}" / "train_state.json").write_text("{}")
    (checkpoints / "step_00000099").mkdir(parents=True, exist_ok=True)  # incomplete: no marker
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(stat.S_IRWXU)
    overrides = [f"logging.run_dir={run_dir}", *prime_overrides]
    prime = load_run_config(str(REPO / RUN_CONFIG), overrides)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(slurm, RUN_CONFIG, overrides, prime))
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]",
           "FAKE_DIR": str(tmp_path), "FAKE_CHECKPOINTS": str(checkpoints),
           **{key.upper(): str(value) for key, value in fake_env.items()}}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    return done, tmp_path / "scontrol_calls"


def test_script_requeues_a_run_stopped_early_with_progress(tmp_path):
    slurm = SlurmConfig(nodes=2, signal_seconds=300, time="12:00:00")
    done, calls = run_script(tmp_path, ["trainer.steps=3"], slurm, existing_steps=[1],
                             fake_new_step=2)
    assert done.returncode == 0, done.stderr
    assert calls.read_text() == "requeue 4242\n"
    assert "stopped at step 2 of 3" in done.stdout and "from step 1 of 3" in done.stdout
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[:4] == ["--nodes=2", "--ntasks-per-node=8", "--cpus-per-task=8", "--kill-on-bad-exit=1"]
    assert args[-4:] == [RUN_CONFIG, f"logging.run_dir={tmp_path / 'run'}", "trainer.steps=3",
                         "checkpoint.resume=auto"]
    assert (tmp_path / "srun_master").read_text() == f"node001:{20000 + 4242 % 20000}\n"


def test_script_does_not_requeue_a_finished_run(tmp_path):
    done, calls = run_script(tmp_path, ["trainer.steps=3"], SlurmConfig(signal_seconds=300, time="12:00:00"),
                             fake_new_step=3)
    assert done.returncode == 0, done.stderr
    assert "all 3 steps done" in done.stdout and not calls.exists()


def test_script_does_not_requeue_without_progress(tmp_path):
    done, calls = run_script(tmp_path, ["trainer.steps=3"], SlurmConfig(signal_seconds=300, time="12:00:00"),
                             existing_steps=[2])
    assert done.returncode == 1 and "make no progress" in done.stderr
    assert not calls.exists()


def test_script_passes_on_a_trainer_failure_without_requeue(tmp_path):
    done, calls = run_script(tmp_path, ["trainer.steps=3"], SlurmConfig(signal_seconds=300, time="12:00:00"),
                             fake_new_step=1, fake_srun_status=7)
    assert done.returncode == 7 and "exit status 7" in done.stderr
    assert not calls.exists()


def test_script_stops_before_the_trainer_when_the_doctor_fails(tmp_path):
    done, calls = run_script(tmp_path, ["trainer.steps=3"], SlurmConfig(signal_seconds=300, time="12:00:00"),
                             fake_new_step=1, fake_doctor_status=1)
    assert done.returncode == 1
    assert "the preflight check (megatron-prime-doctor) failed on a node" in done.stderr
    assert (tmp_path / "doctor_args").read_text().splitlines()[:2] == ["--nodes=1",
                                                                      "--ntasks-per-node=1"]
    assert not (tmp_path / "srun_args").exists() and not calls.exists()  # no trainer ran


def test_script_with_requeue_off_says_how_to_go_on(tmp_path):
    done, calls = run_script(tmp_path, ["trainer.steps=3"],
                             SlurmConfig(signal_seconds=300, time="12:00:00", requeue=False), fake_new_step=2)
    assert done.returncode == 0 and "submit again" in done.stdout
    assert not calls.exists()


# ---- the environment every rank gets: NCCL_CUMEM_ENABLE, socket interfaces, compile caches ----

def srun_environment(tmp_path: Path, slurm: SlurmConfig, **fake_env) -> dict[str, str]:
    done, _ = run_script(tmp_path, ["trainer.steps=3"], slurm, fake_new_step=3, **fake_env)
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in (tmp_path / "srun_env").read_text().splitlines()
                if "=" in line)


def test_ranks_get_one_nccl_cumem_value_the_interfaces_and_node_local_caches(tmp_path):
    from megatron_prime.distributed import NCCL_CUMEM_ENABLE_VALUE
    from megatron_prime.rollout.engine import COMPILE_CACHES, node_local_cache_root

    slurm = SlurmConfig(signal_seconds=300, time="12:00:00", nccl_socket_ifname="^lo,docker",
                        gloo_socket_ifname="eth0,eth1")
    env = srun_environment(tmp_path, slurm, tmpdir="/local/scratch", triton_cache_dir="/mine/triton")
    assert env["NCCL_CUMEM_ENABLE"] == NCCL_CUMEM_ENABLE_VALUE == "0"
    assert env["NCCL_SOCKET_IFNAME"] == "^lo,docker" and env["GLOO_SOCKET_IFNAME"] == "eth0,eth1"
    # ${TMPDIR:-/tmp}/megatron-prime-<job id>/<cache>; a cache the user exported is kept.
    assert env["VLLM_CACHE_ROOT"] == "/local/scratch/megatron-prime-4242/vllm"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/local/scratch/megatron-prime-4242/torchinductor"
    assert env["CUDA_CACHE_PATH"] == "/local/scratch/megatron-prime-4242/cuda-jit"
    assert env["TRITON_CACHE_DIR"] == "/mine/triton"
    # The engine picks the same folders when it starts without the script (or inside it).
    root = node_local_cache_root({"SLURM_JOB_ID": "4242", "TMPDIR": "/local/scratch"})
    for variable, folder in COMPILE_CACHES.items():
        if variable != "TRITON_CACHE_DIR":
            assert env[variable] == str(root / folder), variable


def test_defaults_without_tmpdir_and_a_named_node_local_dir(tmp_path):
    env = srun_environment(tmp_path, SlurmConfig(signal_seconds=300, time="12:00:00"))
    assert env["VLLM_CACHE_ROOT"] == "/tmp/megatron-prime-4242/vllm"
    assert "NCCL_SOCKET_IFNAME" not in env and "GLOO_SOCKET_IFNAME" not in env
    local = tmp_path / "local"
    env = srun_environment(tmp_path, SlurmConfig(signal_seconds=300, time="12:00:00",
                                                 node_local_dir="$FAKE_DIR/local"))
    assert env["TORCH_EXTENSIONS_DIR"] == f"{local}/megatron-prime-4242/torch-extensions"


def test_a_user_nccl_cumem_value_is_exported_once(prime, tmp_path):
    slurm = SlurmConfig(signal_seconds=300, time="12:00:00", nccl_env={"NCCL_CUMEM_ENABLE": "1"})
    text = render_sbatch(slurm, RUN_CONFIG, [], prime)
    assert [line for line in text.splitlines() if "NCCL_CUMEM_ENABLE=" in line] == \
        ["export NCCL_CUMEM_ENABLE=1"]
    assert srun_environment(tmp_path, slurm)["NCCL_CUMEM_ENABLE"] == "1"


def test_interface_options_in_the_cluster_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text('time: "12:00:00"\nnccl_socket_ifname: =ib0\ngloo_socket_ifname: ib0\n')
    slurm = load_slurm_config(path)
    assert (slurm.nccl_socket_ifname, slurm.gloo_socket_ifname) == ("=ib0", "ib0")
    path.write_text('time: "12:00:00"\ngloo_socket_ifname: [ib0]\n')
    with pytest.raises(ValueError, match=r"slurm.gloo_socket_ifname=\['ib0'\] is invalid"):
        load_slurm_config(path)
