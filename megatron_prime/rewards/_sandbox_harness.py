"""Runs inside the sandbox's fresh namespaces; started by ``sandbox.py``, never imported.

``unshare [--user --map-root-user] --net --mount --pid --fork --mount-proc`` has made this
process pid 1 of its own pid namespace, root there (really root, or root of a fresh user
namespace when the trainer is unprivileged), with no network but a downed loopback and a
private mount table. Here we finish the jail and supervise the program:

1. a private root filesystem: a tmpfs holding only read-only binds of the interpreter, its
   standard library and the system shared-library folders, /dev/{null,zero,urandom}, a /proc
   of this pid namespace and a size-capped tmpfs /tmp (the work folder); ``pivot_root`` into
   it and detach the old root, so no path leads back to the host (no checkout, data, home);
2. ``oom_score_adj`` 1000 for this process and everything it starts: under memory pressure
   the kernel kills a sandbox before the trainer;
3. fork the program's process; this one (pid 1) stays root-in-namespace, undumpable (no
   ptrace, no /proc/1/environ), and polls the proportional memory (PSS) of every process in
   the namespace: over ``memory_bytes`` in total, it kills them all. When the program's own
   process exits it kills whatever is left (daemons) and exits with the program's status;
4. the program's process sets its limits (address space, CPU time, file size = output cap,
   processes, files), then gives up every privilege: as real root it switches to the
   sandbox's own uid; in a user namespace (only uid 0 is mapped) it drops every capability
   and locks the securebits so no exec can regain them; then no_new_privs, and it runs the
   code: stdin/stdout mode as ``__main__``, call mode by calling the named function (or
   ``Solution().<name>``) with JSON arguments and printing the JSON result after a marker.

The job arrives as JSON on the file descriptor named in argv[1]. Only the standard library
is used, and everything needed later is imported before the old root is detached.
"""

import ctypes
import glob
import json
import os
import resource
import signal
import sys
import sysconfig
import traceback

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP = 1, 4, 24
_PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 28, 38, 47, 4
# NOROOT | NOROOT_LOCKED | NO_SETUID_FIXUP | NO_SETUID_FIXUP_LOCKED | KEEP_CAPS_LOCKED: uid 0
# in the user namespace gains no capabilities from exec or setuid, ever again.
_LOCKED_SECUREBITS = 0x2F
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203}
_SIGKILL = 9
_RESULT_MARKER = "\n__SANDBOX_CALL_RESULT__"
_NEW_ROOT = "/tmp"  # mount point of the new root's tmpfs in the old tree (this namespace's)
# Verdicts pid 1 writes to the file named by argv[2], which the program's process closes
# before anything runs: a program cannot forge them, whatever it prints or exits with.
VERDICT_MEMORY_LIMIT = "memory_limit"
VERDICT_SETUP_FAILED = "setup_failed"
_POLL_S = 0.01


def _libc_call(libc, name, *args):
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{tuple(a for a in args[:2])} failed: {os.strerror(errno)}")


def _mount(libc, source, target, fstype, flags, data=None):
    _libc_call(libc, "mount", source and source.encode(), target.encode(), fstype and fstype.encode(),
               ctypes.c_ulong(flags), data and data.encode())


def _read_only_flags(path):
    """Flags for remounting a bind read-only: the mount's own nosuid/nodev/noexec/atime flags
    must be kept, because inside a user namespace the kernel refuses to clear locked ones."""
    flag = os.statvfs(path).f_flag
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
    for st_bit, ms_bit in ((4, _MS_NODEV), (8, _MS_NOEXEC), (1024, _MS_NOATIME),
                           (2048, _MS_NODIRATIME), (4096, _MS_RELATIME)):
        if flag & st_bit:
            flags |= ms_bit
    return flags


def _bind(libc, source, root, read_only=True):
    """Bind host ``source`` at the same path under ``root`` (a file onto a file)."""
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(libc, source, target, None, _MS_BIND | _MS_REC)
    if read_only:
        _mount(libc, None, target, None, _read_only_flags(target))


def _visible_paths():
    """What the interpreter needs: its binary, its standard library, shared libraries."""
    paths = {os.path.realpath(sys.executable), os.path.realpath(os.path.dirname(os.__file__))}
    paths.update(os.path.realpath(entry) for entry in sys.path if entry.endswith("lib-dynload"))
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and library:
        paths.add(os.path.realpath(os.path.join(libdir, library)))
    for folder in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/lib32", "/lib32"):
        if os.path.isdir(folder) and not os.path.islink(folder):
            paths.add(folder)
    paths.add("/etc/ld.so.cache")  # the index dlopen uses to find a library's folder
    existing = sorted(path for path in paths if os.path.exists(path))
    # A folder already bound covers what lies inside it.
    binds = [path for path in existing if not any(path.startswith(other + "/") for other in existing)]
    # Installed packages are not the standard library: covered by an empty folder.
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    hidden = glob.glob(stdlib + "/site-packages") + glob.glob("/usr/lib/python3*/*-packages")
    return binds, [path for path in hidden if os.path.isdir(path)]


