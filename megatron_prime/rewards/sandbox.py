"""Runs untrusted Python (model-written solutions) with no way to harm, fool or starve the
trainer.

Each run is one process tree in fresh namespaces, jailed by ``_sandbox_harness.py``:

* ``unshare --net --mount --pid --ipc --uts --fork --mount-proc``, plus ``--user
  --map-root-user`` when the trainer is not root (the normal case under SLURM): no network,
  a private mount table, its own pid namespace, its own System V IPC (with no shared memory
  allowed: it would outlive the processes and show in no RSS) and hostname. The harness is
  pid 1 there: when it dies the kernel kills every process the program started, daemons and
  fork bombs included.
* a private root filesystem (a tmpfs): read-only binds of the interpreter, its standard
  library and the shared-library folders, /dev/{null,zero,urandom}, the namespace's /proc
  and a size-capped tmpfs work folder. The checkout, the data, /home, /root and /etc are not
  there at all, so a program cannot print a ground truth it read from disk.
* no privileges: as root the program runs as a uid of its own (see below); in a user
  namespace it keeps the only mapped uid (0, which is the trainer's user outside) but drops
  every capability with locked securebits, so it can neither mount, nor ptrace, nor regain
  them by exec. no_new_privs; an empty environment (the trainer's secrets are not inherited).
* ``oom_score_adj`` 1000 for every sandboxed process: under memory pressure the kernel's
  first victims. The trainer's own score is never touched.
* wall-clock timeout enforced here by killing the namespace's pid 1; CPU time, file size
  (which also caps stdout/stderr) and open files by rlimits.

Per-sandbox limits, which one sandbox cannot spend for another:

* processes: RLIMIT_NPROC, which the kernel counts per (user namespace, uid) and checks at
  each level up to the init namespace (Linux >= 5.14, "ucounts"). As root every concurrent
  sandbox takes a distinct uid from a pool (``first_uid`` .. + ``num_uids``, leased with a
  file lock so that trainer processes on one node never share one): a fork bomb exhausts its
  own uid's count only. Unprivileged, every sandbox is its own user namespace, so its count
  is its own too; the trainer's user is charged at most ``max_processes`` per sandbox.
* memory: RLIMIT_AS caps each process, and the harness (pid 1) polls the proportional set
  size of all the namespace's processes every 10 ms and kills them all above
  ``memory_bytes``, so three 400 MiB children fail a 512 MiB sandbox. Between two polls a
  sandbox can overshoot by what its processes touch in 10 ms (bounded by RLIMIT_AS each).

Why not cgroups: this is what works on a cgroup v1 node (this machine) and for an
unprivileged user on any node, where no cgroup is delegated to the job; on a cgroup v2 node
with a delegated subtree, a child cgroup per sandbox with ``memory.max``/``pids.max`` would
make the memory bound exact (it also counts tmpfs and pipe pages), and is not implemented
here: the limits above apply the same on both kinds of node.

``check_sandbox_available`` is the start-up probe: it runs one tiny program end to end and
raises ``SandboxUnavailable`` with one line naming what is missing. Clusters that forbid both
root and user namespaces set ``backend="remote"`` (``rewards.code.sandbox.backend``) and
``remote_url`` to a SandboxFusion-style HTTP service: ``POST {remote_url}/run_code`` (or the
URL itself when it already ends in /run_code) with ``{"code", "stdin", "language": "python",
"compile_timeout", "run_timeout", "memory_limit_MB"}`` answered by ``{"status", "run_result":
{"status", "return_code", "stdout", "stderr"}}`` - the request verl's sandbox_fusion reward
sends (verl/utils/reward_score/sandbox_fusion/utils.py). Call-mode tests are sent as a
program that calls the function and prints the same result marker.

No outcome of the program or of its output raises here: every run returns a ``RunResult``
whose ``reason`` says why it failed; results are decoded with bounded size and depth.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from megatron_prime.job_signals import children_outlive_job_signals

_HARNESS = Path(__file__).with_name("_sandbox_harness.py")
_RESULT_MARKER = b"\n__SANDBOX_CALL_RESULT__"
_STDERR_KEEP_BYTES = 4096
# The harness's verdicts (_sandbox_harness.VERDICT_*; that file is never imported).
_VERDICT_MEMORY_LIMIT = "memory_limit"
_VERDICT_SETUP_FAILED = "setup_failed"
# A call-mode result deeper than this is refused (the host's comparison recurses, too).
MAX_RESULT_DEPTH = 100
_UID_LOCK_DIR = Path("/run/megatron_prime_sandbox")
_KILL_GRACE_S = 5.0  # after pid 1 is killed, the namespace is empty within this
Backend = Literal["local", "remote"]


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one run of an untrusted program (one test case)."""

    wall_timeout_s: float = 10.0  # killed after this much real time (sleeping counts)
    cpu_time_s: int = 10  # RLIMIT_CPU per process
    # All processes of one sandbox together (PSS, polled by its pid 1); also each process's
    # RLIMIT_AS. rewards.code.workers sandboxes at once use at most that many times this.
    memory_bytes: int = 1 << 30
    max_output_bytes: int = 8 << 20  # RLIMIT_FSIZE; stdout beyond this is cut and fails
    max_processes: int = 16  # processes + threads of one sandbox (its own RLIMIT_NPROC count)
    tmpfs_bytes: int = 64 << 20  # size of the writable work folder (/tmp)
    # Root only: the uid pool, one uid per concurrent sandbox (never 0, never a login user).
    first_uid: int = 65280
    num_uids: int = 254
    # Interpreter for the program (None: the trainer's own); the harness binds its binary
    # and standard library into the sandbox's root.
    python: str | None = None
    # "local": namespaces on this machine; "remote": the HTTP service at remote_url.
    backend: Backend = "local"
    remote_url: str | None = None
    max_result_bytes: int = 1 << 20  # call mode: a longer JSON result fails

    def __post_init__(self) -> None:
        positive = ("wall_timeout_s", "cpu_time_s", "memory_bytes", "max_output_bytes", "max_processes",
                    "tmpfs_bytes", "num_uids", "max_result_bytes")
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"rewards.code.sandbox.{name}={value} is not allowed; need a value > 0")
        if self.first_uid < 1000 or self.first_uid + self.num_uids > 65534:
            raise ValueError(f"rewards.code.sandbox.first_uid={self.first_uid} with num_uids={self.num_uids} is not "
                             "allowed; the pool must lie within 1000..65533 (not root, not nobody)")
        if self.backend not in ("local", "remote"):
            raise ValueError(f"rewards.code.sandbox.backend={self.backend!r} is not allowed; "
                             "allowed: ('local', 'remote')")
        if self.backend == "remote" and not (self.remote_url or "").startswith(("http://", "https://")):
            raise ValueError(f"rewards.code.sandbox.remote_url={self.remote_url!r} is not allowed with "
                             "backend='remote'; need an http:// or https:// URL of the sandbox service")


