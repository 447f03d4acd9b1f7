"""The process's memory allocator: keep freed memory, so each step reuses the last one's pages.

Each call of a jitted XLA program on the CPU allocates its temporary buffer afresh and frees it
on return: about 140 MB for a train step of the reference model. glibc's malloc serves a request
that large with a new `mmap` (from a per-thread arena, whatever `M_MMAP_THRESHOLD` says) and
unmaps it on free, so the kernel zero-fills every page again at its first touch in the next
step: measured here, 35,000 page faults and about 50 ms of system time per train step, a fifth
of the step. One arena that takes all memory from the heap and never gives it back
(`M_ARENA_MAX` 1, `M_MMAP_MAX` 0, `M_TRIM_THRESHOLD` at its maximum) hands the same pages out
again: no faults.

The price is memory: what the process frees stays resident. Compiling a program allocates and
frees hundreds of megabytes, so the heap is kept only from `programs_compiled()` on, once the
train loop has built its programs: a one-epoch run of the reference model then peaks at
0.9-1.2 GiB (the more on a first run, which compiles), against 0.55 with glibc's defaults
throughout (and up to 1.6 when the heap was kept from the start). The train loop also runs
one step at a time, since a step queued behind another allocates its buffer before the running
one frees its own.

A program opts in with `reuse_freed_memory()`, first thing (the scripts do): the arena setting
must come before threads that allocate exist. Those of numpy and jax are created later or do
not allocate, but importing torch starts one that does: call it before `import torch`.
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

_opted_in = False


def is_glibc() -> bool:
    """True on a system whose C library is glibc (Linux, mostly), where `mallopt` exists."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or not glibc
        return False


def _mallopt(param: int, value: int) -> bool:
    return ctypes.CDLL(None).mallopt(param, value) == 1


def reuse_freed_memory() -> bool:
    """Opt this process in: one malloc arena now, freed memory kept once programs are compiled.

    True when it took effect; False (and nothing changes) on other C libraries, or when the
    environment variable `CHARLSTM_JAX_DEFAULT_MALLOC` is `1`.
    """
    global _opted_in
    if os.environ.get(OPT_OUT) == "1" or not is_glibc():
        return False
    _opted_in = _mallopt(M_ARENA_MAX, 1)
    return _opted_in


def programs_compiled() -> bool:
    """Keep freed memory for reuse from now on, when the process opted in; True if so.

    Called by the train loop once its programs are built, so that what compilation freed goes
    back to the system first (`malloc_trim`) instead of staying resident.
    """
    if not _opted_in:
        return False
    ctypes.CDLL(None).malloc_trim(0)
    return _mallopt(M_MMAP_MAX, 0) and _mallopt(M_TRIM_THRESHOLD, INT_MAX)
