"""Handing freed host memory back to the operating system."""

from __future__ import annotations

import ctypes
import gc


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
