"""The grid runner: every arm at every seed trained and audited in this process (or reused, see
`memguard.bench.reuse`), then `bench.json`, `bench.md` and `bench.html` from their figures.

Under `output_dir`:

    data/seed-S/                 the benchmark for data seed S (train/, test/, ...), and
                                 train-drop-<hash>/ for each drop_where rule used
    runs/ARM/seed-S/             the model folder (checkpoints, memguard.json, bench_run.json;
                                 a mitigation arm's: the pruned model and pruning.json)
    runs/ARM/seed-S/audit/       results.json, report.html, samples/
    logs/ARM-seed-S.log          what the run printed (appended on every invocation)
    bench.json, bench.md, bench.html

Runs go seed by seed, every arm at a seed before the next seed, so a grid stopped early has
comparable arms; within a seed in the spec's order, so an arm's `from` is there before it. One
progress bar counts runs (an arm at a seed: its training and its audit); the trainer's bar is
off and the run's output goes to its log.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from memguard.audit import load_results, run_audit
from memguard.audit_plugins.shapes import ShapesBenchmark
from memguard.bench.data import benchmark_data, drop_rows
from memguard.bench.page import markdown, render_html
from memguard.bench.reuse import (
    REUSE,
    TRAIN,
    audit_reusable,
    begin_mitigation,
    begin_training,
    mitigation_reusable,
    model_sha256,
    plan_training,
)
from memguard.bench.spec import Arm, BenchSpec, load_spec
from memguard.bench.stats import LEVEL, RESAMPLES, flatten, summary
from memguard.config import ConfigError
from memguard.data.folder import fingerprint, read_metadata
from memguard.io import METADATA_FILE, best_device, write_json
from memguard.mitigations.pruning import mitigate
from memguard.train.trainer import Trainer

BENCH_JSON, BENCH_MD, BENCH_HTML = "bench.json", "bench.md", "bench.html"
MITIGATION_TIME_FILE = "bench_mitigation.json"  # in a mitigation arm's folder: its seconds


@contextlib.contextmanager
def captured(log: Path) -> Iterator[None]:
    """stdout and stderr appended to `log`; if the block raises, its traceback goes there too
    and the terminal is told where to look."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (
            open(log, "a") as stream,
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
        ):
            try:
                yield
            except BaseException:
                traceback.print_exc(file=stream)
                raise
    except Exception:
        tqdm.write(f"memguard bench: a run failed; what it printed is in {log}", file=sys.stderr)
        raise


def source_sha256(spec: BenchSpec, arm: Arm, seed: int, run_dir: Path) -> str:
    """The model_sha256 of the model an arm starts from; a ConfigError (the run is recorded as
    refused) when that arm has no finished model at this seed."""
    source = spec.source_dir(arm, seed, run_dir)
    if not (source / METADATA_FILE).is_file():
        raise ConfigError(
            f"from: arm {arm.source!r} has no finished model at seed {seed} ({source}): it was "
            "refused, or stopped"
        )
    return model_sha256(source)


def train_arm(spec: BenchSpec, arm: Arm, seed: int, data: Path, run_dir: Path, bar: tqdm) -> str:
    """Train (or reuse, or resume) an arm that trains; what was done."""
    train_dir = data / "train"
    if arm.drop_where:
        train_dir = drop_rows(train_dir, arm.drop_where)
    config, defenses = spec.train_config(arm, seed, data, train_dir, run_dir)
    records = read_metadata(train_dir, config.image_column, config.captions_read)
    data_sha256 = fingerprint(records)
    source = source_sha256(spec, arm, seed, run_dir) if arm.source else None
    plan = plan_training(config, defenses, data_sha256, source)
    print(f"training: {plan}")
    if plan == TRAIN:
        begin_training(config, defenses, data_sha256, source)
    if plan != REUSE:
        bar.set_postfix_str(f"{arm.name}, seed {seed}: training")
        Trainer(config, defenses, progress=False).train()
    return plan


def mitigate_arm(
    spec: BenchSpec, arm: Arm, seed: int, data: Path, run_dir: Path, device: str, bar: tqdm
) -> str:
    """Apply (or reuse) a mitigation arm's `memguard mitigate` to its source arm's model; what
    was done (its seconds go to the folder, for `arm_seconds`)."""
    config = spec.mitigate_config(arm, seed, data, run_dir, device)
    source = source_sha256(spec, arm, seed, run_dir)
    if mitigation_reusable(config, source):
        print("mitigation: reused")
        return REUSE
    begin_mitigation(config, source)
    bar.set_postfix_str(f"{arm.name}, seed {seed}: {config.method}")
    start = time.perf_counter()
    mitigate(config)
    seconds = time.perf_counter() - start
    write_json(run_dir / MITIGATION_TIME_FILE, {"mitigate_seconds": seconds})
    print(f"mitigation: {config.method} in {seconds:.0f} s")
    return "mitigated"


