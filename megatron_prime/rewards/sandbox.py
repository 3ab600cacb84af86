"""Runs untrusted Python (model-written solutions) with no way to harm the trainer.

Each run is one process tree, jailed by ``_sandbox_harness.py``:

* ``unshare --net --mount --pid --fork --mount-proc``: no network (an empty network
  namespace), a private mount table, its own pid namespace whose /proc shows nothing of the
  host. The harness is pid 1 there, so when it dies the kernel kills every process the
  program started: a fork bomb dies with it.
* private tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock; a fresh work folder inside.
* an unprivileged uid (default ``nobody``), no supplementary groups, no_new_privs: it cannot
  write anywhere the host can see, read another user's files or /proc entries, or signal
  the trainer.
* limits: address space, CPU time, process count (RLIMIT_NPROC, counted per uid — which is
  why dropping root matters: root ignores it), file size (which also caps stdout), open files.
* an empty environment (only PATH/HOME/LANG): the trainer's secrets are not inherited.
* wall-clock timeout enforced here by killing the harness and the whole process group.
* stdout/stderr go to anonymous temporary files capped by the file-size limit, and at most
  ``max_output_bytes`` are read back, so printing gigabytes costs nothing.

Requires Linux, root (to create the namespaces and change uid) and util-linux ``unshare``.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from megatron_prime.job_signals import children_outlive_job_signals

_HARNESS = Path(__file__).with_name("_sandbox_harness.py")
_RESULT_MARKER = b"\n__SANDBOX_CALL_RESULT__"
_STDERR_KEEP_BYTES = 4096
NOBODY_UID = 65534


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one run of an untrusted program (one test case)."""

    wall_timeout_s: float = 10.0  # killed after this much real time (sleeping counts)
    cpu_time_s: int = 10  # RLIMIT_CPU per process
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process
    max_output_bytes: int = 8 << 20  # RLIMIT_FSIZE; stdout beyond this is cut and fails
    # RLIMIT_NPROC: processes + threads of the sandbox uid, counted across every sandbox
    # running at once under that uid (so a fork bomb can slow, never break, its neighbours'
    # single-threaded runs: their pid 1 exists before the limit applies).
    max_processes: int = 32
    tmpfs_bytes: int = 64 << 20  # size of each private tmpfs (the writable work folder)
    uid: int = NOBODY_UID  # unprivileged uid/gid the program runs as
    # Interpreter for the program; it must be readable by ``uid`` (see default_python()).
    python: str = field(default_factory=lambda: default_python())

    def __post_init__(self) -> None:
        positive = ("wall_timeout_s", "cpu_time_s", "memory_bytes", "max_output_bytes", "max_processes", "tmpfs_bytes")
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"SandboxConfig.{name}={value} is not allowed; need a value > 0")
        if self.uid == 0:
            raise ValueError("SandboxConfig.uid=0 is not allowed; the program must not run as root")


def default_python() -> str:
    """This interpreter if an unprivileged uid can reach its standard library, else the
    system ``python3``: after dropping root the program still imports stdlib modules, and an
    interpreter under a private home folder (pyenv in /root) would fail on the first import.
    """
    if _world_searchable(Path(sys.base_prefix)) or not Path("/usr/bin/python3").exists():
        return sys.executable
    return "/usr/bin/python3"


def _world_searchable(path: Path) -> bool:
    path = path.resolve()
    return all(os.stat(folder).st_mode & 0o001 for folder in (path, *path.parents))


class RunStatus(str, enum.Enum):
    """How a sandboxed run ended."""

    OK = "ok"  # exited with status 0 within all limits
    RUNTIME_ERROR = "runtime_error"  # non-zero exit, an exception, or killed by a limit signal
    TIMEOUT = "timeout"  # wall-clock limit reached; the process tree was killed
    OUTPUT_LIMIT = "output_limit"  # wrote at least max_output_bytes


