"""`memguard` command line: thin over the library; flags are generated from the config classes.

    memguard data shapes --output_dir DIR [--seed S ...]    write the benchmark image folders
    memguard train [--config FILE.yaml] --train_data_dir DIR --output_dir DIR [...]
    memguard sample --model DIR --prompt "..." --num_images N --seed S
    memguard replication --samples_dir DIR --train_data_dir DIR [--output FILE.json]
    memguard attack trigger --model DIR --images FILE_OR_DIR --output_dir DIR [--init ...]
                            [--locality --locality_starts K]
    memguard mitigate --model DIR --method nemo|wanda --prompts FILE --output_dir DIR
    memguard bench configs/bench/NAME.yaml --output_dir DIR [--seeds S.. --arms A.. ...]

`train` runs unchanged under `accelerate launch [--num_processes N] -m memguard train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from memguard.config import (
    AuditConfig,
    ConfigError,
    MitigateConfig,
    SampleConfig,
    ShapesConfig,
    TrainConfig,
    TriggerConfig,
    build,
    load_yaml,
)
from memguard.data.folder import DataError
from memguard.defenses.registry import build_training
from memguard.defenses.registry import flags as defense_flags
from memguard.metrics.intervals import format_rate
from memguard.report.summary import replication_rows, summary_rows, text_lines
from memguard.train.step import TrainingError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, TrainingError)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _add_flag(parser, name: str, annotation, default, help: str, choices=None) -> None:
    """One flag; its value stays a string here and is validated when the config is built."""
    kwargs: dict = {"default": argparse.SUPPRESS, "dest": name}
    text = help + ("" if default is None else f" (default: {default})")
    kwargs["help"] = text.replace("%", "%%")  # argparse formats help with %
    if choices:
        kwargs["choices"] = choices
    if typing.get_origin(annotation) is tuple:
        kwargs["action"] = "append"
    elif annotation is bool:
        kwargs.update(nargs="?", const="true", metavar="true|false")
    parser.add_argument(f"--{name}", **kwargs)


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        _add_flag(
            parser, f.name, hints[f.name], f.default, meta.get("help", ""), meta.get("choices")
        )


def _settings(args: argparse.Namespace, names: set[str]) -> dict:
    """YAML file (if --config) overridden by the flags given on the command line."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


def _source(args: argparse.Namespace) -> str:
    return getattr(args, "config", None) or "command line"


def _config(cls: type, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return build(cls, _settings(args, names), source=_source(args))


def _print(text: str) -> None:
    if _is_main_process():
        print(text, flush=True)


# -------------------------------------------------------------------------------- commands


def cmd_data_shapes(args: argparse.Namespace) -> None:
    from memguard.data.shapes import make_shapes_dataset

    config = _config(ShapesConfig, args)
    root = make_shapes_dataset(config)
    summary = json.loads((root / "dataset.json").read_text())
    counts = summary["counts"]
    _print(
        f"benchmark written to {root}\n"
        f"  train: {counts['train']} images ({counts['train_with_concept']} with "
        f"{summary['concept']} ({summary['concept_kind']}), "
        f"{counts['train_duplicates']} copies of {counts['duplicate_groups']} planted duplicates)\n"
        f"  test: {counts['test']}, concept exemplars: {counts['concept_exemplars']}\n"
        f"  prompts: {root / 'prompts'}\n"
        f"  conditions: {summary['captions']}"
        + (f" (column '{summary['class_column']}')" if "class_column" in summary else "")
    )


def cmd_train(args: argparse.Namespace) -> None:
    from memguard.train.trainer import Trainer

    names = {f.name for f in dataclasses.fields(TrainConfig)} | set(defense_flags())
    config, defenses = build_training(_settings(args, names), source=_source(args))
    result = Trainer(config, defenses).train()
    per_second = result.steps_run / result.loop_seconds if result.loop_seconds else 0.0
    _print(
        f"trained {result.global_step} steps (this run: {result.steps_run} in "
        f"{result.loop_seconds:.0f}s, {per_second:.2f} steps/s), "
        f"final loss {result.final_loss:.4f}\n"
        f"model: {result.output_dir} (diffusers UNet + memguard.json)"
    )


def read_prompts(config: SampleConfig) -> list[str]:
    prompts = list(config.prompt)
    for path in config.prompt_file:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--prompt_file: no such file: {path}")
        prompts += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return prompts


def cmd_sample(args: argparse.Namespace) -> None:
    from memguard.io import load_model
    from memguard.sampling import generate, save_samples

    config = _config(SampleConfig, args)
    given = read_prompts(config)
    model = load_model(config.model, config.device)
    try:  # captions, classes, or the empty prompt of an unconditional model
        prompts = model.conditioning.choose(given, config.class_label)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    images = generate(
        model,
        prompts,
        config.num_images,
        config.seed,
        config.scheduler,
        config.num_inference_steps,
        config.guidance_scale,
        config.batch_size,
    )
    out = save_samples(images, prompts, config.num_images, config.seed, config.output_dir)
    _print(f"{len(images)} images for {len(prompts)} prompts written to {out} (grid: grid.png)")


def cmd_replication(args: argparse.Namespace) -> None:
    from memguard.audit import images01, load_folders, replication_summary, unconditional
    from memguard.io import best_device

    samples, train = load_folders(args.samples_dir, args.train_data_dir)
    from_nothing = not any(train.captions) and not any(samples.captions)
    summary = replication_summary(
        samples, train, images01(samples), args.threshold, device=best_device(args.device),
        kinds=unconditional if from_nothing else None,
    )  # fmt: skip
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"replication (Gu et al., d1/d2 < {summary['threshold']:.3f}, pixel space) of "
        f"{summary['overall']['generations']} generations against "
        f"{summary['num_distinct_train_images']} distinct training images "
        f"({summary['num_train_images']} rows), rates with 95% intervals:",
        *text_lines(replication_rows(summary)),
    ]
    if args.output:
        lines.append(f"written to {args.output}")
    _print("\n".join(lines))