def _build_root(job, libc):
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    root = _NEW_ROOT
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=16m,mode=0755")
    binds, hidden = _visible_paths()
    for path in binds:
        _bind(libc, path, root)
    for path in hidden:
        _mount(libc, "tmpfs", root + path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=4k,mode=0555")
    for link in ("/lib", "/lib64", "/lib32", "/bin"):  # merged-/usr: keep the symlinks
        if os.path.islink(link):
            os.symlink(os.readlink(link), root + link)
    os.mkdir(root + "/dev", 0o755)
    for device in ("null", "zero", "urandom"):
        open(f"{root}/dev/{device}", "a").close()
        _mount(libc, f"/dev/{device}", f"{root}/dev/{device}", None, _MS_BIND)
    os.mkdir(root + "/proc", 0o555)
    _mount(libc, "proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(root + "/tmp", 0o755)
    os.mkdir(root + "/.old", 0o700)
    machine = os.uname().machine
    if libc.syscall(_SYS_PIVOT_ROOT[machine], root.encode(), (root + "/.old").encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"pivot_root failed: {os.strerror(errno)}")
    os.chdir("/")
    _libc_call(libc, "umount2", b"/.old", _MNT_DETACH)
    os.rmdir("/.old")
    _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={job['tmpfs_bytes']},nr_inodes=4096,mode=1777")
    os.mkdir("/tmp/work", 0o700)
    os.chown("/tmp/work", job["uid"], job["uid"])
    _mount(libc, None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _drop_privileges(job, libc):
    limits = {
        resource.RLIMIT_AS: job["memory_bytes"],
        resource.RLIMIT_CPU: job["cpu_time_s"],
        resource.RLIMIT_FSIZE: job["max_output_bytes"],
        # In a user namespace pid 1 shares the program's uid, so its count includes pid 1.
        resource.RLIMIT_NPROC: job["max_processes"] + (1 if job["uid"] == 0 else 0),
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_MSGQUEUE: 0,  # POSIX message queues hold kernel memory no RSS shows
    }
    for kind, value in limits.items():
        # soft == hard: the CPU limit kills with SIGKILL rather than a catchable SIGXCPU.
        resource.setrlimit(kind, (value, value))
    for capability in range(job["cap_last_cap"] + 1):  # no exec can ever grant one back
        _libc_call(libc, "prctl", _PR_CAPBSET_DROP, capability, 0, 0, 0)
    _libc_call(libc, "prctl", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if job["uid"] != 0:  # real root: the sandbox's own uid (RLIMIT_NPROC counts per uid)
        os.setgroups([])
        os.setresgid(job["uid"], job["uid"], job["uid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])  # clears every capability
    else:  # user namespace: uid 0 is the only uid there; keep it, lose every capability
        _libc_call(libc, "prctl", _PR_SET_SECUREBITS, _LOCKED_SECUREBITS, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    _libc_call(libc, "capset", header, (ctypes.c_uint32 * 6)())
    _libc_call(libc, "prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc_call(libc, "prctl", _PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    os.chdir("/tmp/work")
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": "/tmp/work", "LANG": "C.UTF-8"})


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


def _program(job, libc, verdict_fd):
    os.close(verdict_fd)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _drop_privileges(job, libc)
    try:
        code = compile(job["code"], "solution.py", "exec")
        if job["mode"] == "call":
            _run_call(job, code)
        else:
            exec(code, {"__name__": "__main__"})
    except SystemExit as stop:
        _finish(stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1))
    except BaseException:
        try:
            traceback.print_exc(limit=5)
        except BaseException:  # stderr may be past its size limit
            pass
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
    os._exit(status & 0xFF)


def _namespace_memory():
    """Bytes used by every process of this pid namespace but pid 1: proportional set size
    (shared pages split between their users, so forked copies of the interpreter are not
    counted 16 times), or the resident size where smaps_rollup cannot be read; plus the
    memfd files they hold open, whose pages no process's RSS shows until mapped."""
    total = 0
    memfds = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}").startswith("/memfd:"):
                    info = os.stat(f"/proc/{name}/fd/{fd}")
                    if (info.st_dev, info.st_ino) not in memfds:
                        memfds.add((info.st_dev, info.st_ino))
                        total += info.st_blocks * 512
        except OSError:
            pass
        try:
            with open(f"/proc/{name}/smaps_rollup", "rb") as file:
                for line in file:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            try:
                with open(f"/proc/{name}/statm", "rb") as file:
                    total += int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                pass
    return total


def _supervise(child, job, verdict_fd):
    """Wait for the program's process, reaping orphans; enforce the namespace's memory."""
    status = None
    while status is None:
        signal.sigtimedwait([signal.SIGCHLD], _POLL_S)
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                status = os.waitstatus_to_exitcode(wait_status)
        if status is None and _namespace_memory() > job["memory_bytes"]:
            os.kill(-1, signal.SIGKILL)  # every process of this namespace but pid 1
            os.write(verdict_fd, VERDICT_MEMORY_LIMIT.encode())
            os._exit(137)
    try:
        os.kill(-1, signal.SIGKILL)  # daemons the program left behind
    except ProcessLookupError:
        pass
    os._exit(128 - status if status < 0 else status)


def main():
    job_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(job_fd, "r") as job_file:
        job = json.load(job_file)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            job["cap_last_cap"] = int(file.read())
        _build_root(job, libc)
        with open("/proc/self/oom_score_adj", "w") as file:
            file.write("1000")
        # System V shared memory outlives its processes and shows in no RSS: none at all in
        # this IPC namespace (these sysctls are per IPC namespace; the host's are untouched).
        for name in ("shmmni", "shmall", "shmmax", "msgmni"):
            with open(f"/proc/sys/kernel/{name}", "w") as file:
                file.write("0")
        _libc_call(libc, "prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception as error:  # reported to the host as a sandbox failure, not the program's
        os.write(verdict_fd, f"{VERDICT_SETUP_FAILED} {error}".encode(errors="replace"))
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    child = os.fork()
    if child == 0:
        _program(job, libc, verdict_fd)
    _supervise(child, job, verdict_fd)


if __name__ == "__main__":
    main()
