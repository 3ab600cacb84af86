"""``megatron-prime-submit``: check a PRIME run against the cluster options, render its batch
script and hand it to ``sbatch``.

    megatron-prime-submit examples/eurus2_7b_prime.yaml --slurm examples/slurm/h100_2nodes.yaml \\
        trainer.steps=300 --time 1-00:00:00 [--dry-run]

``key=value`` arguments override the run config (as for ``megatron_prime.train``); the flags
override the cluster YAML. Everything is validated before anything is written or submitted;
a problem is one ``error: ...`` line and exit status 2. ``--dry-run`` prints the script and
writes nothing. Otherwise the doctor's checks of the shared file system and the job run here
(``submit_checks``: folders, disk, signal margin, and the installed versions unless the job
runs in a container); a FAIL prints the doctor's lines and submits nothing (exit status 1;
``--skip-doctor`` to submit anyway). Then the script goes to ``<output_dir>/<job_name>.sbatch``
and ``sbatch --parsable`` submits it; the script runs the node checks on every node itself.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from megatron_prime.config import require
from megatron_prime.doctor import FAIL, SHARED_CHECKS, CheckResult, run_checks
from megatron_prime.launch.margin import SignalMargin
from megatron_prime.launch.sbatch import (
    SlurmConfig,
    load_run_config,
    load_slurm_config,
    log_path,
    render_sbatch,
)

if TYPE_CHECKING:
    from megatron_prime.train import PrimeConfig



@dataclass(frozen=True)
class NodeShape:
    """What one kind of node in a partition offers a job."""

    cpus: int
    gpus: int


@dataclass
class Partitions:
    """The cluster's partitions and the node kinds in each (``sinfo``)."""

    nodes: dict[str, list[NodeShape]]
    default: str | None = None  # the partition a job without --partition goes to


# Asks the cluster for its partitions; None when that cannot be asked (no sinfo here).
PartitionLister = Callable[[], "Partitions | None"]

_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,()]+)?:(\d+)")


@dataclass
class SubmitResult:
    script: str
    script_path: Path | None = None  # None with dry_run
    job_id: str | None = None
    log_path: str | None = None
    notes: tuple[str, ...] = ()  # what was not checked, and why
    checks: tuple[CheckResult, ...] = ()  # the doctor's results (none with dry_run)
    margin: SignalMargin | None = None  # the USR1 margin and where it came from


class PreflightFailed(ValueError):
    """The doctor found a problem before submission; ``checks`` holds every result."""

    def __init__(self, checks: Sequence[CheckResult]) -> None:
        self.checks = tuple(checks)
        failed = sum(check.status == FAIL for check in self.checks)
        super().__init__(f"megatron-prime-doctor: {failed} check(s) failed (FAIL lines above); "
                         "nothing submitted (fix them, or pass --skip-doctor)")


# Runs the doctor's checks for a job about to be submitted.
Preflight = Callable[["PrimeConfig", SlurmConfig], Sequence[CheckResult]]


def submit_checks(prime: PrimeConfig, slurm: SlurmConfig) -> list[CheckResult]:
    """The doctor's checks that hold on the login node too: the shared file system (folders,
    disk) and the signal margin, plus the installed versions when the job runs this
    environment rather than a container's. GPUs, /dev/shm, the sandbox and the interfaces
    belong to the compute nodes: the batch script checks them there."""
    only = SHARED_CHECKS if slurm.container_image is not None else ("versions", *SHARED_CHECKS)
    return run_checks(prime, slurm, only=only)


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in sinfo's %G field: ``gpu:8``, ``gpu:h100:8(S:0-1)``, ``(null)``."""
    return sum(int(count) for count in _GPU_GRES.findall(gres))


def parse_sinfo(text: str) -> Partitions:
    """``sinfo -h -o '%P|%c|%G'`` output (one line per partition and node kind; the default
    partition is marked ``*``) -> Partitions."""
    partitions = Partitions(nodes={})
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, gres = (line.split("|") + ["", ""])[:3]
        name = name.strip()
        if name.endswith("*"):
            name = name[:-1]
            partitions.default = name
        cpus = cpus.strip().rstrip("+")  # sinfo writes "2+" for mixed groups
        shape = NodeShape(int(cpus) if cpus.isdigit() else 0, gpus_in_gres(gres))
        partitions.nodes.setdefault(name, []).append(shape)
    return partitions


