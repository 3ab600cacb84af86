"""Runs inside the sandbox's fresh namespaces; started by ``sandbox.py``, never imported.

``unshare --net --mount --pid --fork --mount-proc`` has already given this process (as root,
pid 1 of its own pid namespace) no network interfaces but loopback-down, a private mount table
and a /proc that shows only its own namespace. Here we finish the jail, then run the untrusted
program *in this process*:

1. private tmpfs over every world-writable folder, so the only writable place is a fresh
   work folder that vanishes with the namespace;
2. resource limits (address space, CPU time, file size = output cap, process count, files);
3. drop root for good: clear groups, set gid/uid to the unprivileged sandbox id, forbid
   regaining privileges (no_new_privs), and die if our parent dies (pid 1 dying takes every
   process of the namespace with it);
4. execute the program: stdin/stdout mode runs it as ``__main__``; call mode calls a named
   function (or ``Solution().<name>``) with JSON arguments and prints the JSON result.

The job arrives as JSON on the file descriptor named in argv[1]. Only the Python standard
library is used, and everything it needs is imported before privileges are dropped.
"""

import ctypes
import json
import os
import resource
import sys
import traceback

_MS_NOSUID, _MS_NODEV = 2, 4
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_SIGKILL = 9
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_RESULT_MARKER = "\n__SANDBOX_CALL_RESULT__"


def _libc_call(libc, name, *args):
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args[:2]} failed: {os.strerror(errno)}")


def _jail(job, libc):
    for folder in _WORLD_WRITABLE:
        if os.path.isdir(folder) and not os.path.islink(folder):
            options = f"size={job['tmpfs_bytes']},mode=1777".encode()
            _libc_call(libc, "mount", b"tmpfs", folder.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options)
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    os.chown(workdir, job["uid"], job["uid"])
    os.chdir(workdir)

    limits = {
        resource.RLIMIT_AS: job["memory_bytes"],
        resource.RLIMIT_CPU: job["cpu_time_s"],
        resource.RLIMIT_FSIZE: job["max_output_bytes"],
        resource.RLIMIT_NPROC: job["max_processes"],
        resource.RLIMIT_NOFILE: 256,
        resource.RLIMIT_CORE: 0,
    }
    for kind, value in limits.items():
        # soft == hard: the CPU limit kills with SIGKILL rather than a catchable SIGXCPU.
        resource.setrlimit(kind, (value, value))

    os.setgroups([])
    os.setresgid(job["uid"], job["uid"], job["uid"])
    os.setresuid(job["uid"], job["uid"], job["uid"])
    _libc_call(libc, "prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc_call(libc, "prctl", _PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)  # cleared by setuid; re-arm
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"})


def _run_call(job, code):
    """Call-based test: never let the program's own prints mix with the result line."""
    real_stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")
    namespace = {"__name__": "__solution__"}
    exec(code, namespace)
    function = namespace.get(job["fn_name"])
    if function is None and "Solution" in namespace:
        function = getattr(namespace["Solution"](), job["fn_name"], None)
    if function is None:
        raise NameError(f"no function or Solution method named {job['fn_name']!r}")
    result = function(*job["args"])
    if isinstance(result, tuple):
        result = list(result)
    sys.stdout = real_stdout
    sys.stdout.write(_RESULT_MARKER + json.dumps(result) + "\n")


def main():
    job_fd = int(sys.argv[1])
    with os.fdopen(job_fd, "r") as job_file:
        job = json.load(job_file)
    libc = ctypes.CDLL(None, use_errno=True)
    _jail(job, libc)
    try:
        code = compile(job["code"], "solution.py", "exec")
        if job["mode"] == "call":
            _run_call(job, code)
        else:
            exec(code, {"__name__": "__main__"})
    except SystemExit as stop:
        _finish(stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1))
    except BaseException:
        traceback.print_exc(limit=5)
        _finish(1)
    _finish(0)


def _finish(status):
    """Flush what the program printed (the flush itself may hit the output cap) and exit
    without running the program's atexit hooks or finalizers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 1
    os._exit(status)


if __name__ == "__main__":
    main()
