"""One thread pool for the codec: contiguous ranges of work items on up to ``threads`` threads.

The compiled kernels release the GIL (``nogil=True``), so Python threads run them in parallel. The
output never depends on the number of threads: callers give each range its own output (a region of
a buffer, or a partial histogram that they sum).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None


def resolve(threads: int | None) -> int:
    """``threads``, or torch's intra-op thread count when None (every physical core unless set, e.g. by
    ``torch.set_num_threads`` or the CLI's ``--threads``), so one setting governs both."""
    return max(1, threads if threads is not None else torch.get_num_threads())


def run_ranges(task, n: int, threads: int, per_thread: int = 4) -> list[tuple[int, int]]:
    """Call ``task(lo, hi)`` over contiguous ranges covering ``range(n)``: one range on one thread,
    else up to ``per_thread`` ranges per thread (so an uneven range does not leave a thread idle).
    Returns the ranges, in order."""
    global _POOL
    if threads <= 1 or n <= 1:  # no pool, no lists: small tensors are many, and this is all overhead
        if n > 0:
            task(0, n)
        return [(0, n)] if n > 0 else []
    nranges = min(n, threads * per_thread)  # >= 2, and every range non-empty
    bounds = [n * i // nranges for i in range(nranges + 1)]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if _POOL is None or _POOL._max_workers < threads:
        _POOL = ThreadPoolExecutor(max_workers=max(threads, os.cpu_count() or 1))
    for f in [_POOL.submit(task, a, b) for a, b in ranges]:
        f.result()
    return ranges