def sinfo_partitions() -> Partitions | None:
    """The cluster's partitions from ``sinfo``; None where sinfo is not installed."""
    if shutil.which("sinfo") is None:
        return None
    command = ["sinfo", "-h", "-o", "%P|%c|%G"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"{' '.join(command)} failed (exit status {done.returncode}): "
                         f"{done.stderr.strip()}")
    return parse_sinfo(done.stdout)


def check_partition(slurm: SlurmConfig, list_partitions: PartitionLister,
                    dry_run: bool) -> str | None:
    """Errors when slurm.partition names a partition the cluster lacks, or when no node of the
    partition holds what one node of the job asks for (GPUs, CPUs for its tasks). Returns a
    note when the check was skipped (allowed only for a dry run without sinfo)."""
    partitions = list_partitions()
    if partitions is None:
        if slurm.partition is None:
            return None
        if dry_run:
            return f"sinfo not found: slurm.partition={slurm.partition!r} was not checked"
        raise ValueError(f"sinfo not found: cannot check slurm.partition={slurm.partition!r}; "
                         "submit from a SLURM login node (or use --dry-run to only render)")
    if slurm.partition is None:
        if partitions.default is None:
            return None
        names = [partitions.default]
    else:
        names = slurm.partition.split(",")
    missing = [name for name in names if name not in partitions.nodes]
    if missing:
        raise ValueError(f"slurm.partition={slurm.partition!r} is invalid: {missing[0]!r} is not "
                         f"a partition of this cluster; expected one of {sorted(partitions.nodes)}")
    shapes = [shape for name in names for shape in partitions.nodes[name]]
    where = f"partition {'/'.join(names)!r}" + (" (the default)" if slurm.partition is None else "")
    most_gpus = max(shape.gpus for shape in shapes)
    require(slurm.gpus_per_node <= most_gpus, "slurm.gpus_per_node", slurm.gpus_per_node,
            f"at most {most_gpus}: more GPUs than a node has (the nodes of {where} have at most "
            f"{most_gpus}, says sinfo)")
    fitting = [shape for shape in shapes if shape.gpus >= slurm.gpus_per_node]
    most_cpus = max(shape.cpus for shape in fitting)
    tasks = slurm.ntasks_per_node
    nodes_meant = f"the nodes of {where}" + (f" with {slurm.gpus_per_node} GPUs" if slurm.gpus_per_node else "")
    require(tasks <= most_cpus, "slurm.tasks_per_node", tasks,
            f"at most {most_cpus}: {nodes_meant} have at most {most_cpus} CPUs (sinfo), and "
            "each task needs one at least")
    cpus = tasks * slurm.cpus_per_task
    require(cpus <= most_cpus, "slurm.cpus_per_task", slurm.cpus_per_task,
            f"at most {most_cpus // tasks}: {tasks} tasks per node x {slurm.cpus_per_task} CPUs = "
            f"{cpus}, but {nodes_meant} have at most {most_cpus} CPUs (sinfo)")
    return None


def run_sbatch(script_path: Path) -> str:
    """``sbatch --parsable SCRIPT`` -> the job id."""
    if shutil.which("sbatch") is None:
        raise ValueError("sbatch not found: submit from a SLURM login node (or use --dry-run)")
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"sbatch rejected {script_path} (exit status {done.returncode}): "
                         f"{done.stderr.strip()}")
    # --parsable prints "<job id>" or "<job id>;<cluster>".
    return done.stdout.strip().split(";")[0]


