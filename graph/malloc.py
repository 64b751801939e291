"""Keep glibc's allocator from handing a training step's large tensors back to the kernel.

Every GNN step allocates and frees the same whole-graph tensors: the layer-0 embedding, each
propagated layer and their gradients, ``[U + I, d]`` float32 each (94,150 × 64 × 4 bytes =
24 MB on the built-in graph; 48 MB at ``--dim 128``). glibc serves an allocation above its
``mmap`` threshold with a fresh ``mmap`` and returns it with ``munmap`` when it is freed; that
threshold adapts upwards only to 32 MB (``DEFAULT_MMAP_THRESHOLD_MAX``), and memory freed at the
top of the heap is returned to the kernel above the trim threshold. So every step re-faults its
tensors' pages, and the kernel zeroes every page again: at 128 dimensions, where each tensor is
above 32 MB, that was more than half of a step (``bench/train_bench.py``; docs/EXPERIMENTS.md,
"glibc's allocator").

:func:`retain_freed_memory` raises both thresholds, so freed blocks stay in the process and the
next step reuses them. The process's resident memory then stays at its peak instead of rising
and falling with each step. ``TrainConfig(retain_freed_memory=False)`` leaves glibc's defaults
(to compare, or where a worker's memory must shrink between steps). Other C libraries (musl)
and other allocators (jemalloc, tcmalloc via ``LD_PRELOAD``) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest value mallopt takes (an int). Allocations below it come from the heap.
RETAIN_BYTES = 2**31 - 1
# The largest mmap threshold older glibc releases accept (HEAP_MAX_SIZE / 2; 2.36 takes more).
OLD_GLIBC_MAX = 32 * 2**20


def retain_freed_memory(threshold: int = RETAIN_BYTES) -> int:
    """Raise glibc's ``mmap`` and trim thresholds to ``threshold`` bytes in this process.

    Older glibc releases refuse an ``mmap`` threshold above 32 MB (half their largest
    arena heap); there the threshold becomes 32 MB, which still keeps tensors below it (the
    built-in graph's at 64 dimensions) in the process.

    Returns:
        The ``mmap`` threshold now in force, in bytes; 0 when nothing was changed (not glibc:
        musl has no ``mallopt``).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return 0
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return 0
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for value in (min(int(threshold), RETAIN_BYTES), min(int(threshold), OLD_GLIBC_MAX)):
        if mallopt(M_MMAP_THRESHOLD, value):
            mallopt(M_TRIM_THRESHOLD, RETAIN_BYTES)
            return value
    return 0
