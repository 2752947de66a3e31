"""Memory the ONNX backend hands back to the system (Linux with glibc; elsewhere every call is a no-op).

* **Mapped pages nothing reads** (:func:`release`, :func:`paging_out`).  onnxruntime maps a graph's external
  data file into the process.  When MatMulNBits prepacks a weight on x86 it copies the block scales and zero
  points into the packed buffer as well, but reports them as not packed, so the original tensors stay mapped
  and their pages resident for the session's life although the kernels read the packed copy: 134 MiB at
  full size (``docs/memory.md``).  They are clean, read-only file pages.  ``madvise(MADV_PAGEOUT)`` drops
  them from the resident set and any later read faults them back in from the file, so results cannot
  change, only the resident set does.  PAGEOUT (not DONTNEED) never discards data: were an address reused
  by another mapping between reading /proc/self/maps and the call, its pages would at worst go to swap.
* **A freed session's heap** (:func:`trim_heap`): glibc keeps freed chunks in the process until trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

MADV_PAGEOUT = 21  # Linux 5.4+; older kernels answer EINVAL and nothing changes


@functools.cache
def _libc():
    """The C library with ``madvise`` typed, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _mappings(paths: set[str]) -> list[tuple[int, int]]:
    """(start, end) of every mapping of one of ``paths`` in /proc/self/maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in paths:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            spans.append((start, end))
    return spans


def release(files) -> int:
    """Page out this process's mappings of ``files`` (paths); returns how many mappings were advised."""
    libc = _libc()
    if libc is None:
        return 0
    spans = _mappings({os.path.realpath(f) for f in files})
    return sum(libc.madvise(start, end - start, MADV_PAGEOUT) == 0 for start, end in spans)


@contextmanager
def paging_out(files, interval_s: float = 0.02):
    """Page out ``files``' mappings every ``interval_s`` while the block runs, and once after it.

    For a session's creation: onnxruntime releases the GIL while it loads and prepacks, and the scales it has
    copied into a packed buffer would otherwise stay resident until the session is complete (the creation's
    peak: +134 MiB at full size).  A page it has not read yet is not resident, so nothing is paged out ahead
    of it; one it reads again is faulted back in from the file."""
    files = list(files)
    if _libc() is None:
        yield
        return
    done = threading.Event()

    def watch():
        while not done.wait(interval_s):
            release(files)

    watcher = threading.Thread(target=watch, name="smoledge-page-out", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        release(files)


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); False where there is none.

    A freed session's packed weights are free heap chunks: glibc keeps them in the process (reused by the next
    allocations, but resident meanwhile) unless they are trimmed."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None  # glibc only (not musl)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
