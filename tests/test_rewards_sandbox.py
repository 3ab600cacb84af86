"""Code sandbox security: each attack is contained, scores 0, and this test process (the
"trainer") is unharmed. Every attack is written so that it *would* print the expected answer
(and score 1) if it succeeded, so a broken sandbox fails these tests instead of passing them.

The many-program escape suite, run as root and as an unprivileged user, is
tests/test_sandbox_escapes.py; this file holds one test per finding of issue 19 and the
remote backend's round trip.
"""

import http.server
import json
import os
import pwd
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from megatron_prime.rewards import (
    CodeVerifier,
    CodeVerifierConfig,
    MathVerifier,
    RewardRegistry,
    RunStatus,
    SandboxConfig,
    SandboxUnavailable,
    run_python,
)
from megatron_prime.rewards.sandbox import MAX_RESULT_DEPTH, check_sandbox_available, decode_result, sandbox_mode

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxConfig(wall_timeout_s=3.0, cpu_time_s=2, memory_bytes=512 << 20, max_output_bytes=1 << 20, max_processes=16)
ANSWER = {"inputs": [""], "outputs": ["42"]}
POOL = set(range(FAST.first_uid, FAST.first_uid + FAST.num_uids))
# This checkout's harness (another checkout's test run may have its own sandboxes running).
HARNESS = str(REPO / "megatron_prime" / "rewards" / "_sandbox_harness.py").encode()
# Safety valve for the destructive attacks: if the sandbox were broken and the program still
# root *outside* (the pool uid is not 0; in a user namespace uid 0 has no capability), it
# reports the escape (scores 1, the test fails) instead of fork-bombing or killing for real.
ROOT_GUARD = ("if os.getuid() == 0 and int(open('/proc/self/status').read().split('CapEff:')[1].split()[0], 16): "
              "print(42); raise SystemExit")


@pytest.fixture(scope="module")
def verifier():
    try:
        check_sandbox_available(FAST)
    except SandboxUnavailable as error:
        pytest.skip(f"no local sandbox on this machine: {error}")
    code_verifier = CodeVerifier(CodeVerifierConfig(sandbox=FAST))
    yield code_verifier
    code_verifier.close()


def _response(code: str) -> str:
    return f"[OUTPUT] Here is my solution.\n```python\n{textwrap.dedent(code).strip()}\n```"


def _sandbox_processes() -> list[int]:
    """Host pids still running as a sandbox uid, or as this checkout's harness (none may be left)."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next(line for line in status.read_text().splitlines() if line.startswith("Uid:"))
            cmdline = (status.parent / "cmdline").read_bytes()
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) in POOL or HARNESS in cmdline:
            pids.append(int(status.parent.name))
    return pids


def _assert_no_leftovers():
    deadline = time.monotonic() + 3.0
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []


def test_honest_solution_scores_1(verifier):
    # The control for every attack below: the same expected output, produced honestly.
    assert verifier.score(_response("print(6 * 7)"), ANSWER) == 1.0


def test_infinite_loop(verifier):
    started = time.monotonic()
    assert verifier.score(_response("while True:\n    pass\nprint(42)"), ANSWER) == 0.0
    assert time.monotonic() - started < FAST.wall_timeout_s + 3
    result = run_python("import time\ntime.sleep(60)", config=FAST)  # sleeping burns no CPU
    assert result.status is RunStatus.TIMEOUT
    _assert_no_leftovers()


def test_fork_bomb(verifier):
    code = f"""
        import os
        {ROOT_GUARD}
        children = 0
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()  # try to leave the process group that gets killed
                children += 1
            except OSError:
                pass
            if children > 10_000:
                print(42)
    """
    started = time.monotonic()
    assert verifier.score(_response(code), ANSWER) == 0.0
    assert time.monotonic() - started < FAST.wall_timeout_s + 5
    _assert_no_leftovers()
    assert verifier.score(_response("print(42)"), ANSWER) == 1.0  # the machine still works


def test_memory_bomb(verifier):
    code = """
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))
            if len(blocks) > 64:  # 4 GiB
                print(42)
                break
    """
    assert verifier.score(_response(code), ANSWER) == 0.0
    result = run_python("x = bytearray(8 << 30)\nprint(42)", config=FAST)
    assert result.status is RunStatus.RUNTIME_ERROR and "MemoryError" in result.stderr


def test_network_socket(verifier):
    # A listener on the host's loopback: reachable from here (the control), not from the sandbox.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        code = f"""
            import socket
