"""Measurements shared by the benchmarks (`bench/`) and the tests that check their claims: peak tensor memory of a
call and best-of-rounds timing of several calls, interleaved.

They live in the package so that a test and a benchmark import the very same measurement (`from
dense_connector.measurement import peak_bytes`) rather than copies that could drift apart.
"""

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a clock read afterwards includes it (nothing to wait for on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str, threads: int) -> Callable[[], float]:
    """The timer to use. A single CPU thread is timed by its CPU time: a machine shared with other jobs stretches
    wall time by unpredictable amounts but not the CPU time this process spends on its own (deterministic) work.
    With several threads or on a GPU: wall time, synchronised."""
    if device == "cpu" and threads == 1:
        return time.process_time

    def wall() -> float:
        synchronize(device)
        return time.perf_counter()

    return wall


def interleaved_times(functions: dict[str, Callable[[], object]], reps: int, now: Callable[[], float]) -> dict:
    """Best time of each function over `reps` rounds (A, B, C, A, B, C, ...) run after one warm-up round.

    Interleaving makes a slow phase of a shared machine hit every contender alike; the minimum is the run least
    disturbed by other processes (what `timeit` reports), as the work itself is deterministic."""
    times = {name: [] for name in functions}
    for round_index in range(reps + 1):
        for name, function in functions.items():
            start = now()
            function()
            if round_index:
                times[name].append(now() - start)
    return {name: min(values) for name, values in times.items()}


def peak_bytes(function: Callable[[], object], device: str) -> int:
    """Peak bytes held by tensors allocated while `function` runs (weights and inputs made before are not counted).

    CPU: torch's profiler records every allocation and free of the CPU allocator (size and time); the peak of their
    running sum is the exact high-water mark of tensor memory, free of the noise of RSS and of the Python heap.
    CUDA: the caching allocator's own peak counter, relative to what was allocated before.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def mib(num_bytes: float) -> str:
    """A byte count as MiB, for tables."""
    return f"{num_bytes / 2**20:,.1f} MiB"
