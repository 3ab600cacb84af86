"""Escape suite: hostile programs run through the sandbox as root and as an unprivileged user
(user namespaces), concurrently with honest neighbours in the same batch.

Each attack prints ``ESCAPED`` if it achieved anything a contained program must not (read a
secret or a host file, reached the network, kept a capability, ...), and the limits ones
must end in the named status. After the batch: the host's canary file is untouched, no
datagram or connection reached the host's listeners, no process of the sandbox is left, and
every honest neighbour printed its answer (it would score 1.0). A mode this machine cannot
run is skipped with the reason, never counted as passed.
"""

import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "sandbox_escape_driver.py"
HARNESS = REPO / "megatron_prime" / "rewards" / "_sandbox_harness.py"
UNPRIVILEGED_USER = "sbxtest"
SECRET = "hunter2-megatron-prime-secret"
HOSTILE = {"wall_timeout_s": 3.0, "cpu_time_s": 3, "memory_bytes": 512 << 20, "max_output_bytes": 1 << 20,
           "max_processes": 16, "tmpfs_bytes": 16 << 20}
HONEST = {"wall_timeout_s": 60.0}  # the machine is busy with bombs: give the neighbours time
MARKER = "\\n__SANDBOX_CALL_RESULT__"
NOT_OK = {"runtime_error", "timeout", "output_limit", "memory_limit"}
ANY = NOT_OK | {"ok"}

