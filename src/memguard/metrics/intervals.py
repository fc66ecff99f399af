"""Binomial rates with their 95% Wilson score intervals (Wilson, "Probable inference, the law of
succession, and statistical inference", JASA 1927; recommended over the Wald interval by Brown,
Cai & DasGupta, "Interval Estimation for a Binomial Proportion", Statistical Science 2001).

Every rate the audit reports (a fraction of generations, of prompts' images, of judged
attributes) is written in one form, `{"rate": k / n, "count": k, "n": n, "ci95": [lo, hi]}`,
so that a reader sees how far each figure can be trusted.

How many generations a rate needs: with n >= 97 both ends of the interval lie within 0.10 of
the observed rate whatever the count (the half-width alone is at most 0.10 from n = 93 on), so
an audit that wants every rate to +-10 points draws at least that many generations per rate and
spreads them over the prompts of that rate: `generations_per_prompt`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


def wilson_interval(count: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion count / n (no continuity correction).
    It holds count / n and lies in [0, 1]; the clipping only undoes rounding."""
    if n <= 0:
        raise ValueError("a binomial interval needs at least one trial")
    if not 0 <= count <= n:
        raise ValueError(f"count {count} is not within 0..{n}")
    p = count / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def binomial_rate(count: int, n: int) -> dict:
    """A reported rate: `{"rate", "count", "n", "ci95"}`."""
    low, high = wilson_interval(count, n)
    return {"rate": count / n, "count": int(count), "n": int(n), "ci95": [low, high]}


def rate_of(flags: Iterable[bool]) -> dict:
    """`binomial_rate` of the true values among `flags` (at least one)."""
    values = [bool(flag) for flag in flags]
    return binomial_rate(sum(values), len(values))


def generations_per_prompt(min_generations_per_rate: int, num_prompts: int) -> int:
    """Generations per prompt so that a rate over `num_prompts` prompts rests on at least
    `min_generations_per_rate` generations."""
    if num_prompts <= 0:
        raise ValueError("no prompts to share the generations")
    return math.ceil(min_generations_per_rate / num_prompts)


def format_rate(rate: dict | None) -> str:
    """'90.0% [82.6%, 94.5%]': the rate and its 95% interval; 'n/a' for None."""
    if rate is None:
        return "n/a"
    low, high = rate["ci95"]
    return f"{rate['rate']:.1%} [{low:.1%}, {high:.1%}]"