import subprocess
            for host, port in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)):
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    print(42)
                    break
                except OSError:
                    pass
        """
        assert verifier.score(_response(code), ANSWER) == 0.0


def test_writing_outside_its_folder(verifier, tmp_path):
    open_dir = tmp_path / "world_writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    targets = [open_dir / "escape.txt", Path.cwd() / "escape.txt", Path("/root/escape.txt"), Path("/etc/escape.txt")]
    for target in targets:
        code = f"""
            with open({str(target)!r}, "w") as f:
                f.write("pwned")
            print(42)
        """
        assert verifier.score(_response(code), ANSWER) == 0.0, target
        assert not target.exists(), target
    # World-writable host folders do not exist in the sandbox's root: nothing lands on the host.
    shared = [Path("/var/tmp/megatron_prime_escape.txt"), Path("/dev/shm/megatron_prime_escape.txt")]
    code = "".join(f"open({str(path)!r}, 'w').write('pwned')\n" for path in shared) + "print('wrote')"
    assert run_python(code, config=FAST).status is RunStatus.RUNTIME_ERROR
    assert not any(path.exists() for path in shared)
    # Its own work folder is writable.
    code = "open('scratch.txt', 'w').write('42')\nprint(open('scratch.txt').read())"
    assert verifier.score(_response(code), ANSWER) == 1.0


def test_reading_parent_environment_secrets(verifier, monkeypatch):
    secret = "hunter2-megatron-prime-secret"
    # Two places a secret lives: this process's environment (inherited by children unless
    # cleared) and the start-up environment of a host process, visible in /proc/<pid>/environ.
    monkeypatch.setenv("WANDB_API_KEY", secret)
    trainer = subprocess.Popen(["sleep", "60"], env={"WANDB_API_KEY": secret})
    try:
        # The control: from the host the secret is readable (once the child has exec'd:
        # mid-exec its environ reads empty).
        deadline = time.monotonic() + 5
        while secret.encode() not in Path(f"/proc/{trainer.pid}/environ").read_bytes():
            assert time.monotonic() < deadline, "the control process never showed its environment"
            time.sleep(0.01)
        ground_truth = {"inputs": [""], "outputs": [secret]}
        code = """
            import os
            found = [value for value in os.environ.values() if "hunter2" in value]
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        found += [v.decode() for v in f.read().split(b"\\0") if b"hunter2" in v]
                except OSError:
                    pass
            for value in found:
                print(value.split("=")[-1])
                break
        """
        assert verifier.score(_response(code), ground_truth) == 0.0
    finally:
        trainer.kill()
        trainer.wait()


def test_printing_gigabytes(verifier):
    code = """
        import sys
        chunk = "4" * (1 << 20)
        for _ in range(4096):  # 4 GiB
            sys.stdout.write(chunk)
        print(2)
    """
    started = time.monotonic()
    assert verifier.score(_response(code), ANSWER) == 0.0
    result = run_python(textwrap.dedent(code), config=FAST)
    assert result.status is RunStatus.OUTPUT_LIMIT
    assert len(result.stdout) == FAST.max_output_bytes
    assert time.monotonic() - started < 10


def test_killing_its_parent(verifier):
    me = os.getpid()
    code = f"""
        import os, signal
        {ROOT_GUARD}
        killed = False
        for pid in ({me}, {os.getppid()}, os.getppid()):
            if pid <= 1:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except OSError:
                pass
        if killed:
            print(42)
    """
    assert verifier.score(_response(code), ANSWER) == 0.0
    assert os.getpid() == me  # still here
    assert verifier.score(_response("print(42)"), ANSWER) == 1.0
    _assert_no_leftovers()


def test_runs_unprivileged_in_a_fresh_folder(verifier):
    code = ("import os\nstatus = open('/proc/self/status').read()\n"
            "print(os.getuid(), os.getgid(), os.getgroups(), os.getcwd(), os.listdir('.'), os.getpid(),"
            " status.split('CapEff:')[1].split()[0], status.split('CapBnd:')[1].split()[0])")
    first = run_python(code, config=FAST)
    second = run_python("open('left_behind', 'w').write('x')\n" + code, config=FAST)
    uid, gid, rest = first.stdout.decode().split(None, 2)
    if sandbox_mode() == "root":
        assert int(uid) in POOL and gid == uid  # a uid of its own, never root
    else:
        assert (uid, gid) == ("0", "0")  # uid 0 of its own user namespace, without capabilities
    # pid 2: pid 1 of its namespace is the harness that supervises it; no capability at all.
    assert rest.strip() == "[] /tmp/work [] 2 0000000000000000 0000000000000000"
    assert "left_behind" in second.stdout.decode()
    assert "left_behind" not in run_python(code, config=FAST).stdout.decode()  # nothing carried over


def test_sandboxed_program_ignores_slurm_preemption_signal():
    """SLURM's --signal=USR1@N reaches every process of the job step: a program under test
    must not die of it (it would score 0) while the trainer finishes its step and saves."""
    code = textwrap.dedent("""
        import os, signal, time
        ignored = int(open('/proc/self/status').read().split('SigIgn:')[1].split()[0], 16)
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered now if not ignored: default = die
        time.sleep(0.1)
        print('usr1 ignored' if ignored & (1 << (signal.SIGUSR1 - 1)) else 'usr1 not ignored')
    """)
    result = run_python(code, config=FAST)
    assert result.status == RunStatus.OK, result
    assert result.stdout.strip() == b"usr1 ignored"


# ---- one test per finding of issue 19 ----

def test_deeply_nested_result_is_a_failed_run_not_an_exception(verifier):
    """A result nested ~1,000+ levels, returned or forged after the marker, made the host's
    json.loads raise RecursionError out of score_batch: now a failed run with a reason."""
    returned = "def f():\n    v = []\n    for _ in range(5000):\n        v = [v]\n    return v"
    forged = ("import os\ndef f():\n    os.write(1, b'\\n__SANDBOX_CALL_RESULT__' + b'[' * 100000 + b']' * 100000)"
              "\n    os._exit(0)")
    just_deep_enough = (f"def f():\n    v = 7\n    for _ in range({MAX_RESULT_DEPTH + 1}):\n        v = [v]\n"
                        "    return v")
    for code in (returned, forged, just_deep_enough):
        result = run_python(code, config=FAST, fn_name="f", args=[])
        assert result.status is RunStatus.RUNTIME_ERROR and result.reason, result
    assert "nested deeper than 100 levels" in run_python(just_deep_enough, config=FAST, fn_name="f").reason
    # Through the registry, as the trainer calls it: a score of 0, no exception.
    registry = RewardRegistry(math=MathVerifier(), code=verifier)
    tests = json.dumps({"fn_name": "f", "inputs": [[]], "outputs": [[7]]})
    honest = "def f():\n    return [7]"
    scores = registry.score_batch([_response(forged), _response(returned), _response(honest)], [tests] * 3,
                                  ["code"] * 3, ["taco"] * 3)
    assert scores == [0.0, 0.0, 1.0]


def test_decode_result_bounds_depth_and_size():
    assert decode_result(b"[" * 5000 + b"]" * 5000, 1 << 20)[0] is None
    assert decode_result(b"[" * 101 + b"]" * 101, 1 << 20) == (None, "result nested deeper than 100 levels")
    assert decode_result(b"[" * 100 + b"]" * 100, 1 << 20)[1] == ""
    assert decode_result(b'{"a": [1, 2]}', 1 << 20) == ({"a": [1, 2]}, "")
    assert decode_result(b'"' + b"x" * 100 + b'"', 50) == (None, "result of 102 bytes exceeds 50")
    assert decode_result(b"{not json", 100)[1].startswith("result is not valid JSON")


@pytest.mark.slow
def test_fork_bomb_does_not_fail_honest_neighbours_in_the_same_batch():
    """The process limit was per uid, shared by every sandbox at once: one fork bomb in a batch
    of 7 made the 6 honest solutions fail (they start a thread, as many solutions do to get a
    deeper stack). Each sandbox now counts its own processes."""
    try:
        check_sandbox_available(FAST)
    except SandboxUnavailable as error:
        pytest.skip(f"no local sandbox on this machine: {error}")
    bomb = """
        import os, time
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(60)
            except OSError:
                time.sleep(0.001)
    """
    honest = """
        import sys, threading, time
        time.sleep(1)  # the bomb has filled its process count by now
        threading.stack_size(1 << 26)
        def main():
            print(6 * 7)
        thread = threading.Thread(target=main)
        thread.start()
        thread.join()
    """
    config = CodeVerifierConfig(workers=7, sandbox=SandboxConfig(
        wall_timeout_s=20.0, cpu_time_s=5, memory_bytes=512 << 20, max_processes=8))
    code_verifier = CodeVerifier(config)
    try:
        # The bomb starts first and holds its 8 processes while the neighbours run.
        scores = code_verifier.score_batch([_response(bomb)] + [_response(honest)] * 6, [ANSWER] * 7)
    finally:
        code_verifier.close()
    assert scores == [0.0] + [1.0] * 6
    _assert_no_leftovers()


def test_memory_is_limited_per_sandbox_not_per_process(verifier):
    """3 children x 400 MiB passed a 512 MiB limit (RLIMIT_AS is per process): pid 1 now
    counts the whole namespace. The control, 3 x 100 MiB, runs."""
    code = """
        import os, time
        size = {size} << 20
        read, write = os.pipe()
        for _ in range(3):
            if os.fork() == 0:
                block = bytearray(size)  # zero-filled: every page touched
                os.write(write, b"1")
                time.sleep(2)
                os._exit(0)
        got = b""
        while len(got) < 3:
            got += os.read(read, 3)
        time.sleep(0.5)
        print(42)
    """
    config = SandboxConfig(wall_timeout_s=20.0, cpu_time_s=10, memory_bytes=512 << 20)
    over = run_python(textwrap.dedent(code.replace("{size}", "400")), config=config)
    assert over.status is RunStatus.MEMORY_LIMIT, over
    assert over.reason == f"its processes used more than {512 << 20} bytes"
    under = run_python(textwrap.dedent(code.replace("{size}", "100")), config=config)
    assert under.status is RunStatus.OK and under.stdout == b"42\n", under
    _assert_no_leftovers()


def test_default_limits_bound_one_sandbox_well_below_a_24_GiB_host():
    """The old defaults allowed 32 processes x 1 GiB each (~32 GiB) per sandbox; now 1 GiB
    in total per sandbox, and by default half this machine's cores (at most 16) sandboxes at
    once: on the 2-core CI machine 1 GiB in all, on a 16-core one 8 GiB."""
    import os

    assert SandboxConfig().memory_bytes == 1 << 30
    assert SandboxConfig().max_processes == 16
    cores = len(os.sched_getaffinity(0))
    assert CodeVerifierConfig().pool_size == max(1, min(16, cores // 2))
    assert CodeVerifierConfig(workers=3).pool_size == 3
    assert SandboxConfig().memory_bytes * CodeVerifierConfig().pool_size <= max(1, cores // 2) << 30


def test_host_files_are_not_visible(verifier, tmp_path):
    """A program read a file of the checkout and printed it for reward 1.0; a dataset's
    ground truth on disk could be read the same way. The root is now private."""
    readme_line = (REPO / "README.md").read_text().splitlines()[0]
    dataset = tmp_path / "data" / "ground_truth.txt"
    dataset.parent.mkdir()
    dataset.write_text("the hidden answer\n")
    dataset.parent.chmod(0o755)
    dataset.chmod(0o644)
    for path, truth in ((REPO / "README.md", readme_line), (dataset, "the hidden answer"),
                        (Path("/etc/passwd"), Path("/etc/passwd").read_text().splitlines()[0])):
        code = f"print(open({str(path)!r}).read().splitlines()[0])"
        assert verifier.score(_response(code), {"inputs": [""], "outputs": [truth]}) == 0.0, path
    listing = run_python("import os\nprint(sorted(os.listdir('/')), os.path.exists('/home'), "
                         "os.path.exists('/work'), os.path.exists(os.path.expanduser('~root/.bashrc')))", config=FAST)
    roots, *absent = listing.stdout.decode().rsplit(None, 3)
    assert absent == ["False", "False", "False"], listing
    assert set(eval(roots)) <= {"bin", "dev", "lib", "lib32", "lib64", "proc", "root", "tmp", "usr", "etc"}


def test_sandboxed_processes_are_the_kernels_first_oom_victims(verifier):
    before = Path("/proc/self/oom_score_adj").read_text()
    code = ("import os\nif os.fork() == 0:\n    print(open('/proc/self/oom_score_adj').read().strip())\n"
            "else:\n    os.wait()")
    result = run_python(code, config=FAST)
    assert result.stdout == b"1000\n", result
    assert Path("/proc/self/oom_score_adj").read_text() == before  # never the trainer


def _as_unprivileged_user(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` as the unprivileged test user with the system interpreter, with the
    sandbox module loaded by path as ``sandbox`` (it needs only the standard library)."""
    if os.geteuid() != 0:
        pytest.skip("switching to the unprivileged test user needs root (setpriv)")
    try:
        user = pwd.getpwnam("sbxtest")
    except KeyError:
        pytest.skip("no unprivileged user 'sbxtest' on this machine")
    # The system interpreter has none of the trainer's packages: sandbox.py and the one module
    # of the project it imports (job_signals.py, standard library only) load from their files.
    loader = textwrap.dedent(f"""
        import importlib.util, sys, types
        sys.modules["megatron_prime"] = types.ModuleType("megatron_prime")
        spec = importlib.util.spec_from_file_location("megatron_prime.job_signals", {str(REPO / "megatron_prime/job_signals.py")!r})
        job_signals = importlib.util.module_from_spec(spec)
        sys.modules["megatron_prime.job_signals"] = job_signals
        spec.loader.exec_module(job_signals)
        spec = importlib.util.spec_from_file_location("sandbox", {str(REPO / "megatron_prime/rewards/sandbox.py")!r})
        sandbox = importlib.util.module_from_spec(spec)
        sys.modules["sandbox"] = sandbox
        spec.loader.exec_module(sandbox)
    """)
    command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
               "/usr/bin/python3", "-c", loader + textwrap.dedent(script)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"})


