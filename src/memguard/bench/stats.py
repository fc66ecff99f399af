"""Summary statistics of a benchmark grid: each run's figures flattened, and per arm and figure
the mean over seeds with its spread (min-max and a bootstrap 95% interval of the mean).

The interval is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13): the seeds' values
resampled with replacement, 10,000 times from a fixed seed, and the 2.5th and 97.5th
percentiles of the resampled means. With a handful of seeds it is rough, and narrower than the
truth (the resamples cannot leave the observed values' range); with one seed there is none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of nested mappings as {"a.b.c": value}; lists, strings, booleans and
    None are left out (per-generation lists stay in each run's results.json)."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def bootstrap_interval(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (at least two)."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, min, max and the bootstrap interval (None with fewer than two values)."""
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None, "ci_low": None, "ci_high": None}
    low, high = bootstrap_interval(values) if len(values) > 1 else (None, None)
    return {
        "n": len(values),
        "mean": float(np.mean(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "ci_low": low,
        "ci_high": high,
    }


def summary(
    runs: Sequence[Mapping[str, Any]], arms: Sequence[str], keys: Sequence[str]
) -> dict[str, dict[str, dict]]:
    """{arm: {key: summarize(...) and the values by seed}} from run records ('arm', 'seed',
    'figures'); a figure missing from a run is left out of that arm's statistics."""
    table = {}
    for arm in arms:
        table[arm] = {}
        for key in keys:
            values = {
                str(run["seed"]): run["figures"][key]
                for run in runs
                if run["arm"] == arm and key in run["figures"]
            }
            table[arm][key] = {**summarize(list(values.values())), "values": values}
    return table