def cmd_attack_trigger(args: argparse.Namespace) -> None:
    from memguard.attacks.locality import summary_lines
    from memguard.attacks.trigger import (
        GENERATIONS_DIR,
        LOCALITY_TRIGGERS_FILE,
        RESULTS_FILE,
        TRIGGERS_FILE,
        run_trigger_attack,
    )

    config = _config(TriggerConfig, args)
    results = run_trigger_attack(config)
    lines = [
        f"DoRI triggers from --init {config.init}, {config.steps} steps: "
        f"{format_rate(results['replicated'])} of {len(results['targets'])} targets recovered"
    ]
    for row in results["targets"]:
        verdict = "recovered" if row["replicated"] else "not recovered"
        lines.append(
            f"  {row['name']}: loss {row['initial_loss']:.4f} -> {row['final_loss']:.4f}, "
            f"{verdict}, steps to replicate: {row['steps_to_replicate']}"
        )
    files = [TRIGGERS_FILE, f"{GENERATIONS_DIR}/", RESULTS_FILE]
    if "locality" in results:
        lines += summary_lines(results["locality"])
        files.insert(1, LOCALITY_TRIGGERS_FILE)
    lines.append(f"written to {config.output_dir}: {', '.join(files)}")
    _print("\n".join(lines))


def cmd_mitigate(args: argparse.Namespace) -> None:
    from memguard.mitigations.pruning import PRUNING_FILE, mitigate

    config = _config(MitigateConfig, args)
    record = mitigate(config)
    lines = [f"{config.method}: {record['num_pruned']} {record['unit']}s pruned in total"]
    for prompt in record["prompts"]:
        lines.append(f"  {prompt['num_pruned']:6d}  {prompt['prompt']}")
    lines.append(f"pruned model: {config.output_dir} (what was pruned: {PRUNING_FILE})")
    _print("\n".join(lines))


def audit_summary(results: dict) -> str:
    """The one-screen summary of an audit (`memguard.report.summary`'s rows, as report.html's
    table holds them); rates with their 95% intervals."""
    lines = [f"audit of {results['model']} ({results['seconds']:.0f}s), rates with 95% intervals"]
    lines += text_lines(summary_rows(results))
    lines += [f"  WARNING: {w}" for w in results["warnings"]]
    return "\n".join(lines)


def cmd_audit(args: argparse.Namespace) -> None:
    from memguard.audit import REPORT_FILE, RESULTS_FILE, run_audit

    config = _config(AuditConfig, args)
    results = run_audit(config)
    output = Path(config.output_dir)
    _print(
        audit_summary(results)
        + f"\nresults: {output / RESULTS_FILE}\nreport: {output / REPORT_FILE}"
    )


def cmd_report(args: argparse.Namespace) -> None:
    from memguard.audit import load_results
    from memguard.report.html import render_report

    out = render_report(load_results(args.results), args.output)
    _print(f"report: {out}")


