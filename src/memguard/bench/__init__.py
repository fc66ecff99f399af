"""`memguard bench`: one evaluation harness for every defense.

A spec (`configs/bench/NAME.yaml`, `memguard.bench.spec`) names arms, seeds, data and audit
settings; `run_bench` trains and audits every arm at every seed in this process, reusing what
is already done (`memguard.bench.reuse`), and writes bench.json, bench.md and bench.html with
the mean of each headline figure over seeds and its spread (`memguard.bench.stats`,
`memguard.bench.page`).
"""

from memguard.bench.runner import run_bench
from memguard.bench.spec import BenchSpec, load_spec

__all__ = ["BenchSpec", "load_spec", "run_bench"]