def test_runs_as_a_non_root_user_through_user_namespaces():
    """A non-root user got SandboxUnavailable at the first code prompt; now it gets a sandbox
    of its own user namespace (where the kernel allows them, as here)."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True)
    done = _as_unprivileged_user("""
        sandbox.check_sandbox_available()
        result = sandbox.run_python("import os\\nprint(os.getuid(), open('/proc/self/oom_score_adj').read().strip())")
        print(sandbox.sandbox_mode(), result.status.value, result.stdout.decode().strip())
    """)
    if probe.returncode != 0 and "user namespaces" in done.stderr:
        pytest.skip(f"user namespaces are disabled here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "userns ok 0 1000"


def test_start_up_probe_names_what_is_missing():
    """One line naming the cause, raised before step 1, instead of a crash at the first prompt."""
    with pytest.raises(SandboxUnavailable, match="rewards.code.sandbox.python='/nonexistent/python3' is not an"):
        check_sandbox_available(SandboxConfig(python="/nonexistent/python3"))
    with pytest.raises(SandboxUnavailable, match=r"the sandbox service at http://127.0.0.1:9/ cannot run a test"):
        check_sandbox_available(SandboxConfig(backend="remote", remote_url="http://127.0.0.1:9/", wall_timeout_s=2))
    done = _as_unprivileged_user("""
        import os
        os.environ["PATH"] = "/nonexistent"
        try:
            sandbox.check_sandbox_available()
        except sandbox.SandboxUnavailable as error:
            print(error)
    """)
    assert done.stdout.strip() == "the code sandbox needs util-linux 'unshare' on PATH (apt-get install util-linux)"


class _SandboxService(http.server.BaseHTTPRequestHandler):
    """A tiny SandboxFusion-style service: POST /run_code runs the program in *this* machine's
    local sandbox, so the remote backend is tested by a real round trip."""

    def do_POST(self):  # noqa: N802 (the http.server API)
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/run_code" and request["language"] == "python"
        local = SandboxConfig(wall_timeout_s=request["run_timeout"], memory_bytes=request["memory_limit_MB"] << 20)
        result = run_python(request["code"], request["stdin"], local)
        run_status = "TimeLimitExceeded" if result.status is RunStatus.TIMEOUT else "Finished"
        body = json.dumps({"status": "Success" if result.status is RunStatus.OK else "Failed",
                           "run_result": {"status": run_status, "return_code": result.returncode,
                                          "stdout": result.stdout.decode(errors="replace"),
                                          "stderr": result.stderr}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_remote_backend_round_trip(verifier):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SandboxService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        remote = SandboxConfig(backend="remote", remote_url=url, wall_timeout_s=3.0, memory_bytes=512 << 20)
        check_sandbox_available(remote)
        code_verifier = CodeVerifier(CodeVerifierConfig(sandbox=remote))
        sum_tests = {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"]}
        call_tests = json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]})
        deep = "def add(a, b):\n    v = []\n    for _ in range(5000):\n        v = [v]\n    return v"
        try:
            assert code_verifier.score(_response("a, b = map(int, input().split())\nprint(a + b)"), sum_tests) == 1.0
            assert code_verifier.score(_response("print(3)"), sum_tests) == 0.5
            assert code_verifier.score(_response("class Solution:\n    def add(self, a, b):\n        return a + b"),
                                       call_tests) == 1.0
            assert code_verifier.score(_response(deep), call_tests) == 0.0
            assert code_verifier.score(_response("import time\ntime.sleep(60)"), ANSWER) == 0.0
        finally:
            code_verifier.close()
        timeout = run_python("import time\ntime.sleep(60)", config=remote)
        assert timeout.status is RunStatus.TIMEOUT
        # verl names the endpoint itself: the same service through its full URL.
        full_url = SandboxConfig(backend="remote", remote_url=url + "/run_code/")
        assert run_python("print(input()[::-1])", "olleh", full_url).stdout == b"hello\n"
        # The secret of this process does not travel: the service ran it in its own jail.
        assert run_python("import os\nprint(sorted(os.environ))", config=remote).stdout == b"['HOME', 'LANG', 'PATH']\n"
    finally:
        server.shutdown()
        server.server_close()
    down = run_python("print(42)", config=remote)  # the service is gone: a result, not an exception
    assert down.status is RunStatus.SANDBOX_ERROR and url in down.reason


@pytest.mark.slow
def test_trainer_stops_at_start_naming_the_missing_sandbox(tmp_path):
    """A run with code prompts probes the sandbox before building any model: one line naming
    what is missing, and no run folder, instead of SandboxUnavailable at step 1."""
    from megatron_prime.toy.arithmetic import make_rl_rows, write_jsonl
    from megatron_prime.toy.model import write_toy_model

    model = write_toy_model(tmp_path / "model", num_layers=1)
    code_row = {"prompt": [{"role": "user", "content": "Print 42."}], "ability": "code",
                "reward_model": {"ground_truth": json.dumps(ANSWER), "style": "rule"}, "data_source": "taco"}
    data = write_jsonl([*make_rl_rows(31, seed=3), code_row], tmp_path / "mixed.jsonl")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "megatron_prime.train", f"model.path={model}", f"data.paths=[{data}]",
               f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled", "trainer.device=cpu",
               "rollout.batch.prompts_per_step=4", "rewards.code.sandbox.python=/nonexistent/python3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert "rewards.code.sandbox.python='/nonexistent/python3' is not an executable interpreter" in done.stderr
    assert not run_dir.exists()


def test_each_concurrent_sandbox_leases_a_uid_of_its_own(tmp_path):
    """As root, RLIMIT_NPROC is counted per uid: two sandboxes at once, in this process or in
    another trainer process of the node, must never share one."""
    if sandbox_mode() != "root":
        pytest.skip("the uid pool is used in root mode only")
    from megatron_prime.rewards.sandbox import _UidLease

    pool = SandboxConfig(first_uid=60000, num_uids=3)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from megatron_prime.rewards.sandbox import SandboxConfig, _UidLease
        with _UidLease(SandboxConfig(first_uid=60000, num_uids=3)) as uid:
            print(uid, flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        held_elsewhere = int(holder.stdout.readline())
        with _UidLease(pool) as first, _UidLease(pool) as second:
            assert {first, second, held_elsewhere} == {60000, 60001, 60002}
        with _UidLease(pool) as again:  # released ones are leased again
            assert again != held_elsewhere
    finally:
        holder.kill()
        holder.wait()