class RunStatus(str, enum.Enum):
    """How a sandboxed run ended."""

    OK = "ok"  # exited with status 0 within all limits (and, in call mode, a valid result)
    RUNTIME_ERROR = "runtime_error"  # non-zero exit, an exception, a limit signal, a bad result
    TIMEOUT = "timeout"  # wall-clock limit reached; the process tree was killed
    OUTPUT_LIMIT = "output_limit"  # wrote at least max_output_bytes
    MEMORY_LIMIT = "memory_limit"  # the sandbox's processes together exceeded memory_bytes
    SANDBOX_ERROR = "sandbox_error"  # the jail (or the remote service) failed, not the program


@dataclass(frozen=True)
class RunResult:
    status: RunStatus
    stdout: bytes
    stderr: str  # the first few KB, for debugging
    returncode: int | None
    wall_s: float
    call_result: Any = None  # call mode: the function's JSON-decoded return value
    reason: str = ""  # why the run failed, in words ("" when OK)


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox; the message names what is missing."""


def sandbox_mode() -> str:
    """"root" (namespaces plus a uid per sandbox) or "userns" (an unprivileged user
    namespace per sandbox): decided by who the trainer runs as."""
    return "root" if os.geteuid() == 0 else "userns"


_probed: set[tuple[str, str, str | None]] = set()
_probe_lock = threading.Lock()


def check_sandbox_available(config: SandboxConfig = SandboxConfig(), *, remembered: bool = True) -> None:
    """Raise ``SandboxUnavailable`` (one line naming what is missing) unless a program runs.

    Called once at start-up, before step 1: the static checks name the usual causes, then
    one tiny program runs end to end, which catches the rest (a seccomp filter, a missing
    mount permission, an unreachable service). A success is remembered per interpreter;
    ``remembered=False`` checks again (megatron-prime-doctor: the environment may differ)."""
    key = (config.backend, config.python or sys.executable, config.remote_url)
    with _probe_lock:
        if remembered and key in _probed:
            return
        if config.backend == "local":
            _check_local_prerequisites(config)
        probe = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "40 2", config)
        if probe.status is not RunStatus.OK or probe.stdout.strip() != b"42":
            where = f"the sandbox service at {config.remote_url}" if config.backend == "remote" else (
                f"the local sandbox ({sandbox_mode()} mode)")
            detail = (probe.reason or probe.stderr.strip() or "wrong output").strip().splitlines()
            raise SandboxUnavailable(f"{where} cannot run a test program: {detail[-1] if detail else '?'}")
        _probed.add(key)


def _check_local_prerequisites(config: SandboxConfig) -> None:
    if sys.platform != "linux":
        raise SandboxUnavailable(f"the code sandbox needs Linux namespaces; this is {sys.platform!r} "
                                 "(set rewards.code.sandbox.backend=remote)")
    if shutil.which("unshare") is None:
        raise SandboxUnavailable("the code sandbox needs util-linux 'unshare' on PATH (apt-get install util-linux)")
    if not os.access(config.python or sys.executable, os.X_OK):
        raise SandboxUnavailable(f"rewards.code.sandbox.python={config.python!r} is not an executable interpreter")
    if sandbox_mode() == "root":
        return
    switches = {
        "/proc/sys/user/max_user_namespaces": ("0", "user namespaces are disabled (user.max_user_namespaces=0)"),
        "/proc/sys/kernel/unprivileged_userns_clone": (
            "0", "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)"),
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": (
            "1", "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)"),
    }
    for path, (bad, why) in switches.items():
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value == bad:
            raise SandboxUnavailable(f"the code sandbox needs root or unprivileged user namespaces, and {why}; "
                                     f"running as uid {os.geteuid()} (set rewards.code.sandbox.backend=remote)")


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
    if config.backend == "remote":
        return _run_remote(code, stdin, config, fn_name, args or [])
    return _run_local(code, stdin, config, fn_name, args or [])


def _run_local(code: str, stdin: str, config: SandboxConfig, fn_name: str | None, args: list[Any]) -> RunResult:
    rooted = sandbox_mode() == "root"
    with _UidLease(config) if rooted else _NoLease() as uid:
        job = {
            "code": code,
            "mode": "stdio" if fn_name is None else "call",
            "fn_name": fn_name,
            "args": args,
            "uid": uid,
            "memory_bytes": config.memory_bytes,
            "cpu_time_s": config.cpu_time_s,
            "max_output_bytes": config.max_output_bytes,
            "max_processes": config.max_processes,
            "tmpfs_bytes": config.tmpfs_bytes,
        }
        namespaces = ["--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
        if not rooted:
            namespaces = ["--user", "--map-root-user", *namespaces]
        with (
            tempfile.TemporaryFile() as job_file,
            tempfile.TemporaryFile() as stdin_file,
            tempfile.TemporaryFile() as stdout_file,
            tempfile.TemporaryFile() as stderr_file,
            tempfile.TemporaryFile() as verdict_file,
        ):
            job_file.write(json.dumps(job).encode())
            job_file.seek(0)
            stdin_file.write(stdin.encode(errors="replace"))
            stdin_file.seek(0)
            fds = (job_file.fileno(), verdict_file.fileno())
            command = [*_IGNORE_JOB_SIGNALS_THEN_EXEC, "unshare", *namespaces, config.python or sys.executable,
                       "-I", "-B", str(_HARNESS), *map(str, fds)]
            started = time.monotonic()
            try:
                with children_outlive_job_signals():
                    process = subprocess.Popen(
                        command, stdin=stdin_file, stdout=stdout_file, stderr=stderr_file,
                        pass_fds=fds, env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, cwd="/",
                        start_new_session=True,  # its own process group, killed as a whole
                    )
            except OSError as error:
                return RunResult(RunStatus.SANDBOX_ERROR, b"", "", None, 0.0, reason=f"cannot start: {error}")
            timed_out = False
            try:
                process.wait(timeout=config.wall_timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_namespace(process)  # the uid is free for reuse only once it holds nothing
            wall_s = time.monotonic() - started
            stdout = _read_capped(stdout_file, config.max_output_bytes)
            stderr = _read_capped(stderr_file, _STDERR_KEEP_BYTES).decode(errors="replace")
            verdict = _read_capped(verdict_file, _STDERR_KEEP_BYTES).decode(errors="replace")
    returncode = None if timed_out else process.returncode
    return _result(config, fn_name, stdout, stderr, returncode, wall_s, verdict)


def _result(config: SandboxConfig, fn_name: str | None, stdout: bytes, stderr: str,
            returncode: int | None, wall_s: float, verdict: str = "") -> RunResult:
    """Status and reason of one run, from how it ended, what it printed and the harness's
    verdict (both backends; the remote one has no verdict)."""
    if verdict.startswith(_VERDICT_SETUP_FAILED):
        status, reason = RunStatus.SANDBOX_ERROR, f"sandbox setup failed: {verdict.partition(' ')[2][:300]}"
    elif verdict == _VERDICT_MEMORY_LIMIT:
        status, reason = RunStatus.MEMORY_LIMIT, f"its processes used more than {config.memory_bytes} bytes"
    elif returncode is None:
        status, reason = RunStatus.TIMEOUT, f"wall-clock limit of {config.wall_timeout_s} s reached"
    elif len(stdout) >= config.max_output_bytes:
        status, reason = RunStatus.OUTPUT_LIMIT, f"printed {config.max_output_bytes} bytes or more"
    elif returncode != 0:
        status, reason = RunStatus.RUNTIME_ERROR, f"exit status {returncode}: {_last_line(stderr)}"
    else:
        status, reason = RunStatus.OK, ""
    call_result = None
    if fn_name is not None and status is RunStatus.OK:
        stdout, marker, encoded = stdout.rpartition(_RESULT_MARKER)
        call_result, reason = decode_result(encoded, config.max_result_bytes) if marker else (None, "no result")
        if reason:
            status = RunStatus.RUNTIME_ERROR
    return RunResult(status, stdout, stderr, returncode, wall_s, call_result, reason)


def decode_result(encoded: bytes, max_bytes: int) -> tuple[Any, str]:
    """(value, "") or (None, why not): at most ``max_bytes`` of JSON, nested at most
    MAX_RESULT_DEPTH levels. The C decoder raises RecursionError at ~1,000 levels, and
    a value just under that would make the caller's comparison recurse as deep."""
    if len(encoded) > max_bytes:
        return None, f"result of {len(encoded)} bytes exceeds {max_bytes}"
    try:
        value = json.loads(encoded)
    except (ValueError, RecursionError, MemoryError) as error:
        return None, f"result is not valid JSON: {type(error).__name__}"
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_RESULT_DEPTH:
            return None, f"result nested deeper than {MAX_RESULT_DEPTH} levels"
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
    return value, ""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class _UidLease:
    """One uid of the pool, held (flock) by one sandbox at a time across every process of
    the node: RLIMIT_NPROC is counted per uid, so sharing one would share the limit."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.file: BinaryIO | None = None

    def __enter__(self) -> int:
        _UID_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        pool = range(self.config.first_uid, self.config.first_uid + self.config.num_uids)
        while True:
            offset = random.randrange(len(pool))  # spread leases; fewer failed attempts
            for index in range(len(pool)):
                uid = pool[(offset + index) % len(pool)]
                file = open(_UID_LOCK_DIR / f"uid-{uid}.lock", "wb")
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.close()
                    continue
                self.file = file
                return uid
            time.sleep(0.05)  # more concurrent sandboxes than uids: wait for one to end

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock


class _NoLease:
    """User-namespace mode: uid 0 of the sandbox's own namespace (its count is its own)."""

    def __enter__(self) -> int:
        return 0

    def __exit__(self, *exc: object) -> None:
        pass


