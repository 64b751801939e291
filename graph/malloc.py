"""Keep glibc's allocator from handing a training step's large tensors back to the kernel.

Every GNN step allocates and frees the same whole-graph tensors: the layer-0 embedding, each
propagated layer and their gradients, ``[U + I, d]`` float32 each (94,150 × 64 × 4 bytes =
24 MB on the built-in graph; 48 MB at ``--dim 128``). glibc serves an allocation above its
``mmap`` threshold with a fresh ``mmap`` and returns it with ``munmap`` when it is freed, so its
pages are faulted in, and zeroed by the kernel, again at every step. glibc raises the threshold
to the size of a freed block, which keeps the 24 MB tensors in the heap after the first step,
but only up to 32 MB (``DEFAULT_MMAP_THRESHOLD_MAX``): at 128 dimensions every tensor was a
fresh ``mmap``, and that took about half of each epoch (``python bench/train_bench.py --dim 128
--malloc both``: 109 against 58 s per epoch with two 1-core workers, 68 against 38 s with one
2-core worker, the same loss; docs/EXPERIMENTS.md, "glibc's allocator").

:func:`retain_freed_memory` raises the ``mmap`` threshold past those sizes and the trim
threshold with it, so freed blocks stay in the process and the next step reuses them: what
glibc already does at 64 dimensions (where the same bench measures no difference), now at any
width. The price is memory: at 128 dimensions a worker's peak resident memory is 2.6-2.7 GB
instead of 1.2-1.3 GB (at 64 it is 1.3-1.4 GB either way).
``TrainConfig(retain_freed_memory=False)`` leaves glibc's defaults. Other C libraries (musl)
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