@dataclass(frozen=True)
class RunResult:
    status: RunStatus
    stdout: bytes
    stderr: str  # the first few KB, for debugging
    returncode: int | None
    wall_s: float
    call_result: Any = None  # call mode: the function's JSON-decoded return value


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (not Linux, not root, or no ``unshare``)."""


def check_sandbox_available() -> None:
    """Raise ``SandboxUnavailable`` saying what is missing, rather than run code unjailed."""
    if sys.platform != "linux":
        raise SandboxUnavailable(f"the code sandbox needs Linux namespaces; this is {sys.platform!r}")
    if os.geteuid() != 0:
        raise SandboxUnavailable(
            f"the code sandbox needs root to create namespaces and drop to an unprivileged uid "
            f"(running as uid {os.geteuid()})"
        )
    if shutil.which("unshare") is None:
        raise SandboxUnavailable("the code sandbox needs util-linux 'unshare' on PATH (apt-get install util-linux)")


# SLURM's pre-emption warning (--signal=USR1@N) and scancel's SIGTERM reach every process of
# the job step, and would kill a run mid-test (scored as a failure) while the trainer finishes
# its step; the wall timeout ends a sandbox anyway. The run starts with both blocked
# (job_signals.py, which covers the moment before this trampoline runs), and the trampoline
# ignores them too: an ignored signal stays ignored across exec, so unshare and the harness
# inherit it.
_IGNORE_JOB_SIGNALS_THEN_EXEC = (
    sys.executable, "-I", "-S", "-c",
    "import os, signal, sys; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); os.execvp(sys.argv[1], sys.argv[1:])",
)


def run_python(
    code: str,
    stdin: str = "",
    config: SandboxConfig = SandboxConfig(),
    fn_name: str | None = None,
    args: list[Any] | None = None,
) -> RunResult:
    """Run ``code`` in a fresh sandbox and return what it printed and how it ended.

    stdin/stdout mode (``fn_name`` None): the program runs as ``__main__`` reading ``stdin``.
    Call mode: the program is executed, then ``fn_name(*args)`` (or ``Solution().fn_name``)
    is called and its JSON-encoded return value comes back as ``call_result``.
    """
    check_sandbox_available()
    job = {
        "code": code,
        "mode": "stdio" if fn_name is None else "call",
        "fn_name": fn_name,
        "args": args or [],
        "uid": config.uid,
        "memory_bytes": config.memory_bytes,
        "cpu_time_s": config.cpu_time_s,
        "max_output_bytes": config.max_output_bytes,
        "max_processes": config.max_processes,
        "tmpfs_bytes": config.tmpfs_bytes,
    }
    with (
        tempfile.TemporaryFile() as job_file,
        tempfile.TemporaryFile() as stdin_file,
        tempfile.TemporaryFile() as stdout_file,
        tempfile.TemporaryFile() as stderr_file,
    ):
        job_file.write(json.dumps(job).encode())
        job_file.seek(0)
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        command = [
            *_IGNORE_JOB_SIGNALS_THEN_EXEC,
            "unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
            config.python, "-I", "-B", str(_HARNESS), str(job_file.fileno()),
        ]  # fmt: skip
        started = time.monotonic()
        with children_outlive_job_signals():
            process = subprocess.Popen(
                command,
                stdin=stdin_file,
                stdout=stdout_file,
                stderr=stderr_file,
                pass_fds=(job_file.fileno(),),
                env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
                cwd="/",
                start_new_session=True,  # its own process group, killed as a whole
            )
        timed_out = False
        try:
            process.wait(timeout=config.wall_timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_tree(process)
        wall_s = time.monotonic() - started
        stdout = _read_capped(stdout_file, config.max_output_bytes)
        stderr = _read_capped(stderr_file, _STDERR_KEEP_BYTES).decode(errors="replace")

    if timed_out:
        status = RunStatus.TIMEOUT
    elif len(stdout) >= config.max_output_bytes:
        status = RunStatus.OUTPUT_LIMIT
    elif process.returncode != 0:
        status = RunStatus.RUNTIME_ERROR
    else:
        status = RunStatus.OK
    call_result = None
    if fn_name is not None and status is RunStatus.OK:
        stdout, _, encoded = stdout.rpartition(_RESULT_MARKER)
        try:
            call_result = json.loads(encoded)
        except ValueError:
            status = RunStatus.RUNTIME_ERROR
    return RunResult(status, stdout, stderr, None if timed_out else process.returncode, wall_s, call_result)


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the namespace's pid 1 (the kernel then kills everything inside) and the group.

    The harness is killed by pid, found as unshare's child, because the program may have left
    the process group (setsid) and cleared its parent-death signal.
    """
    if process.poll() is None:
        for child in _children(process.pid):
            _signal(child)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_capped(file: BinaryIO, limit: int) -> bytes:
    file.seek(0)
    return file.read(limit)