# name: (code, allowed statuses, call-mode function name or None)
ATTACKS = {
    "env_secret": ("""
        import os
        found = [v for v in os.environ.values() if "hunter2" in v]
        print("ESCAPED" if found else "clean", found)
    """, ANY, None),
    "proc_environ_all": ("""
        import os
        for pid in os.listdir("/proc"):
            try:
                data = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if b"hunter2" in data:
                print("ESCAPED", pid)
    """, ANY, None),
    "proc_1_environ_and_mem": ("""
        for path in ("/proc/1/environ", "/proc/1/mem", "/proc/1/root/proc/1/environ"):
            try:
                open(path, "rb").read(16)
                print("ESCAPED", path)
            except OSError:
                pass
    """, ANY, None),
    "host_pid_visible": ("""
        import os
        try:
            print("ESCAPED", open("/proc/@HOST_PID@/cmdline").read()[:80])
        except OSError:
            print("clean", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    """, ANY, None),
    "tcp_host_loopback": ("""
        import socket
        try:
            socket.create_connection(("127.0.0.1", @TCP_PORT@), timeout=1).close()
            print("ESCAPED")
        except OSError as error:
            print("clean", error)
    """, ANY, None),
    "tcp_external": ("""
        import socket
        for host, port in (("1.1.1.1", 53), ("8.8.8.8", 443)):
            try:
                socket.create_connection((host, port), timeout=1).close()
                print("ESCAPED", host)
            except OSError:
                pass
    """, ANY, None),
    "udp_host": ("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"ESCAPED", ("127.0.0.1", @UDP_PORT@))
        except OSError as error:
            print("clean", error)
    """, ANY, None),
    "abstract_unix_socket": ("""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect("\\0@ABSTRACT@")
            print("ESCAPED")
        except OSError as error:
            print("clean", error)
    """, ANY, None),
    "raw_socket": ("""
        import socket
        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            print("ESCAPED")
        except OSError as error:
            print("clean", error)
    """, ANY, None),
    "write_canary": ("""
        try:
            open("@CANARY@", "w").write("pwned")
            print("ESCAPED")
        except OSError as error:
            print("clean", error)
    """, ANY, None),
    "delete_canary": ("""
        import os, shutil
        for action in (lambda: os.remove("@CANARY@"), lambda: shutil.rmtree("@CANARY_DIR@")):
            try:
                action()
                print("ESCAPED")
            except OSError:
                pass
    """, ANY, None),
    "write_outside_work_folder": ("""
        for path in ("/escape", "/etc/escape", "/usr/lib/escape", "/root/escape", "/dev/escape", "/proc/escape"):
            try:
                open(path, "w").write("x")
                print("ESCAPED", path)
            except OSError:
                pass
    """, ANY, None),
    "read_checkout_file": ("""
        try:
            print("ESCAPED", open("@README@").read()[:40])
        except OSError as error:
            print("clean", error)
    """, ANY, None),
    "read_etc": ("""
        for path in ("/etc/passwd", "/etc/shadow", "/etc/hostname", "/etc/hosts"):
            try:
                open(path).read()
                print("ESCAPED", path)
            except OSError:
                pass
    """, ANY, None),
    "list_home_and_root": ("""
        import os
        for path in ("/home", "/work", "/root"):
            try:
                names = set(os.listdir(path)) - {".pyenv"}  # the interpreter may live there
            except OSError:
                continue
            if names:
                print("ESCAPED", path, sorted(names)[:5])
    """, ANY, None),
    "read_dataset": ("""
        import glob
        try:
            print("ESCAPED", open("@DATA@").read()[:40])
        except OSError:
            print("clean", glob.glob("/**/ground_truth*", recursive=True))
    """, ANY, None),
    "fork_bomb": ("""
        import os, time
        children = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
            except OSError:
                time.sleep(0.01)
            if children > 64:
                print("ESCAPED", children)
    """, {"timeout", "runtime_error", "memory_limit"}, None),
    "fork_bomb_setsid": ("""
        import os
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()
            except OSError:
                pass
    """, {"timeout", "runtime_error", "memory_limit"}, None),
    "thread_bomb": ("""
        import threading, time
        started = 0
        try:
            while started < 1000:
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
                started += 1
        except RuntimeError:
            pass
        print("ESCAPED" if started > 64 else "clean", started)
        import os; os._exit(0)
    """, ANY, None),
    "memory_bomb": ("""
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))
            if len(blocks) > 16:
                print("ESCAPED", len(blocks))
                break
    """, {"runtime_error", "memory_limit", "timeout"}, None),  # timeout: on a loaded machine
    "memory_split_3x400MiB": ("""
        import os, time
        read, write = os.pipe()
        for _ in range(3):
            if os.fork() == 0:
                block = bytearray(400 << 20)  # zero-filled: every page touched
                os.write(write, b"1")
                time.sleep(3)
                os._exit(0)
        got = b""
        while len(got) < 3:
            got += os.read(read, 3)
        time.sleep(0.5)  # all three hold their 400 MiB now
        print("ESCAPED", len(got))
    """, {"memory_limit", "timeout"}, None),  # timeout: on a loaded machine (both fail it)
    "memfd_hoard": ("""
        import os, time
        for _ in range(12):  # 12 x 60 MiB of memfd pages that no RSS shows
            if os.fork() == 0:
                fds = []
                for i in range(60):
                    fd = os.memfd_create("hoard")
                    os.write(fd, b"x" * (1 << 20))
                    fds.append(fd)
                time.sleep(3)
                os._exit(0)
        time.sleep(2.5)
        print("ESCAPED")
    """, {"memory_limit", "timeout"}, None),
    "busy_loop": ("while True:\n    pass", {"timeout", "runtime_error"}, None),
    "sleep_forever": ("import time\ntime.sleep(3600)", {"timeout"}, None),
    "daemonise": ("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for _ in range(600):
                    time.sleep(0.1)
                    try:
                        open("@CANARY@", "w").write("late")
                    except OSError:
                        pass
            os._exit(0)
        print("parent done")
    """, ANY, None),
    "setsid_double_fork_ignoring_signals": ("""
        import os, signal, time
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    time.sleep(1)
            os._exit(0)
        time.sleep(0.2)
    """, ANY, None),
    "ptrace_pid1": ("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PTRACE_ATTACH = 16
        for pid in (1, @HOST_PID@):
            if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
                print("ESCAPED", pid)
    """, ANY, None),
    "kill_all": ("""
        import os, signal
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        for pid in (1, @HOST_PID@):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        print("sent")
    """, ANY, None),
    "tmpfs_fill": ("""
        import os
        written = 0
        try:
            for i in range(10_000):
                with open(f"fill{i}", "wb") as file:
                    file.write(b"x" * (512 << 10))
                written += 512 << 10
        except OSError:
            pass
        print("ESCAPED" if written > (16 << 20) else "clean", written)
    """, ANY, None),
    "stdout_flood": ("""
        import sys
        chunk = "4" * (1 << 20)
        for _ in range(4096):
            sys.stdout.write(chunk)
    """, {"output_limit", "runtime_error"}, None),
    "stderr_flood": ("""
        import sys
        chunk = "4" * (1 << 20)
        for _ in range(4096):
            sys.stderr.write(chunk)
        print("ESCAPED")
    """, {"runtime_error"}, None),
    "print_then_crash": ("print(42, flush=True)\nraise SystemExit(3)", {"runtime_error"}, None),
    "print_then_kill_self": ("import os, signal\nprint(42, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)",
                             {"runtime_error"}, None),
    "sysv_shared_memory": ("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        IPC_PRIVATE, IPC_CREAT = 0, 0o1000
        if libc.shmget(IPC_PRIVATE, ctypes.c_size_t(64 << 20), IPC_CREAT | 0o600) >= 0:
            print("ESCAPED")
    """, ANY, None),
    "nested_namespace_remount": ("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
        libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
        libc.mount(b"proc", b"/tmp", b"proc", 0, None)
        for path in ("@README@", "/etc/passwd", "/tmp/1/root/etc/passwd", "/tmp/@HOST_PID@"):
            if os.path.exists(path):
                print("ESCAPED", path)
    """, ANY, None),
    "capabilities_or_setuid": ("""
        import os
        status = open("/proc/self/status").read()
        caps = {line.split()[0]: int(line.split()[1], 16) for line in status.splitlines() if line.startswith("Cap")}
        if caps["CapEff:"] or caps["CapPrm:"] or caps["CapBnd:"] or caps["CapAmb:"]:
            print("ESCAPED", caps)
        try:
            os.setuid(0)
            os.setgroups([0])
            print("ESCAPED setgroups")
        except OSError:
            pass
    """, ANY, None),
    "sethostname": ("""
        import socket
        try:
            socket.sethostname("pwned")
            print("ESCAPED")
        except OSError as error:
            print("clean", error)
    """, ANY, None),
    "lower_oom_score": ("""
        try:
            open("/proc/self/oom_score_adj", "w").write("-1000")
        except OSError:
            pass
        value = int(open("/proc/self/oom_score_adj").read())
        print("ESCAPED" if value < 1000 else "clean", value)
    """, ANY, None),
    "fake_marker_deep_nesting": ("""
        import os
        def f():
            os.write(1, b"@MARKER@" + b"[" * 100000 + b"]" * 100000 + b"\\n")
            os._exit(0)
    """, {"runtime_error"}, "f"),
    "fake_marker_garbage": ("""
        import os
        def f():
            os.write(1, b"@MARKER@{not json\\n")
            os._exit(0)
    """, {"runtime_error"}, "f"),
    "fake_marker_then_crash": ("""
        import os
        def f():
            os.write(1, b"@MARKER@42\\n")
            raise ValueError("crash after the forged result")
    """, {"runtime_error"}, "f"),
    "deep_nested_result": ("""
        def f():
            value = []
            for _ in range(900):
                value = [value]
            return value
    """, {"runtime_error"}, "f"),
    "very_deep_nested_result": ("""
        def f():
            value = []
            for _ in range(100000):
                value = [value]
            return value
    """, {"runtime_error"}, "f"),
    "huge_result": ("def f():\n    return 'x' * (3 << 20)", {"runtime_error", "output_limit"}, "f"),
}
HONEST_PROGRAMS = {
    f"honest_{i}": (f"import sys\nn = int(sys.stdin.read())\nprint(sum(range(n)) + {i})", "1000", str(499500 + i))
    for i in range(8)
}


def _substitute(code: str, values: dict[str, str]) -> str:
    code = textwrap.dedent(code).strip() + "\n"
    for key, value in values.items():
        code = code.replace(f"@{key}@", value)
    return code


def _processes_of(uids: set[int]) -> list[str]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uid = int(next(line for line in text.splitlines() if line.startswith("Uid:")).split()[1])
        if uid in uids or str(HARNESS) in cmdline:
            found.append(f"{status.parent.name} uid={uid} {cmdline[:100]}")
    return found


def _run_suite(tmp_root: Path, owner: int | None, command_prefix: list[str], python: str,
               sandbox_uids: set[int]) -> None:
    """Run every attack and honest program in one batch; assert containment and the host."""
    canary_dir = tmp_root / "canary"
    canary_dir.mkdir()
    canary = canary_dir / "canary.txt"
    canary.write_text("canary")
    data = tmp_root / "data" / "ground_truth.json"
    data.parent.mkdir()
    data.write_text(json.dumps({"outputs": ["the answer"]}))
    for path in (canary_dir, canary, data.parent, data):
        path.chmod(0o777 if path.is_dir() else 0o666)
        if owner is not None:  # owned by the user the sandbox runs as: only the jail protects it
            os.chown(path, owner, owner)
    before = (canary.read_text(), canary.stat().st_mtime_ns)
    hostname = socket.gethostname()

    tcp = socket.create_server(("127.0.0.1", 0))
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    abstract_name = f"megatron_prime_escape_{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + abstract_name)
    abstract.listen()
    abstract.setblocking(False)
    values = {"HOST_PID": str(os.getpid()), "TCP_PORT": str(tcp.getsockname()[1]),
              "UDP_PORT": str(udp.getsockname()[1]), "ABSTRACT": abstract_name, "CANARY": str(canary),
              "CANARY_DIR": str(canary_dir), "README": str(REPO / "README.md"), "DATA": str(data),
              "MARKER": MARKER}
    assert (REPO / "README.md").is_file()  # the control: these exist on the host
    jobs = []
    honest = iter(HONEST_PROGRAMS.items())
    for index, (name, (code, _, fn_name)) in enumerate(ATTACKS.items()):
        jobs.append({"name": name, "code": _substitute(code, values), "fn_name": fn_name, "args": [],
                     "config": {**HOSTILE, "python": python}})
        if index % 5 == 0:  # honest neighbours spread through the batch
            honest_name, (honest_code, stdin, _) = next(honest, (None, (None, None, None)))
            if honest_name:
                jobs.append({"name": honest_name, "code": honest_code, "stdin": stdin,
                             "config": {**HONEST, "python": python}})
    jobs_file = tmp_root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    jobs_file.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_root), "WANDB_API_KEY": SECRET, "LANG": "C.UTF-8"}
    try:
        started = time.monotonic()
        finished = subprocess.run([*command_prefix, python, str(DRIVER), str(jobs_file), "8"], env=env,
                                  capture_output=True, timeout=240, cwd=str(tmp_root))
        elapsed = time.monotonic() - started
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
        report = json.loads(finished.stdout)
        results = {result["name"]: result for result in report["results"]}

        assert set(results) == {job["name"] for job in jobs}
        wrong = [(name, results[name]) for name, (_, allowed, _) in ATTACKS.items()
                 if "ESCAPED" in results[name]["stdout"] or results[name]["status"] not in allowed
                 or (results[name]["status"] != "ok" and not results[name]["reason"])]  # failures say why
        assert wrong == [], "\n".join(f"{name}: {result}" for name, result in wrong)
        assert "nested deeper than 100" in results["deep_nested_result"]["reason"]
        for name, (_, _, expected) in HONEST_PROGRAMS.items():
            if name in results:
                assert results[name]["status"] == "ok", (name, results[name])
                assert results[name]["stdout"].strip() == expected, (name, results[name])
        # The host is unchanged and nothing reached it.
        time.sleep(0.5)  # a surviving daemon would write the canary within 0.1 s
        assert (canary.read_text(), canary.stat().st_mtime_ns) == before
        assert data.read_text() == json.dumps({"outputs": ["the answer"]})
        assert socket.gethostname() == hostname
        for listener in (tcp, abstract):
            with pytest.raises(BlockingIOError):
                listener.accept()
        with pytest.raises(BlockingIOError):
            udp.recvfrom(64)
        assert _processes_of(sandbox_uids) == []
        assert int(Path("/proc/self/oom_score_adj").read_text()) <= 0  # the "trainer" untouched
        print(f"{report['mode']}: {len(ATTACKS)} attacks and {len(HONEST_PROGRAMS)} honest programs "
              f"in {elapsed:.1f} s")
    finally:
        for sock in (tcp, udp, abstract):
            sock.close()


@pytest.mark.slow
def test_escapes_contained_as_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip(f"root mode needs root; this test runs as uid {os.geteuid()}")
    sys.path.insert(0, str(REPO))
    from megatron_prime.rewards.sandbox import SandboxConfig

    pool = SandboxConfig()
    uids = set(range(pool.first_uid, pool.first_uid + pool.num_uids))
    _run_suite(tmp_path, None, [], sys.executable, uids)


@pytest.mark.slow
def test_escapes_contained_as_unprivileged_user_in_user_namespaces():
    if os.geteuid() != 0:
        pytest.skip("switching to the unprivileged test user needs root (setpriv)")
    try:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        pytest.skip(f"no unprivileged user {UNPRIVILEGED_USER!r} on this machine")
    python = "/usr/bin/python3"
    as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    probe = subprocess.run([*as_user, "unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork",
                            "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces do not work here: {probe.stderr.decode().strip()}")
    readable = subprocess.run([*as_user, python, "-c", f"open({str(DRIVER)!r}).read()"], capture_output=True)
    if readable.returncode != 0:
        pytest.skip(f"{UNPRIVILEGED_USER} cannot read the checkout: {readable.stderr.decode().strip()[-200:]}")
    tmp_root = Path(tempfile.mkdtemp(prefix="sandbox_escapes_"))
    try:
        tmp_root.chmod(0o755)
        os.chown(tmp_root, user.pw_uid, user.pw_gid)
        _run_suite(tmp_root, user.pw_uid, as_user, python, {user.pw_uid})
    finally:
        subprocess.run(["rm", "-rf", str(tmp_root)], check=False)
