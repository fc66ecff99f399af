"""Wilson score intervals against scipy, and the sample size behind the audit's +-10 points."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from memguard.metrics.intervals import (
    binomial_rate,
    format_rate,
    generations_per_prompt,
    rate_of,
    wilson_interval,
)


@pytest.mark.parametrize("n", [1, 2, 7, 30, 97, 100, 1000])
def test_wilson_matches_scipy(n: int) -> None:
    for count in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        expected = binomtest(count, n).proportion_ci(0.95, method="wilson")
        low, high = wilson_interval(count, n)
        assert low == pytest.approx(expected.low, abs=1e-12)
        assert high == pytest.approx(expected.high, abs=1e-12)


def _furthest_end(n: int) -> float:
    """The largest distance from the rate to an end of its interval, over every count."""
    ends = [(count / n, *wilson_interval(count, n)) for count in range(n + 1)]
    return max(max(rate - low, high - rate) for rate, low, high in ends)


def test_97_generations_keep_every_rate_within_10_points() -> None:
    assert _furthest_end(97) <= 0.1 < _furthest_end(96)
    assert _furthest_end(100) <= 0.1


def test_generations_per_prompt() -> None:
    assert generations_per_prompt(100, 10) == 10  # 10 duplicated prompts
    assert generations_per_prompt(100, 20) == 5  # 20 ordinary prompts
    assert generations_per_prompt(100, 8) == 13  # 104 generations, not 96
    assert generations_per_prompt(100, 300) == 1
    with pytest.raises(ValueError, match="no prompts"):
        generations_per_prompt(100, 0)


def test_the_reported_form() -> None:
    rate = rate_of([True] * 9 + [False])
    low, high = wilson_interval(9, 10)
    assert rate == {"rate": 0.9, "count": 9, "n": 10, "ci95": [low, high]}
    assert binomial_rate(9, 10) == rate
    assert format_rate(rate) == f"90.0% [{low:.1%}, {high:.1%}]" == "90.0% [59.6%, 98.2%]"
    assert format_rate(None) == "n/a"
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    for count, n in ((1, 0), (-1, 3), (4, 3)):
        with pytest.raises(ValueError):
            wilson_interval(count, n)
