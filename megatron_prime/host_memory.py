"""Handing freed host memory back to the operating system."""

from __future__ import annotations

import ctypes
import gc
import os


def return_freed_memory(collect_garbage: bool = True) -> None:
    """Collects garbage (unless told not to), then asks glibc to release its free heap pages.

    glibc keeps freed blocks below its mmap threshold in the heap for reuse, so a process
    that frees one large working set and then allocates a different one (a converter moving
    from layer to layer, an engine that moved its weights elsewhere) would keep every freed
    set resident. A no-op where libc is not glibc.
    """
    if collect_garbage:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


SHARED_MEMORY_DIR = "/dev/shm"


def check_shared_memory_space(nbytes: int, purpose: str) -> None:
    """Refuses, with the numbers, to put ``nbytes`` into /dev/shm when they do not fit: writing
    past a full tmpfs kills the writing process with SIGBUS instead of raising."""
    stat = os.statvfs(SHARED_MEMORY_DIR)
    free = stat.f_bavail * stat.f_frsize
    if free < nbytes:
        raise RuntimeError(f"{purpose} needs {nbytes / 2**20:.0f} MiB in {SHARED_MEMORY_DIR}, but "
                           f"only {free / 2**20:.0f} MiB are free (containers: raise --shm-size; "
                           f"or lower rollout.bridge.bucket_bytes)")