def submit(config_path: str, slurm: SlurmConfig, overrides: Sequence[str] = (), *,
           dry_run: bool = False, list_partitions: PartitionLister = sinfo_partitions,
           sbatch: Callable[[Path], str] = run_sbatch,
           preflight: Preflight | None = submit_checks) -> SubmitResult:
    """Validates the run and the cluster options, renders the script, and (unless
    ``dry_run``) runs ``preflight`` (None: skipped), writes and submits it. Nothing is written
    before every check passed."""
    prime = load_run_config(config_path, overrides)
    slurm.validate(prime)
    note = check_partition(slurm, list_partitions, dry_run)
    script = render_sbatch(slurm, config_path, overrides, prime)
    margin = slurm.signal_margin(prime)
    notes = (note,) if note else ()
    if dry_run:
        return SubmitResult(script, notes=notes, margin=margin)
    checks = tuple(preflight(prime, slurm)) if preflight is not None else ()
    if any(check.status == FAIL for check in checks):
        raise PreflightFailed(checks)
    output_dir = Path(slurm.output_dir)
    # SLURM does not create the log folder: a job whose --output folder is missing fails
    # without a log.
    output_dir.mkdir(parents=True, exist_ok=True)
    script_path = output_dir / f"{slurm.job_name}.sbatch"
    script_path.write_text(script)
    job_id = sbatch(script_path)
    return SubmitResult(script, script_path, job_id, log_path(slurm, job_id), notes, checks, margin)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one "error: ..." line, like every other error
        raise ValueError(message)


def _signal_seconds(text: str) -> int | str:
    """--signal-seconds: "auto" or a number of seconds (the range is checked with the rest)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of seconds, got {text!r}") from None


# Flags that override the cluster YAML: (flag, SlurmConfig key, type).
_SLURM_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--nodes", "nodes", int),
    ("--gpus-per-node", "gpus_per_node", int),
    ("--tasks-per-node", "tasks_per_node", int),
    ("--cpus-per-task", "cpus_per_task", int),
    ("--partition", "partition", str),
    ("--account", "account", str),
    ("--qos", "qos", str),
    ("--time", "time", str),
    ("--job-name", "job_name", str),
    ("--output-dir", "output_dir", str),
    ("--container-image", "container_image", str),
    ("--venv", "venv", str),
    ("--signal-seconds", "signal_seconds", _signal_seconds),
    ("--dependency", "dependency", str),
    ("--seconds-per-step-estimate", "seconds_per_step_estimate", float),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megatron-prime-submit",
                     description="Render a SLURM batch script for a PRIME run and submit it.")
    parser.add_argument("config", help="run config YAML (as for megatron_prime.train)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="run config overrides, e.g. trainer.steps=300")
    parser.add_argument("--slurm", metavar="CLUSTER.yaml",
                        help="cluster options (SlurmConfig); flags below override them")
    for flag, key, kind in _SLURM_FLAGS:
        parser.add_argument(flag, dest=key, type=kind, default=None, help=f"slurm.{key}")
    parser.add_argument("--no-requeue", dest="requeue", action="store_false", default=None,
                        help="do not requeue a run stopped by the time-limit signal")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script; write and submit nothing")
    parser.add_argument("--skip-doctor", action="store_true",
                        help="submit without the doctor's checks (megatron-prime-doctor)")
    return parser


def main(argv: Sequence[str] | None = None, *, list_partitions: PartitionLister = sinfo_partitions,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         sbatch: Callable[[Path], str] = run_sbatch) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        args = build_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
        for override in args.overrides:
            if "=" not in override:
                raise ValueError(f"argument {override!r} is invalid: expected key=value "
                                 "(a run config override) or a --flag")
        flags = {key: getattr(args, key) for _, key, _ in _SLURM_FLAGS}
        flags["requeue"] = args.requeue
        slurm = load_slurm_config(args.slurm, {k: v for k, v in flags.items() if v is not None})
        result = submit(args.config, slurm, args.overrides, dry_run=args.dry_run,
                        list_partitions=list_partitions, sbatch=sbatch,
                        preflight=None if args.skip_doctor else submit_checks)
    except PreflightFailed as error:
        for check in error.checks:
            print(check.line, file=stderr)
        print(f"error: {error}", file=stderr)
        return 1
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}", file=stderr)
    for check in result.checks:
        print(check.line, file=stderr)
    if args.dry_run:
        # stdout is the script; the margin (also in its header) goes next to the notes.
        print(f"signal: {result.margin.describe()}", file=stderr)
        stdout.write(result.script)
    else:
        print(f"submitted job {result.job_id}\nscript: {result.script_path}\nlog: {result.log_path}"
              f"\nsignal: {result.margin.describe()}", file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
