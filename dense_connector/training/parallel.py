"""Work over every record of a dataset, in forked processes: the data check and the exact token lengths.

Both render and tokenise hundreds of thousands of records before the first step (LLaVA-1.5's stage 2 has 665K), which
one process does in minutes. Forked workers inherit the records and the processor without pickling them; each gets
chunks of `CHUNK` consecutive records and returns one result per chunk, in order.
"""

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


CHUNK = 1000
_WORK: tuple | None = None  # (function, work) for the forked workers


def default_workers() -> int:
    """The CPUs of this machine shared by its training processes, at most 16."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, (os.cpu_count() or 1) // local_ranks))


def _run_chunk(start: int, stop: int) -> Any:
    function, work = _WORK
    return function(work, start, stop)


def map_chunks(function: Callable[[Any, int, int], Any], work: Any, count: int, workers: int | None = None) -> list:
    """`function(work, start, stop)` for consecutive chunks of `range(count)`, in `workers` forked processes (default
    `default_workers()`) where there are several chunks and the platform forks; in this process otherwise."""
    global _WORK
    workers = workers or default_workers()
    chunks = [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    if workers < 2 or len(chunks) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [function(work, start, stop) for start, stop in chunks]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a forked Rust tokenizer must not use its threads
    _WORK = (function, work)
    try:
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_run_chunk, *zip(*chunks)))
    finally:
        _WORK = None