def _kill_namespace(process: subprocess.Popen) -> None:
    """SIGKILL the namespace's pid 1 (found as unshare's child) and wait for unshare: it
    reaps pid 1 only after the kernel has killed every process of the namespace, so when
    this returns none is left. The process group is the fallback if unshare hangs."""
    if process.poll() is None:
        for child in _children(process.pid):
            _signal(child)
        try:
            process.wait(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    if process.poll() is None:
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


# ---- remote backend: a SandboxFusion-style HTTP service ----

_CALL_WRAPPER = """\
import json as _json, os as _os, sys as _sys
_real_stdout, _sys.stdout = _sys.stdout, open(_os.devnull, "w")
_namespace = {{"__name__": "__solution__"}}
exec(compile({code!r}, "solution.py", "exec"), _namespace)
_function = _namespace.get({fn_name!r})
if _function is None and "Solution" in _namespace:
    _function = getattr(_namespace["Solution"](), {fn_name!r}, None)
if _function is None:
    raise NameError("no function or Solution method named " + {fn_name!r})
_result = _function(*_json.loads({args!r}))
_sys.stdout = _real_stdout
_sys.stdout.write({marker!r} + _json.dumps(list(_result) if isinstance(_result, tuple) else _result) + "\\n")
"""


def _run_remote(code: str, stdin: str, config: SandboxConfig, fn_name: str | None, args: list[Any]) -> RunResult:
    """One POST to the service; every failure of the service is a SANDBOX_ERROR result."""
    if fn_name is not None:
        code = _CALL_WRAPPER.format(code=code, fn_name=fn_name, args=json.dumps(args),
                                    marker=_RESULT_MARKER.decode())
    request = {"code": code, "stdin": stdin, "language": "python", "compile_timeout": config.wall_timeout_s,
               "run_timeout": config.wall_timeout_s, "memory_limit_MB": config.memory_bytes >> 20}
    url = config.remote_url.rstrip("/")
    url = url if url.endswith("/run_code") else url + "/run_code"
    started = time.monotonic()
    try:
        http_request = urllib.request.Request(
            url, data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        # The service enforces run_timeout; the extra time covers queueing and transfer.
        with urllib.request.urlopen(http_request, timeout=config.wall_timeout_s + 30) as response:
            body = response.read(2 * config.max_output_bytes + (1 << 20) + 1)
        answer, why = decode_result(body, 2 * config.max_output_bytes + (1 << 20))
        if why or not isinstance(answer, dict):
            raise ValueError(why or "the answer is not a JSON object")
        run = answer.get("run_result") or {}
        if not isinstance(run, dict) or answer.get("status") == "SandboxError":
            raise ValueError(f"service status {answer.get('status')!r}: {str(answer.get('message'))[:200]}")
        stdout = str(run.get("stdout") or "").encode()[: config.max_output_bytes]
        stderr = str(run.get("stderr") or "")[:_STDERR_KEEP_BYTES]
        if run.get("status") == "TimeLimitExceeded":
            returncode = None
        else:
            returncode = run.get("return_code")
            returncode = returncode if isinstance(returncode, int) and not isinstance(returncode, bool) else 1
    except (OSError, ValueError, urllib.error.URLError) as error:  # HTTPError is an URLError
        return RunResult(RunStatus.SANDBOX_ERROR, b"", "", None, time.monotonic() - started,
                         reason=f"sandbox service {config.remote_url}: {str(error)[:300]}")
    return _result(config, fn_name, stdout, stderr, returncode, time.monotonic() - started)