def run_one(
    spec: BenchSpec,
    arm: Arm,
    seed: int,
    data: Path,
    output: Path,
    device: str,
    bar: tqdm,
    audit: bool = True,
) -> dict[str, Any]:
    """Train or mitigate (or reuse) and audit (or reuse; not at all without `audit`) one arm at
    one seed; its record for bench.json."""
    run_dir = spec.run_dir(output, arm.name, seed)
    audit_config = spec.audit_config(run_dir, data, run_dir / "audit", device)
    log = output / "logs" / f"{arm.name}-seed-{seed}.log"
    with captured(log):
        # a line of its own: a killed run may have left half of one
        print(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.path}: {arm.name}, seed {seed}")
        if arm.mitigate:
            plan = mitigate_arm(spec, arm, seed, data, run_dir, device, bar)
        else:
            plan = train_arm(spec, arm, seed, data, run_dir, bar)
        metadata = json.loads((run_dir / METADATA_FILE).read_text())
        judge = spec.judge_spec(metadata["config"]["resolution"])
        reused = audit_reusable(audit_config, judge, metadata)
        state = "reused" if reused else "audited" if audit else "skipped"
        print(f"audit: {state}")
        if reused:
            results = load_results(audit_config.output_dir)
        elif audit:
            bar.set_postfix_str(f"{arm.name}, seed {seed}: audit")
            results = run_audit(audit_config, ShapesBenchmark(judge))
        else:
            results = {}
    figures = flatten(results) | arm_seconds(arm, run_dir, metadata)
    return {
        "arm": arm.name,
        "seed": seed,
        "data_seed": spec.data_seed_of(seed),
        "settings": arm.settings,
        "train_config": metadata["config"],
        "train": plan,
        "audit": state,
        "train_seconds": figures.get("train_seconds"),
        "model_dir": str(run_dir),
        "audit_dir": audit_config.output_dir,
        "log": str(log),
        "figures": figures,
    }


def arm_seconds(arm: Arm, run_dir: Path, metadata: dict[str, Any]) -> dict[str, float]:
    """What the arm's model cost: its training's seconds, or its mitigation's (not the seconds
    of the model it prunes, which its memguard.json carries over)."""
    if arm.mitigate:
        timing = run_dir / MITIGATION_TIME_FILE
        return json.loads(timing.read_text()) if timing.is_file() else {}
    seconds = metadata.get("train_seconds")
    return {} if seconds is None else {"train_seconds": float(seconds)}


def refused_run(
    spec: BenchSpec, arm: Arm, seed: int, output: Path, refusal: ConfigError
) -> dict[str, Any]:
    """The record of a run that stopped with a configuration error before it trained (a
    projection whose footprint or detector cannot guard this concept, say): no figures, and
    why, in bench.json and bench.md; the grid goes on."""
    return {
        "arm": arm.name,
        "seed": seed,
        "data_seed": spec.data_seed_of(seed),
        "settings": arm.settings,
        "train": "refused",
        "audit": "skipped",
        "refused": str(refusal),
        "train_seconds": None,
        "model_dir": str(spec.run_dir(output, arm.name, seed)),
        "log": str(output / "logs" / f"{arm.name}-seed-{seed}.log"),
        "figures": {},
    }


def run_bench(
    spec: BenchSpec | str | Path,
    output_dir: str | Path,
    device: str | None = None,
    progress: bool = True,
    audit: bool = True,
) -> dict[str, Any]:
    """Train and audit every arm x seed of `spec` (or of the spec file it names) under
    `output_dir`, reusing finished runs; write bench.json, bench.md and bench.html there and
    return bench.json's content.

    `device`: the audits' torch device (default: cuda when present); training uses
    accelerate's. `progress`: show the one progress bar over the grid. `audit=False` trains
    the grid only (to audit later, or elsewhere: a later call reuses the trained models).
    """
    if not isinstance(spec, BenchSpec):
        spec = load_spec(spec)
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    device = str(best_device(device))
    runs = []
    total = len(spec.arms) * len(spec.seeds)
    with tqdm(total=total, unit="run", desc=spec.path.stem, disable=not progress) as bar:
        for seed in spec.seeds:
            data_seed = spec.data_seed_of(seed)
            bar.set_postfix_str(f"data, seed {data_seed}")
            root = output / "data" / f"seed-{data_seed}"
            data = benchmark_data(spec.shapes_config(data_seed, root))
            for arm in spec.arms:
                try:
                    runs.append(run_one(spec, arm, seed, data, output, device, bar, audit))
                except ConfigError as refusal:  # a defense that refuses this data or setting
                    runs.append(refused_run(spec, arm, seed, output, refusal))
                bar.update()
    paths = {name: str(output / name) for name in (BENCH_JSON, BENCH_MD, BENCH_HTML)}
    bench = {
        "name": spec.path.stem,
        "spec": str(spec.path.resolve()),
        "device": device,
        "seeds": list(spec.seeds),
        "data_seed": spec.data_seed,
        "base": spec.base,
        "data": spec.data,
        "audit": spec.audit,
        "judge": spec.judge,
        "figures": [asdict(figure) for figure in spec.figures],
        "bootstrap_resamples": RESAMPLES,
        "bootstrap_level": LEVEL,
        "summary": summary(runs, [arm.name for arm in spec.arms], [f.key for f in spec.figures]),
        "runs": runs,
        "outputs": {**paths, "logs": str(output / "logs")},
    }
    write_json(paths[BENCH_JSON], bench)
    Path(paths[BENCH_MD]).write_text(markdown(bench))
    render_html(bench, paths[BENCH_HTML])
    return bench