def cmd_compare(args: argparse.Namespace) -> None:
    from memguard.audit import load_results
    from memguard.report.html import comparison_table, render_comparison

    names = args.names.split(",") if args.names else [Path(r).parent.name for r in args.results]
    if len(names) != len(args.results):
        raise ConfigError(f"--names: {len(names)} names for {len(args.results)} results")
    runs = {name: load_results(path) for name, path in zip(names, args.results, strict=True)}
    out = render_comparison(runs, args.output)
    table = comparison_table(runs)
    width = max(len(m) for m in table)
    columns = [max(len(n), *(len(vs[i]) for vs in table.values())) for i, n in enumerate(names)]
    lines = [" " * width + "".join(f"  {n:>{c}}" for n, c in zip(names, columns, strict=True))]
    lines += [
        m.ljust(width) + "".join(f"  {v:>{c}}" for v, c in zip(vs, columns, strict=True))
        for m, vs in table.items()
    ]
    _print("\n".join(lines) + f"\ncomparison: {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from memguard.bench import load_spec, run_bench

    spec = load_spec(args.spec).select(args.arms, args.seeds, args.data_seed)
    bench = run_bench(spec, args.output_dir, args.device, audit=not args.no_audit)
    runs, outputs = bench["runs"], bench["outputs"]
    trained = sum(run["train"] not in ("reused", "refused") for run in runs)
    refused = sum(run["train"] == "refused" for run in runs)
    audited = sum(run["audit"] == "audited" for run in runs)
    counts = (
        f"runs: {len(runs)} ({trained} trained, resumed or mitigated, {refused} refused, "
        f"{audited} audited, the rest reused)"
    )
    paths = "\n".join(f"{name}: {path}" for name, path in outputs.items())
    _print(f"{Path(outputs['bench.md']).read_text()}\n{counts}\n{paths}")


# ---------------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="memguard", description="Train diffusion models that do not reproduce their data."
    )
    commands = root.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build benchmark data")
    kinds = data.add_subparsers(dest="kind", required=True)
    shapes = kinds.add_parser("shapes", help="the procedural shapes benchmark with ground truth")
    _add_config_flags(shapes, ShapesConfig)
    shapes.add_argument("--config", help="YAML file with the same keys")
    shapes.set_defaults(run=cmd_data_shapes)

    train = commands.add_parser("train", help="train or fine-tune a text-conditional UNet")
    _add_config_flags(train, TrainConfig)
    for flag in defense_flags().values():
        _add_flag(train, flag.name, flag.annotation, flag.default, flag.help, flag.choices)
    train.add_argument("--config", help="YAML file with the same keys; flags override it")
    train.set_defaults(run=cmd_train)

    sample = commands.add_parser("sample", help="generate images from prompts")
    _add_config_flags(sample, SampleConfig)
    sample.add_argument("--config", help="YAML file with the same keys")
    sample.set_defaults(run=cmd_sample)

    audit = commands.add_parser(
        "audit", help="what a model reproduces, beside its quality (results.json)"
    )
    _add_config_flags(audit, AuditConfig)
    audit.add_argument("--config", help="YAML file with the same keys")
    audit.set_defaults(run=cmd_audit)

    report = commands.add_parser("report", help="(re)build report.html from a results.json")
    report.add_argument("results", help="results.json, or the audit folder holding it")
    report.add_argument("--output", default="report.html", help="the HTML file to write")
    report.set_defaults(run=cmd_report)

    compare = commands.add_parser("compare", help="several audits side by side")
    compare.add_argument("results", nargs="+", help="results.json files (or audit folders)")
    compare.add_argument("--names", help="comma-separated column names (default: folder names)")
    compare.add_argument("--output", default="compare.html", help="the HTML file to write")
    compare.set_defaults(run=cmd_compare)

    replication = commands.add_parser(
        "replication", help="how many generations replicate a training image (Gu et al.)"
    )
    replication.add_argument("--samples_dir", required=True, help="image folder of generations")
    replication.add_argument("--train_data_dir", required=True, help="the training image folder")
    replication.add_argument("--threshold", type=float, default=1 / 3, help="d1/d2 threshold")
    replication.add_argument("--output", help="write the full results as JSON here")
    replication.add_argument(
        "--device", help="torch device of the search (default: cuda when present, else cpu)"
    )
    replication.set_defaults(run=cmd_replication)

    attack = commands.add_parser("attack", help="try to get training images out of a model")
    attacks = attack.add_subparsers(dest="kind", required=True)
    trigger = attacks.add_parser(
        "trigger", help="DoRI: optimize the conditioning until the model generates a target"
    )
    _add_config_flags(trigger, TriggerConfig)
    trigger.add_argument("--config", help="YAML file with the same keys")
    trigger.set_defaults(run=cmd_attack_trigger)

    mitigation = commands.add_parser(
        "mitigate", help="prune what makes memorized prompts replicate (NeMo, Wanda)"
    )
    _add_config_flags(mitigation, MitigateConfig)
    mitigation.add_argument("--config", help="YAML file with the same keys")
    mitigation.set_defaults(run=cmd_mitigate)

    bench = commands.add_parser(
        "bench", help="train and audit every arm at every seed of a spec; tables and charts"
    )
    bench.add_argument("spec", help="the spec, e.g. configs/bench/projection.yaml")
    bench.add_argument("--output_dir", required=True, help="runs, logs and the bench.* pages")
    bench.add_argument("--device", help="torch device of the audits (default: cuda if present)")
    bench.add_argument(
        "--no_audit", action="store_true", help="train the grid only; a later call audits it"
    )
    bench.add_argument("--seeds", nargs="+", type=int, help="these seeds instead of the spec's")
    bench.add_argument(
        "--data_seed", type=int, help="build every run's data with this seed (default: its own)"
    )
    bench.add_argument("--arms", nargs="+", help="only these arms of the spec")
    bench.set_defaults(run=cmd_bench)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"memguard: error: {error}", file=sys.stderr)
        sys.exit(2)
