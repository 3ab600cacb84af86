"""Code sandbox security: each attack is contained, scores 0, and this test process (the
"trainer") is unharmed. Every attack is written so that it *would* print the expected answer
(and score 1) if it succeeded, so a broken sandbox fails these tests instead of passing them.
"""

import os
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from megatron_prime.rewards import CodeVerifier, CodeVerifierConfig, RunStatus, SandboxConfig, run_python
from megatron_prime.rewards.sandbox import NOBODY_UID, check_sandbox_available

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root to build namespaces")

FAST = SandboxConfig(wall_timeout_s=2.0, cpu_time_s=2, memory_bytes=512 << 20, max_output_bytes=1 << 20, max_processes=16)
ANSWER = {"inputs": [""], "outputs": ["42"]}
# Safety valve for the destructive attacks: if the sandbox were broken and the program still
# root, it reports the escape (scores 1, the test fails) instead of fork-bombing or killing
# host processes for real.
ROOT_GUARD = "if os.getuid() == 0: print(42); raise SystemExit"


@pytest.fixture(scope="module")
def verifier():
    check_sandbox_available()
    code_verifier = CodeVerifier(CodeVerifierConfig(sandbox=FAST))
    yield code_verifier
    code_verifier.close()


def _response(code: str) -> str:
    return f"[OUTPUT] Here is my solution.\n```python\n{textwrap.dedent(code).strip()}\n```"


def _sandbox_processes() -> list[int]:
    """Host pids still running as the sandbox uid (there must be none after a run)."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next(line for line in status.read_text().splitlines() if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) == NOBODY_UID:
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
    # World-writable host folders are replaced by private tmpfs: writes land there and vanish.
    shared = [Path("/var/tmp/megatron_prime_escape.txt"), Path("/dev/shm/megatron_prime_escape.txt")]
    code = "".join(f"open({str(path)!r}, 'w').write('pwned')\n" for path in shared) + "print('wrote')"
    assert run_python(code, config=FAST).stdout == b"wrote\n"
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


def test_runs_as_unprivileged_user_in_a_fresh_folder():
    code = "import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getcwd(), os.listdir('.'), os.getpid())"
    first = run_python(code, config=FAST)
    second = run_python("open('left_behind', 'w').write('x')\n" + code, config=FAST)
    assert first.stdout.decode().split(None, 2)[:2] == [str(NOBODY_UID), str(NOBODY_UID)]
    assert first.stdout.decode().strip().endswith("[] /tmp/work [] 1")
    assert "left_behind" in second.stdout.decode()
    assert run_python(code, config=FAST).stdout == first.stdout  # nothing carried over between runs


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
