"""Shared timing helper of the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_times(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Run the steps interleaved (a, b, a, b, ...) and return each one's median seconds."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
