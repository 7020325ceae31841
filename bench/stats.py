"""Percentiles of latency samples, as the report shows them (milliseconds)."""

from __future__ import annotations

import math


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest sample with at least `fraction` of the samples
    at or below it (no interpolation, so p99 of few samples is an observed value)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summary(samples: list[float]) -> dict[str, float]:
    """p50, p99 and the mean of latency samples in seconds, as milliseconds, and their count.
    Negative samples (clock reads on two cores can cross by a microsecond) count as 1 us, so
    every figure stays positive."""
    cleaned = [max(value, 1e-6) for value in samples]
    return {
        "count": len(cleaned),
        "p50_ms": percentile(cleaned, 0.50) * 1000,
        "p99_ms": percentile(cleaned, 0.99) * 1000,
        "mean_ms": sum(cleaned) / len(cleaned) * 1000,
    }
