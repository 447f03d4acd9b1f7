"""The process's memory allocator: keep freed memory, so each step reuses the last one's pages.

Each call of a jitted XLA program on the CPU allocates its temporary buffer afresh and frees it
on return: about 100 MB for a train step of the reference model. glibc's malloc serves a request
that large with a new `mmap` (from a per-thread arena, whatever `M_MMAP_THRESHOLD` says) and
unmaps it on free, so the kernel zero-fills every page again at its first touch in the next
step: measured here, 24,000 page faults and about 50 ms of system time per train step, 10% of
the step. One arena that takes all memory from the heap and never gives it back (`M_ARENA_MAX`
1, `M_MMAP_MAX` 0, `M_TRIM_THRESHOLD` at its maximum) hands the same pages out again: no faults.
The price is memory: what the process freed stays resident, so a one-epoch run of the
reference model peaks at 0.8-1.2 GiB instead of 0.6 (the train loop runs one step at a time,
since a queued step allocates its buffer before the running one frees its own).

The scripts call `reuse_freed_memory()` first thing. It must run before threads that allocate
exist: those of numpy and jax are created later or do not allocate, but importing torch starts
one that does, so in a program that also uses torch call it before `import torch`.
"""

import ctypes
import os

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
INT_MAX = 2**31 - 1

# Set to 1 to keep the allocator's defaults (benchmarks compare both).
OPT_OUT = "CHARLSTM_JAX_DEFAULT_MALLOC"


def is_glibc() -> bool:
    """True on a system whose C library is glibc (Linux, mostly), where `mallopt` exists."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or not glibc
        return False


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True when the settings took effect.

    Does nothing (and returns False) on other C libraries, or when the environment variable
    `CHARLSTM_JAX_DEFAULT_MALLOC` is `1`.
    """
    if os.environ.get(OPT_OUT) == "1" or not is_glibc():
        return False
    libc = ctypes.CDLL(None)
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, INT_MAX))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
