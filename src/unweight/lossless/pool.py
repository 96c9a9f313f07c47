"""One thread pool for the codec: contiguous ranges of work items on up to ``threads`` threads.

The compiled kernels release the GIL (``nogil=True``), so Python threads run them in parallel. The
output never depends on the number of threads: callers give each range its own output (a region of
a buffer, or a partial histogram that they sum).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None


def resolve(threads: int | None) -> int:
    """``threads``, or torch's intra-op thread count when None (every physical core unless set, e.g. by
    ``torch.set_num_threads`` or the CLI's ``--threads``), so one setting governs both."""
    return max(1, threads if threads is not None else torch.get_num_threads())


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < threads:
        _POOL = ThreadPoolExecutor(max_workers=max(threads, os.cpu_count() or 1))
    return _POOL


def run_tasks(tasks, threads: int) -> list:
    """Call each of ``tasks`` (no arguments) on at most ``threads`` threads, in order of submission; returns
    their results in order. A task must not use the pool itself (it would wait on a worker it may be
    holding): tasks run their kernels with one thread. The first task to fail stops the others from
    starting, and its exception is raised here."""
    if threads <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    results, failed = [None] * len(tasks), []
    todo = iter(range(len(tasks)))
    lock = threading.Lock()

    def worker() -> None:
        while not failed:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = tasks[i]()
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                failed.append((i, exc))

    for f in [_pool(threads).submit(worker) for _ in range(min(threads, len(tasks)))]:
        f.result()
    if failed:
        raise min(failed, key=lambda f: f[0])[1]
    return results


def run_ranges(task, n: int, threads: int, per_thread: int = 4, unit: int = 1) -> list[tuple[int, int]]:
    """Call ``task(lo, hi)`` over contiguous ranges covering ``range(n)``: one range on one thread,
    else up to ``per_thread`` ranges per thread (so an uneven range does not leave a thread idle), each
    starting at a multiple of ``unit`` (the decoder's chunks go two by two). Returns the ranges, in order."""
    if threads <= 1 or n <= unit:  # no pool, no lists: small tensors are many, and this is all overhead
        if n > 0:
            task(0, n)
        return [(0, n)] if n > 0 else []
    m = -(-n // unit)
    nranges = min(m, threads * per_thread)  # >= 2, and every range non-empty
    bounds = [min(n, unit * (m * i // nranges)) for i in range(nranges + 1)]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    run_tasks([lambda a=a, b=b: task(a, b) for a, b in ranges], threads)
    return ranges
