"""Exact chunked nearest-neighbour search: peak memory and time as the training set grows.

Runs `memguard.metrics.neighbors.nearest_neighbors` (k = 2, the Gu criterion's query) for
10,000 queries of dimension 768 against training sets of 12,500 ... 100,000 vectors, each size
in a fresh process so that its peak resident memory (ru_maxrss) is its own. Writes JSON.

    python benchmarks/nn_search.py --output runs/nn_search.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(train_size: int, queries: int, dim: int, k: int) -> dict:
    from memguard.metrics.neighbors import nearest_neighbors

    generator = torch.Generator().manual_seed(0)
    train = torch.randn(train_size, dim, generator=generator)
    query = torch.randn(queries, dim, generator=generator)
    data_mb = (train.numel() + query.numel()) * 4 / 2**20
    start = time.perf_counter()
    nearest_neighbors(query, train, k=k)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    return {
        "train_size": train_size,
        "queries": queries,
        "dim": dim,
        "k": k,
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
        "input_tensors_mb": data_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="12500,25000,50000,100000")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--output", default="runs/nn_search.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.queries, args.dim, args.k)))
        return
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        child = [sys.executable, __file__, "--one", str(size), "--queries", str(args.queries)]
        child += ["--dim", str(args.dim), "--k", str(args.k)]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "benchmark": "exact chunked nearest-neighbour search (memguard.metrics.neighbors)",
        "threads": torch.get_num_threads(),
        "runs": runs,
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }
    from memguard.io import write_json  # here, not at the top: the children measured stay lean

    write_json(args.output, result)


if __name__ == "__main__":
    main()
